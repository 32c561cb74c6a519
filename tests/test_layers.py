"""The layer registry (seedrand.layers): built-in layouts new in it (transposed convolutions, string padding,
``x @ W.T``) and a user's own layer class given every weight action and garbage collection by one
``register_layer`` call."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import seeded

import seedrand
from seedrand.kernels.init import sample
from seedrand.kernels.philox import derive_seed
from seedrand.layers import LayerSpec, layer_spec, register_layer
from seedrand.passes.random import RandomConvTranspose, RandomLinear
from seedrand.testing import check_garbage_collection


class Decoder(nn.Module):
    """A conv encoder and a transposed-conv decoder (a U-Net's up path, a VAE's decoder)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.down(x)))))


class ExportedDecoder(Decoder):
    def forward(self, x):
        if x.shape[0] > 0:  # control flow on a shape defeats symbolic tracing: seedrand exports the model
            x = super().forward(x)
        return x


def images(n=2, size=8):
    return (torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def random_rule(types, **params):
    return {"version": 1, "seed": 5, "rules": [{"match": {"types": types}, "random": params}]}


@pytest.mark.parametrize("cls", [Decoder, ExportedDecoder])
def test_random_conv_transpose_regenerates_pytorchs_own_init(cls):
    model, inputs = seeded(cls).eval(), images()
    gm = seedrand.rewrite(model, random_rule(["ConvTranspose2d"]), inputs, graph=True)
    layer = gm.get_submodule("up")
    assert isinstance(layer, RandomConvTranspose) and "up.weight" not in dict(gm.named_parameters())
    weight = sample(derive_seed(5, "up", "weight"), (6, 8, 4, 4), "uniform", 1 / math.sqrt(6 * 16)).transpose(0, 1)
    assert torch.equal(layer.merged()["weight"], weight)  # stored (in, out, k, k), canonical counters (out, in, k, k)
    # kaiming_uniform(a=sqrt(5)) on the stored weight, as nn.ConvTranspose2d initializes: bound 1 / sqrt(out * k * k)
    assert weight.abs().max() <= 1 / math.sqrt(6 * 16) and weight.abs().max() > 0.9 / math.sqrt(6 * 16)
    x = torch.relu(model.down(inputs[0]))
    expected = model.head(torch.relu(F.conv_transpose2d(x, weight, model.up.bias, 2, 1)))
    torch.testing.assert_close(gm(*inputs), expected)


def test_random_conv_transpose_is_the_same_in_both_tracings_and_trains():
    inputs = images()
    outs = [seedrand.rewrite(seeded(cls).eval(), random_rule(["ConvTranspose2d"], bias="random"), inputs)(*inputs)
            for cls in (Decoder, ExportedDecoder)]
    assert torch.equal(outs[0], outs[1])
    kept = seedrand.rewrite(seeded(Decoder), random_rule(["ConvTranspose2d"], bias="trainable"), inputs)
    kept(*inputs).square().mean().backward()
    assert kept.down.weight.grad is not None and kept.up.bias.grad is not None


def test_random_conv_transpose_grouped_is_refused():
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2))
    with pytest.raises(seedrand.PolicyError, match=r"'0' \(ConvTranspose2d\): random supports transposed "
                                                   r"convolutions with groups=1 only"):
        seedrand.rewrite(model, random_rule(["ConvTranspose2d"]), (torch.randn(2, 4, 5, 5),))


@pytest.mark.parametrize("cls", [Decoder, ExportedDecoder])
def test_freeze_fraction_of_conv_transpose_filters(cls):
    model, inputs = seeded(cls), images()
    policy = {"version": 1, "rules": [{"match": {"types": ["ConvTranspose2d"]},
                                       "freeze_fraction": {"fraction": 0.5, "dim": "out", "fixed": "zero"}}]}
    kept = seedrand.rewrite(model, policy, inputs)
    kept(*inputs).sum().backward()
    frozen = kept.up.weight.detach()
    zero_filters = (frozen == 0).all(dim=(0, 2, 3))  # the out filters are the stored weight's dim 1
    assert zero_filters.sum() == 3
    grad = dict(kept.named_parameters())
    assert all(g.grad is not None for n, g in grad.items() if n.startswith("up."))


@pytest.mark.parametrize("cls", [Decoder, ExportedDecoder])
@pytest.mark.parametrize("graph", [True, False])
def test_garbage_collection_through_a_transposed_convolution(cls, graph):
    report = check_garbage_collection(seeded(cls).eval(), images(), fraction=0.5, seed=2, graph=graph)
    assert report.not_applied is None
    assert {"down", "up"} <= set(report.removed), report.removed


class SameConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
        self.even = nn.Conv2d(4, 4, 2, padding="same")

    def forward(self, x):
        return self.even(torch.relu(self.conv(x)))


class ExportedSameConv(SameConv):
    def forward(self, x):
        if x.shape[0] > 0:
            x = super().forward(x)
        return x


@pytest.mark.parametrize("cls", [SameConv, ExportedSameConv])
def test_string_padding_same_and_valid(cls):
    """``padding='same'`` (``aten.conv2d.padding`` once exported: EfficientNet, SigLIP) becomes its numbers."""
    model, inputs = seeded(cls).eval(), images()
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["conv"]}, "random": {}}]}, inputs,
                          graph=True)
    assert gm.get_submodule("conv").padding == (2, 2)
    weight = gm.get_submodule("conv").merged()["weight"]
    expected = model.even(torch.relu(F.conv2d(inputs[0], weight, model.conv.bias, padding="same", dilation=2)))
    torch.testing.assert_close(gm(*inputs), expected)
    with pytest.raises(seedrand.PolicyError, match=r"'even' \(Conv2d\): random supports padding='same' where it "
                                                   r"pads both sides alike"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["even"]}, "random": {}}]}, inputs)


class TransposedMatmul(nn.Linear):
    """Falcon's ``FalconLinear``: ``x @ W.T`` (``aten.numpy_T`` + ``aten.matmul`` once exported)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Falconish(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = TransposedMatmul(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[0] > 0:
            x = self.out(torch.relu(self.proj(x)))
        return x


def test_x_matmul_weight_transpose_is_a_linear_call_site():
    model, inputs = seeded(Falconish).eval(), (torch.randn(2, 5, 6),)
    gm = seedrand.rewrite(model, random_rule(["TransposedMatmul"]), inputs, graph=True)
    assert isinstance(gm.get_submodule("proj"), RandomLinear)
    assert not [n for n in gm.graph.nodes if n.target in (torch.ops.aten.numpy_T.default, torch.ops.aten.t.default)]
    weight = gm.get_submodule("proj").merged()["weight"]
    torch.testing.assert_close(gm(*inputs), model.out(torch.relu(inputs[0] @ weight.T + model.proj.bias)))


# A user's own layer class: registered once, it gets random, freeze_fraction, filter_gates and garbage collection.
class ScaledLinear(nn.Module):
    """A linear layer of the user's own (not an nn.Linear): weight (out, in) and bias as parameters."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.width = out_features

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


register_layer(ScaledLinear, LayerSpec("linear", default_init="normal(0.1)",
                                       resize=lambda m: setattr(m, "width", m.weight.shape[0])))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = ScaledLinear(6, 16), ScaledLinear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def rule(action, params=None):
    return {"version": 1, "seed": 3, "rules": [{"match": {"types": ["ScaledLinear"]}, action: params or {}}]}


def test_registered_layer_gets_random_with_its_own_init():
    model, x = seeded(Mlp), torch.randn(4, 6)
    kept = seedrand.rewrite(model, rule("random"), (x,))
    assert type(kept) is Mlp and isinstance(kept.a, RandomLinear)
    weight = sample(derive_seed(3, "a", "weight"), (16, 6), "normal", 0.1)
    torch.testing.assert_close(kept.a.weight, weight)
    assert abs(kept.a.weight.std().item() - 0.1) < 0.03


def test_registered_layer_gets_freeze_fraction_and_filter_gates():
    model, x = seeded(Mlp), torch.randn(4, 6)
    kept = seedrand.rewrite(model, rule("freeze_fraction", {"fraction": 0.25, "fixed": "zero"}), (x,))
    assert int((kept.a.weight == 0).all(1).sum()) == 4
    gated = seedrand.rewrite(model, rule("filter_gates"), (x,))
    torch.testing.assert_close(gated(x), model(x))
    assert {"a_gate", "b_gate"} <= {n for n, _ in gated.named_modules()}


@pytest.mark.parametrize("graph", [True, False])
def test_registered_layer_gets_garbage_collection_and_its_resize(graph):
    report = check_garbage_collection(seeded(Mlp), (torch.randn(4, 6),), match={"types": ["ScaledLinear"]},
                                      fraction=0.4, seed=1, graph=graph)
    assert report.not_applied is None and set(report.removed) >= {"a", "b"}


def test_registered_layer_resize_follows_in_the_kept_model():
    model, x = seeded(Mlp), torch.randn(4, 6, dtype=torch.float64)
    kept = seedrand.rewrite(model.double(), rule("filter_gates", {"init": "ones"}), (x,))
    with torch.no_grad():
        kept.a_gate.theta[:5] = -1.0
    before = kept(x)
    seedrand.collect_garbage(kept)
    assert kept.a.weight.shape == (11, 6) and kept.a.width == 11 and kept.b.weight.shape == (12, 11)
    torch.testing.assert_close(kept(x), before)


def test_unregistered_layer_names_the_registry():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(Mine())
    with pytest.raises(seedrand.PolicyError, match=r"random applies to registered layer classes .* register "
                                                   r".*Mine with seedrand.register_layer"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Mine"]}, "random": {}}]},
                         (torch.randn(2, 3),))


def test_register_layer_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="layout must be one of linear, conv, conv_transpose, embedding"):
        LayerSpec("bilinear")
    with pytest.raises(ValueError, match="transposed convolution is layout='conv_transpose'"):
        LayerSpec("conv", transposed=True)
    with pytest.raises(TypeError, match="takes an nn.Module subclass"):
        register_layer(int, LayerSpec("linear"))
    with pytest.raises(TypeError, match="takes a seedrand.layers.LayerSpec"):
        register_layer(ScaledLinear, {"layout": "linear"})


def test_most_derived_registration_wins(monkeypatch):
    class Sub(nn.Linear):
        pass

    assert layer_spec(Sub) is layer_spec(nn.Linear)
    spec = LayerSpec("linear", default_init="zero")
    monkeypatch.setattr(seedrand.layers, "_LAYERS", dict(seedrand.layers._LAYERS))  # this test's registration only
    register_layer(Sub, spec)
    assert layer_spec(Sub) is spec and layer_spec(nn.Linear) is not spec
    assert layer_spec(nn.ConvTranspose2d).layout == "conv_transpose" and layer_spec(nn.Conv2d).layout == "conv"


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.q(x)), torch.relu(self.v(x))], -1))


def test_a_weight_action_on_a_peft_lora_layer_applies_to_its_base_layer():
    """PEFT's LoRA layers are registered as wrappers of ``base_layer`` (LayerSpec(delegate=...)): ``random`` on a
    ``lora.Linear`` regenerates the frozen base weight and keeps the adapters trainable, in the PeftModel too."""
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(seeded(Attention), peft.LoraConfig(r=2, target_modules=["q"],
                                                                        init_lora_weights=False))
    x = torch.randn(4, 8)
    policy = {"version": 1, "rules": [{"match": {"types": ["peft.tuners.lora.layer.Linear"]}, "random": {}}]}
    kept = seedrand.rewrite(peft_model, policy, (x,))
    q = kept.base_model.model.q
    assert isinstance(q.base_layer, RandomLinear) and type(q).__name__ == "Linear"
    assert sorted(n for n, p in kept.named_parameters() if p.requires_grad) == [
        "base_model.model.q.lora_A.default.weight", "base_model.model.q.lora_B.default.weight"]
    inner = peft_model.base_model.model
    delta = q.lora_B["default"](q.lora_A["default"](x)) * q.scaling["default"]
    expected = inner.out(torch.cat([torch.relu(q.base_layer(x) + delta), torch.relu(inner.v(x))], -1))
    torch.testing.assert_close(kept(x), expected)
    with pytest.raises(seedrand.PolicyError, match=r"filter_gates applies to the layer a Linear wraps: select its "
                                                   r"'base_layer'"):
        seedrand.rewrite(peft_model, {"version": 1, "rules": [{"match": {"types": ["peft.tuners.lora.layer.Linear"]},
                                                               "filter_gates": {}}]}, (x,))
    both = {"version": 1, "rules": [policy["rules"][0], {"match": {"modules": ["re:.*q.base_layer"]},
                                                         "freeze_fraction": {"fraction": 0.5}}]}
    with pytest.raises(seedrand.PolicyError, match="both own its weight"):
        seedrand.rewrite(peft_model, both, (x,))


def tiny_mixtral():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    return seeded(lambda: transformers.MixtralForCausalLM(config)).eval(), torch.randint(0, 64, (2, 8))


def test_random_on_mixture_of_experts_weights(tmp_path):
    """transformers 5 keeps a MoE layer's experts as 3D parameters (MixtralExperts.gate_up_proj, down_proj): the
    "tensors" layout regenerates them, so a random Mixtral stores its embeddings, norms, routers and head only."""
    model, tokens = tiny_mixtral()
    linear = {"version": 1, "seed": 2, "rules": [{"match": {"types": ["Linear"], "exclude": ["lm_head"]},
                                                  "random": {}}]}
    experts = {"version": 1, "seed": 2, "rules": [{"match": {"types": ["Linear", "MixtralExperts"],
                                                             "exclude": ["lm_head"]}, "random": {}}]}
    stored = {name: sum(p.numel() for p in seedrand.rewrite(model, policy, (tokens,)).parameters())
              for name, policy in (("linear", linear), ("experts", experts))}
    total = sum(p.numel() for p in model.parameters())
    assert stored["linear"] / total > 0.8 and stored["experts"] / total < 0.15, (stored, total)
    kept = seedrand.rewrite(model, experts, (tokens,))
    layer = kept.model.layers[1].mlp.experts
    qualname = "model.layers.1.mlp.experts"
    expected = sample(derive_seed(2, qualname, "gate_up_proj"), (4, 96, 32), "normal", 0.02)
    assert torch.equal(layer.gate_up_proj, expected) and not layer.gate_up_proj.requires_grad
    assert not any("gate_up_proj" in n or "down_proj" in n for n, _ in kept.named_parameters())
    seedrand.save(kept, tmp_path / "moe.safetensors")
    loaded = seedrand.load(tmp_path / "moe.safetensors")
    torch.testing.assert_close(loaded(tokens).logits, kept(tokens).logits)
    merged = seedrand.merge(kept)
    assert isinstance(merged.model.layers[1].mlp.experts.gate_up_proj, nn.Parameter)
    torch.testing.assert_close(merged(tokens).logits, kept(tokens).logits)
    with pytest.raises(seedrand.PolicyError, match=r"freeze_fraction does not apply to a layer whose forward reads "
                                                   r"its weights as tensors"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["MixtralExperts"]},
                                                          "freeze_fraction": {"fraction": 0.5}}]}, (tokens,))


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


class ExportedSelfAttention(SelfAttention):
    def forward(self, x):
        if x.shape[0] > 0:
            x = super().forward(x)
        return x


@pytest.mark.parametrize("cls", [SelfAttention, ExportedSelfAttention])
def test_random_multihead_attention_in_projection(cls):
    """nn.MultiheadAttention reads in_proj_weight itself (layout "tensors"): it is regenerated with PyTorch's own
    xavier_uniform, read by the module's forward (symbolic trace, kept model) or by the exported ops."""
    model, x = seeded(cls).eval(), torch.randn(2, 5, 16)
    policy = {"version": 1, "seed": 4, "rules": [{"match": {"types": ["MultiheadAttention"]}, "random": {}}]}
    weight = sample(derive_seed(4, "attn", "in_proj_weight"), (48, 16), "uniform", math.sqrt(6 / (16 + 48)))
    reference = seeded(cls).eval()
    with torch.no_grad():
        reference.attn.in_proj_weight.copy_(weight)
    for graph in (True, False):
        rewritten = seedrand.rewrite(model, policy, (x,), graph=graph)
        torch.testing.assert_close(rewritten(x), reference(x))
        assert "attn.in_proj_weight" not in dict(rewritten.named_parameters())
        assert "attn.in_proj_weight.value_seed" in rewritten.state_dict()
    kept = seedrand.rewrite(model, policy, (x,))
    assert torch.equal(kept.attn.in_proj_weight, weight) and kept.attn.out_proj.weight.requires_grad
