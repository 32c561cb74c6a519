"""Matching precedence and strictness (seedrand.rewriter.match)."""

import pytest
import torch.nn as nn

from seedrand import Policy, PolicyError
from seedrand.rewriter import resolve


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)


class MyLinear(nn.Linear):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.classifier = MyLinear(4, 2)


def targets(rules, optional=False):
    policy = Policy.model_validate({"version": 1, "seed": 5, "rules": rules})
    return [(t.qualname, t.rule._index) for t in resolve(policy, Net())]


def rule(match, action="freeze", **extra):
    return {"match": match, action: extra.pop("params", {}), **extra}


def test_exact_names_and_full_match_regex():
    assert targets([rule({"modules": ["conv1", "re:blocks\\.\\d\\.fc"]})]) == [
        ("conv1", 0), ("blocks.0.fc", 0), ("blocks.1.fc", 0)]
    with pytest.raises(PolicyError, match="matches no module"):  # `re:` must match the whole name
        targets([rule({"modules": ["re:fc"]})])


def test_types_follow_the_class_hierarchy_and_dotted_paths():
    assert [n for n, _ in targets([rule({"types": ["Linear"]})])] == ["blocks.0.fc", "blocks.1.fc", "classifier"]
    assert [n for n, _ in targets([rule({"types": ["MyLinear"]})])] == ["classifier"]
    assert [n for n, _ in targets([rule({"types": ["torch.nn.modules.conv._ConvNd"]})])] == [
        "conv1", "blocks.0.conv", "blocks.1.conv"]


def test_modules_and_types_intersect():
    assert targets([rule({"modules": ["re:blocks\\.0\\..*"], "types": ["Conv2d", "Linear"]})]) == [
        ("blocks.0.conv", 0), ("blocks.0.fc", 0)]


def test_exclude_beats_everything():
    got = targets([rule({"modules": ["re:.*"], "exclude": ["re:blocks\\.1(\\..*)?", "classifier"],
                         "exclude_types": ["BatchNorm2d"]})])
    names = [n for n, _ in got]
    assert "blocks.1.fc" not in names and "blocks.1" not in names and "classifier" not in names
    assert "blocks.0.bn" not in names and "blocks.0.conv" in names and "" in names


def test_rules_apply_in_file_order_and_compatible_actions_stack():
    got = targets([rule({"types": ["Linear"]}, "filter_gates"), rule({"modules": ["classifier"]})])
    assert got == [("blocks.0.fc", 0), ("blocks.1.fc", 0), ("classifier", 0), ("classifier", 1)]


@pytest.mark.parametrize("first,second", [("random", "freeze_fraction"), ("subspace", "random"),
                                          ("random", "random"), ("filter_gates", "filter_gates")])
def test_incompatible_actions_name_both_rules(first, second):
    params = {"freeze_fraction": {"fraction": 0.5}, "subspace": {"dim": 4}}
    rules = [dict(rule({"types": ["Linear"]}, first, params=params.get(first, {})), name="one"),
             dict(rule({"modules": ["classifier"]}, second, params=params.get(second, {})), name="two")]
    with pytest.raises(PolicyError) as info:
        targets(rules)
    message = str(info.value)
    assert "'one' (rules[0])" in message and "'two' (rules[1])" in message and "'classifier'" in message


@pytest.mark.parametrize("match,words", [
    ({"modules": ["conv_1"]}, ["'conv_1' matches no module", "did you mean 'conv1'"]),
    ({"modules": ["conv1", "clasifier"]}, ["'clasifier' matches no module", "did you mean 'classifier'"]),
    ({"types": ["Conv2D"]}, ["unknown type 'Conv2D'", "did you mean 'Conv2d'"]),
    ({"types": ["LayerNorm"]}, ["'LayerNorm' matches no module"]),
    ({"types": ["torch.nn.Conv9d"]}, ["'torch.nn.Conv9d' is neither a class"]),
    ({"types": ["Linear"], "exclude": ["clasifier"]}, ["exclude entry 'clasifier'", "did you mean 'classifier'"]),
    ({"modules": ["conv1"], "types": ["Linear"]}, ["selects no module"]),
    ({"modules": ["conv1"], "exclude_types": ["Conv2d"]}, ["selects no module"]),
])
def test_strict_matching_errors_name_the_rule(match, words):
    with pytest.raises(PolicyError) as info:
        targets([dict(rule(match), name="r")])
    assert "'r' (rules[0])" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_optional_rules_may_match_nothing():
    assert targets([dict(rule({"modules": ["missing"], "types": ["LayerNorm"]}), optional=True)]) == []
