"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models") on seedrand's regenerated layers, through
PEFT's custom-module mapping: ``peft.get_peft_model`` wraps a :class:`~seedrand.passes.random.RandomLinear` as it
wraps an ``nn.Linear``, ``y = R(x) + B A x * scaling`` with ``R`` the regenerated layer (still zero bytes stored) and
``A``, ``B`` PEFT's trainable adapters. PEFT's own layers serve every other layer of a kept model unchanged.

    config = seedrand.lora.register(peft.LoraConfig(r=8, target_modules=["c_fc", "c_attn"]))
    model = peft.get_peft_model(seedrand.rewrite(model, policy, inputs), config)
"""

from __future__ import annotations

import functools

import torch.nn as nn

from ._optional import require
from .passes.random import RandomLinear

__all__ = ["register", "lora_modules"]


@functools.cache
def _lora_random_linear() -> type:
    lora = require("peft.tuners.lora.layer", "LoRA on seedrand's regenerated layers")

    class LoraRandomLinear(lora.Linear):
        """PEFT's LoRA ``Linear`` around a :class:`RandomLinear`: the forward is PEFT's (base output plus the
        adapters' ``(..., out_features)``); the base weight is regenerated, so merging an adapter into it is
        refused (``seedrand.merge`` the model first for a plain ``nn.Linear``)."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
            return base_layer.dtype_probe.device, base_layer.dtype

        def merge(self, *args, **kwargs) -> None:
            raise ValueError("a LoRA adapter cannot be merged into a regenerated (random) layer, whose weight is not "
                             "stored: call seedrand.merge(model) before PEFT's merge_and_unload")

    return LoraRandomLinear


def lora_modules() -> dict[type, type]:
    """seedrand layer class -> its PEFT LoRA layer class, for ``LoraConfig._register_custom_module``.

    Raises:
        SeedrandError: PEFT is not installed (names ``pip install 'seedrand[peft]'``).
    """
    return {RandomLinear: _lora_random_linear()}


def register(config):
    """Register :func:`lora_modules` with a ``peft.LoraConfig`` (PEFT's custom-module mapping) and return it, so
    that its ``target_modules`` may name regenerated layers.

    Raises:
        SeedrandError: PEFT is not installed.
    """
    config._register_custom_module(lora_modules())
    return config
