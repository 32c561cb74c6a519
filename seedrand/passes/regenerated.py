"""The base of every module that regenerates tensors from Philox keys instead of storing them, and what its
``state_dict`` holds for them.

A regenerated tensor (a :class:`Stream`) is ``sample_at(seed, offsets, kind, scale)``: its values are a pure function
of the Philox key and the elements' counters. It stores zero bytes; ``state_dict()`` holds, per stream ``NAME``,

* ``NAME_seed``: the Philox key, an int64 0-d tensor (keys are below ``2**63``);
* ``NAME_fingerprint``: its first :data:`FINGERPRINT_SIZE` values (row-major) in float32.

``load_state_dict`` adopts the saved key and regenerates the fingerprint: values that differ (another init, shape,
counter layout or PRNG) are a load error, never a silent change. Both keys are plain tensors, so
``torch.load(..., weights_only=True)`` and safetensors can hold them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..kernels.init import sample_at

__all__ = ["Stream", "Regenerating", "FINGERPRINT_SIZE"]

FINGERPRINT_SIZE = 16


@dataclass
class Stream:
    """One regenerated tensor of ``shape``: ``U(-scale, scale)`` (``kind="uniform"``) or ``N(0, scale**2)``
    (``kind="normal"``) from Philox key ``seed``; element ``j`` (row-major) uses counter ``j`` unless the module's
    :meth:`Regenerating.offsets` says otherwise."""

    seed: int
    kind: str
    scale: float
    shape: tuple[int, ...]


class Regenerating(nn.Module):
    """An ``nn.Module`` with regenerated tensors ``self.streams: dict[str, Stream]`` (see the module docstring).

    Subclasses fill ``streams`` in ``__init__`` and override :meth:`offsets` for tensors that are not the counters
    ``0 .. numel - 1`` in order (a slice or a gather of a larger weight).
    """

    def __init__(self):
        super().__init__()
        self.streams: dict[str, Stream] = {}

    def register_dtype(self, dtype: torch.dtype) -> None:
        """Remember ``dtype`` as the dtype of what this module produces, in an empty buffer so that
        ``module.to(dtype)``, ``.half()`` and ``.to(device)`` update it like a stored tensor's (read :attr:`dtype`)."""
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype given to :meth:`register_dtype`, as converted since."""
        return self.dtype_probe.dtype

    def offsets(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The Philox counters of stream ``name``'s elements: int64, its shape."""
        stream = self.streams[name]
        return torch.arange(math.prod(stream.shape), dtype=torch.int64, device=device).reshape(stream.shape)

    def regenerate(self, name: str, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
        """Stream ``name`` materialized: shape ``stream.shape``, ``dtype``, on ``device``."""
        stream = self.streams[name]
        return sample_at(stream.seed, self.offsets(name, device), stream.kind, stream.scale, dtype)

    def fingerprint(self, name: str) -> torch.Tensor:
        """The first ``FINGERPRINT_SIZE`` values of stream ``name`` (fewer if it is smaller), float32, 1-d."""
        stream = self.streams[name]
        first = self.offsets(name).flatten()[:FINGERPRINT_SIZE]
        return sample_at(stream.seed, first, stream.kind, stream.scale)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, stream in self.streams.items():
            destination[f"{prefix}{name}_seed"] = torch.tensor(stream.seed, dtype=torch.int64)
            destination[f"{prefix}{name}_fingerprint"] = self.fingerprint(name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = set()
        for name, stream in self.streams.items():
            seed_key, print_key = f"{prefix}{name}_seed", f"{prefix}{name}_fingerprint"
            ours |= {seed_key, print_key}
            if seed_key not in state_dict or print_key not in state_dict:
                missing_keys.extend(k for k in (seed_key, print_key) if k not in state_dict)
                continue
            old, stream.seed = stream.seed, int(state_dict[seed_key])
            got, saved = self.fingerprint(name), state_dict[print_key].to(torch.float32)
            if saved.shape != got.shape or not torch.equal(saved, got):
                error_msgs.append(
                    f"{prefix}{name}: fingerprint mismatch: regenerating from seed {stream.seed} gives "
                    f"{got[:3].tolist()}..., the checkpoint holds {saved[:3].tolist()}... (another init, shape or "
                    "seedrand version made it; loading would silently change the model)")
                stream.seed = old
        rest = {k: v for k, v in state_dict.items() if k not in ours}  # else torch reports our keys as unexpected
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
