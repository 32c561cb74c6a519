"""The `random` action on nn.Linear / Conv2d (symbolic trace) and transformers Linear, Conv1D and (depthwise)
Conv2d layers (export graphs)."""

import copy
import math

import pytest
import torch
from conftest import LAYER_NAMES, all_layers, logits

import seedrand
from seedrand import PolicyError
from seedrand.kernels import philox
from seedrand.passes.random import RandomConv, RandomEmbedding, RandomLinear


def policy(types, bias="trainable", exclude=(), seed=7, init=None):
    return {"version": 1, "seed": seed, "rules": [{"name": "rnd", "match": {"types": types, "exclude": list(exclude)},
                                     "random": {"bias": bias, "init": init}}]}


def randomized(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, (RandomLinear, RandomConv))}


def materialized_reference(model, gm, conv1d=False):
    """The original model with each regenerated weight written in as a stored weight."""
    ref = copy.deepcopy(model)
    for name, module in randomized(gm).items():
        layer = ref.get_submodule(name)
        w = module.weight
        layer.weight.data = w.T.contiguous() if conv1d else w
        if module.bias is not None:
            layer.bias.data = module.bias.detach().clone()
    return ref


@pytest.mark.parametrize("name,types,exclude,conv1d", [
    ("mlp", ["Linear"], (), False),
    ("cnn", ["Conv2d"], (), False),
    ("resnet", ["Conv2d"], (), False),
    ("mobilenet_v2", ["Conv2d"], (), False),
    ("vit", ["Conv2d", "Linear"], ("classifier",), False),
    ("bert", ["Linear"], ("classifier",), False),
    ("gpt2", ["Conv1D"], (), True),
])
def test_equals_model_with_materialized_weights_and_trains(zoo_models, name, types, exclude, conv1d):
    model, inputs = zoo_models[name]
    gm = seedrand.rewrite(model, policy(types, exclude=exclude), inputs, graph=True)
    layers = randomized(gm)
    assert layers and all(f"{n}.weight" not in dict(gm.named_parameters()) for n in layers)
    state = gm.state_dict()
    for n, m in layers.items():  # per regenerated weight only its seed and a 16-value fingerprint are stored
        assert {k for k in state if k.startswith(f"{n}.weight")} == {f"{n}.weight_seed", f"{n}.weight_fingerprint"}
        assert state[f"{n}.weight_seed"].item() == m.seed
        assert torch.equal(state[f"{n}.weight_fingerprint"], m.weight.flatten()[:16])
    ref = materialized_reference(model, gm, conv1d)
    with torch.no_grad():
        torch.testing.assert_close(logits(gm(*inputs)), logits(ref(*inputs)), rtol=1e-5, atol=1e-5)
    gm.train()
    logits(gm(*inputs)).square().mean().backward()
    assert all(m.bias.grad is not None for m in layers.values() if m.bias is not None)
    assert seedrand.summary(gm).total.regenerated == sum(math.prod(m.weight_shape) for m in layers.values())


def test_weights_are_scaled_philox_bit_for_bit_with_linear_default_bounds(zoo_models):
    model, inputs = zoo_models["mlp"]
    gm = seedrand.rewrite(model, policy(["Linear"]), inputs, graph=True)
    for name, m in randomized(gm).items():
        assert m.seed == philox.derive_seed(7, name, "weight")
        bound = 1 / math.sqrt(m.in_features)  # nn.Linear's default kaiming_uniform(a=sqrt(5)) bound
        u = philox.rand(m.seed, torch.arange(m.in_features * m.out_features))
        assert torch.equal(m.weight, ((2.0 * u - 1.0) * bound).reshape(m.out_features, m.in_features))


def test_frozen_weights_do_not_change_while_biases_train(zoo_models):
    model, inputs = zoo_models["mlp"]
    gm = seedrand.rewrite(model, policy(["Linear"]), inputs, graph=True).train()
    before = {n: m.weight.clone() for n, m in randomized(gm).items()}
    biases = {n: m.bias.detach().clone() for n, m in randomized(gm).items()}
    opt = torch.optim.Adam(gm.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        gm(*inputs).square().mean().backward()
        opt.step()
    for n, m in randomized(gm).items():
        assert torch.equal(m.weight, before[n]) and not torch.equal(m.bias, biases[n])


@pytest.mark.parametrize("bias,trainable,regenerated", [("keep", 0, 0), ("zero", 0, 0), ("random", 0, 1),
                                                        ("trainable", 1, 0)])
def test_bias_modes(zoo_models, bias, trainable, regenerated):
    model, inputs = zoo_models["mlp"]
    gm = seedrand.rewrite(model, policy(["Linear"], bias=bias), inputs, graph=True)
    fc = randomized(gm)["0"]
    assert sum(p.numel() for p in gm.parameters() if p.requires_grad) == trainable * (128 + 128 + 10)
    assert ("bias" in fc.streams) == bool(regenerated)
    x = torch.zeros(1, 64)
    expected = {"keep": model[0].bias, "zero": torch.zeros(128), "trainable": model[0].bias}.get(bias)
    if expected is not None:
        torch.testing.assert_close(fc(x)[0], expected.detach())
    else:
        assert fc(x).abs().max() <= 1 / 8 and fc(x).abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(zoo_models, dtype):
    model, (x,) = zoo_models["mlp"]
    gm = seedrand.rewrite(copy.deepcopy(model).to(dtype), policy(["Linear"]), (x.to(dtype),), graph=True)
    out = gm(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_seed_determines_weights(zoo_models):
    model, inputs = zoo_models["mlp"]
    a, b, c = (seedrand.rewrite(model, policy(["Linear"], seed=s), inputs, graph=True)(*inputs) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unsupported_type_names_module_rule_and_line(zoo_models, tmp_path):
    model, inputs = zoo_models["cnn"]
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: rnd\n    match: {types: [BatchNorm2d]}\n    random: {}\n")
    with pytest.raises(PolicyError, match=r"p.yaml:3:5: rule 'rnd' \(rules\[0\]\): 'bn1' \(BatchNorm2d\): random "
                                          r"applies to registered layer classes \(Linear, Conv1D, ConvNd, ConvTransposeNd, Embedding"):
        seedrand.rewrite(model, path, inputs, graph=True)


def test_tied_weight_is_refused(zoo_models):
    model, inputs = zoo_models["gpt2"]
    with pytest.raises(PolicyError, match="'lm_head' .*weight is tied to transformer.wte.weight"):
        seedrand.rewrite(model, policy(["Linear"]), inputs, graph=True)


@pytest.mark.parametrize("conv,shape", [(torch.nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 11)),
                                        (torch.nn.Conv3d(2, 4, 2, dilation=2, groups=2), (1, 2, 6, 6, 6))])
def test_conv1d_and_conv3d_with_gradients(conv, shape):
    model = torch.nn.Sequential(conv, torch.nn.ReLU())
    x = torch.randn(shape, requires_grad=True)
    gm = seedrand.rewrite(model, policy([type(conv).__name__]), (x,), graph=True)
    ref = materialized_reference(model, gm)
    torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(gm(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(ref(x).sum(), x)[0], rtol=1e-5, atol=1e-6)


def materialized_all_layers(model, gm, dtype):
    """AllLayers with every regenerated weight written in (Conv1D transposed, the padding row zeroed)."""
    ref = copy.deepcopy(model)
    for name in LAYER_NAMES:
        layer, module = ref.get_submodule(name), gm.get_submodule(name)
        w = module.regenerate("weight", dtype)
        if name == "emb":
            w[layer.padding_idx] = 0
        layer.weight.data = w.T.contiguous() if name == "proj" else w
        if getattr(layer, "bias", None) is not None:
            layer.bias.data = module.bias.detach().clone()
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_layer_type_and_dtype(dtype):
    model, inputs = all_layers(dtype)
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": list(LAYER_NAMES)}, "random": {}}]}, inputs, graph=True)
    assert not [n for n, _ in gm.named_parameters() if n.endswith("weight")]
    out = gm(*inputs)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, materialized_all_layers(model, gm, dtype)(*inputs), rtol=tol, atol=tol)


def test_embedding_rows_are_philox_normal_and_padding_reads_zero():
    model, (ids,) = all_layers()
    gm = seedrand.rewrite(model, {"version": 1, "seed": 4, "rules": [{"match": {"modules": ["emb"]}, "random": {}}]}, (ids,), graph=True)
    emb = gm.get_submodule("emb")
    assert isinstance(emb, RandomEmbedding) and emb.seed == philox.derive_seed(4, "emb", "weight")
    table = philox.randn(emb.seed, torch.arange(20 * 8)).reshape(20, 8)  # nn.Embedding's default N(0, 1)
    assert torch.equal(emb.weight, table)
    rows = emb(ids)
    assert torch.equal(rows[ids != 0], table[ids[ids != 0]]) and not rows[ids == 0].any()
    assert torch.equal(emb.half()(ids), table[ids].half().masked_fill((ids == 0).unsqueeze(-1), 0))


def test_exported_embeddings(zoo_models):
    model, inputs = zoo_models["bert"]
    names = ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"]
    gm = seedrand.rewrite(model, {"version": 1, "seed": 3, "rules": [{"match": {"modules": names}, "random": {}}]}, inputs, graph=True)
    ref = copy.deepcopy(model)
    for name in names:
        layer, w = ref.get_submodule(name), gm.get_submodule(name).weight
        if layer.padding_idx is not None:
            w[layer.padding_idx] = 0
        layer.weight.data = w
    with torch.no_grad():
        torch.testing.assert_close(logits(gm(*inputs)), logits(ref(*inputs)), rtol=1e-5, atol=1e-5)


def test_embedding_with_max_norm_is_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(PolicyError, match=r"'0' \(Embedding\): random cannot regenerate an embedding with max_norm"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Embedding"]}, "random": {}}]}, torch.zeros(2, 3).long(), graph=True)
