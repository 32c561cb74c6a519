"""`seedrand.ensemble` (Rosenfeld & Tsotsos 2018, section 4.3): members share frozen and regenerated weights (one
storage or one seed), differ in their trainable slices, train independently, and are accounted once by
`seedrand.summary`."""

import pytest
import torch

import seedrand
from seedrand import zoo
from seedrand.kernels import ops

SEED = 7


def share_conv(fraction, fixed="random"):
    return {"version": 1, "seed": SEED, "rules": [
        {"name": "share", "match": {"types": ["Conv2d"]}, "freeze_fraction": {"fraction": fraction, "fixed": fixed}},
        {"name": "bn", "match": {"types": ["BatchNorm2d"]}, "freeze": {}}]}


@pytest.fixture(scope="module")
def cnn():
    return zoo.cnn()


def test_members_share_frozen_tensors_and_regeneration_keys(cnn):
    model, inputs = cnn
    kept = seedrand.ensemble(model, share_conv(0.6, "keep"), members=3, example_inputs=inputs)
    random = seedrand.ensemble(model, share_conv(0.6, "random"), members=3, example_inputs=inputs)
    first, *others = kept.members
    for other in others:
        assert other.conv1.weight.frozen is first.conv1.weight.frozen  # one storage
        assert other.bn1.weight is first.bn1.weight  # a frozen parameter: one tensor
        assert other.conv1.weight.trainable is not first.conv1.weight.trainable
        assert other.bn1.running_mean is not first.bn1.running_mean  # statistics are per member
    streams = [m.conv2.weight.streams["frozen"] for m in random.members]
    assert len({(s.seed, s.shape) for s in streams}) == 1  # one key, nothing stored
    assert all(not any(n.endswith("frozen") for n, _ in m.conv2.weight.named_buffers()) for m in random.members)


def test_members_differ_member_zero_is_the_rewrite_and_all_are_pure_functions_of_the_seed(cnn):
    model, inputs = cnn
    state = torch.random.get_rng_state()
    ens = seedrand.ensemble(model, share_conv(0.9), members=4, example_inputs=inputs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is never touched
    mean, each = ens(*inputs, return_members=True)
    assert each.shape == (4, *mean.shape) and torch.allclose(mean, each.mean(0))
    single = seedrand.rewrite(model, share_conv(0.9), inputs, graph=True)
    torch.testing.assert_close(each[0], single(*inputs), rtol=0, atol=0)
    assert all(not torch.allclose(each[i], each[j]) for i in range(4) for j in range(i))
    again = seedrand.ensemble(model, share_conv(0.9), members=4, example_inputs=inputs)
    torch.testing.assert_close(again(*inputs), mean, rtol=0, atol=0)
    # the frozen slices are the same in every member: the assembled weights agree there
    frozen = ens.members[0].conv2.weight.frozen_index
    weights = [m.conv2.weight().index_select(0, frozen) for m in ens.members]
    assert all(torch.equal(w, weights[0]) for w in weights)


def test_training_moves_each_member_and_never_the_shared_weights(cnn):
    model, inputs = cnn
    ens = seedrand.ensemble(model, share_conv(0.6, "keep"), members=3, example_inputs=inputs).train()
    shared = ens.members[0].conv1.weight.frozen.clone()
    before = [m.conv1.weight.trainable.detach().clone() for m in ens.members]
    optimizer = torch.optim.Adam(ens.parameters(), lr=1e-2)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    for _ in range(3):
        _, each = ens(x, return_members=True)
        loss = sum(torch.nn.functional.cross_entropy(out, y) for out in each)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(ens.members[2].conv1.weight.frozen, shared)
    assert all(not torch.equal(m.conv1.weight.trainable, b) for m, b in zip(ens.members, before))


def test_summary_counts_shared_weights_once(cnn):
    model, inputs = cnn
    for fixed in ("keep", "random"):
        single = seedrand.summary(seedrand.rewrite(model, share_conv(0.6, fixed), inputs, graph=True)).total
        total = seedrand.summary(seedrand.ensemble(model, share_conv(0.6, fixed), 5, inputs)).total
        assert total.trainable == 5 * single.trainable
        assert (total.frozen, total.regenerated) == (single.frozen, single.regenerated)
        assert total.frozen + total.regenerated > 0


def test_bad_member_count(cnn):
    with pytest.raises(ValueError, match="at least one member, got members=0"):
        seedrand.ensemble(cnn[0], share_conv(0.5), members=0, example_inputs=cnn[1])


def test_batched_evaluation_equals_members_one_by_one(cnn):
    model, inputs = cnn
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ens = seedrand.ensemble(model, share_conv(0.6), members=4, example_inputs=inputs).eval()
    mean, each = ens(x, return_members=True)
    one_by_one = torch.stack([member(x) for member in ens.members])
    assert ens.batched  # vmap ran (a failure would have switched it off)
    torch.testing.assert_close(each, one_by_one, rtol=1e-5, atol=1e-6)
    mean.sum().backward()  # gradients reach each member's own tensors through the stacked copies
    assert all(m.conv1.weight.trainable.grad is not None for m in ens.members)


def test_batched_evaluation_through_regenerated_layers(monkeypatch):
    """Random Linear and Conv layers (the regen custom ops) have vmap rules: one call for all members."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    policy = {"version": 1, "seed": SEED, "rules": [{"match": {"modules": ["0", "3"]}, "random": {"bias": "trainable"}}]}
    ens = seedrand.ensemble(model, policy, members=3, example_inputs=(x[:2],)).eval()
    calls = []
    reference = ops.regen_matmul_reference
    monkeypatch.setattr(ops, "regen_matmul_reference", lambda *a: calls.append(a[0].shape) or reference(*a))
    _, each = ens(x, return_members=True)
    assert ens.batched and calls == [(3, 5, 144)]  # without the rule: one call per member
    torch.testing.assert_close(each, torch.stack([member(x) for member in ens.members]), rtol=1e-5, atol=1e-6)
