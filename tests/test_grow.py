"""The `grow` action and `seedrand.CapacityScheduler` (the dynamic network capacity thesis, section 5.1): staged
capacity, transitions on plateaus only, frozen slices that stay frozen, optimizer state across transitions, init of new
units, checkpoints, removal of inactive units, and errors."""

import copy

import pytest
import torch
import torch.nn as nn

import seedrand
from seedrand import CapacityScheduler, PolicyError
from seedrand.policy import parse_policy
from seedrand.passes.grow import GrowingSlices, stage_bounds

SEED = 5


def sine_net(hidden=10):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def grow_policy(stages=5, start=1, freeze_previous=True, window=3, min_delta=0.0, consumer=True):
    settings = {"stages": stages, "start": start, "freeze_previous": freeze_previous,
                "plateau": {"window": window, "min_delta": min_delta}}
    rules = [{"name": "hidden", "match": {"modules": ["0"]}, "grow": settings}]
    if consumer:
        rules.append({"name": "readout", "match": {"modules": ["2"]}, "grow": {**settings, "dim": "in"}})
    return {"version": 1, "seed": SEED, "rules": rules}


X = torch.linspace(-6, 6, 32).unsqueeze(1)


def grown(hidden=10, **kwargs):
    model = sine_net(hidden)
    return model, seedrand.rewrite(model, grow_policy(**kwargs), (X[:2],), graph=True)


def test_stage_bounds_split_like_tensor_split():
    for n, stages in [(10, 5), (11, 5), (500, 5), (7, 7)]:
        sizes = [hi - lo for lo, hi in stage_bounds(n, stages)]
        assert sizes == [len(t) for t in torch.tensor_split(torch.arange(n), stages)]
    with pytest.raises(ValueError, match="3 units cannot be split into 4 stages"):
        stage_bounds(3, 4)


def test_start_is_the_static_network_of_the_active_units():
    """With 2 of 5 stages active, the grown net computes exactly the static net of its first 4 hidden units."""
    model, gm = grown(hidden=10, start=2)
    small = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        small[0].weight.copy_(model[0].weight[:4])
        small[0].bias.copy_(model[0].bias[:4])
        small[2].weight.copy_(model[2].weight[:, :4])
        small[2].bias.copy_(model[2].bias)
    torch.testing.assert_close(gm(X), small(X), rtol=0, atol=1e-6)
    weight = gm.get_submodule("0.weight")
    assert [p.requires_grad for p in weight.slices] == [True, True, False, False, False]
    assert all(torch.count_nonzero(p) == 0 for p in weight.slices[2:])


def test_transition_on_plateau_and_not_before():
    _, gm = grown(window=4)
    scheduler = CapacityScheduler(gm, torch.optim.SGD(gm.parameters(), lr=0.1))
    for step in range(1, 40):  # a loss that keeps falling never plateaus
        assert scheduler.step(1.0 / step) == []
    assert scheduler.stage("'hidden' (rules[0])") == 1 and not scheduler.transitions
    _, gm = grown(window=4)
    scheduler = CapacityScheduler(gm, torch.optim.SGD(gm.parameters(), lr=0.1))
    grew = [scheduler.step(0.5) for _ in range(16)]  # constant: 4 steps fill the average, 4 more without gain
    both = ["'hidden' (rules[0])", "'readout' (rules[1])"]
    assert grew == ([[]] * 7 + [both]) * 2  # each stage starts a fresh moving average
    assert [(t.step, t.group, t.stage) for t in scheduler.transitions] == [
        (8, both[0], 2), (8, both[1], 2), (16, both[0], 3), (16, both[1], 3)]


def test_min_delta_counts_small_gains_as_a_plateau():
    _, gm = grown(window=2, min_delta=0.1, consumer=False)
    scheduler = CapacityScheduler(gm, torch.optim.SGD(gm.parameters(), lr=0.1))
    grew = [scheduler.step(1.0 - 0.01 * k) for k in range(4)]
    assert grew[-1] == ["'hidden' (rules[0])"] and grew[:-1] == [[]] * 3


def _train(gm, optimizer, scheduler, steps, target=torch.sin(X)):
    for _ in range(steps):
        loss = ((gm(X) - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=False)  # stale zero gradients must not move frozen slices either
        loss.backward()
        optimizer.step()
        scheduler.step(loss)


def test_frozen_slices_stop_changing_and_new_units_train():
    _, gm = grown(window=2)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    scheduler = CapacityScheduler(gm, optimizer)
    weight = gm.get_submodule("0.weight")
    _train(gm, optimizer, scheduler, 1)
    scheduler.step(float("inf"))  # force plateaus: constant losses from here
    while scheduler.stage("'hidden' (rules[0])") < 2:
        scheduler.step(1.0)
    snapshot = [p.detach().clone() for p in weight.slices]
    assert [p.requires_grad for p in weight.slices] == [False, True, False, False, False]
    assert all(p not in optimizer.state for p in (weight.slices[0], gm.get_submodule("2.weight").slices[0]))
    for _ in range(5):
        loss = ((gm(X) - torch.sin(X)) ** 2).mean()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
    assert torch.equal(weight.slices[0], snapshot[0])  # Adam's momentum would move it, were its state kept
    assert not torch.equal(weight.slices[1], snapshot[1])
    assert all(torch.count_nonzero(p) == 0 for p in weight.slices[2:])


def test_optimizer_state_of_active_slices_survives_a_transition():
    _, gm = grown(window=2, freeze_previous=False)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    scheduler = CapacityScheduler(gm, optimizer)
    first = gm.get_submodule("0.weight").slices[0]
    _train(gm, optimizer, scheduler, 3)
    state = optimizer.state[first]
    moment, steps = state["exp_avg"].clone(), int(state["step"])
    while not scheduler.transitions:
        scheduler.step(1.0)
    assert optimizer.state[first] is state and torch.equal(state["exp_avg"], moment)
    assert gm.get_submodule("0.weight").slices[1] not in optimizer.state  # new: no state until its first gradient
    _train(gm, optimizer, scheduler, 1)
    assert int(optimizer.state[first]["step"]) == steps + 1 and first.requires_grad
    assert gm.get_submodule("0.weight").slices[1] in optimizer.state


def test_new_units_get_the_full_layers_init_from_the_seed():
    """An activated slice holds what the `random` action regenerates for those rows (init for the full fan-in)."""
    model, gm = grown(hidden=10, start=1, consumer=True)
    for layer in gm.get_submodule("0.weight"), gm.get_submodule("0.bias"), gm.get_submodule("2.weight"):
        layer.grow()
    regenerated = seedrand.rewrite(model, {"version": 1, "seed": SEED, "rules": [
        {"match": {"modules": ["0", "2"]}, "random": {"bias": "random"}}]}, (X[:2],), graph=True)
    torch.testing.assert_close(gm.get_submodule("0.weight")()[2:4], regenerated.get_submodule("0").weight[2:4],
                               rtol=0, atol=0)
    torch.testing.assert_close(gm.get_submodule("0.bias")()[2:4],
                               regenerated.get_submodule("0").regenerate("bias")[2:4], rtol=0, atol=0)
    torch.testing.assert_close(gm.get_submodule("2.weight")()[:, 2:4], regenerated.get_submodule("2").weight[:, 2:4],
                               rtol=0, atol=0)
    torch.testing.assert_close(gm.get_submodule("0.weight")()[:2], model[0].weight[:2], rtol=0, atol=0)


def test_checkpoint_restores_stages_and_frozen_flags():
    _, gm = grown(window=2)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    scheduler = CapacityScheduler(gm, optimizer)
    _train(gm, optimizer, scheduler, 2)
    for _ in range(8):
        scheduler.step(1.0)
    assert scheduler.stage("'hidden' (rules[0])") == 3
    _, fresh = grown(window=2)
    fresh.load_state_dict(gm.state_dict())
    torch.testing.assert_close(fresh(X), gm(X), rtol=0, atol=0)
    for name in ("0.weight", "0.bias", "2.weight"):
        assert [p.requires_grad for p in fresh.get_submodule(name).slices] == [False, False, True, False, False]
    restored = CapacityScheduler(fresh, torch.optim.Adam(fresh.parameters()))
    restored.load_state_dict(copy.deepcopy(scheduler.state_dict()))
    assert restored.state_dict() == scheduler.state_dict()


def test_drop_inactive_keeps_outputs_and_removes_the_zero_units():
    _, gm = grown(hidden=10, start=2)
    pruned, report = seedrand.drop_inactive(gm)
    torch.testing.assert_close(pruned(X), gm(X), rtol=0, atol=1e-6)
    assert report.removed == {"0": 6} and pruned.get_submodule("0").weight.shape == (4, 1)
    assert pruned.get_submodule("2").weight.shape == (1, 4)
    assert isinstance(gm.get_submodule("0.weight"), GrowingSlices)  # the model itself is untouched


def test_convolutions_grow_and_train_only_active_slices():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    policy = {"version": 1, "seed": 1, "rules": [
        {"match": {"modules": ["0"]}, "grow": {"stages": 4, "start": 1}},
        {"match": {"modules": ["2"]}, "grow": {"stages": 4, "start": 1, "dim": "in"}}]}
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    gm = seedrand.rewrite(model, policy, (x,), graph=True)
    gm(x).square().sum().backward()
    slices = gm.get_submodule("0.weight").slices
    assert slices[0].grad is not None and all(p.grad is None for p in slices[1:])
    assert gm.get_submodule("0.weight")().shape == (8, 1, 3, 3)


def test_scheduler_needs_every_slice_in_the_optimizer():
    _, gm = grown()
    trainable = [p for p in gm.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"does not hold slice\(s\) \[1, 2, 3, 4\] of 0.weight"):
        CapacityScheduler(gm, torch.optim.SGD(trainable, lr=0.1))
    with pytest.raises(ValueError, match="no grow layers"):
        CapacityScheduler(sine_net(), torch.optim.SGD(sine_net().parameters(), lr=0.1))


@pytest.mark.parametrize("settings,message", [
    ("{stages: 1}", "stages: Input should be greater than or equal to 2"),
    ("{stages: 3, start: 4}", "start: 4 must be below stages: 3"),
    ("{stages: 3, start: 3}", "start: 3 must be below stages: 3"),
    ("{plateau: {window: 0}}", "window: Input should be greater than or equal to 1"),
    ("{plateau: {patience: 3}}", "unknown key 'patience'"),
])
def test_bad_settings_name_the_rule_and_line(settings, message):
    text = f"version: 1\nseed: 0\nrules:\n  - name: g\n    match: {{modules: ['0']}}\n    grow: {settings}\n"
    with pytest.raises(PolicyError, match=message) as info:
        parse_policy(text, "grow.yaml")
    assert "grow.yaml" in str(info.value) and ":6" in str(info.value)


def test_layers_that_cannot_grow_are_refused_and_the_model_is_untouched():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PolicyError, match="not to the rows of an nn.Embedding"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["0"]}, "grow": {}}]}, graph=True)
    with pytest.raises(PolicyError, match="3 output units, fewer than stages: 5"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["1"]}, "grow": {"stages": 5}}]}, graph=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_manual_grow_step():
    """scheduler.grow() grows now, whatever the loss: one rule or every rule that can, dropping the frozen slices'
    optimizer state as a plateau would, and starting the plateau tracker anew."""
    _, gm = grown(window=2, stages=3)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-2)
    scheduler = CapacityScheduler(gm, optimizer)
    _train(gm, optimizer, scheduler, 1)
    hidden, readout = "'hidden' (rules[0])", "'readout' (rules[1])"
    first = gm.get_submodule("0.weight").slices[0]
    assert first in optimizer.state
    assert scheduler.grow(hidden) == [hidden]
    assert scheduler.stage(hidden) == 2 and scheduler.stage(readout) == 1
    assert first not in optimizer.state and not first.requires_grad  # frozen: its Adam moments dropped
    assert not scheduler.plateaus[hidden].losses
    assert scheduler.grow() == [hidden, readout]
    assert scheduler.grow() == [readout] and scheduler.stage(readout) == 3
    assert [t.stage for t in scheduler.transitions] == [2, 3, 2, 3]
    with pytest.raises(ValueError, match="has all its 3 stages active"):
        scheduler.grow(hidden)
    with pytest.raises(ValueError, match="no grow rule 'other'"):
        scheduler.grow("other")
    assert scheduler.grow() == []
