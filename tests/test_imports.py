"""The package's import structure: no module-level import cycle (a static check of every ``import`` run at import
time), every module importable alone, and ``import seedrand`` (with a rewrite) without the optional extras."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seedrand"
OPTIONAL = ("onnx", "onnxscript", "onnxruntime", "transformers", "matplotlib", "sklearn", "peft")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(name: str, path: Path, modules: dict[str, Path], lazy: bool) -> set[str]:
    """The package modules ``name`` imports, with the packages above each target (their ``__init__`` runs first):
    at import time (module-level statements, not ``if TYPE_CHECKING``), and with ``lazy`` in function bodies too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for statement in ast.parse(path.read_text()).body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        nested = lazy or isinstance(statement, (ast.If, ast.Try))
        for node in ast.walk(statement) if nested else [statement]:
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
    closed = {".".join(t.split(".")[:i + 1]) for t in targets for i in range(t.count(".") + 1)}
    return {t for t in closed if t in modules and t != name and not name.startswith(f"{t}.")}


@pytest.mark.parametrize("lazy", [False, True], ids=["import time", "with function-level imports"])
def test_imports_form_no_cycle(lazy):
    """No cycle among the modules, at import time nor counting the imports functions make when they run: the
    layers (kernels, policy, rewriter helpers, passes, driver, garbage collection, API) only import downwards."""
    modules = _modules()
    graph = {name: _targets(name, path, modules, lazy) for name, path in modules.items()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert "seedrand.rewriter.rewrite" in graph and graph["seedrand.garbage"]  # the check saw real imports


def test_every_module_imports_alone():
    """Each module imported first, in a fresh child (forked after torch, the shared heavy import)."""
    names = sorted(n for n in _modules() if n != "seedrand.__main__")
    script = textwrap.dedent(f"""
        import importlib, os, sys, torch
        failed = []
        for name in {names!r}:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException as e:
                    print(name, type(e).__name__, e, flush=True)
                    os._exit(1)
                os._exit(0)
            if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
                failed.append(name)
        print("FAILED", failed)
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_import_and_rewrite_without_the_optional_extras(tmp_path):
    """With onnx, onnxscript, onnxruntime, transformers, matplotlib, scikit-learn and peft hidden, ``import
    seedrand`` and a rewrite work, and a feature that needs one names the extra to install."""
    script = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL!r}:  # as if not installed: find_spec gives None, import raises ModuleNotFoundError
            sys.modules[name] = None
        import torch, seedrand
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        policy = {{"version": 1, "rules": [{{"match": {{"types": ["Linear"]}}, "random": {{}}}}]}}
        out = seedrand.rewrite(model, policy, (torch.randn(2, 4),))(torch.randn(3, 4))
        assert out.shape == (3, 2)
        try:
            seedrand.export_onnx(model, (torch.randn(2, 4),), "m.onnx")
        except seedrand.SeedrandError as e:
            print("refused:", e)
        assert all(sys.modules[m] is None for m in sys.modules if m.partition(".")[0] in {OPTIONAL!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pip install 'seedrand[onnx]'" in result.stdout
