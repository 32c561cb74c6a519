"""Operand shapes shared by the torch and the Triton implementations of seedrand's ops (so that neither imports the
other)."""

from __future__ import annotations

import torch

__all__ = ["frozen_weight_shape"]


def frozen_weight_shape(trainable: torch.Tensor, source: torch.Tensor,
                        trained_dim: int) -> tuple[int, int]:
    """``(out_features, in_features)`` of the weight of ``seedrand::frozen_matmul``: ``trainable``'s shape with
    ``source``'s length along ``trained_dim`` (arguments as ``seedrand.kernels.ops.frozen_matmul``; shapes only, no
    data read). Raises nothing."""
    shape = [trainable.shape[0], trainable.shape[1]]
    shape[trained_dim] = source.shape[0]
    return shape[0], shape[1]
