"""``seedrand.merge`` (a plain model of the original class from a kept model) and ``seedrand.load_base_state_dict``
(an original architecture's weights into a kept model)."""

import copy

import pytest
import torch
import torch.nn as nn

import seedrand
from seedrand import zoo
from seedrand.passes.filter_gates import FilterGate
from seedrand.rewriter.kept import is_seedrand_module
from seedrand.rewriter.rewrite import record_of

from test_kept import ACTIONS, GPT2_POLICY, Net, _gpt2_default, _rule


def _plain(model: nn.Module) -> bool:
    """No seedrand module, generated class, computed attribute or hook left."""
    return not any(is_seedrand_module(m) or type(m).__name__.startswith("Seedrand") or m._forward_hooks
                   or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("action", [a for a in ACTIONS if a != "insert_random"])
def test_merge_gives_a_plain_model_of_the_original_class_computing_the_same(action):
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(0))
    kept = seedrand.rewrite(model, ACTIONS[action], (tokens,)).eval()
    merged = seedrand.merge(kept).eval()
    assert type(merged) is Net and _plain(merged)
    assert sorted(merged.state_dict()) == sorted(model.state_dict())
    assert all(merged.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), kept(tokens), rtol=1e-5, atol=1e-6)
    fresh = Net()
    fresh.load_state_dict(merged.state_dict())  # any tool that knows the original architecture takes it
    torch.testing.assert_close(fresh.eval()(tokens), merged(tokens), rtol=0, atol=0)
    assert record_of(merged) is None


def test_merge_folds_gates_after_batch_norm_and_follows_garbage_collection():
    model, inputs = zoo.cnn()
    kept = seedrand.rewrite(model.eval(), {"version": 1, "rules": [
        {"match": {"types": ["Conv2d"]}, "filter_gates": {"init": "uniform"}},
        {"match": {"modules": ["re:.*"], "types": ["Linear"]}, "random": {}}]}, inputs).eval()
    with torch.no_grad():
        for gate in (m for m in kept.modules() if isinstance(m, FilterGate)):
            gate.theta[: len(gate.theta) // 3] = -1.0
    seedrand.collect_garbage(kept)
    merged = seedrand.merge(kept).eval()
    assert type(merged) is type(model) and _plain(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs), kept(*inputs), rtol=1e-4, atol=1e-5)
    convs = [m for m in merged.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.out_channels < o.out_channels for c, o in zip(convs, (m for m in model.modules()
                                                                      if isinstance(m, nn.Conv2d))))


def test_merge_of_a_gpt2_keeps_its_class_config_and_generation():
    model = _gpt2_default()
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    policy = {"version": 1, "seed": 5, "rules": [
        {"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\.c_fc"]}, "random": {"bias": "trainable"}},
        {"match": {"modules": [r"re:transformer\.h\.\d+\.attn\.c_attn"]}, "freeze_fraction": {"fraction": 0.5}},
        {"match": {"modules": [r"re:transformer\.h\.\d+\.mlp\.c_proj"]}, "filter_gates": {"init": "uniform"}}]}
    kept = seedrand.rewrite(model, policy, (ids,))
    merged = seedrand.merge(kept)
    assert type(merged) is type(model) and _plain(merged) and merged.config.to_dict() == kept.config.to_dict()
    assert sorted(merged.state_dict()) == sorted(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, kept(ids).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(merged.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0),
                           kept.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_merge_refuses_what_the_original_class_cannot_hold():
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(2))
    kept = seedrand.rewrite(model, ACTIONS["insert_random"], (tokens,))
    with pytest.raises(seedrand.ModelError, match="cannot fold the RandomStack inserted after fc1"):
        seedrand.merge(kept)
    with pytest.raises(seedrand.ModelError, match="graph=True"):
        seedrand.merge(seedrand.rewrite(model, ACTIONS["random"], (tokens,), graph=True))
    with pytest.raises(seedrand.ModelError, match="seedrand.rewrite returned"):
        seedrand.merge(model)


def test_load_base_state_dict_keeps_pretrained_values_where_the_policy_keeps_values():
    pretrained, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(3))
    policy = {"version": 1, "seed": 3, "rules": [
        {"match": {"modules": ["fc1"]}, "freeze_fraction": {"fraction": 0.5}},
        {"match": {"modules": ["emb"]}, "random": {}},
        {"match": {"modules": ["fc2"]}, "filter_gates": {"init": "uniform"}}]}
    kept = seedrand.rewrite(Net(), policy, (tokens,)).eval()  # other (random) weights
    parameters = {id(p) for p in kept.parameters()}
    gates = {n: p.detach().clone() for n, p in kept.named_parameters() if "gate" in n}
    report = seedrand.load_base_state_dict(kept, pretrained.state_dict())
    assert report.not_kept == ["emb.weight", "fc1.weight", "fc1.bias"]  # regenerated table, frozen random halves
    assert "fc2.weight" in report.kept and "bn.running_mean" in report.kept
    assert {id(p) for p in kept.parameters()} == parameters  # in place: an optimizer goes on
    assert all(torch.equal(p, gates[n]) for n, p in kept.named_parameters() if n in gates)
    expected = seedrand.rewrite(pretrained, policy, (tokens,)).eval()  # as if the pretrained model was rewritten
    with torch.no_grad():
        expected.fc2_gate.theta.copy_(kept.fc2_gate.theta)
        torch.testing.assert_close(kept(tokens), expected(tokens), rtol=0, atol=0)


def test_load_base_state_dict_refuses_what_does_not_fit_and_changes_nothing():
    model, tokens = Net(), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(4))
    kept = seedrand.rewrite(model, ACTIONS["freeze_fraction"], (tokens,))
    before = copy.deepcopy(kept.state_dict())
    partial = {k: v for k, v in Net().state_dict().items() if k != "fc2.bias"}
    with pytest.raises(seedrand.ModelError, match="fc2.bias"):
        seedrand.load_base_state_dict(kept, partial)
    wrong = {**Net().state_dict(), "fc2.weight": torch.zeros(3, 16)}
    with pytest.raises(seedrand.ModelError, match="size mismatch for fc2.weight"):
        seedrand.load_base_state_dict(kept, wrong, strict=False)
    assert all(torch.equal(before[k], v) for k, v in kept.state_dict().items())
    report = seedrand.load_base_state_dict(kept, partial, strict=False)
    assert report.missing_keys == ["fc2.bias"] and report.unexpected_keys == []


def test_load_base_state_dict_into_a_kept_gpt2():
    pretrained = _gpt2_default()
    torch.manual_seed(1)
    kept = seedrand.rewrite(type(pretrained)(pretrained.config), GPT2_POLICY, (torch.ones(2, 4, dtype=torch.long),))
    report = seedrand.load_base_state_dict(kept, pretrained.state_dict())
    assert sorted(report.not_kept) == sorted(f"transformer.h.{i}.mlp.{n}.weight" for i in range(2)
                                             for n in ("c_fc", "c_proj"))
    assert torch.equal(kept.transformer.wte.weight, pretrained.transformer.wte.weight)
    assert torch.equal(kept.transformer.h[1].mlp.c_fc.bias, pretrained.transformer.h[1].mlp.c_fc.bias)
