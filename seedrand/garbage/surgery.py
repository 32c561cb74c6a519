"""Surgery: slicing a parameter, its gradient and its optimizer state in place, and the check that an optimizer's
state can follow (before anything changes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from ..errors import ModelError, shown
from .graph import Ref
from .sizes import follow_tensors

if TYPE_CHECKING:  # the report is filled by these steps, made by collect (which imports this module)
    from .collect import GarbageReport

__all__ = ["keep_index", "shrink", "check_optimizer", "slice_tensor", "resize"]


def keep_index(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device))


def shrink(param: nn.Parameter, dim: int, index: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Keep ``index`` along ``dim`` of ``param``, its gradient and its optimizer state, in place."""
    old_shape = param.shape
    if optimizer is not None and param in optimizer.state:
        state = optimizer.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = keep_index(value, dim, index)
    smaller = nn.Parameter(keep_index(param.detach(), dim, index), requires_grad=param.requires_grad)
    if param.grad is not None:
        smaller.grad = keep_index(param.grad, dim, index)
    # swap, not .data: the Python object (optimizer key, user references) stays, and autograd's cached gradient
    # accumulator, which remembers the old shape, goes with the old tensor. Swapping is refused while a previous
    # autograd graph (a loss kept from the last step) still holds that accumulator; then the data changes, and the
    # accumulator must be dropped by hand: setting .data keeps it unless the dtype or device changes, and the next
    # backward would check the new gradient against the old shape. Backward through that old graph fails, as it
    # would after any in-place resize.
    try:
        torch.utils.swap_tensors(param, smaller)
    except RuntimeError:
        other = torch.float64 if param.dtype != torch.float64 else torch.float32
        param.data = torch.empty(0, dtype=other, device=param.device)
        param.data, param.grad = smaller.data, smaller.grad


def check_optimizer(model: nn.Module, optimizer, shrinking: list[nn.Parameter]) -> None:
    """Refuse, before anything changes, an optimizer whose state :func:`shrink` cannot keep consistent.

    Known layouts: per-parameter state made of tensors of the parameter's shape (sliced with it: momentum, Adam's
    moments), 0-d tensors and Python scalars (steps). Anything else (LBFGS's flat vectors over all parameters,
    factored or list-valued state) would no longer fit after the shrink.

    Raises:
        ModelError: ``optimizer`` is not a ``torch.optim.Optimizer``, holds none of the model's parameters, or
            keeps state of another layout (names the optimizer, the state entry and the parameter).
    """
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ModelError(f"collect_garbage takes a torch.optim.Optimizer, not {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if not held & names.keys():
        raise ModelError(f"the {type(optimizer).__name__} holds none of this model's parameters (built for another "
                         "model, or for the original before seedrand.rewrite?); pass the optimizer that trains it")
    if not any(id(p) in held for p in shrinking):
        return
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ModelError("LBFGS keeps its history as flat vectors over all parameters, which no longer fit once "
                         "channels go; nothing was changed: collect garbage without the optimizer and build a new one")
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and (value.dim() == 0 or value.shape == param.shape):
                continue
            if value is None or isinstance(value, (bool, int, float)):
                continue
            what = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            name = names.get(id(param), "(not in the model)")
            raise ModelError(
                f"{type(optimizer).__name__}'s state {shown(key)} of parameter {name} {tuple(param.shape)} is {what}: "
                "collect_garbage slices only per-parameter state tensors "
                "of the parameter's shape (SGD momentum, Adam, AdamW, RMSprop, Adagrad) and changed nothing; "
                "collect garbage without the optimizer and build a new one")


def slice_tensor(ref: Ref, dim: int, keep: torch.Tensor, name: Optional[str], count: int,
           optimizer: Optional[torch.optim.Optimizer], report: GarbageReport) -> None:
    tensor = ref.tensor
    if isinstance(tensor, nn.Parameter):
        shrink(tensor, dim, keep, optimizer)
    else:  # a buffer (BatchNorm statistics, a frozen weight)
        setattr(ref.owner, ref.name, keep_index(tensor, dim, keep))
    if name is not None:
        report.removed[name] = count


def resize(module: nn.Module, old_out: int, *_) -> None:
    """Keep a Linear/Conv/BatchNorm's size attributes true to its tensors after slicing (a conv's groups shrink in
    proportion: whole groups went)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        module.groups = module.groups * module.weight.shape[0] // old_out
    follow_tensors(module)
