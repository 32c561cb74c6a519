"""``seedrand.save`` / ``seedrand.load``: a rewritten model as one safetensors file.

The file holds the model's ``state_dict()`` (trainable tensors, stored frozen tensors and buffers, and per regenerated
tensor its Philox key and fingerprint: ``seedrand.passes.regenerated``), the example inputs it was traced with, and,
in the safetensors metadata, the policy as YAML, the channel groups :func:`seedrand.collect_garbage` removed, and a
SHA-256 checksum of every tensor and of the metadata. A file cannot hold code, so :func:`load` rebuilds the graph the
way PEFT rebuilds an adapter: it verifies every checksum first, applies the saved policy to the architecture you pass
(the weights of that model do not matter, every tensor the rewritten model keeps is in the file), removes the
channels that were removed since, then loads the tensors strictly. Every regenerated tensor's fingerprint is checked,
so a model that would compute something else is an error, never a silent change.

What a file can do: give tensors, a policy (read with the bounded, safe YAML reader of :mod:`seedrand.policy`; its
``types`` resolve only among classes already imported), and lists of numbers. What it cannot do: import a module,
run code, or change the model passed to :func:`load`.
The ``state_dict`` itself is plain tensors: ``torch.save``/``torch.load(weights_only=True)`` work as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, SeedrandError, shown
from .garbage import replay_collections
from .policy import MAX_POLICY_BYTES, parse_policy
from .rewriter.rewrite import record_of, rewrite

__all__ = ["save", "load", "tensor_checksum"]

_FORMAT = "seedrand-2"  # seedrand-1 files had no checksums
_INPUT = "__seedrand_example_input__."
_CHECKSUMS = "sha256"  # metadata key: tensor name -> checksum
_METADATA_CHECKSUM = "metadata_sha256"


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes (row-major): what :func:`save` writes per tensor and
    :func:`load` verifies. Any dtype and device; equal for tensors that are equal bit for bit."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _metadata_checksum(metadata: dict[str, str]) -> str:
    rest = {k: v for k, v in metadata.items() if k != _METADATA_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _signed(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` with the checksums of ``tensors`` and of itself added."""
    metadata = {**metadata, _CHECKSUMS: json.dumps({k: tensor_checksum(t) for k, t in tensors.items()})}
    return {**metadata, _METADATA_CHECKSUM: _metadata_checksum(metadata)}


class _Architecture(BaseModel):
    """A transformers model's class (a name exported by ``transformers``, never a path) and config."""

    model_config = ConfigDict(extra="forbid", strict=True)

    class_name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
    config: dict


class _Metadata(BaseModel):
    """The decoded metadata of a seedrand file (every value is a string in safetensors; JSON inside)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["seedrand-2"]
    policy: str = Field(max_length=MAX_POLICY_BYTES)
    aliases: dict[str, str]
    example_inputs: Optional[int] = Field(ge=0, le=1024)
    training: bool
    collections: list[list[int]] = Field(max_length=100_000)
    architecture: Optional[_Architecture] = None
    sha256: dict[str, str]
    metadata_sha256: str


def save(model: nn.Module, path: Union[str, Path]) -> None:
    """Write a model returned by :func:`seedrand.rewrite` (the kept model or the graph, trained since) to ``path``
    (safetensors).

    Tensors that share memory (tied parameters) are written once; the file is written to a temporary name and
    renamed, so an interrupted save never leaves a partial file at ``path``.

    Raises:
        SeedrandError: ``model`` was not returned by ``seedrand.rewrite``, or its example inputs are not all tensors.
        CheckpointError: the folder of ``path`` does not exist.
    """
    record = record_of(model)
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
                "example_inputs": json.dumps(len(inputs) if record.example_inputs is not None else None),
                "training": json.dumps(model.training), "collections": json.dumps(record.collections)}
    architecture = _architecture(model)
    if architecture is not None:
        metadata["architecture"] = json.dumps(architecture)
    metadata = _signed(tensors, metadata)
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(path, f"cannot write: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the mode open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _architecture(model: nn.Module) -> Optional[dict]:
    """The class name and config of a kept transformers model, if ``transformers`` exports its class by name."""
    import sys

    transformers = sys.modules.get("transformers")
    cls = type(model)
    if transformers is None or not cls.__module__.startswith("transformers.") or not hasattr(model, "config"):
        return None
    if getattr(transformers, cls.__name__, None) is not cls:
        return None
    return {"class_name": cls.__name__, "config": model.config.to_dict()}


def _rebuild(path, architecture: Optional[_Architecture]) -> nn.Module:
    """The architecture recorded in a file: a freshly initialized transformers model of the saved class and config.
    The class is looked up by name among ``transformers``' exports (a transformers model), never imported by path."""
    if architecture is None:
        raise CheckpointError(path, "the file records no transformers architecture (the model was not a transformers "
                              "model, or was saved as a graph); pass the architecture: seedrand.load(path, model)")
    from ._optional import require

    transformers = require("transformers", "seedrand.load without a model")
    cls = getattr(transformers, architecture.class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(path, f"architecture {shown(architecture.class_name)} is not a transformers model class")
    try:
        return cls(cls.config_class.from_dict(architecture.config))
    except Exception as e:  # noqa: BLE001 - whatever the class refuses to build from, the file's config is malformed
        raise CheckpointError(path, f"the saved {architecture.class_name} config is malformed: {shown(str(e))}") from None


def load(path: Union[str, Path], model: Optional[nn.Module] = None, example_inputs: Optional[tuple] = None, *,
         graph: bool = False) -> Union[nn.Module, fx.GraphModule]:
    """Rebuild a model saved by :func:`save`: apply its policy to ``model`` (the original architecture, never
    modified) and load its tensors.

    Args:
        path: a file written by :func:`save`.
        model: the un-rewritten architecture the saved model came from (any weights). May be left out for a kept
            transformers model: the file records its class (by name) and config, and the architecture is rebuilt.
        example_inputs: inputs to trace with; defaults to the ones saved with the model.
        graph: return the rewritten ``GraphModule`` instead of the kept model (as :func:`seedrand.rewrite`).

    Returns:
        The rewritten model (of ``model``'s class, or the ``GraphModule`` with ``graph=True``), in the saved
        train/eval mode, whose outputs equal the saved model's bit for bit.

    Raises:
        CheckpointError: not a seedrand file (missing, a directory, not safetensors, truncated, another format),
            malformed metadata, a checksum that does not match (the file changed after saving; names the tensor),
            tensors missing or unexpected, shapes that differ, or a regenerated tensor whose fingerprint does not
            match (names the tensor). Nothing is rewritten before every checksum is verified.
        PolicyError: the saved policy does not fit ``model``.

    A ``model`` left out needs a file that records a transformers architecture (a ``CheckpointError`` says so).
    """
    tensors, meta = _read(path)
    saved_inputs = None
    if meta.example_inputs is not None:
        names = [f"{_INPUT}{i}" for i in range(meta.example_inputs)]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointError(path, f"metadata lists {meta.example_inputs} example inputs, tensor {missing[0]} "
                                  "is missing")
        saved_inputs = tuple(tensors.pop(n) for n in names)
    for name, kept in meta.aliases.items():
        if kept not in tensors:
            raise CheckpointError(path, f"alias {shown(name)} refers to {shown(kept)}, which the file does not hold")
        tensors[name] = tensors[kept]
    policy = parse_policy(meta.policy, f"{path}:policy")
    if model is None:
        model = _rebuild(path, meta.architecture)
    gm = rewrite(model, policy, saved_inputs if example_inputs is None else example_inputs, graph=graph)
    try:
        replay_collections(gm, meta.collections)
        gm.load_state_dict(tensors, strict=True)
    except (RuntimeError, SeedrandError) as e:
        raise CheckpointError(path, str(e)) from None
    return gm.train(meta.training)


def _read(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], _Metadata]:
    """The tensors and the validated metadata of a seedrand file, every checksum verified.

    Raises:
        CheckpointError: not a readable file, not safetensors (truncated, corrupted, a ``torch.save`` file), not a
            seedrand file, malformed metadata, or a checksum that does not match (names the tensor).
    """
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such file" if not os.path.exists(path) else "not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                found = shown(metadata.get("format"))
                raise CheckpointError(path, f"not a seedrand checkpoint (metadata format {found}, expected "
                                      f"{_FORMAT!r}; files written before checksums, seedrand-1, must be saved again)")
            if metadata.get(_METADATA_CHECKSUM) != _metadata_checksum(metadata):
                raise CheckpointError(path, "the metadata does not match its checksum: the file was changed after "
                                      "seedrand.save")
            meta = _metadata(path, metadata)
            names = set(f.keys())
            if names != set(meta.sha256):
                odd = sorted(names ^ set(meta.sha256))[0]
                raise CheckpointError(path, f"tensor {shown(odd)} is in the file or in its checksums, not both")
            tensors = {}
            for name in sorted(names):
                tensors[name] = f.get_tensor(name)
                if tensor_checksum(tensors[name]) != meta.sha256[name]:
                    raise CheckpointError(path, f"tensor {shown(name)} does not match its checksum: the file was "
                                          "changed or corrupted after seedrand.save")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({type(e).__name__}: {e}); truncated, "
                              "corrupted, or not written by seedrand.save") from None
    return tensors, meta


def _metadata(path, metadata: dict[str, str]) -> _Metadata:
    decoded = {}
    for key, value in metadata.items():
        if key in ("format", "policy", _METADATA_CHECKSUM):
            decoded[key] = value
            continue
        try:
            decoded[key] = json.loads(value)
        except ValueError:
            raise CheckpointError(path, f"metadata {shown(key)} is not JSON: {shown(value)}") from None
    try:
        return _Metadata.model_validate(decoded)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise CheckpointError(path, f"malformed metadata {where}: {err['msg']}") from None
