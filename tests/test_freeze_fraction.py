"""The `freeze_fraction` action on every supported layer type (Embedding, Linear, Conv1D, Conv1d/2d/3d), both
dimensions, every `fixed` and `select`, three dtypes, symbolic and exported graphs."""

import copy
import math

import pytest
import torch
from conftest import LAYER_NAMES, all_layers, logits

import seedrand
from seedrand import PolicyError
from seedrand.passes.freeze_fraction import FrozenFraction, FrozenFractionLinear, frozen_indices

SEED = 11


def policy(modules, fraction=0.5, dim="out", select="first", fixed="random", action="freeze_fraction", **extra):
    params = {"fraction": fraction, "dim": dim, "select": select, "fixed": fixed, **extra}
    if action == "random":
        params = {"bias": "random"}
    return {"version": 1, "seed": SEED, "rules": [{"name": "ff", "match": {"modules": list(modules)}, action: params}]}


def stored_dim(name, dim):
    """The stored weight's filter (out) or input (in) dimension; Conv1D stores (in, out)."""
    return {"out": 0, "in": 1}[dim] if name != "proj" else {"out": 1, "in": 0}[dim]


def random_action_tensors(model, inputs, name, dtype):
    """The weight (stored layout) and bias the `random` action regenerates for layer `name`."""
    layer = seedrand.rewrite(model, policy([name], action="random"), inputs, graph=True).get_submodule(name)
    weight = layer.regenerate("weight", dtype)
    bias = layer.regenerate("bias", dtype) if "bias" in layer.streams else None
    return (weight.T if name == "proj" else weight), bias


CASES = [("random", "random"), ("zero", "first"), ("keep", "last")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", ["out", "in"])
@pytest.mark.parametrize("fixed,select", CASES)
def test_assembled_weights_and_biases(dtype, dim, fixed, select):
    model, inputs = all_layers(dtype)
    names = [n for n in LAYER_NAMES if not (dim == "in" and n == "emb")]
    gm = seedrand.rewrite(model, policy(names, 0.5, dim, select, fixed), inputs, graph=True)
    for name in names:
        original = model.get_submodule(name)
        d = stored_dim(name, dim)
        n = original.weight.shape[d]
        frozen = frozen_indices(n, 0.5, select, seedrand.kernels.philox.derive_seed(SEED, name, "select"))
        trainable = [i for i in range(n) if i not in frozen]
        module = gm.get_submodule(f"{name}.weight")
        assert isinstance(module, FrozenFraction) and module.trainable.requires_grad
        assert module.trainable.numel() == original.weight.numel() // n * len(trainable)
        assembled = module()
        assert assembled.dtype == dtype and assembled.shape == original.weight.shape
        take = lambda t, idx, dd=d: t.index_select(dd, torch.tensor(idx))  # noqa: E731
        assert torch.equal(take(assembled, trainable), take(original.weight.detach(), trainable))
        regenerated, regenerated_bias = random_action_tensors(model, inputs, name, dtype)
        expected = {"random": take(regenerated, frozen), "zero": torch.zeros_like(take(assembled, frozen)),
                    "keep": take(original.weight.detach(), frozen)}[fixed]
        assert torch.equal(take(assembled, frozen), expected)
        if getattr(original, "bias", None) is None:
            continue
        bias = gm.get_submodule(f"{name}.bias")() if dim == "out" else gm.get_parameter(f"{name}.bias")
        assert torch.equal(take(bias, trainable, 0) if dim == "out" else bias, take(original.bias, trainable, 0)
                           if dim == "out" else original.bias)
        if dim == "out":
            expected_bias = {"random": regenerated_bias, "zero": torch.zeros_like(original.bias),
                             "keep": original.bias.detach()}[fixed]
            assert torch.equal(take(bias, frozen, 0), take(expected_bias, frozen, 0))
    assert gm(*inputs).dtype == dtype


@pytest.mark.parametrize("dim", ["out", "in"])
@pytest.mark.parametrize("fixed,select", CASES)
def test_linear_multiplies_without_assembling(dim, fixed, select):
    """An nn.Linear becomes a FrozenFractionLinear: seedrand::frozen_matmul (one Triton launch on CUDA) gives the
    output and trainable-slice gradient of a linear by the assembled weight, and export keeps it as one node."""
    model, inputs = all_layers()
    layer = seedrand.rewrite(model, policy(["fc"], 0.5, dim, select, fixed), inputs, graph=True).fc
    assert isinstance(layer, FrozenFractionLinear)
    x = torch.randn(2, 3, model.fc.in_features, generator=torch.Generator().manual_seed(3))
    bias = layer.bias() if dim == "out" else layer.bias
    expected = torch.nn.functional.linear(x, layer.weight(), bias)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), layer.weight.trainable)
    got = layer(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), layer.weight.trainable)[0], expected_grad)
    nodes = [n for n in torch.export.export(layer, (x,)).graph.nodes
             if n.target == torch.ops.seedrand.frozen_matmul.default]
    assert len(nodes) == (fixed != "keep")


def test_only_trainable_slices_learn(zoo_models):
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy(LAYER_NAMES, 0.75, select="random"), inputs, graph=True).train()
    before = {n: gm.get_submodule(f"{n}.weight")().detach().clone() for n in LAYER_NAMES}
    params = [p for p in gm.parameters() if p.requires_grad]
    expected = sum(m.trainable.numel() for m in gm.modules() if isinstance(m, FrozenFraction))
    assert sum(p.numel() for p in params) == expected  # no trainable tensor besides the slices
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        gm(*inputs).square().mean().backward()
        opt.step()
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == expected  # Adam state scales with the slices
    for name in LAYER_NAMES:
        d, n = stored_dim(name, "out"), before[name].shape[stored_dim(name, "out")]
        frozen = frozen_indices(n, 0.75, "random", seedrand.kernels.philox.derive_seed(SEED, name, "select"))
        trainable = [i for i in range(n) if i not in frozen]
        after = gm.get_submodule(f"{name}.weight")().detach()
        index = lambda idx: torch.tensor(idx)  # noqa: E731
        assert torch.equal(after.index_select(d, index(frozen)), before[name].index_select(d, index(frozen)))
        assert not torch.equal(after.index_select(d, index(trainable)), before[name].index_select(d, index(trainable)))


@pytest.mark.parametrize("zoo,match", [(None, {"modules": list(LAYER_NAMES)}),
                                       ("gpt2", {"types": ["Conv1D", "Embedding"], "exclude": ["transformer.wte"]}),
                                       ("bert", {"types": ["Linear", "Embedding"]})])
def test_fraction_zero_equals_original(zoo_models, zoo, match):
    model, inputs = all_layers() if zoo is None else zoo_models[zoo]
    gm = seedrand.rewrite(model, {"version": 1, "seed": 1, "rules": [{"match": match, "freeze_fraction": {"fraction": 0.0}}]},
                          inputs, graph=True)
    assert torch.equal(logits(gm(*inputs)), logits(model(*inputs)))


def test_exported_graph_keep_is_exact_and_trains(zoo_models):
    model, inputs = zoo_models["gpt2"]
    gm = seedrand.rewrite(model, {"version": 1, "seed": 1, "rules": [{"match": {"types": ["Conv1D"]}, "freeze_fraction": {
        "fraction": 0.9, "select": "random", "fixed": "keep", "dim": "in"}}]}, inputs, graph=True)
    assert gm.meta["seedrand"].trace.strategy == "torch.export"
    assert torch.equal(logits(gm(*inputs)), logits(model(*inputs)))
    gm.train()
    logits(gm(*inputs)).square().mean().backward()
    slices = [m for m in gm.modules() if isinstance(m, FrozenFraction)]
    assert slices and all(m.trainable.grad is not None and m.trainable.grad.abs().sum() > 0 for m in slices)


def test_state_dict_keys():
    model, inputs = all_layers()
    state = seedrand.rewrite(model, policy(["fc"], fixed="random"), inputs, graph=True).state_dict()
    assert set(k for k in state if k.startswith("fc.")) == {
        "fc.weight.trainable", "fc.weight.frozen_seed", "fc.weight.frozen_fingerprint",
        "fc.bias.trainable", "fc.bias.frozen_seed", "fc.bias.frozen_fingerprint"}
    assert state["fc.weight.trainable"].shape == (6, 8)
    kept = seedrand.rewrite(model, policy(["fc"], fixed="keep"), inputs, graph=True).state_dict()
    assert kept["fc.weight.frozen"].shape == (6, 8) and "fc.weight.frozen_seed" not in kept


def test_rounding_keeps_one_filter_trainable():
    assert len(frozen_indices(10, 0.25, "first", 0)) == 3  # 2.5 rounds half up
    assert len(frozen_indices(10, 0.999, "last", 0)) == 9
    assert frozen_indices(1, 0.9, "random", 0) == []
    a, b = frozen_indices(100, 0.5, "random", 1), frozen_indices(100, 0.5, "random", 2)
    assert len(a) == 50 and a != b and a == frozen_indices(100, 0.5, "random", 1)


def test_dim_in_on_embedding_names_rule_and_module(tmp_path):
    model, inputs = all_layers()
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: ff\n    match: {modules: [emb]}\n    freeze_fraction: {fraction: 0.5, dim: in}\n")
    with pytest.raises(PolicyError, match=r"p.yaml:3:5: rule 'ff' .*'emb' \(Embedding\): dim: in on an nn.Embedding"):
        seedrand.rewrite(model, path, inputs, graph=True)


def test_unsupported_layer_is_refused_and_model_untouched(zoo_models):
    model, inputs = zoo_models["cnn"]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PolicyError, match=r"'bn1' \(BatchNorm2d\): freeze_fraction applies to registered layer classes \(Linear, Conv1D, ConvNd.*register BatchNorm2d with seedrand.register_layer"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["BatchNorm2d"]}, "freeze_fraction": {
            "fraction": 0.5}}]}, inputs, graph=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_init_sets_the_frozen_distribution():
    model, inputs = all_layers()
    gm = seedrand.rewrite(model, policy(["fc"], 0.9, init="uniform(0.001)"), inputs, graph=True)
    frozen = gm.get_submodule("fc.weight")()[:10]
    assert frozen.abs().max() <= 0.001 and frozen.abs().max() > 0.0005
    assert math.isclose(gm.get_submodule("fc.weight").streams["frozen"].scale, 0.001)


@pytest.mark.parametrize("fixed,kind", [("random", "regenerated"), ("keep", "frozen"), ("zero", None)])
def test_summary_rows_count_the_slices(fixed, kind):
    model, inputs = all_layers()
    row = seedrand.summary(seedrand.rewrite(model, policy(["fc"], 0.5, fixed=fixed), inputs, graph=True)).rows[0]
    assert row.module == "fc" and row.counts.trainable == 6 * 8 + 6
    assert row.counts.regenerated == (6 * 8 + 6 if kind == "regenerated" else 0)
    assert row.counts.frozen == (6 * 8 + 6 if kind == "frozen" else 0)
