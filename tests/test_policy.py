"""Policy schema: loading, strict errors that name the file, line, column and rule, and round trips."""

import textwrap

import pytest
from seedrand import Policy, PolicyError, load_policy
from seedrand.policy import ACTIONS

GOOD = """\
version: 1
seed: 1234
rules:
  - name: freeze-most-filters
    match:
      modules: ["re:encoder\\\\.layer\\\\.[0-5]\\\\..*", "conv1"]
      types: [Conv2d, Linear]
      exclude: ["classifier"]
    freeze_fraction: {fraction: 0.9, dim: out, select: first, fixed: random, init: kaiming_uniform}
  - match: {types: [BatchNorm2d]}
    freeze: {}
  - name: random-head
    match: {modules: [head]}
    random: {init: "normal(0.02)", bias: trainable}
  - name: grow-wide
    match: {types: [Linear]}
    insert_random: {width: 64, count: 2, activation: gelu, residual: true, scale: per_channel}
  - name: gates
    match: {types: [Conv2d]}
    filter_gates: {lambda: 1.0e-4, init: uniform, placement: output}
  - name: sub
    match: {types: [Linear]}
    subspace: {dim: 750, projection: very_sparse, scope: global, theta0: random, density: 0.01}
  - name: capacity
    match: {types: [Linear]}
    grow: {stages: 5, start: 1, freeze_previous: true, dim: out, plateau: {window: 10, min_delta: 0.0}}
"""


def write(tmp_path, text, name="policy.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_policy_loads_with_every_action(tmp_path):
    policy = load_policy(write(tmp_path, GOOD))
    assert sorted(r.action for r in policy.rules) == sorted(ACTIONS)
    assert policy.seed == 1234
    assert policy.rules[0].params.fraction == 0.9
    assert policy.rules[1].params == ACTIONS["freeze"].params()
    assert policy.rules[4].params.lambda_ == 1.0e-4
    assert [r._line for r in policy.rules] == [4, 10, 12, 15, 18, 21, 24]
    assert policy.rules[6].params.plateau.window == 10
    assert policy.rules[1].label == "rules[1]" and policy.rules[0].label == "'freeze-most-filters' (rules[0])"


def test_round_trip_through_yaml(tmp_path):
    policy = load_policy(write(tmp_path, GOOD))
    again = load_policy(write(tmp_path, policy.to_yaml(), "again.yaml"))
    assert again == policy
    assert "lambda:" in policy.to_yaml() and "lambda_" not in policy.to_yaml()
    assert Policy.model_validate(policy.model_dump(by_alias=True)) == policy


RULE_HEAD = """\
version: 1
rules:
  - name: ok
    match: {types: [Linear]}
    freeze: {}
  - name: bad
    match: {types: [Linear]}
"""

# (text appended to RULE_HEAD, line, column or None, words the message must contain); the bad rule starts at line 6
MALFORMED = [
    ("    freeze_fraction: {fraction: 1.0}\n", 8, None, ["fraction", "less than 1"]),
    ("    freeze_fraction: {fraction: -0.1}\n", 8, None, ["fraction", "greater than or equal to 0"]),
    ("    freeze_fraction: {fraction: 0.5, dimm: in}\n", 8, 38, ["unknown key 'dimm'", "did you mean 'dim'"]),
    ("    random: {init: kaiming_unifrom}\n", 8, None, ["unknown init 'kaiming_unifrom'"]),
    ("    random: {init: normal(-1)}\n", 8, None, ["unknown init"]),
    ("    freeze_fraction: {fraction: 0.5, dim: sideways}\n", 8, None, ["dim", "'out' or 'in'"]),
    ("    insert_random: {scale: scalar}\n", 8, None, ["needs residual: true"]),
    ("    subspace: {dim: 10, projection: gaussian, density: 0.1}\n", 8, None,
     ["density applies to projection: very_sparse"]),
    ("    subspace: {dim: 0}\n", 8, None, ["dim", "greater than or equal to 1"]),
    ("    filter_gates: {lambda: -1}\n", 8, None, ["lambda", "greater than or equal to 0"]),
    ("    freeze: {}\n    random: {}\n", 6, None, ["exactly one action", "freeze, random"]),
    ("", 6, None, ["needs exactly one action"]),
    ("    freze: {}\n", 8, 5, ["unknown key 'freze'", "did you mean 'freeze'"]),
    ("    freeze_fracton: {fraction: 0.5}\n", 8, 5, ["unknown key 'freeze_fracton'", "did you mean 'freeze_fraction'"]),
    ("    freeze: false\n", 6, None, ["freeze", "a mapping of its parameters", "not False"]),
    ("    random: false\n", 6, None, ["random", "a mapping of its parameters"]),
    ("    freeze:\n", 6, None, ["freeze", "write `freeze: {}`"]),
    ("    freeze: {}\n    freeze: {}\n", 9, 5, ["duplicate key 'freeze'", "first at line 8"]),
    ("    freeze_fraction: {fraction: 0.5, fraction: 0.2}\n", 8, 38, ["duplicate key 'fraction'"]),
    ("    filter_gates: {lambda: .inf}\n", 8, None, ["lambda", "finite"]),
    ("    filter_gates: {lambda: .nan}\n", 8, None, ["lambda", "finite"]),
    ("    random: {init: normal(1e400)}\n", 8, None, ["unknown init", "finite"]),
    ("    insert_random: {residual: 'yes'}\n", 8, None, ["residual", "boolean"]),
    ("    subspace: {dim: true}\n", 8, None, ["dim", "integer"]),
    ("    freeze: {}\n    optinal: true\n", 9, 5, ["unknown key 'optinal'", "did you mean 'optional'"]),
    ("    freeze: {}\n  - name: empty\n    match: {}\n    freeze: {}\n", 10, None,
     ["match needs `modules` or `types`"]),
    ("    freeze: {}\n  - name: typo\n    match: {typs: [Linear]}\n    freeze: {}\n", 10, 13,
     ["unknown key 'typs'", "did you mean 'types'"]),
    ("    freeze: {}\n  - match: {modules: ['re:(unclosed']}\n    freeze: {}\n", 9, None,
     ["invalid regular expression"]),
]


@pytest.mark.parametrize("text,line,column,words", MALFORMED)
def test_malformed_policy_names_file_line_and_rule(tmp_path, text, line, column, words):
    path = write(tmp_path, RULE_HEAD + text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    message = str(err)
    assert err.line == line, message
    if column is not None:
        assert err.column == column, message
    assert message.startswith(f"{path}:{line}:"), message
    assert err.rule is not None and "rules[" in err.rule and err.rule in message, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text,words", [
    ("version: 2\nrules: []\n", ["version", "1"]),
    ("version: true\nrules: []\n", ["version must be the integer 1"]),
    ("rules: []\n", ["version", "Field required"]),
    ("version: 1\nrules: {a: 1}\n", ["rules", "list"]),
    ("version: 1\nrules: 5\n", ["rules: Input should be a valid list"]),
    ("version: 1\nrules:\n  - match: {types: [Linear]\n    freeze: {}\n", ["invalid YAML"]),
    ("- just\n- a list\n", ["a policy is a mapping"]),
    ("version: 1\nseed: 18446744073709551616\nrules: []\n", ["seed"]),
    ("version: 1\nseed: true\nrules: []\n", ["seed", "valid integer"]),
    ("version: 1\nseed: 1.5\nrules: []\n", ["seed", "valid integer"]),
    ("vesrion: 1\n", ["did you mean 'version'"]),
    ("version: 1\nrules: []\nseed: !!python/object:os.system [echo]\n", ["invalid YAML"]),
    ("version: 1\nrules: []\nrules: []\n", ["duplicate key 'rules'", "first at line 2"]),
    ("", ["empty policy", "version: 1"]),
    ("# only a comment\n", ["empty policy"]),
])
def test_policy_level_errors(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line is not None
    assert str(info.value).startswith(f"{path}:{info.value.line}:")
    for word in words:
        assert word in str(info.value)


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "nope.yaml")


def test_dict_policies_get_the_file_messages_without_lines():
    with pytest.raises(PolicyError) as info:
        Policy.from_dict({"version": 1, "rules": [{"match": {"types": ["Linear"]}, "freeze": {"x": 1}}]})
    assert str(info.value).startswith("<dict>: rule rules[0]: unknown key 'x'")
    assert info.value.line is None and info.value.rule == "rules[0]"
    with pytest.raises(PolicyError, match="did you mean 'freeze_fraction'") as info:
        Policy.from_dict({"version": 1, "rules": [{"match": {"types": ["Linear"]}, "freeze_fracton": {}}]})
    assert "pydantic" not in str(info.value) and "input_value" not in str(info.value)
    with pytest.raises(PolicyError, match="a mapping of its parameters"):
        Policy.from_dict({"version": 1, "rules": [{"match": {"types": ["Linear"]}, "freeze": None}]})
    with pytest.raises(PolicyError, match="a policy is a mapping"):
        Policy.from_dict([1, 2])
    # model_dump() output, where the unused actions are None, validates back
    policy = Policy.from_dict({"version": 1, "rules": [{"match": {"types": ["Linear"]}, "freeze": {}}]})
    assert Policy.from_dict(policy.model_dump()) == policy


def test_reference_table_in_the_docs_is_the_registry():
    """docs/policies.md shows the table generated from the action registry (every parameter, its values, default
    and description), so a parameter added to an action's model appears there or this fails."""
    from pathlib import Path

    from seedrand.policy import reference_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "policies.md").read_text()
    assert reference_table() in docs
    for name, spec in ACTIONS.items():
        assert all(f"| `{name}` | `{f.alias or n}` |" in docs for n, f in spec.params.model_fields.items())


def test_parameter_errors_carry_the_parameters_description():
    with pytest.raises(PolicyError, match=r"freeze_fraction.fraction: Input should be less than 1 \(fraction: the "
                                          r"fraction of filters \(or inputs\) frozen, in \[0, 1\)\)"):
        Policy.from_dict({"version": 1, "rules": [{"match": {"types": ["Linear"]},
                                                   "freeze_fraction": {"fraction": 1.5}}]})


def test_an_action_spec_refuses_undocumented_parameters_and_an_unsaid_backend():
    from pydantic import Field

    from seedrand.actions import ActionSpec, StrictModel

    class Params(StrictModel):
        width: int = 1

    class Documented(StrictModel):
        width: int = Field(1, description="how wide")

    with pytest.raises(ValueError, match="parameters width have no description"):
        ActionSpec("mine", Params, lambda gm, targets: None, not_captured="it adds modules")
    with pytest.raises(ValueError, match="give either captured"):
        ActionSpec("mine", Documented, lambda gm, targets: None)
