"""Weight inits regenerated from Philox: the distribution each ``init`` name means, and the weights themselves.

Each init reproduces the bounds / standard deviation of the ``torch.nn.init`` function of the same name:

* ``kaiming_uniform``: PyTorch's default for Linear and Conv layers, ``kaiming_uniform_(w, a=sqrt(5))``:
  ``U(-b, b)`` with ``b = gain * sqrt(3 / fan_in)``, ``gain = sqrt(2 / (1 + a**2))``, hence ``b = 1 / sqrt(fan_in)``.
* ``kaiming_normal``: ``kaiming_normal_(w)`` (``a = 0``, leaky_relu gain ``sqrt(2)``): ``N(0, 2 / fan_in)``.
* ``xavier_uniform`` / ``xavier_normal``: gain 1, ``std = sqrt(2 / (fan_in + fan_out))``, ``b = sqrt(3) * std``.
* ``normal(STD)``: ``N(0, STD**2)``; ``uniform(A)``: ``U(-A, A)``.

Element ``i`` (row-major index into the weight) of a uniform init is ``(2 * rand(seed, i) - 1) * b``, of a normal
init ``randn(seed, i) * std``, computed in float32 (so CPU, Triton and ONNX agree) and then cast.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import shown
from . import cpu_philox, philox

__all__ = ["INIT_NAMES", "parse_init", "init_distribution", "regenerate", "sample", "sample_at"]

_NAMED = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")
_PARAMETRIC = re.compile(r"^(normal|uniform)\(((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\)$")
INIT_NAMES = (*_NAMED, "normal(std)", "uniform(a)")


def parse_init(init: str) -> tuple[str, float | None]:
    """Split an init name into ``(kind, parameter)``: ``"normal(0.02)"`` -> ``("normal", 0.02)``,
    ``"xavier_uniform"`` -> ``("xavier_uniform", None)``.

    Raises:
        ValueError: not one of ``INIT_NAMES`` with a positive finite number for ``std``/``a``.
    """
    if init in _NAMED:
        return init, None
    match = _PARAMETRIC.match(init)
    if not match or not 0 < float(match.group(2)) < math.inf:
        raise ValueError(f"unknown init {shown(init)}; expected one of {', '.join(INIT_NAMES)} (std, a: positive "
                         "finite numbers)")
    return match.group(1), float(match.group(2))


def init_distribution(init: str, fan_in: int, fan_out: int) -> tuple[str, float]:
    """``("uniform", bound)`` or ``("normal", std)`` for an ``init`` name (see the module docstring).

    Args:
        init: ``kaiming_uniform``, ``kaiming_normal``, ``xavier_uniform``, ``xavier_normal``, ``normal(STD)`` or
            ``uniform(A)``.
        fan_in, fan_out: as ``torch.nn.init._calculate_fan_in_and_fan_out`` computes them for the layer's weight
            (input features times receptive field; output features times receptive field).

    Raises:
        ValueError: unknown init, or a fan that is not positive.
    """
    kind, param = parse_init(init)
    if param is not None:
        return kind, param
    if fan_in <= 0 or fan_out <= 0:
        raise ValueError(f"fan_in and fan_out must be positive, got {fan_in} and {fan_out}")
    if init == "kaiming_uniform":
        return "uniform", math.sqrt(2.0 / (1 + 5)) * math.sqrt(3.0 / fan_in)
    if init == "kaiming_normal":
        return "normal", math.sqrt(2.0) / math.sqrt(fan_in)
    xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
    if init == "xavier_uniform":
        return "uniform", math.sqrt(3.0) * xavier_std
    return "normal", xavier_std  # xavier_normal


def regenerate(seed: int, shape: tuple[int, ...], init: str, fan_in: int, fan_out: int,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               start: int = 0) -> torch.Tensor:
    """Elements ``start .. start + prod(shape)`` of the regenerated weight, reshaped to ``shape``.

    Args:
        seed: the tensor's Philox key (see ``philox.derive_seed``).
        shape: shape of the returned block; a chunk of rows of a weight is ``(rows, *weight.shape[1:])`` with
            ``start = first_row * prod(weight.shape[1:])``.
        init, fan_in, fan_out: as :func:`init_distribution`.
        dtype: output dtype (values are computed in float32, then cast).
        device: where to generate.
        start: row-major index of the block's first element in the whole weight.

    Returns:
        A tensor of ``shape`` and ``dtype``; a pure function of the arguments (the global RNG is not used).

    Raises:
        ValueError: as :func:`init_distribution`.
    """
    kind, scale = init_distribution(init, fan_in, fan_out)
    return sample(seed, shape, kind, scale, dtype, device, start)


def sample(seed: int, shape: tuple[int, ...], kind: str, scale: float, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """Elements ``start .. start + prod(shape)`` of :func:`sample_at`, shaped ``shape``.

    Raises:
        ValueError: ``kind`` is neither ``"uniform"`` nor ``"normal"``.
    """
    n = math.prod(shape)
    if torch.device(device).type == "cpu":  # a range: the CPU Philox needs no counter tensor
        return sample_at(seed, range(start, start + n), kind, scale, dtype).reshape(shape)
    offsets = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return sample_at(seed, offsets, kind, scale, dtype).reshape(shape)


def sample_at(seed: int, offsets: torch.Tensor, kind: str, scale: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``U(-scale, scale)`` (``kind="uniform"``) or ``N(0, scale**2)`` (``kind="normal"``) at Philox counter
    ``offsets`` (int64, any shape, values in ``[0, 2**63)``) of key ``seed``: computed in float32, cast to ``dtype``,
    shaped like ``offsets``, on its device. A gather of rows or a slice of a weight is the same tensor indexed.

    Raises:
        ValueError: ``kind`` is neither ``"uniform"`` nor ``"normal"``.
    """
    if kind == "uniform" and cpu_philox.usable(offsets):
        values = cpu_philox.symmetric_uniform(philox.check_seed(seed), philox.check_offsets(offsets), scale)
    elif kind == "uniform":
        values = (2.0 * philox.rand(seed, offsets) - 1.0) * scale
    elif kind == "normal":
        values = philox.randn(seed, offsets) * scale
    else:
        raise ValueError(f"kind must be 'uniform' or 'normal', got {kind!r}")
    return values.to(dtype)
