"""seedrand: a graph-rewriting compiler pass that applies YAML policies (freeze fractions of filters, random layers
regenerated from Philox seeds, filter gates, subspace training) to existing PyTorch models.

Public API: :func:`load_policy`, :class:`Policy`, :func:`rewrite`, :func:`summary`, :func:`save`, :func:`load`,
:func:`export_onnx`, :func:`intrinsic_dimension`, :func:`penalty`, :func:`gate_parameters`, :func:`collect_garbage`,
:class:`CapacityScheduler` and :func:`drop_inactive` (``grow``), :func:`ensemble`; errors in
:mod:`seedrand.errors`; the Philox reference in :mod:`seedrand.kernels.philox`.
"""

from .checkpoint import load, save
from .ensemble import Ensemble, ensemble
from .errors import CheckpointError, ModelError, PolicyError, SeedrandError, TraceError
from .export import export_onnx
from .garbage import collect_garbage
from .intrinsic import intrinsic_dimension
from .passes.filter_gates import gate_parameters, penalty
from .passes.grow import drop_inactive
from .policy import Policy, load_policy
from .rewriter import rewrite
from .scheduler import CapacityScheduler
from .summary import summary

__version__ = "0.1.0"

__all__ = ["Policy", "load_policy", "rewrite", "summary", "save", "load", "export_onnx", "intrinsic_dimension",
           "penalty", "collect_garbage", "gate_parameters", "CapacityScheduler", "drop_inactive", "ensemble",
           "Ensemble", "PolicyError", "CheckpointError", "ModelError", "SeedrandError", "TraceError", "__version__"]
