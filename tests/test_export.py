"""ONNX export of rewritten models: onnxruntime equals PyTorch in both weight modes, seed files stay small, and
regenerated uniform weights are bit-identical in the runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import all_layers, logits

import seedrand
from seedrand import SeedrandError
from seedrand.export import export_onnx
from seedrand.kernels.ops import regen_matmul

EVERY_ACTION = {"version": 1, "seed": 4, "rules": [
    {"match": {"modules": ["emb", "conv1"]}, "random": {"bias": "random"}},
    {"match": {"modules": ["fc", "conv3"]}, "freeze_fraction": {"fraction": 0.5, "select": "random"}},
    {"match": {"modules": ["proj"]}, "subspace": {"dim": 4, "projection": "sparse"}},
    {"match": {"modules": ["conv2"]}, "insert_random": {"residual": True, "scale": "scalar"}},
    {"match": {"modules": ["conv2"]}, "freeze": {}},
]}


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path))
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})[0]


@pytest.mark.parametrize("weights", ["seed", "materialize"])
def test_every_action_matches_onnxruntime(tmp_path, weights):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, EVERY_ACTION, inputs, graph=True)
    with torch.no_grad():
        gm.get_submodule("proj.subspace").theta_d.normal_()
        gm.get_submodule("conv2_random").scales[0].fill_(0.5)
        expected = gm(*inputs).numpy()
    report = export_onnx(gm, inputs, tmp_path / "m.onnx", weights=weights)
    np.testing.assert_allclose(run_onnx(report.path, *inputs), expected, rtol=1e-5, atol=1e-6)
    assert report.bytes == report.path.stat().st_size and not gm.training


@pytest.mark.parametrize("weights", ["seed", "materialize"])
def test_transformers_model(zoo_models, tmp_path, weights):
    model, inputs = zoo_models["gpt2"]
    gm = seedrand.rewrite(model, {"version": 1, "seed": 1, "rules": [{"match": {"types": ["Conv1D"]}, "random": {}}]}, inputs, graph=True)
    report = export_onnx(gm, inputs, tmp_path / "g.onnx", weights=weights)
    np.testing.assert_allclose(run_onnx(report.path, *inputs), logits(gm(*inputs)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)


def test_seed_file_is_a_fraction_of_the_materialized_one_and_weights_are_bit_identical(tmp_path):
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
    x = torch.eye(256)[:2]
    gm = seedrand.rewrite(mlp, {"version": 1, "rules": [{"match": {"modules": ["0", "2"]}, "random": {"bias": "zero"}}]}, x, graph=True)
    seed = export_onnx(gm, x, tmp_path / "seed.onnx", weights="seed")
    full = export_onnx(gm, x, tmp_path / "full.onnx", weights="materialize")
    stored_weights = (256 + 1024) * 1024 * 4
    assert full.bytes > stored_weights and seed.bytes < stored_weights / 10
    graph = onnx.load(str(seed.path)).graph  # no per-node stack traces: they would outweigh the Philox nodes
    assert len(graph.node) > 100 and not any(node.metadata_props or node.doc_string for node in graph.node)
    first = torch.nn.Sequential(gm.get_submodule("0"))  # x = identity rows: the output is W[:, :2].T exactly
    export_onnx(first, torch.eye(256), tmp_path / "w.onnx", weights="seed")
    assert np.array_equal(run_onnx(tmp_path / "w.onnx", torch.eye(256)), gm.get_submodule("0").weight.T.numpy())


def test_unexportable_projection_and_bad_mode_are_clear_errors(tmp_path):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["fc"]}, "subspace": {
        "dim": 2, "projection": "orthogonal"}}]}, inputs, graph=True)
    with pytest.raises(SeedrandError, match="module 'fc.subspace': the orthogonal subspace projection needs a QR"):
        export_onnx(gm, inputs, tmp_path / "o.onnx")

    class Direct(torch.nn.Module):  # calls a custom op itself, not through a seedrand module
        def forward(self, x):
            return regen_matmul(x, 1, 3, 3, 0.1, False, False, 1024)

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Direct())
    with pytest.raises(SeedrandError, match="no ONNX translation for op seedrand.regen_matmul.default, called by "
                                            "module '1'"):
        export_onnx(model, torch.randn(2, 3), tmp_path / "u.onnx")
    with pytest.raises(SeedrandError, match="weights must be 'seed' or 'materialize'"):
        export_onnx(gm, inputs, tmp_path / "o.onnx", weights="stored")


def test_cli_export(tmp_path, capsys):
    from seedrand.cli import main

    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - match: {types: [Linear]}\n    random: {}\n")
    assert main(["export", str(policy), "--model", "seedrand.zoo:mlp", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name,types,exclude", [
    ("resnet", ["Conv2d"], []), ("mobilenet_v2", ["Conv2d"], []), ("vit", ["Linear"], ["classifier"]),
    ("bert", ["Linear", "Embedding"], ["classifier"]),
])
def test_more_transformers_models_in_seed_mode(zoo_models, tmp_path, name, types, exclude):
    model, inputs = zoo_models[name]
    policy = {"version": 1, "seed": 2, "rules": [{"match": {"types": types, "exclude": exclude}, "random": {}}]}
    gm = seedrand.rewrite(model, policy, inputs, graph=True)
    report = export_onnx(gm, inputs, tmp_path / f"{name}.onnx", weights="seed")
    np.testing.assert_allclose(run_onnx(report.path, *inputs), logits(gm(*inputs)).detach().numpy(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("weights", ["seed", "materialize"])
def test_llama_with_random_and_frozen_fraction_layers(zoo_models, tmp_path, weights):
    """A rewritten Llama (grouped-query attention; random MLPs, half of each output projection's filters frozen at
    a random choice) exports in both modes; onnxruntime equals torch. Its random layers are small, so seed mode's
    file is the larger and the report says so."""
    model, inputs = zoo_models["llama"]
    policy = {"version": 1, "seed": 3, "rules": [
        {"match": {"modules": [r"re:model\.layers\.\d+\.mlp\..*"], "types": ["Linear"]}, "random": {}},
        {"match": {"modules": [r"re:model\.layers\.\d+\.self_attn\.o_proj"]},
         "freeze_fraction": {"fraction": 0.5, "select": "random"}}]}
    gm = seedrand.rewrite(model, policy, inputs, graph=True).eval()
    report = export_onnx(gm, inputs, tmp_path / "llama.onnx", weights=weights)
    session = ort.InferenceSession(str(report.path))
    out = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), inputs)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, logits(gm(*inputs)).numpy(), rtol=1e-5, atol=1e-5)
    assert bool(report.note) == (weights == "seed")


def test_batch_and_sequence_are_dynamic_axes(zoo_models, tmp_path):
    """The file runs at other batch sizes (and, for token inputs, sequence lengths) than the example's."""
    for name in ("mlp", "llama"):
        model, inputs = zoo_models[name]
        gm = seedrand.rewrite(model, {"version": 1, "seed": 1, "rules": [
            {"match": {"types": ["Linear"]}, "optional": True, "random": {}}]}, inputs, graph=True).eval()
        report = export_onnx(gm, inputs, tmp_path / f"{name}.onnx")
        assert report.dynamic
        session = ort.InferenceSession(str(report.path))
        other = tuple(torch.cat([x, x, x]) for x in inputs)
        if name == "llama":
            other = (other[0][:, :5],)
        out = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), other)})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, logits(gm(*other)).numpy(), rtol=1e-5, atol=1e-5)
