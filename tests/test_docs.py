"""A newcomer's first hour: the README's first screen and its example, the documentation site (built in strict
mode), figures in the docs that match what the code prints, and a CLI that helps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seedrand
import seedrand.zoo

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_first_screen_says_what_how_and_set_up():
    first = "\n".join(README.splitlines()[:40])
    assert "```python" in first and "from transformers import" in first and "seedrand.rewrite(" in first
    assert first.count("python -m venv .venv") == 2 and "python -m pytest" in first and "seedrand demo" in first
    assert "paper 00" not in README and "shared/seeds" not in README


def test_readme_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    result = run("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "weights regenerated, none stored" in result.stdout and (tmp_path / "gpt2-random-mlp.safetensors").exists()


def test_extending_example_runs(tmp_path):
    """README "Extending seedrand": a user's layer class gets random, freeze_fraction, filter_gates and garbage
    collection by one register_layer call, and a custom op's channels go once register_channel_rule names it."""
    section = README[README.index("## Extending seedrand"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = run("-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Net RandomLinear", "{'a': 24, 'a_gate': 24} (8, 8) 8"]
    unregistered = run("-c", code.replace("seedrand.register_channel_rule(", "print("), cwd=tmp_path)
    assert unregistered.stdout.splitlines()[-1] == "{} (32, 8) 32"  # the custom op is a barrier without its rule


def test_documentation_site_builds_in_strict_mode(tmp_path):
    """MkDocs with the API reference generated from the docstrings; any warning (a broken link, a docstring griffe
    cannot parse) fails the build."""
    result = run("-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "seedrand.rewrite" in api and "CheckpointError" in api
    for page in ["actions/freeze_fraction", "garbage-collection", "checkpoints", "papers", "own-model", "extending"]:
        assert (tmp_path / "site" / page / "index.html").exists(), page


def test_quick_start_sizes_in_the_docs_are_what_it_prints():
    out = run("examples/quickstart.py").stdout
    printed = {k: int(v.replace(",", "")) for k, v in re.findall(r"^(seed|materialize): ([\d,]+) bytes", out, re.M)}
    assert printed.keys() == {"seed", "materialize"}
    for source in (ROOT / "examples" / "quickstart.py", ROOT / "docs" / "getting-started.md"):
        claimed = dict(re.findall(r"(seed|materialize): ([\d,]+) bytes", source.read_text()))
        for mode, size in printed.items():  # within 1%: exporter versions move a few bytes
            assert abs(int(claimed[mode].replace(",", "")) - size) <= size / 100, (source.name, mode, size)


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom seedrand.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    result = run("-c", code)
    assert "usage: seedrand" in result.stdout and result.stdout.strip().endswith("no torch"), result.stderr
    assert run("-c", "import sys, seedrand; print('torch' in sys.modules)").stdout.strip() == "False"


FACTORY = """\
import torch


def make():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), (torch.randn(2, 4),)
"""


def test_factories_from_files_and_helpful_errors(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mymodels.py").write_text(FACTORY)
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - match: {modules: ['0']}\n    random: {}\n")
    ok = run("-m", "seedrand.cli", "inspect", str(policy), "--model", "models/mymodels.py:make", "--json",
             cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert '"regenerated": 32' in ok.stdout
    cases = [("mymodels:make", "run seedrand from the folder that holds mymodels.py, or pass path/to/mymodels.py:make"),
             ("mymodels.py:make", "no Python file mymodels.py"),
             ("models/mymodels.py:build", "has no factory 'build'; it has: make"),
             ("mymodels", "takes MODULE:FACTORY")]
    for spec, words in cases:
        result = run("-m", "seedrand.cli", "inspect", str(policy), "--model", spec, cwd=tmp_path)
        assert result.returncode == 2 and words in result.stderr, result.stderr


def test_inspect_rows_count_inserted_layers_and_peft_share():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    policy = {"version": 1, "rules": [
        {"match": {"modules": ["0"]}, "insert_random": {"count": 2, "residual": True, "scale": "scalar"}},
        {"match": {"modules": ["2"]}, "filter_gates": {}}]}
    report = seedrand.summary(seedrand.rewrite(model, policy, torch.randn(2, 16)))
    rows = {r.module: r.counts for r in report.rows}
    assert rows["0"].regenerated == 2 * 32 * 32 == report.total.regenerated  # the inserted layers, on their row
    assert rows["0"].trainable == 16 * 32 + 32 + 2  # the layer and the two trainable scales
    assert rows["2"].trainable == 32 * 4 + 4 + 4  # the layer and its gate
    assert report.unaccounted_trainable == 0
    stored = sum(p.numel() for p in model.parameters()) + 2 + 4
    assert report.stored_parameters == stored
    assert report.peft_trainable_share == pytest.approx(report.total.trainable / stored)
    assert report.trainable_share == pytest.approx(report.total.trainable / (stored + report.total.regenerated))
    assert "PEFT's figure" in str(report)


def test_export_says_when_seed_mode_is_the_larger_file(tmp_path):
    small = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    gm = seedrand.rewrite(small, {"version": 1, "rules": [{"match": {"modules": ["0"]}, "random": {}}]}, x)
    seed = seedrand.export_onnx(gm, x, tmp_path / "s.onnx", weights="seed")
    materialized = seedrand.export_onnx(gm, x, tmp_path / "m.onnx", weights="materialize")
    assert seed.bytes > materialized.bytes  # 64 regenerated weights: the Philox graph costs more than they do
    assert seed.regenerated_bytes == 8 * 8 * 4 and "weights='materialize' gives a smaller file" in seed.note
    assert materialized.note == ""


def test_reproduction_figures_are_the_committed_runs():
    """Every count (1,606) and accuracy-like figure (0.976) the reproductions page states is in a table the scripts
    wrote (examples/results/*.md) or is the digits split's size, so prose cannot drift from the runs."""
    page = (ROOT / "docs" / "reproductions.md").read_text()
    prose = page[:page.index("## The tables of the committed runs")] + page[page.index("## Against the papers"):]
    tables = "".join((ROOT / "examples" / "results" / f).read_text()
                     for f in ("results.md", "grow_sine.md", "ensemble_digits.md"))
    tables += f" {len(seedrand.zoo.digits_data().x_train):,} training images"  # the data set's own figure
    figures = set(re.findall(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|0\.\d{3,5})(?![\d,])", prose))
    assert len(figures) > 15
    missing = sorted(f for f in figures if f not in tables)
    assert not missing, missing
