"""``seedrand.save`` / ``seedrand.load``: a rewritten model as one safetensors file.

The file holds the model's ``state_dict()`` (trainable tensors, stored frozen tensors and buffers, and per regenerated
tensor its Philox key and fingerprint: ``seedrand.passes.regenerated``), the example inputs it was traced with, and,
in the safetensors metadata, the policy as YAML. A file cannot hold code, so :func:`load` rebuilds the graph the way
PEFT rebuilds an adapter: it applies the saved policy to the architecture you pass (the weights of that model do not
matter, every tensor the rewritten model keeps is in the file), removes the channels that
:func:`seedrand.collect_garbage` removed since (the file lists them), then loads the tensors strictly. Every
regenerated tensor's fingerprint is checked, so a model that would compute something else is an error, never a silent
change.
The ``state_dict`` itself is plain tensors: ``torch.save``/``torch.load(weights_only=True)`` work as well.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SeedrandError
from .garbage import replay_collections
from .policy import parse_policy
from .rewriter.rewrite import RECORD_KEY, rewrite

__all__ = ["save", "load"]

_FORMAT = "seedrand-1"
_INPUT = "__seedrand_example_input__."


def save(model: fx.GraphModule, path: Union[str, Path]) -> None:
    """Write a model returned by :func:`seedrand.rewrite` (and trained since) to ``path`` (safetensors).

    Tensors that share memory (tied parameters) are written once; the file is written to a temporary name and
    renamed, so an interrupted save never leaves a partial file at ``path``.

    Raises:
        SeedrandError: ``model`` was not returned by ``seedrand.rewrite``, or its example inputs are not all tensors.
    """
    record = getattr(model, "meta", {}).get(RECORD_KEY)
    if record is None:
        raise SeedrandError("seedrand.save needs a model returned by seedrand.rewrite (it saves the policy with it)")
    inputs = record.example_inputs or ()
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise SeedrandError("seedrand.save stores the example inputs, which must all be tensors")
    tensors, aliases, by_storage = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in by_storage:
            aliases[name] = by_storage[key]
        else:
            by_storage.setdefault(key, name)
            tensors[name] = tensor.detach().contiguous()
    tensors.update({f"{_INPUT}{i}": x.detach().contiguous() for i, x in enumerate(inputs)})
    metadata = {"format": _FORMAT, "policy": record.policy.to_yaml(), "aliases": json.dumps(aliases),
                "example_inputs": str(len(inputs)) if record.example_inputs is not None else "none",
                "training": json.dumps(model.training), "collections": json.dumps(record.collections)}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: Union[str, Path], model: nn.Module, example_inputs: Optional[tuple] = None) -> fx.GraphModule:
    """Rebuild a model saved by :func:`save`: apply its policy to ``model`` (the original architecture, never
    modified) and load its tensors.

    Args:
        path: a file written by :func:`save`.
        model: the un-rewritten architecture the saved model came from (any weights).
        example_inputs: inputs to trace with; defaults to the ones saved with the model.

    Returns:
        The rewritten ``GraphModule``, in the saved train/eval mode, whose outputs equal the saved model's bit for bit.

    Raises:
        SeedrandError: not a seedrand file, tensors missing or unexpected, shapes that differ, or a regenerated
            tensor whose fingerprint does not match (the message names the tensor).
        PolicyError: the saved policy does not fit ``model``.
    """
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise SeedrandError(f"{path}: not a seedrand checkpoint (metadata format {metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved_inputs = tuple(tensors.pop(f"{_INPUT}{i}") for i in range(int(metadata["example_inputs"]))
                         ) if metadata["example_inputs"] != "none" else None
    for name, kept in json.loads(metadata["aliases"]).items():
        tensors[name] = tensors[kept]
    policy = parse_policy(metadata["policy"], f"{path}:policy")
    gm = rewrite(model, policy, saved_inputs if example_inputs is None else example_inputs)
    replay_collections(gm, json.loads(metadata.get("collections", "[]")))
    try:
        gm.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise SeedrandError(f"{path}: {e}") from None
    return gm.train(json.loads(metadata["training"]))
