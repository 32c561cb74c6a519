"""The ``seedrand`` command line: ``seedrand inspect POLICY --model MODULE:FACTORY [--json]``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch.nn as nn
from rich.console import Console

from .errors import SeedrandError

__all__ = ["main"]


def _load_factory(spec: str):
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SeedrandError(f"--model takes MODULE:FACTORY (e.g. seedrand.zoo:gpt2), got {spec!r}")
    sys.path.insert(0, ".")  # so `examples.models:make` works from the repository root
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SeedrandError(f"cannot load model factory {spec!r}: {e}") from None
    built = factory()
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
        Console(width=None if sys.stdout.isatty() else 160).print(report)  # pipes get whole names, unfolded
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``seedrand`` console script. Returns the exit code: 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="seedrand", description="Apply seed-regenerated-weight policies to "
                                     "PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="rewrite a model with a policy and show what it changed")
    p.add_argument("policy", help="YAML policy file")
    p.add_argument("--model", required=True, help="MODULE:FACTORY returning a module or (module, example_inputs), "
                   "e.g. seedrand.zoo:gpt2")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SeedrandError as e:
        print(f"seedrand: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
