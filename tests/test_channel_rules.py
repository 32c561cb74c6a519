"""Channel rules (seedrand.register_channel_rule): every spelling of an op from one registration, element-wise ops
by what they make of a zero, reductions over non-channel dims, and a user's own op. Each idiom is checked in float64
by seedrand.testing (outputs unchanged, training continues with the same optimizer)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import seeded

import seedrand
from seedrand.garbage import rules
from seedrand.garbage.rules import op_spellings, register_channel_rule
from seedrand.testing import check_garbage_collection


class Pointwise(nn.Module):
    """Three branches through element-wise ops: abs and x ** 2 keep a zero, exp does not."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(6, 10)
        self.out = nn.Linear(30, 3)

    def forward(self, x):
        return self.out(torch.cat([self.a(x).abs(), self.b(x) ** 2, torch.exp(self.c(x))], -1))


def test_elementwise_ops_by_what_they_make_of_zero():
    report = check_garbage_collection(seeded(Pointwise), (torch.randn(8, 6),), match={"modules": ["a", "b", "c"]},
                                      fraction=0.5, seed=4)
    assert {"a", "b"} <= set(report.removed) and "c" not in report.removed
    assert "reads them while they are non-zero" in report.blocked["c_gate"]  # exp(0) = 1 reaches out


class Reduced(nn.Module):
    """Global max and mean pooling spelled as reductions over the spatial dims (amax, mean), keepdim or not."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Linear(16, 2)

    def forward(self, x):
        pooled = torch.amax(torch.relu(self.conv(x)), dim=(2, 3))
        mean = self.conv2(x).mean(dim=[-1, -2], keepdim=True).flatten(1)
        return self.fc(torch.cat([pooled, mean], 1))


class ReducedExported(Reduced):
    def forward(self, x):
        if x.shape[0] > 0:  # control flow on a shape defeats symbolic tracing: seedrand exports the model
            x = super().forward(x)
        return x


@pytest.mark.parametrize("cls", [Reduced, ReducedExported])
def test_reductions_over_non_channel_dims_keep_channels(cls):
    report = check_garbage_collection(seeded(cls).eval(), (torch.randn(2, 3, 6, 6),), fraction=0.5, seed=1,
                                      graph=True)
    assert {"conv", "conv2"} <= set(report.removed), report.blocked


def test_a_reduction_over_the_channel_dim_is_a_barrier():
    class OverChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(torch.amax(self.conv(x), dim=1).flatten(1))

    report = check_garbage_collection(seeded(OverChannels), (torch.randn(2, 3, 6, 6),), match={"modules": ["conv"]})
    assert report.removed == {} and "reduces over the channel dim" in report.blocked["conv_gate"]


def test_one_name_registers_every_spelling():
    spellings = op_spellings("relu")
    assert {torch.relu, F.relu, "relu", torch.ops.aten.relu, torch.ops.aten.relu.default} <= set(spellings)
    assert set(op_spellings(torch.ops.aten.amax)) == {torch.ops.aten.amax, torch.ops.aten.amax.default,
                                                       torch.ops.aten.amax.out}


def squash(x):
    return x / (1 + x.abs())


torch.fx.wrap("squash")  # a leaf function of the user's: traced as one call_function node


class Squashed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 12), nn.Linear(12, 2)

    def forward(self, x):
        return self.b(squash(self.a(x)))


def test_registering_a_users_op(monkeypatch):
    monkeypatch.setattr(rules, "_OP_RULES", dict(rules._OP_RULES))  # this test's registrations only
    args = (seeded(Squashed), (torch.randn(6, 4),))
    before = check_garbage_collection(*args, match={"modules": ["a"]}, fraction=0.5, seed=2)
    register_channel_rule(squash, "keeps_zero")
    after = check_garbage_collection(*args, match={"modules": ["a"]}, fraction=0.5, seed=2)
    assert before.removed == {} and after.removed["a"] > 0


def test_bad_registrations_are_refused():
    with pytest.raises(ValueError, match="rule must be one of keeps_zero, elementwise, pool, reduce"):
        register_channel_rule("relu", "zero")
    with pytest.raises(ValueError, match="a module's reduction dims are not in its call"):
        register_channel_rule(nn.ReLU, "reduce")
    with pytest.raises(TypeError, match="no torch, functional, Tensor method or aten op is named 'no_such_op'"):
        register_channel_rule("no_such_op", "keeps_zero")
    with pytest.raises(TypeError, match="takes an op, a function, a name or an nn.Module subclass"):
        register_channel_rule(3, "keeps_zero")
    assert seedrand.register_channel_rule is register_channel_rule
