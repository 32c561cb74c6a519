"""seedrand: a graph-rewriting compiler pass that applies YAML policies (freeze fractions of filters, random layers
regenerated from Philox seeds, filter gates, subspace training) to existing PyTorch models.

Public API: :func:`load_policy`, :class:`Policy`, :func:`rewrite`, :func:`summary`, :func:`save`, :func:`load`,
:func:`export_onnx`, :func:`intrinsic_dimension`, :func:`penalty`, :func:`gate_parameters`, :func:`collect_garbage`,
:class:`CapacityScheduler` and :func:`drop_inactive` (``grow``), :func:`ensemble`, :func:`register_layer` and
:class:`LayerSpec` (a layer class of one's own), :func:`register_channel_rule` (an op of one's own); errors in
:mod:`seedrand.errors`; the Philox reference in :mod:`seedrand.kernels.philox`.

Names are imported on first use (PEP 562), so ``import seedrand`` and ``seedrand --help`` do not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .errors import CheckpointError, ModelError, PolicyError, SeedrandError, TraceError

if TYPE_CHECKING:  # for type checkers and the documentation; at run time __getattr__ imports on first use
    from .checkpoint import load, save
    from .ensemble import Ensemble, ensemble
    from .export import export_onnx
    from .garbage import collect_garbage, drop_inactive
    from .intrinsic import intrinsic_dimension
    from .layers import LayerSpec, register_layer
    from .merge import load_base_state_dict, merge
    from .passes.filter_gates import gate_parameters, penalty
    from .policy import Policy, load_policy
    from .garbage import register_channel_rule
    from .rewriter.rewrite import rewrite
    from .scheduler import CapacityScheduler
    from .summary import summary

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY = {
    "load": ".checkpoint", "save": ".checkpoint",
    "Ensemble": ".ensemble", "ensemble": ".ensemble",
    "export_onnx": ".export",
    "collect_garbage": ".garbage",
    "intrinsic_dimension": ".intrinsic",
    "LayerSpec": ".layers", "register_layer": ".layers",
    "merge": ".merge", "load_base_state_dict": ".merge",
    "gate_parameters": ".passes.filter_gates", "penalty": ".passes.filter_gates",
    "drop_inactive": ".garbage",
    "Policy": ".policy", "load_policy": ".policy",
    "rewrite": ".rewriter.rewrite",
    "register_channel_rule": ".garbage",
    "CapacityScheduler": ".scheduler",
    "summary": ".summary",
}

__all__ = ["Policy", "load_policy", "rewrite", "summary", "save", "load", "merge", "load_base_state_dict", "export_onnx", "intrinsic_dimension",
           "penalty", "collect_garbage", "gate_parameters", "CapacityScheduler", "drop_inactive", "ensemble",
           "Ensemble", "register_layer", "LayerSpec", "register_channel_rule", "PolicyError", "CheckpointError", "ModelError", "SeedrandError", "TraceError", "__version__"]


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``seedrand.summary`` (or ``seedrand.ensemble``) binds it
    as an attribute of the package; the public function of the same name stays what ``seedrand.summary`` is."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f".{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'seedrand' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
