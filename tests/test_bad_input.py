"""Bad input as a careless or hostile user gives it: every failure is a seedrand error with a location, the model
passed in is never changed, nothing is lost, and no file runs code or makes seedrand work without bound."""

import copy
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seedrand
from seedrand import PolicyError, SeedrandError
from seedrand.errors import ModelError
from seedrand.policy import MAX_DEPTH, MAX_NODES, MAX_POLICY_BYTES, load_policy, parse_policy


class Net(nn.Module):
    """A small symbolically traceable model with every weight action's layer types and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def net():
    gen = torch.Generator().manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, (torch.randn(2, 3, 5, 5, generator=gen),)


def snapshot(model):
    """Everything a failed rewrite must leave as it was: tensors bit for bit, requires_grad, hooks, module objects."""
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, id(m), type(m), len(m._forward_hooks), len(m._forward_pre_hooks), m.training)
             for n, m in model.named_modules()])


def assert_unchanged(model, before):
    tensors, grads, modules = before
    now = snapshot(model)
    assert now[0].keys() == tensors.keys()
    assert all(torch.equal(now[0][k], v) and now[0][k].dtype == v.dtype for k, v in tensors.items())
    assert now[1] == grads and now[2] == modules


def test_rewrite_refuses_what_is_not_a_model_and_leaves_the_model_alone():
    model, inputs = net()
    model.fc1.register_forward_hook(lambda *_: None)
    before = snapshot(model)
    policy = {"version": 1, "rules": [{"match": {"types": ["Linear"]}, "random": {}}]}
    with pytest.raises(ModelError, match="takes an nn.Module as the model, not function"):
        seedrand.rewrite(lambda x: x, policy, graph=True)
    with pytest.raises(ModelError, match="a tuple"):
        seedrand.rewrite(model, policy, {"x": inputs[0]}, graph=True)
    with pytest.raises(PolicyError, match="a policy is a seedrand.Policy, a path to a YAML file or a dict, not int"):
        seedrand.rewrite(model, 5, inputs, graph=True)
    for bad in [(inputs[0].double(),), (inputs[0][:, :2],), (inputs[0].long(),), ()]:
        with pytest.raises(ModelError, match="own forward fails on the example inputs"):
            seedrand.rewrite(model, policy, bad, graph=True)
    assert_unchanged(model, before)


def test_a_rewritten_model_is_not_rewritten_again():
    model, inputs = net()
    policy = {"version": 1, "rules": [{"match": {"types": ["Linear"]}, "random": {}}]}
    gm = seedrand.rewrite(model, policy, inputs, graph=True)
    with pytest.raises(ModelError, match="returned by seedrand.rewrite already"):
        seedrand.rewrite(gm, {"version": 1, "rules": []}, inputs, graph=True)
    holder = nn.Sequential(gm.fc1)  # a seedrand module inside a plain model
    with pytest.raises(ModelError, match="'0'|the root module|0 is a seedrand"):
        seedrand.rewrite(holder, {"version": 1, "rules": []}, graph=True)


class DataDependent(nn.Module):
    """Traceable by neither torch.fx (int() of a proxy) nor torch.export (a data-dependent size)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        n = int((h > 0).sum())
        return h[:, :n] if n > 2 else h


def test_a_failed_trace_prints_nothing(capsys):
    """torch's own dump of the graph a tracing attempt failed in is not printed: seedrand's error says it once."""
    with pytest.raises(seedrand.TraceError, match=r"torch.export failed .*test_bad_input.py:\d+: n = int"):
        seedrand.rewrite(DataDependent(), {"version": 1, "rules": []}, (torch.randn(3, 4),), graph=True)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_subspace_refuses_tied_and_parametrized_weights():
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    x = torch.randn(2, 4)
    policy = {"version": 1, "rules": [{"match": {"modules": ["0"]}, "subspace": {"dim": 2}}]}
    with pytest.raises(PolicyError, match="0.weight is tied to 1.weight; subspace cannot"):
        seedrand.rewrite(tied, policy, x, graph=True)
    glob = {"version": 1, "rules": [{"match": {"modules": ["0", "1"]}, "subspace": {"dim": 2, "scope": "global"}}]}
    with pytest.raises(PolicyError, match="is tied to"):
        seedrand.rewrite(tied, glob, x, graph=True)
    normed = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    before = snapshot(normed)
    with pytest.raises(PolicyError, match="its weight is computed by a torch.nn.utils.parametrize"):
        seedrand.rewrite(normed, policy, x, graph=True)
    assert_unchanged(normed, before)


def test_subspace_dim_beyond_d_is_a_policy_error():
    model, inputs = net()
    for scope in ("per_layer", "global"):
        policy = {"version": 1, "rules": [{"match": {"modules": ["fc1"]}, "subspace": {"dim": 2**62, "scope": scope}}]}
        with pytest.raises(PolicyError, match=r"needs dim <= D, the number of parameters \(112\)"):
            seedrand.rewrite(model, policy, inputs, graph=True)


def test_frozen_parameters_stay_frozen():
    """freeze_fraction keeps requires_grad=False of a weight the user froze (as PEFT freezes base weights); grow,
    which must train slices, refuses it instead of making it trainable."""
    model, inputs = net()
    model.fc1.weight.requires_grad_(False)
    model.fc1.bias.requires_grad_(False)
    gm = seedrand.rewrite(model, {"version": 1, "rules": [
        {"match": {"modules": ["fc1", "fc2"]}, "freeze_fraction": {"fraction": 0.5}}]}, inputs, graph=True)
    assert not any(p.requires_grad for n, p in gm.named_parameters() if n.startswith("fc1."))
    assert all(p.requires_grad for n, p in gm.named_parameters() if n.startswith("fc2."))
    with pytest.raises(PolicyError, match="'fc1' .*its weight has requires_grad=False"):
        seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["fc1"]}, "grow": {"stages": 2}}]},
                         inputs, graph=True)


def bomb(levels):
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nrules:\n  - name: *a{levels - 1}\n    match: {{types: [Linear]}}\n    freeze: {{}}\n"


@pytest.mark.parametrize("text,words", [
    (bomb(9), [f"more than {MAX_NODES:,} YAML nodes"]),
    ("version: 1\nrules: " + "[" * 100_000 + "]" * 100_000 + "\n", [f"nested deeper than {MAX_DEPTH} levels"]),
    ("version: 1\nx: &a [*a]\nrules: []\n", ["recursive alias"]),
    ("version: 1\nrules:\n" + "  - {match: {types: [Linear]}, freeze: {}}\n" * 30_000, ["a policy has at most"]),
])
def test_parsing_is_bounded(text, words):
    """An alias bomb, 100,000 levels of nesting, a recursive alias and a 1.3 MB policy are refused at once with a
    location, not after minutes of work or with a RecursionError."""
    start = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    assert time.perf_counter() - start < 10  # generous on a loaded machine; unbounded work takes minutes
    assert str(info.value).startswith("p.yaml:") and len(str(info.value)) < 500
    for word in words:
        assert word in str(info.value)


def test_messages_never_expand_user_data():
    text = bomb(4) .replace("freeze: {}", "freeze_fracton: {}")  # 10,000 x's as a rule name
    long_key = "k" * 100_000
    for source in (text, f"version: 1\nrules:\n  - match: {{types: [Linear]}}\n    {long_key}: {{}}\n"):
        with pytest.raises(PolicyError) as info:
            parse_policy(source)
        assert len(str(info.value)) < 1000


def test_policy_files_that_are_not_text(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\nrules:\n  - name: \xff\xfe\n")
    with pytest.raises(PolicyError, match=r"p.yaml:3:11: not UTF-8 text \(byte 0xff"):
        load_policy(path)
    path.write_bytes(b"#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path)


def test_cli_bad_factories_and_outputs_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "raising.py").write_text("def make():\n    raise ValueError('no weights here')\n")
    (tmp_path / "broken.py").write_text("def make(:\n")
    policy = "examples/policies/mlp_random_hidden.yaml"
    root = str(__import__("pathlib").Path(__file__).parents[1])
    cases = [
        (["inspect", policy, "--model", "raising:make"], "the factory raised ValueError: no weights here"),
        (["inspect", policy, "--model", "broken:make"], "importing broken failed: SyntaxError"),
        (["inspect", policy, "--model", "seedrand.zoo:CNN"], "has no factory 'CNN'; it has: "),
        (["export", policy, "--model", "seedrand.zoo:mlp", "--out", str(tmp_path / "no" / "m.onnx")],
         "does not exist"),
    ]
    for args, words in cases:
        result = subprocess.run([sys.executable, "-m", "seedrand.cli", *args], capture_output=True, text=True,
                                timeout=600, cwd=tmp_path, env={"PYTHONWARNINGS": "ignore", "PYTHONPATH": root})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr
    result = subprocess.run([sys.executable, "-m", "seedrand.cli", "inspect", policy, "--model", "raising:make",
                             "--debug"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={"PYTHONWARNINGS": "ignore", "PYTHONPATH": root})
    assert result.returncode != 0 and "Traceback" in result.stderr and "no weights here" in result.stderr


VALID = """\
version: 1
seed: 3
rules:
  - name: ff
    match: {modules: [conv], exclude_types: [BatchNorm2d]}
    freeze_fraction: {fraction: 0.5, dim: out, select: random, fixed: random, init: kaiming_uniform}
  - name: bn
    match: {types: [BatchNorm2d]}
    freeze: {}
  - name: rnd
    match: {modules: [fc1]}
    random: {init: "normal(0.02)", bias: trainable}
  - name: gates
    match: {modules: [fc2]}
    filter_gates: {lambda: 1.0e-4, init: ones}
"""

WORDS = ["version", "seed", "rules", "name", "match", "modules", "types", "exclude", "exclude_types", "optional",
         "freeze", "freeze_fraction", "random", "subspace", "grow", "insert_random", "filter_gates", "fraction",
         "dim", "select", "fixed", "init", "bias", "lambda", "projection", "stages", "conv", "fc1", "Linear"]
VALUES = [None, True, False, 0, 1, -1, 2**63, 0.5, 1.5, -0.0, float("inf"), float("nan"), "", "x", "re:(", [],
          {}, [1, 2], {"a": 1}, "normal(-1)", "kaiming_uniform", "Conv2d", "out", "in", "zero", "keep"]


def _paths(data, path=()):
    yield path
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, path + (i,))


@st.composite
def mutated(draw):
    """The YAML text of VALID with 1-3 mutations: a key deleted, duplicated (in the text), retyped or misspelled,
    a value replaced by another type or an out-of-range value, a list item dropped or repeated."""
    data = yaml.safe_load(VALID)
    duplicate = None
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["delete", "retype", "misspell", "rename", "value", "duplicate", "insert"]))
        if not path:
            continue
        key = path[-1]
        if kind == "delete":
            del parent[key]
        elif kind in ("retype", "value"):
            parent[key] = draw(st.sampled_from(VALUES))
        elif kind == "misspell" and isinstance(key, str):
            i = draw(st.integers(0, max(len(key) - 1, 0)))
            parent[key[:i] + key[i + 1:] or "k"] = parent.pop(key)
        elif kind == "rename" and isinstance(key, str):
            parent[draw(st.sampled_from(WORDS))] = parent.pop(key)
        elif kind == "duplicate" and isinstance(key, str):
            duplicate = key
        elif kind == "insert" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif kind == "insert" and isinstance(parent, dict):
            parent[draw(st.sampled_from(WORDS))] = draw(st.sampled_from(VALUES))
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    line = next((ln for ln in text.splitlines() if ln.lstrip(" -").startswith(f"{duplicate}:")), None)
    if duplicate is not None and line is not None:  # the same key twice in one mapping
        again = line.replace("- ", "  ", 1) if line.lstrip().startswith("- ") else line
        text = text.replace(line, f"{line}\n{again}", 1)
    return text


FUZZ_MODEL = net()


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated())
def test_fuzzed_policies_are_valid_or_located_policy_errors(text):
    """Each mutated policy is either valid, or a PolicyError with a file, line and column; a valid one either
    rewrites the model or raises a SeedrandError; never another exception, and the model is unchanged after any
    failure (and after success: rewrite works on a copy)."""
    model, inputs = FUZZ_MODEL
    before = snapshot(model)
    try:
        policy = parse_policy(text, "fuzz.yaml")
    except PolicyError as e:
        assert e.path == "fuzz.yaml" and e.line is not None and e.column is not None, str(e)
        assert str(e).startswith(f"fuzz.yaml:{e.line}:{e.column}: ")
        return
    try:
        seedrand.rewrite(model, policy, inputs, graph=True)
    except SeedrandError as e:
        assert str(e)
    assert_unchanged(model, before)
