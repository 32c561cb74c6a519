"""seedrand reproduce: every reproduction's --quick run from the command line writes its JSON (seeds, paper,
verdict and its measures), report and plot; bad names and seed counts are errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seedrand.errors import SeedrandError
from seedrand.reproduce import REPRODUCTIONS, reproduce

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(REPRODUCTIONS))
def test_quick_reproduction_from_the_command_line(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "seedrand.cli", "reproduce", name, "--quick", "--seeds", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["seeds"] == 2 and data["verdict"] in ("reproduced", "partly", "contradicts") and data["paper"]
    assert (tmp_path / f"{name}.png").stat().st_size > 0 and data["verdict"] in (tmp_path / f"{name}.md").read_text()


def test_shrinknets_records_width_and_revivals_per_lambda_and_seed(tmp_path):
    data = reproduce("shrinknets", tmp_path, seeds=2, quick=True)["shrinknets"]
    assert set(data["final_width"]) == set(data["revived_units"]) == {"0.01", "0.1"}
    assert all(len(w) == 2 and all(1 <= v <= 64 for v in w) for w in data["final_width"].values())
    assert all(r == [0, 0] for r in data["revived_units"].values())  # a gate at theta <= 0 stays dead
    assert set(data["claims"]) == set(data["paper"]["claims"])


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SeedrandError, match="no reproduction named 'nope'; choose one of shrinknets"):
        reproduce("nope", tmp_path)
    with pytest.raises(SeedrandError, match="--seeds must be at least 1"):
        reproduce("shrinknets", tmp_path, seeds=0)
