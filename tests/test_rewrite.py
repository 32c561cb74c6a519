"""seedrand.rewrite: copy semantics, empty-policy bit-identity on real models, train/eval, freeze, errors."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from conftest import logits

import seedrand
from seedrand import SeedrandError, TraceError
from seedrand.actions import ACTIONS

EMPTY = {"version": 1, "rules": []}
TRANSFORMERS = ["resnet", "mobilenet_v2", "vit", "gpt2", "bert"]


@pytest.fixture(scope="module")
def rewritten(zoo_models):
    """Each zoo model rewritten with the empty policy, once per module."""
    return {name: seedrand.rewrite(model, EMPTY, inputs, graph=True) for name, (model, inputs) in zoo_models.items()}


@pytest.mark.parametrize("name", ["mlp", "cnn", *TRANSFORMERS])
def test_empty_policy_is_bit_identical_in_eval_and_train(name, zoo_models, rewritten):
    model, inputs = zoo_models[name]
    gm = copy.deepcopy(rewritten[name])  # a private copy: this test switches modes and writes gradients
    expected_strategy = "symbolic_trace" if name in ("mlp", "cnn") else "torch.export"
    assert gm.meta["seedrand"].trace.strategy == expected_strategy
    with torch.no_grad():
        assert torch.equal(logits(gm.eval()(*inputs)), logits(model.eval()(*inputs)))
    reference = copy.deepcopy(model).train()
    gm.train()
    torch.manual_seed(3)
    out = logits(gm(*inputs))
    torch.manual_seed(3)
    assert torch.equal(out, logits(reference(*inputs)))  # same dropout masks, same BatchNorm batch statistics
    out.square().mean().backward()
    missing = [n for n, p in gm.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_dynamic_batch_after_export(zoo_models, rewritten):
    model, (x,) = zoo_models["vit"]
    bigger = torch.cat([x, x, x])
    with torch.no_grad():
        assert torch.equal(logits(rewritten["vit"].eval()(bigger)), logits(model.eval()(bigger)))


def test_batchnorm_running_stats_follow_train_and_eval(zoo_models):
    model, inputs = zoo_models["resnet"]
    gm = seedrand.rewrite(model, EMPTY, inputs, graph=True)
    reference = copy.deepcopy(model)
    stats = "resnet.embedder.embedder.normalization"
    for mode in (True, False, True):
        gm.train(mode)
        reference.train(mode)
        with torch.no_grad():
            assert torch.equal(logits(gm(*inputs)), logits(reference(*inputs)))
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(gm.get_buffer(f"{stats}.{buffer}"), reference.get_buffer(f"{stats}.{buffer}"))
    assert int(gm.get_buffer(f"{stats}.num_batches_tracked")) == 2


def test_tied_weights_stay_tied(rewritten):
    gm = rewritten["gpt2"]
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("transformer.wte.weight")


def test_original_untouched_after_success_and_rewrite_does_not_share_parameters(zoo_models):
    model, inputs = zoo_models["cnn"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Conv2d"]}, "freeze": {}}]}, inputs, graph=True)
    assert all(p.requires_grad for p in model.parameters())
    assert not gm.get_parameter("conv1.weight").requires_grad
    assert gm.get_parameter("conv1.weight") is not model.conv1.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_original_untouched_after_failure_midway(zoo_models, monkeypatch):
    model, inputs = zoo_models["cnn"]
    before = copy.deepcopy(model.state_dict())

    def breaking_pass(gm, targets):
        for p in gm.parameters():
            p.data.zero_()
            p.requires_grad_(False)
        raise RuntimeError("pass failed midway")

    monkeypatch.setitem(ACTIONS, "freeze", dataclasses.replace(ACTIONS["freeze"], apply=breaking_pass))
    with pytest.raises(RuntimeError, match="midway"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Conv2d"]}, "freeze": {}}]}, inputs, graph=True)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_freeze_learn_only_layernorm_trains_only_layernorm(zoo_models):
    model, inputs = zoo_models["gpt2"]
    gm = seedrand.rewrite(model, "examples/policies/gpt2_learn_only_layernorm.yaml", inputs, graph=True).train()
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable and all(".ln_" in n or n.startswith("transformer.ln_f") for n in trainable)
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        logits(gm(*inputs)).square().mean().backward()
        optimizer.step()
    for n, p in gm.named_parameters():
        assert (p.grad is not None) == (n in trainable)
        assert torch.equal(p, before[n]) == (n not in trainable), n


def test_summary_accounts_for_every_parameter(zoo_models):
    model, inputs = zoo_models["cnn"]
    gm = seedrand.rewrite(model, "examples/policies/cnn_learn_only_batchnorm.yaml", inputs, graph=True)
    report = seedrand.summary(gm)
    total = sum(p.numel() for p in model.parameters())
    conv = sum(p.numel() for m in (model.conv1, model.conv2) for p in m.parameters())
    assert [r.module for r in report.rows] == ["conv1", "conv2"]
    assert report.total.frozen == conv and report.total.trainable == total - conv
    assert report.total.frozen_bytes == 4 * conv
    assert report.unaccounted_trainable == total - conv
    assert "conv2" in str(report) and report.to_dict()["total"]["frozen"] == conv


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * 2 if self.training else self.fc(x)


def test_graph_that_branches_on_training_is_locked_to_its_mode():
    gm = seedrand.rewrite(TrainingBranch().train(), EMPTY, (torch.randn(2, 4),), graph=True)
    assert gm.meta["seedrand"].trace.locked_mode is True
    gm(torch.randn(2, 4))
    with pytest.raises(SeedrandError, match="captured in train mode"):
        gm.eval()(torch.randn(2, 4))


def test_untraceable_without_inputs_names_the_line_and_what_to_try(zoo_models):
    model, _ = zoo_models["gpt2"]
    with pytest.raises(TraceError) as info:
        seedrand.rewrite(model, EMPTY, graph=True)
    assert "modeling_gpt2.py:" in str(info.value) and "pass example_inputs" in str(info.value)


def test_rewrite_leaves_global_rng_alone(zoo_models):
    model, inputs = zoo_models["bert"]
    state = torch.get_rng_state()
    seedrand.rewrite(model, EMPTY, inputs, graph=True)
    assert torch.equal(torch.get_rng_state(), state)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.fc(x).sum() > 0:  # a branch on tensor values: neither strategy can capture it
            return x
        return -x


def test_untraceable_model_reports_both_strategies_and_the_line():
    with pytest.raises(TraceError) as info:
        seedrand.rewrite(DataDependent(), EMPTY, (torch.randn(2, 4),), graph=True)
    message = str(info.value)
    assert "symbolic tracing failed" in message and "torch.export failed" in message
    assert "test_rewrite.py:" in message and "torch.cond" in message


class ExportedDropPath(nn.Module):
    """Branches on ``self.training`` (a drop path's shape) in a way torch.fx cannot trace (a branch on a shape),
    so the export path captures it; train mode doubles the residual branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 0 and self.training:
            return x + 2 * self.fc(x)
        return x + self.fc(x)


@pytest.mark.parametrize("mode", [True, False])
def test_exported_graph_of_a_mode_branching_model_is_the_models_mode(mode):
    """The kept graph is the export of the mode the model was in (before, always the train-mode export: an eval-mode
    model silently computed train-mode outputs), locked to it."""
    model = ExportedDropPath().train(mode)
    x = torch.randn(3, 4)
    gm = seedrand.rewrite(model, EMPTY, (x,), graph=True)
    info = gm.meta["seedrand"].trace
    assert info.strategy == "torch.export" and info.locked_mode is mode and "differ between train and eval" in \
        info.lock_reason
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    with pytest.raises(SeedrandError, match=f"captured in {'train' if mode else 'eval'} mode"):
        gm.train(not mode)(x)


class TrainOnlyNumpy(nn.Module):
    """Like SpecAugment: train mode runs numpy code that torch.export cannot trace; eval mode is plain."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 0 and self.training:
            keep = torch.from_numpy((x.detach().numpy() > -10).astype("float32"))  # .numpy(): no fake tensors
            return self.fc(x * keep)
        return self.fc(x)


def test_a_mode_that_cannot_be_traced_leaves_the_other_usable():
    model = TrainOnlyNumpy().eval()
    x = torch.randn(3, 4)
    gm = seedrand.rewrite(model, EMPTY, (x,), graph=True)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert "train mode cannot be traced" in gm.meta["seedrand"].trace.lock_reason
    with pytest.raises(SeedrandError, match="captured in eval mode and cannot run in the other: train mode cannot"):
        gm.train()(x)
    with pytest.raises(TraceError, match="torch.export failed"):
        seedrand.rewrite(model.train(), EMPTY, (x,), graph=True)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_exported_graphs_change_dtype(zoo_models, name):
    """.double() of an exported graph runs (export's dtype asserts are dropped) and equals the original in float64;
    Llama's rotary embedding casts back to the dtype seen at export (float32), a literal in the graph, so its
    outputs carry float32 rounding there."""
    model, inputs = zoo_models[name]
    gm = seedrand.rewrite(model, EMPTY, inputs, graph=True).eval().double()
    reference = copy.deepcopy(model).eval().double()
    tolerance = 1e-12 if name == "gpt2" else 1e-6
    with torch.no_grad():
        out = logits(gm(*inputs))
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, logits(reference(*inputs)), rtol=tolerance, atol=tolerance)


def test_exported_graphs_take_keyword_inputs(zoo_models):
    """An exported graph binds calls to the original forward's signature: traced inputs by keyword, untraced ones
    left out or at their default; any other value of an untraced input is an error naming it."""
    model, inputs = zoo_models["gpt2"]
    gm = seedrand.rewrite(model, EMPTY, inputs, graph=True).eval()
    with torch.no_grad():
        expected = logits(gm(*inputs))
        assert torch.equal(logits(gm(input_ids=inputs[0])), expected)
        assert torch.equal(logits(gm(inputs[0], attention_mask=None, use_cache=None)), expected)
    for kwargs, name in [({"attention_mask": torch.ones_like(inputs[0])}, "attention_mask"), ({"foo": 1}, "foo")]:
        with pytest.raises(SeedrandError, match=f"input '{name}' was not among the example inputs"):
            gm(inputs[0], **kwargs)
    with pytest.raises(SeedrandError, match="input 'input_ids' is required"):
        gm(attention_mask=None)
    assert torch.equal(logits(copy.deepcopy(gm)(input_ids=inputs[0])), expected)


def test_exported_image_sizes_are_static_unless_asked(zoo_models):
    """The batch stays dynamic; other dimensions of float inputs are static by default (fast to trace), dynamic on
    request through dynamic_shapes."""
    from torch.export import Dim

    model, (x,) = zoo_models["resnet"]
    bigger = torch.randn(3, x.shape[1], x.shape[2] + 8, x.shape[3] + 8, generator=torch.Generator().manual_seed(0))
    gm = seedrand.rewrite(model, EMPTY, (x,), graph=True).eval()
    with torch.no_grad():
        assert torch.equal(logits(gm(x[:1].repeat(3, 1, 1, 1))), logits(model.eval()(x[:1].repeat(3, 1, 1, 1))))
        with pytest.raises(Exception):
            gm(bigger)
        dynamic = seedrand.rewrite(model, EMPTY, (x,), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},), graph=True)
        assert torch.equal(logits(dynamic.eval()(bigger)), logits(model.eval()(bigger)))


@pytest.mark.parametrize("rule", [
    {"match": {"modules": ["2"]}, "random": {"bias": "trainable"}},  # its input requires grad: the op's autograd runs
    {"match": {"modules": ["0", "2"]}, "freeze_fraction": {"fraction": 0.5, "select": "random"}},
    {"match": {"modules": ["0", "2"]}, "subspace": {"dim": 3}},
    {"match": {"modules": ["0", "2"]}, "subspace": {"dim": 3, "projection": "fastfood", "scope": "global"}},
])
def test_torch_func_grad_equals_autograd(rule):
    """torch.func.grad over functional_call of a rewritten model runs (seedrand's custom ops' autograd is not a
    functorch-compatible autograd.Function, so the modules compute with plain torch ops there) and equals
    loss.backward()."""
    from torch.func import functional_call, grad

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    gm = seedrand.rewrite(model, {"version": 1, "seed": 5, "rules": [rule]}, (x,), graph=True)
    params = {n: p.detach() for n, p in gm.named_parameters() if p.requires_grad}
    grads = grad(lambda p: functional_call(gm, p, (x,)).square().sum())(params)
    gm(x).square().sum().backward()
    assert grads.keys() == params.keys()
    for name, p in gm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_default_gpt2_config_with_its_cache_is_rewritten():
    """GPT2LMHeadModel's default config has use_cache=True, whose DynamicCache output torch.export refuses: the
    rewrite traces its copy with the cache off; the user's model and config are untouched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                                       eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    gm = seedrand.rewrite(model, EMPTY, (ids,), graph=True).eval()
    assert model.config.use_cache is True
    with torch.no_grad():
        assert torch.equal(gm(ids).logits, model(ids).logits)


class UnusedHead(nn.Module):
    """A module the forward never calls (DPT keeps heads its forward does not use)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.unused = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(8, 8)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("action", ["random", "filter_gates", "freeze_fraction"])
def test_an_optional_rule_skips_a_module_the_forward_never_reads(action):
    model, x = UnusedHead(), torch.randn(3, 4)
    params = {"fraction": 0.5} if action == "freeze_fraction" else {}
    rule = {"match": {"types": ["Linear"]}, action: params}
    with pytest.raises(seedrand.PolicyError, match=r"'unused' \(Linear\): .*never used by the traced forward"):
        seedrand.rewrite(model, {"version": 1, "rules": [rule]}, (x,))
    kept = seedrand.rewrite(model, {"version": 1, "rules": [{**rule, "optional": True}]}, (x,))
    record = seedrand.rewriter.rewrite.record_of(kept)
    assert record.skipped == {"unused": "rule rules[0] (optional): the traced forward never reads it"}
    assert {t.qualname for t in record.targets} == {"body", "head"} and type(kept.unused) is nn.Linear
