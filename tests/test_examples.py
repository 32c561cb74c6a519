"""The experiment scripts in `examples/` run end to end (`--quick`) and write their tables."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("script,table,rows", [
    ("grow_sine.py", "grow_sine.md", ["static 100", "static 500", "adaptive"]),
    ("ensemble_digits.py", "ensemble_digits.md", ["FC", "Share-Conv-0.9", "Share-Conv-0.6", "Share-Conv-0.3", "Full"]),
])
def test_experiment_scripts_write_their_tables(tmp_path, script, table, rows):
    subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True, timeout=300)
    text = (tmp_path / table).read_text()
    for row in rows:
        assert f"| {row} |" in text
