"""``seedrand.export_onnx``: a rewritten model as an ONNX file, on top of ``torch.onnx.export(..., dynamo=True)``.

During ONNX export every seedrand module computes its regenerated tensors with plain torch ops (the Philox reference
is int64 multiplies, shifts, masks and xors, which the exporter translates to standard ONNX ops and onnxruntime runs
bit for bit; Box-Muller normals agree within about 1e-6), instead of its custom ops. Then:

* ``weights="seed"``: nothing is folded, so the file holds the trainable and stored tensors plus the seeds as
  constants; the runtime regenerates every random weight on each run. A model whose layers are mostly random is a
  small fraction of its materialized size.
* ``weights="materialize"``: every constant subgraph is folded (``onnxscript.optimizer`` with no size limit), so the
  regenerated weights become ordinary initializers and the file runs anywhere, at full size.

The ``orthogonal`` subspace projection (a QR decomposition, which ONNX lacks) cannot be exported.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from ._optional import require
from .errors import SeedrandError
from .rewriter.trace import default_dynamic_shapes
from .summary import summary

__all__ = ["export_onnx", "OnnxExport"]

_NO_LIMIT = 2**62
# logs "torchvision is not installed. Skipping torchvision::..." once per torchvision op on every export
_REGISTRY_LOG = logging.getLogger("torch.onnx._internal.exporter._registration")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the file; bytes: its size (bytes); weights: the mode; opset: the ONNX opset.
        dynamic: whether the batch dimension of every tensor input (and the sequence of integer inputs) is a
            dynamic axis of the file; ``False`` when the model could only be exported at the example's sizes.
        regenerated_bytes: float32 bytes of the weights the model regenerates (what ``materialize`` stores; in
            ``seed`` mode the graph computes them instead).
        graph_bytes: serialized bytes of the graph's nodes, initializers excluded: in ``seed`` mode mostly the
            Philox graph, a fixed cost of about 190 nodes per regenerated tensor whatever its size.
        note: in ``seed`` mode, when ``graph_bytes`` exceeds ``regenerated_bytes`` (small random layers), why the
            file is likely larger than a ``materialize`` one; else ``""``.
    """

    path: Path
    bytes: int
    weights: str
    opset: int
    dynamic: bool = False
    regenerated_bytes: int = 0
    graph_bytes: int = 0
    note: str = ""


def export_onnx(model: nn.Module, args: Union[tuple, torch.Tensor], path: Union[str, Path], *,
                weights: str = "seed", opset: int = 18) -> OnnxExport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` (see the module docstring).

    Args:
        model: a model returned by ``seedrand.rewrite`` (any ``nn.Module`` works).
        args: example positional inputs (a tensor or a tuple). The batch dimension of each tensor (and the sequence
            dimension of integer inputs) is exported as a dynamic axis where the model allows it, else every
            dimension stays as in these inputs (``OnnxExport.dynamic`` says which).
        path: the ``.onnx`` file to write.
        weights: ``"seed"`` (regenerated in the graph) or ``"materialize"`` (stored as initializers).
        opset: ONNX opset (onnxruntime 1.31 accepts up to 26).

    Returns:
        An :class:`OnnxExport`; the file passes ``onnx.checker.check_model``.

    Raises:
        SeedrandError: an unknown ``weights`` mode, an ``orthogonal`` subspace (names the module), or the exporter
            failed (names the op it found no ONNX translation for).
    """
    if weights not in ("seed", "materialize"):
        raise SeedrandError(f"weights must be 'seed' or 'materialize', got {weights!r}")
    onnx = require("onnx", "ONNX export")
    optimizer = require("onnxscript.optimizer", "ONNX export")
    for name, module in model.named_modules():
        if getattr(module, "projection", None) == "orthogonal":
            raise SeedrandError(f"module {name!r}: the orthogonal subspace projection needs a QR decomposition, which "
                                "ONNX lacks; use gaussian, sparse, very_sparse or fastfood to export")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    was_training = model.training
    model.eval()
    level = _REGISTRY_LOG.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _REGISTRY_LOG.setLevel(logging.ERROR)
            dynamic = default_dynamic_shapes(args)
            try:
                program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, optimize=False,
                                            verbose=False, dynamic_shapes=dynamic)
            except Exception:  # noqa: BLE001 - a model whose batch cannot vary still exports at its inputs' sizes
                dynamic = None
                program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, optimize=False,
                                            verbose=False)
    except Exception as e:  # the exporter raises several types; keep its diagnosis
        raise SeedrandError(f"ONNX export failed: {_diagnosis(e, model, args)}") from e
    finally:
        _REGISTRY_LOG.setLevel(level)
        model.train(was_training)
    proto = program.model_proto
    if weights == "materialize":
        proto = optimizer.optimize(proto, input_size_limit=_NO_LIMIT, output_size_limit=_NO_LIMIT)
    _strip_metadata(proto.graph)
    path = Path(path)
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    report = OnnxExport(path, path.stat().st_size, weights, opset, dynamic=dynamic is not None,
                        regenerated_bytes=summary(model).total.regenerated_bytes,
                        graph_bytes=sum(node.ByteSize() for node in proto.graph.node))
    if weights == "seed" and report.graph_bytes > report.regenerated_bytes:
        report.note = (f"the graph's nodes take {report.graph_bytes:,} bytes, more than the "
                       f"{report.regenerated_bytes:,} bytes of weights they regenerate: the Philox graph is a fixed "
                       "cost per random tensor, so for small random layers weights='materialize' gives a smaller "
                       "file")
    return report


def _strip_metadata(graph) -> None:
    """Drop the per-node stack traces and module paths the exporter records: about 700 bytes per node, which would
    dominate a seed-mode file made of thousands of small Philox nodes."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attribute in node.attribute:
            if attribute.type == type(attribute).GRAPH:
                _strip_metadata(attribute.g)


def _diagnosis(error: Exception, model: nn.Module, args: tuple) -> str:
    """The exporter's own diagnosis: the op it found no ONNX function for and the modules that call it, else the
    first line of its message."""
    text = str(error).strip()
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if not missing:
        return text.splitlines()[0] if text else type(error).__name__
    op = f"{missing.group(1)}.{missing.group(2)}"
    modules = _modules_calling(model, args, op)
    where = f", called by module {', '.join(map(repr, modules))}" if modules else ""
    return f"no ONNX translation for op {op}{where}"


def _modules_calling(model: nn.Module, args: tuple, op: str) -> list[str]:
    """Qualified names of the innermost modules whose forward calls ``op`` (from a plain ``torch.export``); empty
    if that export fails too."""
    try:
        graph = torch.export.export(model, args, strict=False).graph
    except Exception:  # only a better message was at stake
        return []
    found = []
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if str(node.target) == op:
            found.append(list(stack.values())[-1][0] if stack else "")
    return list(dict.fromkeys(found))
