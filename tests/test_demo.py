"""`seedrand demo --quick` runs every part end to end on digits and writes its results; `--part` runs one part."""

import json

import pytest

from seedrand.cli import main
from seedrand.demo import DemoSettings, run_demo


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_every_part(quick):
    out, results = quick
    assert {"1", "2", "3", "4", "5"} <= set(results)
    for name in ("part1_freeze_fraction.png", "part2_random_layers.png", "part3_shrinknets.png", "part4_subspace.png",
                 "part4_subspace.csv", "results.md"):
        assert (out / name).stat().st_size > 0, name
    assert "## Part 5: compile and ONNX" in (out / "results.md").read_text()


def test_freeze_fraction_learns_fewer_parameters(quick):
    rows = quick[1]["1"]["rows"]
    learned = {(str(r["learned"]), r["fixed"]): r["learned_parameters"] for r in rows}
    assert learned[("1 filter", "random")] == learned[("1 filter", "zero")] < learned[("40%", "random")] < \
        learned[("all", "-")]


def test_random_layers_store_no_weights(quick):
    rows = {r["model"]: r for r in quick[1]["2"]["rows"]}
    width = DemoSettings.quick().random_width
    hidden = 4 * (64 * width + width * width + 2 * width)  # float32 bytes of the two hidden layers
    assert rows["frozen, stored"]["stored_bytes"] - rows["random, regenerated"]["stored_bytes"] == hidden
    assert rows["random, regenerated"]["trainable_parameters"] == rows["frozen, stored"]["trainable_parameters"]


def test_shrinknets_shrink_during_training(quick):
    rows = quick[1]["3"]["rows"]
    assert rows[0]["lambda"] == 0.0 and rows[0]["final_width"] == 200
    assert rows[-1]["final_width"] < 200  # the largest lambda removed units during training
    live = quick[1]["3"]["curves"][str(rows[-1]["lambda"])]["live"]
    assert live[-1] < live[0]


def test_deployment_agrees(quick):
    part = quick[1]["5"]
    assert part["compiled_max_abs_difference"] < 1e-4
    for row in part["rows"]:
        assert row["onnxruntime_accuracy"] == row["pytorch_accuracy"]
    sizes = {r["weights"]: r["bytes"] for r in part["rows"] if r["model"] == "random MLP"}
    assert sizes["seed"] < sizes["materialize"]


def test_one_part_and_bad_part(tmp_path, capsys):
    results = run_demo(tmp_path, quick=True, parts=[4])
    assert set(results) == {4, "settings"} and (tmp_path / "part4_subspace.png").exists()
    assert not (tmp_path / "part1_freeze_fraction.png").exists()
    assert main(["demo", "--quick", "--part", "7", "--out", str(tmp_path)]) == 2
    assert "1-5" in capsys.readouterr().err
