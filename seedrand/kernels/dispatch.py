"""When seedrand's modules compute with plain torch ops instead of their custom ops and numba kernels."""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType, is_functorch_wrapped_tensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

__all__ = ["plain_torch_ops", "is_functorch_wrapped_tensor", "autocast_input"]


def plain_torch_ops() -> bool:
    """Whether to compute with plain torch ops: during ONNX export (the exporter translates torch ops, not seedrand's
    custom ops), and under a ``torch.func`` transform other than ``vmap`` (``grad``, ``jvp``, ``jacrev``: the autograd
    ``torch.library`` gives a custom op is an ``autograd.Function`` without ``setup_context``, which functorch
    refuses; ``vmap`` has the ops' own batching rules). Raises nothing."""
    if torch.onnx.is_in_onnx_export():
        return True
    if torch.compiler.is_compiling():  # Dynamo cannot trace the functorch stack query (a graph break per call)
        return False
    return any(interpreter.key() != TransformType.Vmap for interpreter in retrieve_all_functorch_interpreters())


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the autocast dtype where ``torch.autocast`` is on for its device and ``x`` is floating point,
    else ``x``: seedrand's matmul and convolution ops take the place of ``linear``/``conv``, which autocast runs in
    its lower precision, but autocast knows no kernel for custom ops. Raises nothing."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x
