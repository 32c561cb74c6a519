"""The ``seedrand`` torch.compile backend, registered through the ``torch_dynamo_backends`` entry-point group (see
pyproject.toml), so ``torch.compile(model, backend="seedrand")`` works without importing seedrand first.

This version hands the captured graph to Inductor unchanged: models rewritten by :func:`seedrand.rewrite` compile
as they are. Substituting fused regenerate-and-matmul kernels, and applying a policy to the captured graph
(``options={"policy": ...}``), come with the kernels work and are refused with a clear error until then.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import SeedrandError

__all__ = ["seedrand_backend"]

_SUPPORTED_OPTIONS: frozenset[str] = frozenset()


def seedrand_backend(gm: torch.fx.GraphModule, example_inputs: list, *, options: Optional[dict[str, Any]] = None,
                     mode: Optional[str] = None):
    """Compile a Dynamo-captured graph.

    Args:
        gm: the FX graph Dynamo captured (parameters lifted to placeholders).
        example_inputs: the real tensors (and Parameters) for ``gm``'s placeholders.
        options: ``torch.compile(..., options=...)``; none are supported yet.
        mode: ``torch.compile(..., mode=...)``, forwarded to Inductor's mode options.

    Returns:
        The compiled callable from ``torch._inductor.compile_fx.compile_fx``.

    Raises:
        SeedrandError: an unsupported option was given.
    """
    unknown = sorted(set(options or {}) - _SUPPORTED_OPTIONS)
    if unknown:
        raise SeedrandError(f"the seedrand backend does not support options {unknown} yet; rewrite the model with "
                            "seedrand.rewrite(model, policy) and compile it with no options")
    from torch._inductor.compile_fx import compile_fx

    config_patches = torch._inductor.list_mode_options(mode) if mode else None
    return compile_fx(gm, example_inputs, config_patches=config_patches)
