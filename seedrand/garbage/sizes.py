"""How the size attributes of a module (``out_features``, a head count) follow its tensors after garbage
collection shrank them in a kept model: a registered layer's :class:`~seedrand.layers.LayerSpec`, else a size rule
registered per class (:func:`register_size_rule`)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch.nn as nn

from ..layers import layer_spec, mro_lookup

__all__ = ["SizeRule", "register_size_rule", "follow_tensors", "follow_sizes"]


SizeRule = Callable[[nn.Module], None]
_SIZE_RULES: dict[Union[type, str], SizeRule] = {}


def register_size_rule(layer: Union[type, str], rule: SizeRule) -> None:
    """Register how the size attributes of a module class follow its tensors after garbage collection shrank them
    in a kept model (the attributes its own forward reads: a split size, a head count). A rule applies to
    subclasses too; the most derived class's rule wins. A registered layer's own sizes follow by its
    :class:`~seedrand.layers.LayerSpec` (``resize``); a size rule registered for the same class replaces that.

    Args:
        layer: the class, or its qualified name ``"package.module.Class"`` (a rule for an optional library's class
            then needs no import).
        rule: ``(module) -> None``, called once per module after its parameters shrank (its children's may not
            have followed yet: read tensor shapes, not their size attributes).

    Raises nothing. The trial on a copy still decides: where a module's forward does not follow, nothing changes.
    """
    _SIZE_RULES[layer] = rule


def _size_rule(module: nn.Module) -> Optional[SizeRule]:
    rule = mro_lookup(_SIZE_RULES, type(module))
    spec = layer_spec(type(module))
    return rule or (spec.follow if spec is not None else None)


def follow_tensors(module: nn.Module) -> None:
    """Set the size attributes of ``module`` (``out_features``, ``num_features``, a head count) from its tensors'
    shapes by its class's rule (:func:`register_size_rule`), if it has one. Raises nothing of its own."""
    rule = _size_rule(module)
    if rule is not None:
        rule(module)


def _batch_norm(module: nn.modules.batchnorm._NormBase) -> None:
    module.num_features = (module.weight if module.affine else module.running_mean).shape[0]


def _layer_norm(module: nn.LayerNorm) -> None:
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)


def _gpt2_attention(module: nn.Module) -> None:
    """GPT-2 splits ``c_attn``'s output (queries, keys, values) by ``split_size``: whole heads went from each."""
    width = module.q_attn.weight.shape[1] if module.is_cross_attention else module.c_attn.weight.shape[1] // 3
    module.split_size = module.embed_dim = width
    module.num_heads = width // module.head_dim


_SIZE_RULES.update({nn.modules.batchnorm._NormBase: _batch_norm, nn.LayerNorm: _layer_norm,
                    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _gpt2_attention})


def follow_sizes(kept: nn.Module) -> None:
    """:func:`follow_tensors` on every module of a kept model, whose tensors garbage collection shrank in the
    graph; a grouped convolution's ``groups`` shrink with whole groups (its ``out_channels`` tells the old width)."""
    for module in kept.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and \
                module.weight.shape[0] != module.out_channels:
            module.groups = module.groups * module.weight.shape[0] // module.out_channels
        follow_tensors(module)
