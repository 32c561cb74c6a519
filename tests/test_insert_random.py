"""The `insert_random` action: plain and residual random layers after Linear, Conv1D, Embedding and Conv layers."""

import copy

import pytest
import torch
from conftest import LAYER_NAMES, all_layers, logits

import seedrand
from seedrand import PolicyError
from seedrand.kernels.philox import derive_seed
from seedrand.passes.insert_random import RandomStack


def policy(modules, **params):
    return {"version": 1, "seed": 5, "rules": [{"name": "ins", "match": {"modules": list(modules)}, "insert_random": params}]}


def with_stacks(model, gm, names):
    """The original model with each listed layer followed by the inserted stack (a reference built by hand)."""
    ref = copy.deepcopy(model)
    for name in names:
        setattr(ref, name, torch.nn.Sequential(getattr(ref, name), gm.get_submodule(f"{name}_random")))
    return ref


def manual_stack(stack, h, activation, residual):
    """What the stack must compute, from its layers' materialized weights."""
    for i, layer in enumerate(stack.layers):
        w = layer.regenerate("weight", h.dtype)
        y = torch.nn.functional.linear(h, w) if w.dim() == 2 else torch.nn.functional.conv2d(h, w)
        y = activation(y)
        if residual:
            s = 1 if stack.scales is None else stack.scales[i]
            s = s.reshape(-1, 1, 1) if torch.is_tensor(s) and s.dim() and w.dim() == 4 else s
            y = h + s * y
        h = y
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("params", [{"count": 2, "width": 9, "activation": "tanh"},
                                    {"residual": True, "scale": "per_channel", "count": 2},
                                    {"residual": True}])
def test_inserted_after_every_layer_type(dtype, params):
    model, inputs = all_layers(dtype)
    gm = seedrand.rewrite(model, policy(LAYER_NAMES, **params), inputs, graph=True)
    torch.testing.assert_close(gm(*inputs), with_stacks(model, gm, LAYER_NAMES)(*inputs), rtol=0, atol=0)
    assert sum(p.numel() for p in gm.parameters()) - sum(p.numel() for p in model.parameters()) == (
        sum(8 if n == "emb" else getattr(model, n).weight.shape[1 if n == "proj" else 0] for n in LAYER_NAMES) * 2
        if params.get("scale") == "per_channel" else 0)  # only the per-channel scales are new parameters
    act = {"tanh": torch.tanh}.get(params.get("activation"), torch.relu)
    for name in ("fc", "conv2"):
        stack = gm.get_submodule(f"{name}_random")
        assert isinstance(stack, RandomStack) and len(stack.layers) == params.get("count", 1)
        channels = 12 if name == "fc" else 5
        h = torch.randn(3, channels, dtype=dtype) if name == "fc" else torch.randn(1, channels, 4, 4, dtype=dtype)
        if stack.scales is not None:
            for s in stack.scales:
                s.data.uniform_(-1, 1)
        expected = manual_stack(stack, h, act, params.get("residual", False))
        torch.testing.assert_close(stack(h), expected, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)
        assert stack.layers[0].seed == derive_seed(5, f"{name}_random.layers.0", "weight")


@pytest.mark.parametrize("scale", ["scalar", "per_channel"])
def test_trainable_scales_start_at_zero_and_learn(zoo_models, scale):
    model, inputs = zoo_models["gpt2"]  # exported graph: inserted after aten.addmm (Conv1D) nodes
    gm = seedrand.rewrite(model, {"version": 1, "seed": 1, "rules": [{"match": {"types": ["Conv1D"]}, "insert_random": {
        "residual": True, "scale": scale}}]}, inputs, graph=True)
    assert torch.equal(logits(gm(*inputs)), logits(model(*inputs)))
    scales = [p for n, p in gm.named_parameters() if "_random.scales" in n]
    assert len(scales) == 4 * 2
    gm.train()
    logits(gm(*inputs)).square().mean().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)
    regenerated = seedrand.summary(gm).total.regenerated
    assert regenerated == sum(m.weight_shape[0] * m.weight_shape[1] for m in gm.modules() if hasattr(m, "weight_shape"))


def test_fixed_scale_changes_outputs_and_seed_matters():
    model, inputs = all_layers()
    a, b = (seedrand.rewrite(model, {**policy(["fc"], residual=True), "seed": s}, inputs, graph=True)(*inputs) for s in (1, 2))
    assert not torch.equal(a, model(*inputs)) and not torch.equal(a, b)


@pytest.mark.parametrize("params,message", [
    ({"width": 9}, "width 9 differs from the module.s 12 output features.*count must be at least 2"),
    ({"residual": True, "width": 9}, "residual random layers keep the width: width must be 12"),
])
def test_width_errors_name_rule_and_module(params, message):
    model, inputs = all_layers()
    with pytest.raises(PolicyError, match=rf"rule 'ins' .*'fc' \(Linear\): {message}"):
        seedrand.rewrite(model, policy(["fc"], **params), inputs, graph=True)


def test_after_a_layer_of_unknown_output_shape_is_refused(zoo_models, tmp_path):
    model, inputs = zoo_models["cnn"]
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: ins\n    match: {types: [BatchNorm2d]}\n    insert_random: {}\n")
    with pytest.raises(PolicyError, match=r"p.yaml:3:5: rule 'ins' .*'bn1' \(BatchNorm2d\): insert_random applies to registered layer classes"):
        seedrand.rewrite(model, path, inputs, graph=True)
