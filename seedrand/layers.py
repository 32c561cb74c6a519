"""The layer registry: one :class:`LayerSpec` per layer class says how the class stores its weight, which gives every
weight action (``random``, ``freeze_fraction``, ``filter_gates``, ``insert_random``, ``grow``), garbage collection
and :func:`seedrand.merge` what they need to know about it. Built-in layers are registered at the bottom of this
module through :func:`register_layer`, exactly as a user registers their own (Torch-Pruning's
``register_customized_layer``, PEFT's custom module mapping).

A layout names the computation the layer's forward performs on its input ``x`` and its ``weight``/``bias``
parameters:

* ``"linear"``: ``y = x @ W.T + b``, ``W`` stored ``(out, in)`` (``transposed``: ``(in, out)``, transformers'
  ``Conv1D``); output features in the last dimension.
* ``"conv"``: ``nn.Conv{1,2,3}d``'s ``F.conv{n}d(x, W, b, stride, padding, dilation, groups)``, ``W`` stored
  ``(out, in / groups, *kernel)``; channels in dimension 1.
* ``"conv_transpose"``: ``nn.ConvTranspose{1,2,3}d``'s ``F.conv_transpose{n}d(x, W, b, stride, padding,
  output_padding, groups, dilation)``, ``W`` stored ``(in, out / groups, *kernel)``; channels in dimension 1.
* ``"embedding"``: ``y = W[x]``, ``W`` stored ``(num_embeddings, embedding_dim)``.
* ``"tensors"``: a layer whose own forward reads its ``weights`` as tensors, each a matrix ``(out, in)`` or a stack of
  them ``(..., out, in)`` (``transposed``: ``(..., in, out)``): ``nn.MultiheadAttention``'s ``in_proj_weight`` (or
  its ``q/k/v_proj_weight``), and the experts of transformers 5's mixture-of-experts layers, kept as 3D parameters
  ``(num_experts, out, in)`` (``MixtralExperts.gate_up_proj``/``down_proj``, Qwen2/3-MoE, OLMoE, DeepSeek-V3). Only
  ``random`` (and ``freeze``) apply: the weights become tensors regenerated for each forward, stored nowhere.

Hyperparameters (``stride``, ``padding``, ``output_padding``, ``dilation``, ``groups``, ``padding_idx``) are read from
the module's attributes of those names, with PyTorch's defaults where it has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union

import torch.nn as nn

__all__ = ["LayerSpec", "LAYOUTS", "register_layer", "layer_spec", "mro_lookup", "registered_names"]

LAYOUTS = ("linear", "conv", "conv_transpose", "embedding", "tensors")
_DEFAULT_INIT = {"linear": "kaiming_uniform", "conv": "kaiming_uniform", "conv_transpose": "kaiming_uniform",
                 "embedding": "normal(1.0)", "tensors": "normal(0.02)"}


def _resize_linear(module: nn.Module, transposed: bool) -> None:
    out, in_ = module.weight.shape[::-1] if transposed else module.weight.shape
    _set_present(module, out_features=out, in_features=in_)


def _resize_conv(module: nn.Module) -> None:  # groups already follow (garbage collection sets them first)
    groups = getattr(module, "groups", 1)
    _set_present(module, out_channels=module.weight.shape[0], in_channels=module.weight.shape[1] * groups)


def _resize_conv_transpose(module: nn.Module) -> None:
    groups = getattr(module, "groups", 1)
    _set_present(module, in_channels=module.weight.shape[0], out_channels=module.weight.shape[1] * groups)


def _resize_embedding(module: nn.Module) -> None:
    _set_present(module, num_embeddings=module.weight.shape[0], embedding_dim=module.weight.shape[1])


def _set_present(module: nn.Module, **sizes: int) -> None:
    """Set the size attributes ``module`` has (a user's layer may name them otherwise, or not keep them)."""
    for name, value in sizes.items():
        if hasattr(module, name):
            setattr(module, name, value)


@dataclass(frozen=True)
class LayerSpec:
    """How a layer class stores its weight (see the module docstring).

    The class holds its weight as the parameter ``weight`` (and its bias, if any, as ``bias``), and its forward
    computes exactly what ``layout`` says on its input: ``random`` replaces the whole module by a regenerated layer of
    that layout, so anything else the forward does (a scale, an activation) would be lost. A forward that does more
    belongs in a layer that calls a registered one.

    Attributes:
        layout: one of :data:`LAYOUTS`.
        transposed: ``"linear"``: the weight is stored ``(in, out)`` (transformers' ``Conv1D``); its Philox
            counters are those of the ``(out, in)`` weight, so a transposed and a plain layer of the same shape
            regenerate the same matrix. ``"tensors"``: each matrix is stored ``(in, out)``.
        weights: ``"tensors"`` only: the names of its weight parameters (those a module lacks, or holds as
            ``None``, are skipped); other layouts: ``("weight",)``.
        default_init: the layer's own init (a ``seedrand.kernels.init`` name), used where a rule gives no ``init``;
            ``None``: the layout's (PyTorch's default ``kaiming_uniform``; ``normal(1.0)`` for an embedding;
            transformers' ``normal(0.02)`` for ``"tensors"``).
        resize: ``(module) -> None``: sets the module's size attributes from its tensors' shapes after garbage
            collection shrank them in a kept model; ``None``: the layout's (``out_features``/``in_features``,
            ``out_channels``/``in_channels``, ``num_embeddings``/``embedding_dim``, each where the module has it).
        delegate: instead of a layout, the name of the child that holds the weight (a wrapper: PEFT's LoRA layers
            wrap ``base_layer``): actions that own the weight (``random``, ``freeze_fraction``, ``subspace``,
            ``grow``) selecting the wrapper apply to that child, the wrapper's own code (its adapters) unchanged.

    Raises:
        ValueError: an unknown layout, neither a layout nor a delegate (or both), or ``transposed`` on a layout
            other than ``"linear"``.
    """

    layout: Optional[str] = None
    transposed: bool = False
    default_init: Optional[str] = None
    resize: Optional[Callable[[nn.Module], None]] = None
    delegate: Optional[str] = None
    weights: tuple[str, ...] = ("weight",)

    def __post_init__(self):
        if (self.layout is None) == (self.delegate is None):
            raise ValueError("a LayerSpec gives either a layout or the delegate child that holds the weight")
        if self.delegate is not None:
            return
        if self.layout not in LAYOUTS:
            raise ValueError(f"LayerSpec layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.transposed and self.layout not in ("linear", "tensors"):
            raise ValueError("LayerSpec(transposed=True) describes a linear layer stored (in, out); a transposed "
                             "convolution is layout='conv_transpose'")
        if self.weights != ("weight",) and self.layout != "tensors":
            raise ValueError("LayerSpec(weights=...) names the parameters of layout='tensors'; other layouts keep "
                             "theirs as 'weight'")

    @property
    def init(self) -> str:
        """The layer's own init name (``default_init``, else the layout's)."""
        return self.default_init or _DEFAULT_INIT[self.layout]

    @property
    def output_dim(self) -> int:
        """The stored weight's dimension indexed by the output features (what a gate after the layer scales)."""
        return 1 if self.transposed or self.layout in ("conv_transpose", "embedding") else 0

    def follow(self, module: nn.Module) -> None:
        """Set ``module``'s size attributes from its tensors (``resize``, else the layout's rule; a delegating
        wrapper's child follows by its own spec)."""
        if self.delegate is not None or self.layout == "tensors":  # not shrunk by garbage collection
            return
        if self.resize is not None:
            self.resize(module)
        elif self.layout == "linear":
            _resize_linear(module, self.transposed)
        else:
            {"conv": _resize_conv, "conv_transpose": _resize_conv_transpose,
             "embedding": _resize_embedding}[self.layout](module)


_LAYERS: dict[Union[type, str], LayerSpec] = {}
T = TypeVar("T")


def register_layer(cls: Union[type, str], spec: LayerSpec) -> None:
    """Register the layer class ``cls`` (or its qualified name ``"package.module.Class"``, so that a class of an
    optional library needs no import) as storing its weight as ``spec`` says. Applies to subclasses too; the most
    derived registered class wins, and registering a class again replaces its spec.

    Raises:
        TypeError: ``cls`` is neither an ``nn.Module`` subclass nor a string, or ``spec`` is not a :class:`LayerSpec`.
    """
    if not (isinstance(cls, str) or (isinstance(cls, type) and issubclass(cls, nn.Module))):
        raise TypeError(f"register_layer takes an nn.Module subclass or its qualified name, not {cls!r}")
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_layer takes a seedrand.layers.LayerSpec, not {type(spec).__name__}")
    _LAYERS[cls] = spec


def mro_lookup(registry: dict[Union[type, str], T], cls: type) -> Optional[T]:
    """The entry of ``registry`` for the most derived class along ``cls.__mro__``, keyed by the class itself or by
    its qualified name ``"module.Class"``; ``None`` when there is none."""
    for base in cls.__mro__:
        entry = registry.get(base) or registry.get(f"{base.__module__}.{base.__qualname__}")
        if entry is not None:
            return entry
    return None


def registered_names() -> str:
    """The registered layer classes' names, comma-separated (for errors)."""
    return ", ".join((c if isinstance(c, str) else c.__qualname__).rpartition(".")[2].lstrip("_")
                     for c, spec in _LAYERS.items() if spec.delegate is None)


def layer_spec(cls: type) -> Optional[LayerSpec]:
    """The :class:`LayerSpec` registered for ``cls`` or its nearest registered base class, else ``None``."""
    return mro_lookup(_LAYERS, cls)


register_layer(nn.Linear, LayerSpec("linear"))
register_layer("transformers.pytorch_utils.Conv1D", LayerSpec(
    "linear", transposed=True, default_init="normal(0.02)",
    resize=lambda m: setattr(m, "nf", m.weight.shape[1])))
register_layer(nn.modules.conv._ConvNd, LayerSpec("conv"))
register_layer(nn.modules.conv._ConvTransposeNd, LayerSpec("conv_transpose"))
register_layer(nn.Embedding, LayerSpec("embedding"))
register_layer(nn.MultiheadAttention, LayerSpec("tensors", default_init="xavier_uniform", weights=(
    "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")))
register_layer("peft.tuners.tuners_utils.BaseTunerLayer", LayerSpec(delegate="base_layer"))
for _experts in ("mixtral.modeling_mixtral.MixtralExperts", "qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts",
                 "qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts", "olmoe.modeling_olmoe.OlmoeExperts",
                 "deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts"):
    register_layer(f"transformers.models.{_experts}", LayerSpec("tensors", weights=("gate_up_proj", "down_proj")))
