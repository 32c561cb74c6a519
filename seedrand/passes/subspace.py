"""The ``subspace`` action: train the matched modules' parameters in a random subspace, ``theta = theta0 + P @
theta_d`` (Li et al. 2018, "Measuring the intrinsic dimension of objective landscapes"; Minut 2023: per-layer
``K = P W``).

Every parameter the matched module owns directly (weight and bias alike, in ``named_parameters`` order) is a slice of
the flat ``theta`` of its group: one group per module (``scope: per_layer``, Minut 2023) or one for all modules the rule
matched (``scope: global``, Li et al.). A group's :class:`SubspaceCoordinates` holds ``theta_d`` (``(dim,)``, zero at
start, so the model starts exactly at ``theta0``: the only trainable tensor) and regenerates the ``D x dim``
projection ``P`` (``seedrand.kernels.projection``; Philox key ``derive_seed(seed, group, "projection")``) on every
use, never storing it. With ``normalize: true`` its columns are rescaled to unit norm exactly. ``theta0`` is the
parameters' current values (``keep``, stored as buffers) or the init the ``random`` action would regenerate
(``random``: weight as ``random`` with the layer's own init, bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; never
stored). Groups live at ``{module}.subspace`` (per layer) or ``subspace_{rule index}`` (global); each parameter is
replaced by a :class:`SubspaceTensor` computing its slice.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import Field, model_validator
from torch.nn.utils import parametrize

from ..actions import StrictModel, ActionSpec, register_action
from ..kernels.dispatch import plain_torch_ops
from ..kernels.philox import derive_seed
from ..kernels.projection import DEFAULT_CHUNK_BYTES, column_norms, leading_rows, materialized, project
from ..rewriter.graph import inline_module, install, own_parameters
from ..rewriter.match import Target
from .layout import layout
from .regenerated import FINGERPRINT_SIZE, Regenerating, Stream

__all__ = ["Subspace", "SubspaceCoordinates", "SubspaceTensor", "subspace", "check_subspace"]


class Subspace(StrictModel):
    """``subspace``: weights become ``theta0 + P @ theta_d`` with a regenerated random projection ``P``."""

    dim: int = Field(ge=1, description="the intrinsic dimension `d`: how many coordinates `theta_d` train (>= 1)")
    projection: Literal["gaussian", "orthogonal", "sparse", "very_sparse", "fastfood"] = Field(
        "gaussian", description="the projection `P`: dense Gaussian, orthonormal columns, sparse (density 1/3), "
                                "very sparse (density `1/sqrt(D)` or `density`), Fastfood (Walsh-Hadamard)")
    scope: Literal["per_layer", "global"] = Field("per_layer", description="one `theta_d` per module, or one shared "
                                                                           "by every module of the rule")
    theta0: Literal["keep", "random"] = Field("keep", description="`theta0`: the module's values, or an init "
                                                                  "regenerated from the seed")
    density: Optional[float] = Field(default=None, gt=0.0, le=1.0, description="`very_sparse` only: the fraction "
                                                                               "of non-zero entries of `P`, in "
                                                                               "(0, 1]")
    normalize: bool = Field(False, description="scale `P`'s columns to unit norm (gaussian, sparse, very_sparse)")

    @model_validator(mode="after")
    def _density_only_for_very_sparse(self):
        if self.density is not None and self.projection != "very_sparse":
            raise ValueError(f"density applies to projection: very_sparse only, not {self.projection}")
        if self.normalize and self.projection in ("orthogonal", "fastfood"):
            raise ValueError(f"normalize applies to gaussian, sparse and very_sparse projections; {self.projection} "
                             "columns already have unit norm")
        return self


class SubspaceCoordinates(Regenerating):
    """``theta_d`` and the projection ``P`` of one group; ``forward()`` returns ``P @ theta_d``, ``(D,)`` float32.

    Args:
        dim: ``d``, the subspace dimension.
        rows: ``D``, the number of parameters of the group.
        seed: ``P``'s Philox key.
        projection: one of ``seedrand.kernels.projection.PROJECTIONS``.
        density: ``very_sparse`` only (default ``1/sqrt(D)``).
        normalize: rescale ``P``'s columns to unit norm (``gaussian``, ``sparse``, ``very_sparse``).
        chunk_bytes: bytes of ``P`` regenerated at a time.

    ``state_dict`` holds ``theta_d`` and ``projection_seed`` / ``projection_fingerprint`` (the first 16 entries of
    ``P @ ones(d)``).
    """

    def __init__(self, dim: int, rows: int, seed: int, projection: str, density: Optional[float], normalize: bool,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.theta_d = nn.Parameter(torch.zeros(dim))
        self.rows, self.projection, self.density, self.chunk_bytes = rows, projection, density, chunk_bytes
        self.streams["projection"] = Stream(seed, projection, 1.0, (rows, dim))
        norms = column_norms(seed, rows, dim, projection, density, chunk_bytes) if normalize else None
        self.register_buffer("column_scale", None if norms is None else 1 / norms.clamp_min(1e-30), persistent=False)

    def fingerprint(self, name: str) -> torch.Tensor:
        """The first ``FINGERPRINT_SIZE`` entries of ``P @ ones(d)`` (cheap: one block of ``P``)."""
        stream = self.streams[name]
        return leading_rows(stream.seed, self.rows, stream.shape[1], self.projection, self.density, FINGERPRINT_SIZE)

    def forward(self) -> torch.Tensor:
        theta_d = self.theta_d if self.column_scale is None else self.theta_d * self.column_scale
        seed = self.streams["projection"].seed
        if plain_torch_ops() and self.projection != "fastfood":
            return materialized(seed, self.rows, theta_d.shape[0], self.projection, self.density) @ theta_d
        return project(theta_d, seed, self.rows, self.projection, self.density, self.chunk_bytes)

    def extra_repr(self) -> str:
        return f"D={self.rows}, d={self.theta_d.shape[0]}, projection={self.projection}"


class SubspaceTensor(Regenerating):
    """One parameter as ``theta0 + delta[start:start + numel].view(shape)``, ``delta`` the group's ``P @ theta_d``.

    Args:
        shape, dtype: the parameter's.
        start: its first row in the group's ``P``.
        theta0: the stored starting value (``keep``), or ``None`` with ``stream`` (``random``).
        stream: the regenerated ``theta0`` (element ``j`` at Philox counter ``j``).

    ``forward(delta)``: ``delta`` ``(D,)`` float32 -> the parameter, ``shape`` and ``dtype``. In the kept model
    (``seedrand.rewrite`` without ``graph=True``) the module's own forward reads the parameter as an attribute:
    ``forward()`` then takes ``delta`` from the callable given to :meth:`bind_inputs` (the group's
    :class:`SubspaceCoordinates`, through ``seedrand.rewriter.kept.PerForward``: once per forward of the model).
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, start: int, theta0: Optional[torch.Tensor],
                 stream: Optional[Stream] = None):
        super().__init__()
        self.shape, self.start = tuple(shape), start
        self.register_dtype(dtype)
        self.register_buffer("theta0", None if theta0 is None else theta0.detach().clone())
        if theta0 is None:
            self.streams["theta0"] = stream

    def bind_inputs(self, inputs: list) -> None:
        """Take ``delta`` from ``inputs[0]()`` (the group's coordinates, or a per-forward cache of them) when called
        without it. A plain reference: the coordinates are registered once, where the rule installed them. Raises
        nothing."""
        self.__dict__["_coordinates"] = inputs[0]

    def forward(self, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        if delta is None:
            delta = self.__dict__["_coordinates"]()
        theta0 = self.theta0 if self.theta0 is not None else self.regenerate("theta0", self.dtype, delta.device)
        step = delta[self.start:self.start + math.prod(self.shape)].view(self.shape)
        return theta0 + step.to(self.dtype)


def _theta0_stream(gm: fx.GraphModule, target: Target, name: str, shape: tuple[int, ...]) -> Stream:
    """The regenerated ``theta0`` of parameter ``name`` (``theta0: random``): the ``random`` action's init."""
    lay = layout(gm, target)
    if name not in ("weight", "bias"):
        raise target.error(f"theta0: random regenerates weight and bias only, not parameter {name!r}")
    if name == "weight" and lay.transposed:
        raise target.error("theta0: random does not support transformers Conv1D (its weight is stored transposed); "
                           "use theta0: keep")
    return lay.stream(target, name, shape=shape)


def _group(gm: fx.GraphModule, targets: list[Target], name: str) -> None:
    """Rewrite the parameters of ``targets`` into one subspace group installed at ``name``."""
    p = targets[0].rule.params
    members = []  # (target, parameter name, parameter, first row)
    rows = 0
    holders: dict[int, list[str]] = {}
    for n, param in gm.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(n)
    for target in targets:
        owned = own_parameters(gm, target.qualname)
        if not owned:
            raise target.error("subspace needs parameters the module owns directly; it has none in the traced graph")
        for full_name, param in owned:
            tied = [n for n in holders[id(param)] if n != full_name]
            if tied:  # as every weight action: reparametrizing one holder would silently untie the others
                raise target.error(f"its parameter {full_name} is tied to {', '.join(tied)}; subspace cannot "
                                   "reparametrize one without the other (exclude the module, or untie the weights)")
            members.append((target, full_name.rpartition(".")[2], param, rows))
            rows += param.numel()
    if p.dim > rows:  # theta_d would hold more values than the parameters it replaces (and may not fit in memory)
        raise targets[0].error(f"projection {p.projection} needs dim <= D, the number of parameters "
                               f"({rows:,}); dim is {p.dim:,}")
    coordinates = SubspaceCoordinates(p.dim, rows, derive_seed(targets[0].seed, name, "projection"), p.projection,
                                      p.density, p.normalize)
    tensors = {}
    for target, pname, param, start in members:
        stream = _theta0_stream(gm, target, pname, tuple(param.shape)) if p.theta0 == "random" else None
        tensors[(target.qualname, pname)] = SubspaceTensor(param.shape, param.dtype, start,
                                                          param if p.theta0 == "keep" else None, stream)
    for target in targets:
        inline_module(gm, target.qualname)
    install(gm, name, coordinates)
    readers = {key: [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == f"{key[0]}.{key[1]}"]
               for key in tensors}
    first = next((n for n in gm.graph.nodes if any(n in r for r in readers.values())), None)
    if first is None:
        raise targets[0].error("the traced forward never reads the parameters of the modules this rule selected")
    with gm.graph.inserting_before(first):
        delta = gm.graph.call_module(name)
    for (qualname, pname), module in tensors.items():
        install(gm, f"{qualname}.{pname}", module)
        for node in readers[(qualname, pname)]:
            with gm.graph.inserting_before(node):
                value = gm.graph.call_module(f"{qualname}.{pname}", (delta,))
            value.meta = dict(node.meta)
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)


def check_subspace(model: nn.Module, targets: list[Target]) -> None:
    """Refuse, before tracing, modules whose parameters a ``torch.nn.utils.parametrize`` parametrization computes:
    their ``parametrizations.*.original`` tensors would stay trainable beside ``theta_d``.

    Raises:
        PolicyError: a selected module is parametrized (names the module, the parametrized tensors and the rule).
    """
    for target in targets:
        module = model.get_submodule(target.qualname)
        if parametrize.is_parametrized(module):
            names = ", ".join(module.parametrizations.keys())
            raise target.error(f"its {names} is computed by a torch.nn.utils.parametrize parametrization, whose "
                               "original tensors would stay trainable beside theta_d; remove the parametrization "
                               "(parametrize.remove_parametrizations) or exclude the module")


def subspace(gm: fx.GraphModule, targets: list[Target]) -> None:
    """Reparametrize the modules of one ``subspace`` rule (see the module docstring).

    Raises:
        PolicyError: a module owns no parameters or shares one (tied), ``dim`` exceeds ``D``, or
            ``theta0: random`` on a layer type without a known init (names the module, the rule and its YAML line).
    """
    if targets[0].rule.params.scope == "global":
        _group(gm, targets, f"subspace_{targets[0].rule._index}")
        return
    for target in targets:
        if not target.qualname:
            raise target.error("subspace with scope: per_layer needs a submodule, not the root (use scope: global)")
        _group(gm, [target], f"{target.qualname}.subspace")


register_action(ActionSpec("subspace", Subspace, subspace, owns_weight=True, check=check_subspace,
                           not_captured="it trains new coordinates theta_d in place of the module's parameters"))
