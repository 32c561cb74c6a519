"""``seedrand reproduce NAME``: the papers' experiments, each in its own module, following its paper's set-up as
closely as the bundled data allow (and saying where and why it departs), over several seeds, with the paper's
figures or claims beside ours and a verdict: ``reproduced``, ``partly`` or ``contradicts``.

A reproduction module has ``run(out, seeds, quick) -> dict`` (JSON-ready, with at least ``seeds``, ``paper`` and
``verdict``; it writes its plot to ``out``) and ``markdown(results) -> str``; :data:`REPRODUCTIONS` registers it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from ..errors import SeedrandError
from . import shrinknets

__all__ = ["REPRODUCTIONS", "reproduce"]

REPRODUCTIONS: dict[str, ModuleType] = {"shrinknets": shrinknets}


def reproduce(name: str, out: str | Path = "examples/results/reproduce", seeds: int = 3,
              quick: bool = False) -> dict[str, dict]:
    """Run reproduction ``name`` (or ``"all"``) and write ``NAME.json``, ``NAME.md`` and ``NAME.png`` to ``out``.

    Args:
        name: a key of :data:`REPRODUCTIONS`, or ``"all"``.
        out: output directory (created).
        seeds: how many seeds each arm runs (at least 1).
        quick: tiny sizes, every output in seconds (what the tests run).

    Returns:
        Per reproduction run, its results (the JSON written).

    Raises:
        SeedrandError: an unknown name, fewer than 1 seed, or a missing optional dependency (names the extra).
    """
    names = list(REPRODUCTIONS) if name == "all" else [name]
    unknown = [n for n in names if n not in REPRODUCTIONS]
    if unknown:
        raise SeedrandError(f"no reproduction named {unknown[0]!r}; choose one of {', '.join(REPRODUCTIONS)} or all")
    if seeds < 1:
        raise SeedrandError(f"--seeds must be at least 1, not {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in names:
        module = REPRODUCTIONS[n]
        results[n] = module.run(out, seeds=seeds, quick=quick)
        (out / f"{n}.json").write_text(json.dumps(results[n], indent=2))
        (out / f"{n}.md").write_text(module.markdown(results[n]))
    return results
