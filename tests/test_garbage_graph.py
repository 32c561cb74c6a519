"""collect_garbage through the channel dependency graph: for each architecture family, kill random gates and check
(seedrand.testing) that outputs are unchanged in float64, eval and train mode, that the expected modules shrank, and
that training continues with the same optimizer. Plus random DAGs (hypothesis) and the barriers."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import seedrand
from seedrand.garbage import collect_garbage
from seedrand.testing import check_garbage_collection, kill_gates


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.f5, self.f6, self.out = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        x = F.max_pool2d(torch.relu(self.c3(x)), 2)
        x = torch.flatten(x, 1)
        return self.out(torch.tanh(self.f6(torch.relu(self.f5(x)))))


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.MaxPool2d(2), conv_bn(8, 12), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(12 * 2 * 2, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(self.features(x).view(x.size(0), -1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1, self.layer2 = BasicBlock(8, 8), BasicBlock(8, 12, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseNet(nn.Module):
    def __init__(self, growth=4, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dense = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(6 + i * growth), nn.ReLU(),
                                                 nn.Conv2d(6 + i * growth, growth, 3, padding=1))
                                   for i in range(layers))
        self.transition = nn.Conv2d(6 + layers * growth, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.dense:
            features.append(layer(torch.cat(features, 1)))
        x = F.avg_pool2d(torch.relu(self.transition(torch.cat(features, 1))), 2)
        return self.fc(x.mean((2, 3)))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b3 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(8, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 5, padding=2))
        self.bp = nn.Conv2d(8, 3, 1)
        self.head = nn.Conv2d(17, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        branches = [self.b1(x), self.b3(x), self.b5(x), self.bp(F.max_pool2d(x, 3, 1, 1))]
        return self.head(torch.relu(torch.cat(branches, 1))).mean((2, 3))


class SE(nn.Module):
    def __init__(self, c=12, r=3):
        super().__init__()
        self.conv = conv_bn(3, c)
        self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return self.head(x * s.unsqueeze(-1).unsqueeze(-1)).flatten(1)


class Grouped(nn.Module):
    """A grouped conv (4 groups), then a MobileNet-style depthwise (multiplier 2) + pointwise pair."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.grouped = conv_bn(8, 16, groups=4)
        self.depthwise = conv_bn(16, 32, groups=16)
        self.pointwise = nn.Conv2d(32, 6, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(self.grouped(self.stem(x)))).mean((2, 3))


class SplitChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, 10, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.c, self.d = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)
        self.head = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        p, q = torch.split(torch.relu(self.stem(x)), [4, 6], dim=1)
        r, t = self.mid(x).chunk(2, 1)
        y = torch.cat([self.a(p), self.b(q), self.c(r), self.d(torch.relu(t))], 1)
        return self.head(y).flatten(1)


class RMSNormed(nn.Module):
    """Linear -> RMSNorm (over the channels) -> SiLU -> Linear, then the same with an RMSNorm without a weight."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 12), nn.RMSNorm(12), nn.Linear(12, 10)
        self.c, self.bare, self.out = nn.Linear(10, 9), nn.RMSNorm(9, eps=1e-3, elementwise_affine=False), \
            nn.Linear(9, 3)

    def forward(self, x):
        x = self.b(F.silu(self.norm(self.a(x))))
        return self.out(self.bare(self.c(x)))


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(),
                         nn.Linear(16, 4))


def image(*shape):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


FAMILIES = {  # model, inputs, modules that must lose channels (only possible through the family's own structure)
    "mlp": (mlp, image(4, 8), ["0", "2", "4"]),
    "lenet5": (LeNet5, image(2, 1, 28, 28), ["c1", "c3", "f5", "f6"]),
    "vgg": (VGG, image(2, 3, 8, 8), ["features.0.0", "features.3.0", "classifier.0"]),
    "resnet": (ResNet, image(2, 3, 8, 8), ["stem.0", "layer1.conv1", "layer1.conv2", "layer2.shortcut.0"]),
    "densenet": (DenseNet, image(2, 3, 8, 8), ["dense.2.2", "transition"]),  # pre-activation BN: see below
    "inception": (Inception, image(2, 3, 8, 8), ["stem.0", "b1", "b3.2", "b5.2", "bp"]),
    "se": (SE, image(2, 3, 8, 8), ["conv.0", "fc1", "fc2"]),
    # a group goes only when all of its depthwise outputs are dead: kill more
    "grouped": (Grouped, image(2, 3, 8, 8), ["grouped.0", "depthwise.0"]),
    "split_chunk": (SplitChunk, image(2, 3, 8, 8), ["stem", "mid", "a", "b"]),
    # eps and weight rescaled for the channels left; without a weight, RMSNorm is a barrier
    "rmsnorm": (RMSNormed, image(4, 8), ["a", "norm"]),
}


GRAPH_ONLY = {"rmsnorm": "RMSNorm's mean over the channels", "split_chunk": "split sizes in the forward"}


@pytest.mark.parametrize("family", sorted(GRAPH_ONLY))
def test_kept_model_changes_nothing_where_its_code_cannot_follow(family):
    build, inputs, _ = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().eval()
    kept = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Linear", "Conv2d"]},
                                                             "optional": True, "filter_gates": {"init": "uniform"}}]},
                            inputs)
    kill_gates(kept, 0.6, 3)
    before = {n: p.detach().clone() for n, p in kept.named_parameters()}
    report = seedrand.collect_garbage(kept)
    assert report.not_applied and "graph=True" in report.not_applied and not report.removed
    assert {n: p.shape for n, p in kept.named_parameters()} == {n: t.shape for n, t in before.items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outputs_unchanged_after_collection(family):
    build, inputs, shrunk = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build().eval()
    graph = family in GRAPH_ONLY  # the kept model's own code reads a literal size: the graph can follow
    report = check_garbage_collection(model, inputs, fraction=0.9 if family == "grouped" else 0.6, seed=3,
                                      graph=graph)
    assert set(shrunk) <= set(report.removed), (report.removed, report.blocked)
    assert report.parameters_after < report.parameters_before and report.flops_after < report.flops_before


def test_grouped_conv_loses_whole_groups():
    model = Grouped().eval()
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"types": ["Conv2d"]}, "filter_gates": {}}]}, image(2, 3, 8, 8), graph=True)
    with torch.no_grad():
        gm.get_submodule("grouped.0_gate").theta[4:8] = -1.0  # the whole second group of four
        gm.get_submodule("depthwise.0_gate").theta[8:16] = -1.0  # and the depthwise channels they feed
        gm.get_submodule("grouped.0_gate").theta[0] = -1.0  # a lone channel of the first: its group stays
    report = collect_garbage(gm)
    conv = gm.get_submodule("grouped.0")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (3, 6, 12) and report.removed["grouped.0"] == 4
    assert gm.get_submodule("depthwise.0").groups == 12 and gm.get_submodule("depthwise.0").out_channels == 24
    assert gm.get_submodule("stem.0").out_channels == 6  # the group's input channels went with it
    assert "grouped.0_gate" in report.blocked


def test_residual_with_the_model_input_is_a_barrier(capsys):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    x = torch.randn(2, 6)
    gm = seedrand.rewrite(Residual(), {"version": 1, "rules": [{"match": {"modules": ["a"]}, "filter_gates": {}}]}, (x,), graph=True)
    kill_gates(gm, 0.5)
    before = gm(x)
    report = collect_garbage(gm, explain=True)
    assert not report.removed and "outside the tracked graph" in report.blocked["a_gate"]
    assert "a_gate: dead channels kept" in capsys.readouterr().out
    assert torch.equal(gm(x), before) and gm.a.weight.shape == (6, 6)


def test_unknown_op_is_a_barrier_and_nothing_changes():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), -1))  # mixes channels: must not be treated as element-wise

    x = torch.randn(3, 4)
    gm = seedrand.rewrite(Odd(), {"version": 1, "rules": [{"match": {"modules": ["a"]}, "filter_gates": {}}]}, (x,), graph=True)
    kill_gates(gm, 0.5)
    report = collect_garbage(gm)
    assert not report.removed and "cumsum" in report.blocked["a_gate"]


def test_zero_rows_and_unread_columns_are_dead_without_gates():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1] = 0.0  # unit 1 of layer 0 is exactly zero
        model[4].weight[:, 3] = 0.0  # unit 3 of layer 2 is read by nobody
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["4"]}, "freeze": {}}]}, (x,), graph=True)
    before = gm(x)  # its autograd graph is still alive while the parameters shrink
    report = collect_garbage(gm)
    assert report.removed == {"0": 1, "2": 1} and gm.get_submodule("2").weight.shape == (4, 5)
    torch.testing.assert_close(gm(x), before, rtol=1e-12, atol=1e-12)


class Dag(nn.Module):
    """A random DAG of convs, BatchNorms, ReLUs, residual adds and channel concats (the program is data)."""

    def __init__(self, program):
        super().__init__()
        self.program, widths, layers = program, [4], []
        for kind, a, b, width in program:
            if kind == "conv":
                layers.append(conv_bn(widths[a], width, k=1 + 2 * (width % 2)))
                widths.append(width)
            else:
                widths.append(widths[a] if kind == "add" else widths[a] + widths[b])
        self.layers, self.head = nn.ModuleList(layers), nn.Linear(widths[-1], 3)

    def forward(self, x):
        values, convs = [self.layers[0](x)], iter(self.layers[1:])
        for kind, a, b, _ in self.program[1:]:
            if kind == "conv":
                values.append(next(convs)(values[a - 1]))
            elif kind == "add":
                values.append(values[a - 1] + values[b - 1])
            else:
                values.append(torch.cat([values[a - 1], values[b - 1]], 1))
        return self.head(values[-1].mean((2, 3)))


@st.composite
def programs(draw):
    program, widths = [("conv", 0, 0, draw(st.integers(3, 6)))], [4]
    widths.append(program[0][3])
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["conv", "conv", "add", "cat"]))
        a = draw(st.integers(1, len(widths) - 1))
        same = [i for i in range(1, len(widths)) if widths[i] == widths[a]]
        b = draw(st.sampled_from(same)) if kind == "add" else draw(st.integers(1, len(widths) - 1))
        width = draw(st.integers(2, 6))
        program.append((kind, a, b, width))
        widths.append(width if kind == "conv" else widths[a] if kind == "add" else widths[a] + widths[b])
    return program


@settings(max_examples=12, deadline=None)
@given(program=programs(), seed=st.integers(0, 100))
def test_random_dags(program, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dag(program).eval()
    check_garbage_collection(model, image(2, 4, 5, 5), fraction=0.5, seed=seed)


TRANSFORMERS = {  # exported graphs; what must shrink (feed-forward intermediates, conv channels)
    "resnet": (None, ["resnet.embedder.embedder.convolution", "resnet.encoder.stages.1.layers.0.shortcut.convolution"]),
    "mobilenet_v2": (None, ["mobilenet_v2.layer.0.expand_1x1.convolution", "mobilenet_v2.layer.0.conv_3x3.convolution",
                            "mobilenet_v2.conv_1x1.convolution"]),
    "convnext": (None, ["convnext.encoder.stages.0.layers.0.pwconv1"]),
    "vit": (None, ["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"]),
    "bert": (None, ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]),
    "gpt2": ({"types": ["Conv1D"]}, ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]),
    "llama": (None, ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers_models(zoo_models, name):
    model, inputs = zoo_models[name]
    match, shrunk = TRANSFORMERS[name]
    report = check_garbage_collection(model, inputs, match=match, fraction=0.6, seed=1)
    assert set(shrunk) <= set(report.removed), (report.removed, report.blocked)
    assert report.parameters_after < report.parameters_before


HEADS = {  # value projection gate, where a head's values start in it, head size, the modules that lose the head
    "bert": ("bert.encoder.layer.0.attention.self.value_gate", 0, 16,
             ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
              "bert.encoder.layer.0.attention.self.value"]),
    "vit": ("vit.layers.1.attention.v_proj_gate", 0, 16,
            ["vit.layers.1.attention.q_proj", "vit.layers.1.attention.k_proj", "vit.layers.1.attention.v_proj"]),
    "gpt2": ("transformer.h.0.attn.c_attn_gate", 64, 16, ["transformer.h.0.attn.c_attn"]),  # q, k, v in one
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_dead_attention_head_is_removed(zoo_models, name):
    model, inputs = zoo_models[name]
    gate, start, size, shrunk = HEADS[name]
    head = 1

    def kill_values_of_one_head(gm):
        with torch.no_grad():
            gm.get_submodule(gate).theta[start + head * size:start + (head + 1) * size] = -1.0

    match = {"types": ["Conv1D"]} if name == "gpt2" else {"types": ["Linear"]}
    for graph in (True, False):  # the kept model follows: GPT-2's split_size and head count by their size rule
        report = check_garbage_collection(model, inputs, match=match, kill=kill_values_of_one_head, graph=graph)
        per_head = 3 * size if name == "gpt2" else size  # its queries, keys and values go
        assert report.not_applied is None and all(report.removed[m] == per_head for m in shrunk), report.removed


def test_rmsnorm_compensated_in_an_exported_graph():
    class Exported(RMSNormed):
        def forward(self, x):
            if x.shape[0] > 0:  # control flow on a shape defeats symbolic tracing: seedrand exports the model
                x = self.b(F.silu(self.norm(self.a(x))))
            return self.out(self.bare(self.c(x)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Exported().eval()
    report = check_garbage_collection(model, image(4, 8), fraction=0.6, seed=3, graph=True)
    assert {"a", "norm"} <= set(report.removed) and "c_gate" in report.blocked
