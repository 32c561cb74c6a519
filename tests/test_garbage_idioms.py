"""Garbage collection through idioms beyond one call per layer: channel shuffles, and modules called more than once
(a shared activation, a weight-shared layer and its gate, a shared BatchNorm whose other call is untracked). Each is
checked in float64 by seedrand.testing (outputs unchanged in eval and train mode, same optimizer training on)."""

import pytest
import torch
import torch.nn as nn
from conftest import seeded

from seedrand.testing import check_garbage_collection


class SharedReLU(nn.Module):
    """One ReLU module applied three times, as torchvision's BasicBlock does."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu, self.fc = nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y))
        return self.fc(self.relu(y).mean(dim=(2, 3)))


def test_a_stateless_module_called_more_than_once():
    report = check_garbage_collection(seeded(SharedReLU), (torch.randn(2, 3, 6, 6),), match={"modules": ["conv2"]},
                                      fraction=0.5, seed=1)
    assert report.removed.get("conv2", 0) > 0, report.blocked


class SharedEncoder(nn.Module):
    """One encoder layer applied to two branches (weight sharing): its rows go where dead in both uses, its
    columns where both branches' inputs are dead."""

    def __init__(self):
        super().__init__()
        self.p1, self.p2 = nn.Linear(6, 16), nn.Linear(6, 16)
        self.enc, self.out = nn.Linear(16, 12), nn.Linear(24, 3)

    def forward(self, x):
        a = self.enc(torch.relu(self.p1(x)))
        b = self.enc(torch.relu(self.p2(x)))
        return self.out(torch.relu(torch.cat([a, b], -1)))


def kill_shared(model):
    """Kill enc's gate (applied at both calls) at 0..4, p1's gate at 0..9 and p2's at 5..11: the encoder's columns
    5..9 read dead channels in both branches."""
    with torch.no_grad():
        model.get_submodule("enc_gate").theta[:5] = -1.0
        model.get_submodule("p1_gate").theta[:10] = -1.0
        model.get_submodule("p2_gate").theta[5:12] = -1.0


def test_a_weight_shared_layer_and_its_gate():
    for graph in (True, False):
        report = check_garbage_collection(seeded(SharedEncoder), (torch.randn(5, 6),),
                                          match={"modules": ["p1", "p2", "enc"]}, kill=kill_shared, graph=graph)
        assert report.removed["enc"] == 5 and report.removed["enc_gate"] == 5, report
        # p1 and p2 each lose exactly the channels dead in both branches' encoder input (5..9)
        assert report.removed["p1"] == 5 and report.removed["p2"] == 5, report


class SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.bn(self.a(x))), torch.relu(self.bn(x.repeat(1, 3, 1, 1)[:, :8]))],
                                   1))


def test_a_shared_module_with_an_untracked_call_keeps_its_channels():
    """The BatchNorm's second call reads an input whose channels are not tracked: its entries cannot shrink for one
    call alone, so a's channels through it stay, with the reason."""
    report = check_garbage_collection(seeded(SharedNorm).eval(), (torch.randn(2, 3, 4, 4),), match={"modules": ["a"]},
                                      fraction=0.5, seed=0)
    assert "a" not in report.removed and "a_gate" in report.blocked


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle between two convolutions: view into 3 groups of 4, transpose, view back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = torch.relu(self.a(x)).view(-1, 3, 4, 5, 5).transpose(1, 2).contiguous().view(-1, 12, 5, 5)
        return self.b(y)


class ExportedShuffle(ChannelShuffle):
    def forward(self, x):
        if x.shape[0] > 0:  # control flow on a shape defeats symbolic tracing: seedrand exports the model
            x = super().forward(x)
        return x


def kill_position(position):
    """Kill a's gate at ``position`` of every group of 4 (channels position, 4 + position, 8 + position)."""
    def kill(model):
        with torch.no_grad():
            model.get_submodule("a_gate").theta[position::4] = -1.0
    return kill


@pytest.mark.parametrize("cls", [ChannelShuffle, ExportedShuffle])
def test_a_channel_shuffle_is_tracked_as_a_permutation(cls):
    """A position dead in every group goes (the group count stays, the literal sizes follow); the shuffled consumer
    loses the permuted columns. One group's channel alone cannot go: the shuffle needs equal groups."""
    inputs = (torch.randn(2, 3, 5, 5),)
    report = check_garbage_collection(seeded(cls).eval(), inputs, match={"modules": ["a"]}, kill=kill_position(1),
                                      graph=True)
    assert report.removed == {"a": 3, "a_gate": 3}, report
    if cls is ChannelShuffle:  # the kept model's own forward writes the sizes as numbers: it cannot follow
        kept = check_garbage_collection(seeded(cls).eval(), inputs, match={"modules": ["a"]}, kill=kill_position(1))
        assert kept.removed == {} and "graph=True" in kept.not_applied

    def kill_one(model):
        with torch.no_grad():
            model.get_submodule("a_gate").theta[1] = -1.0

    report = check_garbage_collection(seeded(cls).eval(), (torch.randn(2, 3, 5, 5),), match={"modules": ["a"]},
                                      kill=kill_one, graph=True)
    assert report.removed == {} and "a_gate" in report.blocked
