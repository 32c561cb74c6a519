"""The ``seedrand`` command line: ``seedrand inspect POLICY --model MODULE:FACTORY [--json]``,
``seedrand export POLICY --model MODULE:FACTORY --out FILE.onnx [--weights seed|materialize]`` and
``seedrand intrinsic-dimension --task MODULE:FACTORY --dims 10,100,... [--out DIR]`` and
``seedrand demo [--quick] [--part N] [--out DIR]``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from .errors import SeedrandError

__all__ = ["main"]


def _import(spec: str, option: str, example: str):
    """The callable ``MODULE:FACTORY`` names (a command-line option the user gave: importing it is what they ask).

    Raises:
        SeedrandError: malformed spec, the module fails to import (any exception, syntax errors included), or it has
            no such attribute (names the callables it has).
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not attr or not module_name:
        raise SeedrandError(f"{option} takes MODULE:FACTORY, a module you can import and a function in it that "
                            f"returns the model (e.g. {example}, or path/to/models.py:make), got {spec!r}")
    try:
        module = _module(module_name)
    except FileNotFoundError:
        raise SeedrandError(f"{option} {spec}: no Python file {module_name} (paths are relative to the folder "
                            "seedrand runs in)") from None
    except ModuleNotFoundError as e:
        hint = ""
        if e.name == module_name.partition(".")[0]:
            hint = (f"; run seedrand from the folder that holds {module_name.replace('.', '/')}.py, or pass "
                    f"path/to/{module_name.rpartition('.')[2]}.py:{attr}")
        raise SeedrandError(f"{option} {spec}: importing {module_name} failed: {_one_line(e)}{hint}") from e
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything at import
        raise SeedrandError(f"{option} {spec}: importing {module_name} failed: {_one_line(e)}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                      and getattr(v, "__module__", None) == module.__name__)
        raise SeedrandError(f"{option} {spec}: {module_name} has no factory {attr!r}; it has: "
                            f"{', '.join(have) or 'no functions or classes of its own'}")
    return factory


def _module(name: str):
    """The module ``name`` (a dotted module, importable from the working folder too) or the Python file at path
    ``name`` (``models.py``, ``path/to/models.py``), imported as a module named after the file."""
    if not name.endswith(".py"):
        sys.path.insert(0, ".")  # so `examples.models:make` works from the repository root
        return importlib.import_module(name)
    path = Path(name).resolve()
    if not path.is_file():
        raise FileNotFoundError(name)
    sys.path.insert(0, str(path.parent))  # the file's own imports of its neighbours
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _one_line(e: BaseException) -> str:
    message = str(e).strip().splitlines()
    return f"{type(e).__name__}: {message[0]}" if message else type(e).__name__


def _call(factory, spec: str, option: str):
    try:
        return factory()
    except SeedrandError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise SeedrandError(f"{option} {spec}: the factory raised {_one_line(e)}") from e


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)  # pipes get whole names, unfolded


def _load_factory(spec: str):
    import torch.nn as nn

    built = _call(_import(spec, "--model", "seedrand.zoo:gpt2"), spec, "--model")
    model, inputs = built if isinstance(built, tuple) else (built, None)
    if not isinstance(model, nn.Module):
        raise SeedrandError(f"{spec} returned {type(model).__name__}, not an nn.Module (or (module, inputs))")
    return model, inputs


def _inspect(args: argparse.Namespace) -> int:
    from . import rewrite, summary

    model, inputs = _load_factory(args.model)
    report = summary(rewrite(model, args.policy, inputs))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _console().print(report)
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import rewrite
    from .export import export_onnx

    model, inputs = _load_factory(args.model)
    if inputs is None:
        raise SeedrandError(f"{args.model} must return (module, example_inputs): export needs example inputs")
    if not Path(args.out).resolve().parent.is_dir():
        raise SeedrandError(f"--out {args.out}: folder {Path(args.out).parent} does not exist")
    report = export_onnx(rewrite(model, args.policy, inputs), inputs, args.out, weights=args.weights)
    print(f"wrote {report.path}: {report.bytes:,} bytes (weights={report.weights}, opset {report.opset})")
    if report.note:
        print(f"note: {report.note}")
    return 0


def _intrinsic_dimension(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .intrinsic import intrinsic_dimension

    try:
        dims = [int(d) for d in args.dims.split(",")]
    except ValueError:
        raise SeedrandError(f"--dims takes comma-separated integers, got {args.dims!r}") from None
    task = _call(_import(args.task, "--task", "seedrand.zoo:digits_task"), args.task, "--task")
    result = intrinsic_dimension(task, dims, args.threshold, args.projection, args.seed, args.out)
    table = Table(title=f"intrinsic dimension ({args.projection}); direct training: {result.baseline:.4f}")
    for col in ("d", "score", "of direct"):
        table.add_column(col, justify="right")
    for d, score in zip(result.dims, result.scores):
        table.add_row(str(d), f"{score:.4f}", f"{score / result.baseline:.1%}")
    console = _console()
    console.print(table)
    name = f"d{round(100 * result.threshold)}"
    console.print(f"{name} = {result.d_threshold}" if result.d_threshold else f"{name}: not reached; try larger dims")
    if result.csv_path:
        console.print(f"wrote {result.csv_path} and {result.plot_path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.markdown import Markdown

    from .demo import run_demo

    results = run_demo(args.out, args.quick, args.part, args.policies)
    console = _console()
    console.print(Markdown((Path(args.out) / "results.md").read_text()))
    console.print(f"wrote results.json, results.md and plots to {args.out}/ in {results['settings']['seconds']:.0f} s")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from rich.markdown import Markdown

    from .reproduce import reproduce

    results = reproduce(args.name, args.out, args.seeds, args.quick)
    console = _console()
    for name in results:
        console.print(Markdown((Path(args.out) / f"{name}.md").read_text()))
    console.print(f"wrote {', '.join(f'{n}.json/.md/.png' for n in results)} to {args.out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``seedrand`` console script. Returns the exit code: 0 on success, 2 on bad input (one
    line on stderr; ``--debug`` raises instead, with the traceback), 1 on an internal error."""
    parser = argparse.ArgumentParser(prog="seedrand", description="Apply seed-regenerated-weight policies to "
                                     "PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="rewrite a model with a policy and show what it changed")
    p.add_argument("policy", help="YAML policy file")
    p.add_argument("--model", required=True, help="MODULE:FACTORY returning a module or (module, example_inputs), "
                   "e.g. seedrand.zoo:gpt2")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("export", help="rewrite a model with a policy and export it to ONNX")
    p.add_argument("policy", help="YAML policy file")
    p.add_argument("--model", required=True, help="MODULE:FACTORY returning (module, example_inputs)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--weights", default="seed", choices=["seed", "materialize"],
                   help="seed: regenerate random weights inside the graph; materialize: store them")
    p.set_defaults(run=_export)
    p = sub.add_parser("intrinsic-dimension", help="sweep subspace dimensions d and report d90 (Li et al. 2018)")
    p.add_argument("--task", default="seedrand.zoo:digits_task", help="MODULE:FACTORY returning a "
                   "seedrand.intrinsic.Task (default: an MLP on scikit-learn digits)")
    p.add_argument("--dims", default="10,25,50,100,200,400,800", help="comma-separated subspace dimensions")
    p.add_argument("--threshold", type=float, default=0.9, help="fraction of the direct-training score")
    p.add_argument("--projection", default="fastfood", choices=["gaussian", "orthogonal", "sparse", "very_sparse",
                                                                 "fastfood"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for intrinsic_dimension.csv and intrinsic_dimension.png")
    p.set_defaults(run=_intrinsic_dimension)
    p = sub.add_parser("demo", help="every part of seedrand on scikit-learn's digits: freeze fraction, random layers, "
                       "ShrinkNets, subspace, compile and ONNX (1-3 minutes on 2 CPU cores)")
    p.add_argument("--out", default="seedrand-demo", help="directory for results.json, results.md and the plots")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every part in under a minute")
    p.add_argument("--part", type=int, action="append", help="run only this part (1-5; repeatable)")
    p.add_argument("--policies", help="directory of the demo's policy files (default: examples/policies of the "
                   "source checkout)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("reproduce", help="a paper's experiment on bundled data, several seeds, its figures beside "
                       "ours and a verdict (shrinknets, or all)")
    p.add_argument("name", help="which reproduction: shrinknets, or all")
    p.add_argument("--out", default="examples/results/reproduce", help="directory for NAME.json, NAME.md, NAME.png")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every output in seconds")
    p.set_defaults(run=_reproduce)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for command in sub.choices.values():  # also after the command: `seedrand inspect ... --debug`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SeedrandError as e:
        if args.debug:
            raise
        print(f"seedrand: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug, not bad input: one line, the traceback on request
        if args.debug:
            raise
        print(f"seedrand: internal error: {_one_line(e)} (run with --debug for the traceback, and please report "
              "it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
