"""The `filter_gates` action (ShrinkNets' Filter layer): placement, exactness at init, penalty, gate parameters."""

import pytest
import torch
from conftest import LAYER_NAMES, all_layers, logits

import seedrand
from seedrand import PolicyError
from seedrand.kernels import philox
from seedrand.kernels.philox import derive_seed
from seedrand.passes.filter_gates import FilterGate


def policy(match, **params):
    return {"version": 1, "seed": 3, "rules": [{"name": "gates", "match": match, "filter_gates": params}]}


@pytest.mark.parametrize("name,types", [("cnn", ["Conv2d", "Linear"]), ("resnet", ["Conv2d"]), ("gpt2", ["Conv1D"]),
                                        ("bert", ["Linear"])])
def test_ones_init_is_exact_and_gates_train(zoo_models, name, types):
    model, inputs = zoo_models[name]
    gm = seedrand.rewrite(model, policy({"types": types}, **{"lambda": 1e-3}), inputs, graph=True)
    assert torch.equal(logits(gm(*inputs)), logits(model(*inputs)))
    gates = seedrand.gate_parameters(gm)
    assert gates and all(torch.equal(g, torch.ones_like(g)) for g in gates)
    gm.train()
    (logits(gm(*inputs)).square().mean() + seedrand.penalty(gm)).backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_auto_placement_follows_batch_norm_and_output_does_not(zoo_models):
    model, inputs = zoo_models["cnn"]
    auto = seedrand.rewrite(model, policy({"types": ["Conv2d"]}), inputs, graph=True)
    output = seedrand.rewrite(model, policy({"types": ["Conv2d"]}, placement="output"), inputs, graph=True)
    inputs_of = lambda gm: {n.target: n.args[0].target for n in gm.graph.nodes  # noqa: E731
                            if n.op == "call_module" and n.target.endswith("_gate")}
    assert inputs_of(auto) == {"conv1_gate": "bn1", "conv2_gate": "bn2"}
    assert inputs_of(output) == {"conv1_gate": "conv1", "conv2_gate": "conv2"}


def test_dead_channels_are_exactly_zero_and_penalty_is_l1():
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy({"modules": ["fc", "conv2"]}, **{"lambda": 0.5, "init": "uniform"}), inputs, graph=True)
    fc_gate = gm.get_submodule("fc_gate")
    assert torch.equal(fc_gate.theta, philox.rand(derive_seed(3, "fc", "gate"), torch.arange(12)))
    assert seedrand.penalty(gm).item() == pytest.approx(0.5 * sum(g.abs().sum().item()
                                                                   for g in seedrand.gate_parameters(gm)))
    with torch.no_grad():
        fc_gate.theta[:5] = -1.0
    seen = {}
    gm.get_submodule("fc_gate").register_forward_hook(lambda m, i, o: seen.update(out=o))
    gm(*inputs)
    assert not seen["out"][..., :5].any() and seen["out"][..., 5:].any()


def test_gates_on_every_layer_type_and_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        model, inputs = all_layers(dtype)
        gm = seedrand.rewrite(model, policy({"modules": list(LAYER_NAMES)}), inputs, graph=True)
        assert torch.equal(gm(*inputs), model(*inputs))
        gates = {n: m for n, m in gm.named_modules() if isinstance(m, FilterGate)}
        assert len(gates) == 6 and gates["conv2_gate"].channel_dim == 1 and gates["fc_gate"].channel_dim == -1
        assert all(m.theta.dtype == dtype for m in gates.values())


def test_gate_on_a_batch_norm_is_refused(zoo_models):
    model, inputs = zoo_models["cnn"]
    with pytest.raises(PolicyError, match=r"rule 'gates' .*'bn1' \(BatchNorm2d\): filter_gates applies to registered layer classes"):
        seedrand.rewrite(model, policy({"types": ["BatchNorm2d"]}), inputs, graph=True)


def test_gated_model_exports_to_onnx(tmp_path):
    import numpy as np
    import onnxruntime as ort

    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy({"modules": ["fc", "conv2"]}, init="uniform"), inputs, graph=True)
    report = seedrand.export_onnx(gm, inputs, tmp_path / "g.onnx")
    session = ort.InferenceSession(str(report.path))
    out = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})[0]
    np.testing.assert_allclose(out, gm(*inputs).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_gate_that_reached_zero_stays_dead_until_collected():
    """ShrinkNets: a unit whose theta reaches <= 0 is gone. Here the L1 gradient (and Adam) push such a theta back
    above zero; the unit stays exactly zero in both modes and collect_garbage removes it."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    x = torch.randn(4, 3)
    gm = seedrand.rewrite(model, policy({"modules": ["0"]}, **{"lambda": 1.0}), (x,), graph=True)
    gate = gm.get_submodule("0_gate")
    with torch.no_grad():
        gate.theta[[1, 4]] = -1e-3
    gm.eval()(x)  # an eval forward decides nothing
    assert gate.alive.all() and gate.live.tolist() == [True, False, True, True, False, True]
    optimizer = torch.optim.Adam(seedrand.gate_parameters(gm), lr=0.1)
    gm.train()
    for _ in range(3):
        optimizer.zero_grad()
        (gm(x).square().sum() * 0 + seedrand.penalty(gm)).backward()  # only the L1 term: theta -> 0 from below
        optimizer.step()
    assert (gate.theta[[1, 4]] > 0).all()  # revived by the optimizer...
    assert gate.alive.tolist() == [True, False, True, True, False, True]  # ...but dead for good
    hidden = gm.get_submodule("0_gate")(torch.ones(2, 6))
    assert (hidden[:, [1, 4]] == 0).all() and (hidden[:, [0, 2, 3, 5]] != 0).all()
    before = gm.eval()(x)
    report = seedrand.collect_garbage(gm, optimizer)
    assert report.removed["0"] == 2 and gm.get_submodule("0").out_features == 4
    assert gate.theta.shape == (4,) and gate.alive.shape == (4,) and gate.alive.all()
    torch.testing.assert_close(gm(x), before)
