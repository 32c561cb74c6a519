"""collect_garbage: removing dead gated channels leaves outputs unchanged, shrinks parameters and optimizer state in
place, stops at barriers, and lets training continue (scikit-learn digits)."""

import copy

import pytest
import torch
import torch.nn as nn

import seedrand
from seedrand.garbage import collect_garbage


def kill(gm, fraction=0.4, seed=0):
    """Set a random subset of every gate's theta to <= 0 (a deterministic local generator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in seedrand.gate_parameters(gm):
            dead = torch.rand(theta.shape, generator=gen) < fraction
            theta[dead] = -torch.rand(int(dead.sum()), generator=gen, dtype=theta.dtype)


def outputs(gm, inputs, train):
    gm = copy.deepcopy(gm).train(train)  # train mode updates BatchNorm statistics: keep the model as it is
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)  # same dropout masks before and after
        return gm(*inputs)


@pytest.mark.parametrize("name,types", [("cnn", ["Conv2d"]), ("mlp", ["re:Linear"])])
def test_outputs_unchanged_and_state_sliced(zoo_models, name, types):
    model, inputs = zoo_models[name]
    match = {"types": types} if name == "cnn" else {"modules": ["0", "2"]}
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": match, "filter_gates": {"init": "uniform"}}]}, inputs, graph=True)
    gm.double()
    inputs = tuple(x.double() for x in inputs)
    for m in gm.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # a mask over a smaller tensor draws other random numbers: compare train mode without one
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    gm.train()
    gm(*inputs).square().mean().backward()
    opt.step()
    kill(gm)
    before = {mode: outputs(gm, inputs, mode) for mode in (False, True)}
    ids = {n: id(p) for n, p in gm.named_parameters()}
    report = collect_garbage(gm, opt)
    assert report.removed and report.parameters_after < report.parameters_before and not report.blocked
    for mode in (False, True):
        torch.testing.assert_close(outputs(gm, inputs, mode), before[mode], rtol=1e-6, atol=1e-12)
    assert {n: id(p) for n, p in gm.named_parameters()} == ids  # same Parameter objects
    for p in gm.parameters():
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape == state["exp_avg_sq"].shape and p.grad.shape == p.shape
    gm.train()
    opt.zero_grad()
    gm(*inputs).square().mean().backward()  # training continues with the same optimizer
    opt.step()


@pytest.mark.parametrize("compiled", [False, True])
def test_training_continues_while_an_old_graph_is_alive(zoo_models, compiled):
    """An output kept from before collect_garbage (its graph saves the old weights, so they cannot be swapped) must not
    break the next backward, eager or through the seedrand backend (which recompiles for the new shapes); the
    gradients equal those of a copy with fresh autograd state."""
    model, inputs = zoo_models["cnn"]
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Conv2d"]}, "filter_gates": {"init": "uniform"}}]},
                          inputs, graph=True).train()
    for m in gm.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    torch._dynamo.reset()
    run = torch.compile(gm, backend="seedrand") if compiled else gm
    run(*inputs).square().mean().backward()
    kill(gm)
    kept = run(*inputs)  # its graph saves the old weights and stays alive across the collection
    assert collect_garbage(gm).removed and kept.grad_fn is not None
    gm.zero_grad(set_to_none=True)
    reference = copy.deepcopy(gm)
    out = run(*inputs)
    out.square().mean().backward()
    expected = reference(*inputs)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for p, q in zip(gm.parameters(), reference.parameters()):
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_shrinks_while_training_on_digits():
    from seedrand import zoo

    task, data = zoo.digits_task(hidden=256), zoo.digits_data()
    plain = task.model_factory()
    gated = seedrand.rewrite(task.model_factory(), {"version": 1, "rules": [{"match": {"modules": ["0", "2"]}, "filter_gates": {
        "lambda": 2e-3}}]}, (data.x_train[:2],), graph=True)
    accuracy = {}
    for name, model in (("plain", plain), ("gated", gated)):
        opt = torch.optim.Adam([{"params": [p for n, p in model.named_parameters() if "gate" not in n]},
                                {"params": seedrand.gate_parameters(model), "weight_decay": 0.0}], lr=1e-2)
        model.train()
        for step in range(300):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train), data.y_train) + seedrand.penalty(model)
            loss.backward()
            opt.step()
            if name == "gated" and step % 50 == 49:
                collect_garbage(model, opt)
        model.eval()
        with torch.no_grad():
            accuracy[name] = (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    live = gated.get_submodule("0").out_features + gated.get_submodule("2").out_features
    assert live < 2 * 256 * 0.9  # units were removed during training
    assert accuracy["gated"] >= accuracy["plain"] - 0.02, accuracy


class FlatMomentum(torch.optim.Optimizer):
    """A custom optimizer keeping one flat momentum vector over all its parameters (state of no known layout)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        state = self.state[params[0]]
        state["flat"] = state.get("flat", torch.zeros_like(flat)) * 0.9 + flat
        offset = 0
        for p in params:
            p.sub_(self.param_groups[0]["lr"] * state["flat"][offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return loss


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.LBFGS(params),
    lambda params: FlatMomentum(params),
    lambda params: torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1),  # another model's
    lambda params: "not an optimizer",
])
def test_optimizers_it_cannot_follow_are_refused_before_any_change(zoo_models, make):
    """collect_garbage validates the optimizer first: with one whose state it cannot slice (LBFGS, flat state), one
    holding none of the model's parameters, or no optimizer at all, it raises and the model, its parameters and the
    optimizer's state are as they were."""
    model, inputs = zoo_models["mlp"]
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["0"]}, "filter_gates": {}}]},
                          inputs, graph=True)
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = make(params)
    if isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["params"][0] is params[0]:
        def closure():
            opt.zero_grad()
            loss = gm(*inputs).square().mean()
            loss.backward()
            return loss
        opt.step(closure)
    kill(gm, fraction=0.5)
    shapes = {n: p.shape for n, p in gm.named_parameters()}
    code = gm.code
    state = copy.deepcopy(opt.state_dict()) if isinstance(opt, torch.optim.Optimizer) else None
    with pytest.raises(seedrand.errors.ModelError, match="torch.optim.Optimizer|LBFGS|'flat'|holds none"):
        collect_garbage(gm, opt)
    assert {n: p.shape for n, p in gm.named_parameters()} == shapes and gm.code == code
    if state is not None:
        assert str(opt.state_dict()) == str(state)
    assert collect_garbage(gm).removed  # without the optimizer it goes ahead
