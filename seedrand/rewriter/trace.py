"""Capture a model's forward as a ``torch.fx.GraphModule`` that trains, and switches train/eval, like the model.

Strategy, tried in order:

1. ``torch.fx`` symbolic tracing with a tracer that keeps every module a rule selected as a leaf (``call_module``
   node), so passes can swap whole modules. The model is traced in train and in eval mode; when the two graphs
   differ (Python branches on ``self.training``), the result is locked to the mode the model was in. When example
   inputs are given, the traced graph's outputs must equal the model's bit for bit, or the next strategy is tried.
2. ``torch.export.export(strict=False)`` with the batch dimension of every tensor input, and the sequence dimension
   of integer (token) inputs, ``Dim.AUTO`` (dynamic where the model allows; pass a batch of at least 2 so the batch
   dimension is not specialized; other dimensions, image sizes among them, are static), in train and in eval mode.
   When the two graphs differ only in constants (the train flags of ``aten.batch_norm``/``aten.dropout``, momentum,
   dropout ``p``) and the ``num_batches_tracked`` increments, the train graph is kept with those tied to the
   module's ``training`` attribute, so ``.train()``/``.eval()`` work. When they differ in anything else (Python
   branches on ``self.training``: drop path, stochastic depth) or one mode cannot be exported at all (numpy masking
   in train mode), the graph of the model's own mode is kept, locked to it: the other mode raises an error naming
   the difference. Modules are inlined into aten ops; each op keeps its module path and class in
   ``node.meta["nn_module_stack"]``.

Real transformers models (GPT-2, ViT, ResNet, MobileNetV2) need strategy 2, hence need example inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import ModelError, SeedrandError, TraceError
from .graph import full_args

__all__ = ["trace", "TraceInfo", "default_dynamic_shapes"]

_aten = torch.ops.aten
_VALUE_PRESERVING = {_aten.contiguous.default}  # ops whose presence in one mode only changes no value


def _by_mode(training: bool, train_value: Any, eval_value: Any) -> Any:
    """A constant an export baked in differently per mode (dropout p, BatchNorm momentum), chosen at run time."""
    return train_value if training else eval_value


@dataclass
class TraceInfo:
    """How a model was captured.

    Attributes:
        strategy: ``"symbolic_trace"`` or ``"torch.export"``.
        locked_mode: ``None`` when train/eval switch freely; else the mode (``True`` = train) the graph is fixed to.
        lock_reason: why the mode is locked, naming the op and code line that differs between modes.
        symbolic_error: why symbolic tracing was not used (``None`` when it was).
    """

    strategy: str
    locked_mode: Optional[bool] = None
    lock_reason: Optional[str] = None
    symbolic_error: Optional[str] = None


class _ModeLock:
    """Forward pre-hook that refuses to run a mode-locked graph in the other mode (instead of silently lying)."""

    def __init__(self, mode: bool, reason: str):
        self.mode, self.reason = mode, reason

    def __call__(self, module: nn.Module, args: Any) -> None:
        if module.training != self.mode:
            want = "train" if self.mode else "eval"
            raise SeedrandError(f"this graph was captured in {want} mode and cannot run in the other: {self.reason}")


class _KeywordInputs:
    """Forward pre-hook of an exported graph: binds a call to the original forward's signature, so inputs can be
    given by keyword as to the model (``gm(input_ids=ids)``), and passes the traced ones on positionally. An
    untraced input may be left out or given its default (``attention_mask=None``); any other value is an error that
    names it, since the graph was captured without it."""

    def __init__(self, signature: inspect.Signature, traced: int):
        # (name, kind, default) only: annotations (typing unions of transformers classes) need not pickle
        self.parameters = [(p.name, p.kind, p.default) for p in signature.parameters.values()]
        self.names = [name for name, kind, _ in self.parameters
                      if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)][:traced]

    @property
    def signature(self) -> inspect.Signature:
        return inspect.Signature([inspect.Parameter(n, k, default=d) for n, k, d in self.parameters])

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if not kwargs:
            return None
        signature = self.signature
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise SeedrandError(f"inputs do not fit {module.__class__.__name__}'s forward: {e}") from None
        for name, value in bound.arguments.items():
            parameter = signature.parameters[name]
            if parameter.kind == parameter.VAR_KEYWORD and value:
                name = next(iter(value))
            elif name in self.names or value is parameter.default or parameter.kind == parameter.VAR_KEYWORD:
                continue
            raise SeedrandError(f"input {name!r} was not among the example inputs this graph was traced with "
                                f"({', '.join(self.names)}); pass it in example_inputs to seedrand.rewrite, in the "
                                "forward's order, or leave it out")
        missing = [n for n in self.names if n not in bound.arguments]
        if missing:
            raise SeedrandError(f"input {missing[0]!r} is required: the graph was traced with it")
        return tuple(bound.arguments[n] for n in self.names), {}


class _TrainingFlag(nn.Module):
    """Returns its own ``training`` attribute, so a graph can read the mode ``.train()``/``.eval()`` set."""

    def forward(self) -> bool:
        return self.training


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException, model: nn.Module) -> str:
    """The error and the innermost traceback line in the model's own code (not torch's or seedrand's); when the
    failure happened inside torch before reaching model code, the model's ``forward`` definition."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and f"{os.sep}seedrand{os.sep}" not in f.filename]
    if frames:
        where = f" at {frames[-1].filename}:{frames[-1].lineno}: {(frames[-1].line or '').strip()}"
    else:
        code = inspect.unwrap(type(model).forward).__code__  # past decorators such as transformers'
        where = f" in {type(model).__name__}.forward ({code.co_filename}:{code.co_firstlineno})"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}{where}"


def in_mode(model: nn.Module, mode: bool, fn):
    """``fn()`` with ``model`` in train (``mode=True``) or eval mode, every module's own mode restored after."""
    saved = {m: m.training for m in model.modules()}
    model.train(mode)
    try:
        return fn()
    finally:
        for m, t in saved.items():
            m.training = t


def _same_outputs(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def _reference(model: nn.Module, example_inputs) -> Any:
    """The model's own eval-mode outputs on ``example_inputs`` (no gradient, so nothing of the model changes).

    Raises:
        ModelError: the forward fails on them (wrong shape, dtype or number of inputs), naming the model code line.
    """
    try:
        with torch.no_grad(), _quiet_torch():
            return in_mode(model, False, lambda: model(*example_inputs))
    except Exception as e:  # noqa: BLE001 - whatever the model raises, the inputs do not fit it
        shapes = ", ".join(f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in example_inputs)
        raise ModelError(f"{type(model).__name__}'s own forward fails on the example inputs ({shapes}): "
                         f"{_user_frame(e, model)}; pass inputs of the shape and dtype the model takes") from None


@contextlib.contextmanager
def _quiet_torch():
    """Silence torch's loggers and what is written to ``sys.stderr`` while a tracing attempt runs: a failed attempt
    is reported once, by seedrand's error, not also as torch's multi-page dump of the graph it failed in."""
    loggers = [lg for name, lg in logging.root.manager.loggerDict.items()
               if name.startswith("torch") and isinstance(lg, logging.Logger) and not lg.disabled]
    for lg in loggers:
        lg.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg in loggers:
            lg.disabled = False


def _symbolic(model: nn.Module, leaves: set[str], example_inputs, reference) -> tuple[fx.GraphModule, TraceInfo]:
    graphs = {mode: in_mode(model, mode, lambda: _LeafTracer(leaves).trace(model)) for mode in (True, False)}
    mode = model.training
    info = TraceInfo("symbolic_trace")
    if graphs[True].python_code("self").src != graphs[False].python_code("self").src:
        info.locked_mode, info.lock_reason = mode, "the model's forward branches on self.training"
    if example_inputs is not None:
        check = fx.GraphModule(model, graphs[False])
        with torch.no_grad():  # in _in_mode: the check's leaves are the model's, whose modes must stay as they are
            same = _same_outputs(reference, in_mode(check, False, lambda: check(*example_inputs)))
        if not same:
            raise TraceError("the symbolically traced graph's outputs differ from the model's")
    # built last: a graph belongs to the GraphModule built on it last, and passes add submodules to this one
    gm = fx.GraphModule(model, graphs[mode], class_name=type(model).__name__)
    return gm, info


def default_dynamic_shapes(inputs: tuple) -> tuple:
    """``torch.export``'s ``dynamic_shapes`` for positional ``inputs``: per tensor, its batch dimension and, for
    integer (token) inputs of two or more dimensions, its sequence dimension as ``Dim.AUTO``; ``None`` for other
    inputs. Every other dimension is static: symbolic spatial sizes through window partitioning made a tiny Swin take
    174 s to export, against 1.3 s static (a new size traces again). Raises nothing."""
    def dims(x: torch.Tensor) -> dict:
        chosen = [0] if x.dim() else []
        if x.dim() >= 2 and not x.is_floating_point() and not x.is_complex():
            chosen.append(1)
        return {d: Dim.AUTO for d in chosen}

    return tuple(dims(x) if isinstance(x, torch.Tensor) else None for x in inputs)


def _export(model: nn.Module, example_inputs, dynamic_shapes=None) -> torch.export.ExportedProgram:
    dynamic = dynamic_shapes if dynamic_shapes is not None else default_dynamic_shapes(example_inputs)
    parameters = list(inspect.signature(model.forward).parameters.values())
    if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        dynamic = (dynamic,)  # forward(*args) (a PeftModel): export wants the shapes of args as one entry
    return torch.export.export(model, tuple(example_inputs), strict=False, dynamic_shapes=dynamic)


def _is_batch_count(node: fx.Node) -> bool:
    first = node.args[0] if node.args else None
    return (node.target == _aten.add_.Tensor and isinstance(first, fx.Node) and first.op == "get_attr"
            and str(first.target).endswith("num_batches_tracked"))


def _comparable_ops(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and not _is_batch_count(n) and n.target not in _VALUE_PRESERVING]


def _mode_constants(train_ops: list[fx.Node], eval_ops: list[fx.Node]):
    """Pair the two exports op by op: ``(patches, None)`` where patches are ``(node, arg index, train value, eval
    value)`` for every numeric constant that differs, or ``(None, reason)`` when anything else differs."""
    if len(train_ops) != len(eval_ops):
        return None, f"the train graph has {len(train_ops)} ops and the eval graph {len(eval_ops)}"
    patches = []
    for a, b in zip(train_ops, eval_ops):
        args_a, args_b = full_args(a), full_args(b)
        same_shape = a.target == b.target and len(args_a) == len(args_b) and repr(a.kwargs) == repr(b.kwargs)
        for i, (x, y) in enumerate(zip(args_a, args_b) if same_shape else ()):
            if isinstance(x, fx.Node) and isinstance(y, fx.Node) or repr(x) == repr(y):
                continue
            if not all(isinstance(v, (bool, int, float)) for v in (x, y)):
                same_shape = False
                break
            patches.append((a, i, x, y))
        if not same_shape:
            lines = a.meta.get("stack_trace", "").strip().splitlines()
            return None, f"first at {a.target} vs {b.target}" + (f": {lines[-1].strip()}" if lines else "")
    return patches, None


def _tie_to_mode(gm: fx.GraphModule, patches) -> None:
    """Make the train-mode export follow ``.train()``/``.eval()``: each mode-dependent constant, and each
    ``num_batches_tracked`` increment, reads the ``training`` attribute of a ``_seedrand_training`` submodule."""
    gm.add_submodule("_seedrand_training", _TrainingFlag())
    last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last_placeholder):
        flag = gm.graph.call_module("_seedrand_training")
    for node, i, train_value, eval_value in patches:
        node.args = full_args(node)
        if (train_value, eval_value) == (True, False):
            node.update_arg(i, flag)
        else:
            with gm.graph.inserting_before(node):
                node.update_arg(i, gm.graph.call_function(_by_mode, (flag, train_value, eval_value)))
    for node in gm.graph.nodes:
        if _is_batch_count(node):
            node.update_arg(1, flag)  # adds True (1) while training, False (0) in eval, as BatchNorm does


def _drop_dtype_asserts(gm: fx.GraphModule) -> None:
    """Erase the ``aten._assert_tensor_metadata`` checks export inserts before dtype conversions: they pin the dtype
    seen at export (float32), so ``.double()``/``.to(dtype)`` of the graph failed at the first forward. Conversions
    to a literal dtype in the model's own code (a mask cast to float32) stay as traced."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == _aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)


def _check_batchnorm_momentum(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None and m.track_running_stats:
            raise TraceError(f"{name} ({type(m).__name__}) uses momentum=None (a cumulative average over "
                             "num_batches_tracked), which torch.export bakes into a constant; set a momentum")


def _exported(model: nn.Module, example_inputs, dynamic_shapes=None) -> tuple[fx.GraphModule, TraceInfo]:
    _check_batchnorm_momentum(model)
    graphs, failures = {}, {}
    for mode in (True, False):
        try:
            graphs[mode] = in_mode(model, mode, lambda: _export(model, example_inputs, dynamic_shapes)).module()
        except Exception as e:  # noqa: BLE001 - one mode may be untraceable (SpecAugment's numpy masks in train)
            failures[mode] = e
    if model.training in failures or not graphs:
        raise failures[model.training]
    for gm in graphs.values():
        for attr in ("train", "eval"):  # ExportedProgram.module() disables these per instance; we support them
            gm.__dict__.pop(attr, None)
    info = TraceInfo("torch.export")
    if failures:  # the other mode cannot be traced: this one works, the other raises a clear error
        other = "train" if not model.training else "eval"
        patches, reason = None, f"{other} mode cannot be traced ({_user_frame(failures[not model.training], model)})"
    else:
        patches, reason = _mode_constants(_comparable_ops(graphs[True]), _comparable_ops(graphs[False]))
        if reason is not None:
            reason = f"its ops differ between train and eval ({reason})"
    for graph_module in graphs.values():
        _drop_dtype_asserts(graph_module)
    if reason is None:
        gm = graphs[True]
        _tie_to_mode(gm, patches)
    else:  # the graph of the model's own mode: the other one's ops (drop path, stochastic depth) would be wrong
        gm = graphs[model.training]
        info.locked_mode, info.lock_reason = model.training, reason
    gm.train(model.training)
    gm.graph.lint()
    gm.recompile()
    signature = inspect.signature(inspect.unwrap(type(model).forward))
    signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # without self
    gm.register_forward_pre_hook(_KeywordInputs(signature, len(example_inputs)), with_kwargs=True, prepend=True)
    return gm, info


def trace(model: nn.Module, leaves: set[str], example_inputs: Optional[tuple] = None,
          dynamic_shapes: Optional[tuple] = None
          ) -> tuple[fx.GraphModule, TraceInfo]:
    """Capture ``model`` as a GraphModule (see the module docstring for the strategy).

    Args:
        model: the module to trace (seedrand passes a private deep copy; it is not modified).
        leaves: qualified names to keep as ``call_module`` leaves under symbolic tracing.
        example_inputs: positional inputs (a tuple; a single tensor is accepted). Needed for the export fallback,
            and used to check the symbolic trace.
        dynamic_shapes: for the export fallback, ``torch.export``'s ``dynamic_shapes`` for ``example_inputs``;
            ``None``: the batch dimension, and the sequence of integer inputs (:func:`default_dynamic_shapes`).

    Returns:
        ``(graph_module, TraceInfo)``. The GraphModule's parameters are the model's own objects, in train or eval
        mode as the model was; a mode-locked graph raises :class:`SeedrandError` when run in the other mode.

    Raises:
        ModelError: the model's own forward fails on ``example_inputs``.
        TraceError: no strategy worked; the message gives each strategy's failure with the model's code line.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    reference = None if example_inputs is None else _reference(model, example_inputs)
    try:
        with _quiet_torch():
            gm, info = _symbolic(model, leaves, example_inputs, reference)
    except Exception as e:  # noqa: BLE001 - any failure of symbolic tracing means: try export
        with _quiet_torch():
            gm, info = _export_fallback(model, example_inputs, _user_frame(e, model), dynamic_shapes)
    if info.locked_mode is not None:
        gm.register_forward_pre_hook(_ModeLock(info.locked_mode, info.lock_reason))
    return gm, info


def _export_fallback(model: nn.Module, example_inputs, symbolic_error: str, dynamic_shapes=None
                     ) -> tuple[fx.GraphModule, TraceInfo]:
    if example_inputs is None:
        raise TraceError(f"torch.fx symbolic tracing failed ({symbolic_error}); pass example_inputs so seedrand can "
                         "trace with torch.export instead")
    try:
        gm, info = _exported(model, example_inputs, dynamic_shapes)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - report both strategies' failures together
        raise TraceError(f"cannot trace {type(model).__name__}: torch.fx symbolic tracing failed ({symbolic_error}); "
                         f"torch.export failed ({_user_frame(e, model)}). Try: make data-dependent branches use "
                         "torch.cond, or give example inputs whose shapes match real use") from e
    info.symbolic_error = symbolic_error
    return gm, info
