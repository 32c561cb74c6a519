"""The ``seedrand`` torch.compile backend, registered through the ``torch_dynamo_backends`` entry-point group (see
pyproject.toml), so ``torch.compile(model, backend="seedrand")`` works without importing seedrand first.

Models rewritten by :func:`seedrand.rewrite` compile as they are. ``options={"policy": <Policy | path | dict>}``
applies a policy to the captured graph instead (for quick experiments on models that were not rewritten): module
names and classes come from each op's ``nn_module_stack``, parameters from Dynamo's placeholder sources
(``L['self']._modules['fc1']._parameters['weight']`` is ``fc1.weight``); the user's module is never changed. Only
actions with a captured-graph pass are accepted: ``freeze`` (parameters detached in the graph), ``freeze_fraction``
(the frozen slice of each weight replaced in the graph by the values ``seedrand.rewrite`` gives it) and ``random`` on
Linear/Conv layers (their ops become the regenerate ops, with the keys ``seedrand.rewrite`` uses). The graph then goes
to Inductor (forward and backward through AOTAutograd), or with ``options={"inductor": False}`` runs through
AOTAutograd with eager kernels (for debugging). seedrand's regenerate ops (``seedrand::regen_matmul``,
``seedrand::frozen_matmul``, ``seedrand::regen_conv``, ``seedrand::subspace_project``) stay single opaque nodes
that Inductor calls: on CUDA tensors they run their Triton kernels (weight tiles generated in registers for small
batches, chunks of rows filled for cuBLAS above), on the CPU the numba Philox path.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.fx as fx

from .errors import SeedrandError, shown

__all__ = ["seedrand_backend"]

_SUPPORTED_OPTIONS = frozenset({"policy", "inductor"})
_SOURCE_PART = re.compile(r"\._(modules|parameters)\['([^']+)'\]")
_STACK_INDEX = re.compile(r"\[(\d+)\]")
# the compiled module: L['self'] when Dynamo traces its forward, L['fn'] when it traces the module as a callable
# (e.g. an nn.Sequential), L['args'][0] when its forward is wrapped by a decorator taking *args (transformers 5's
# CausalLM forwards)
_ROOT = re.compile(r"^L\['(self|fn)'\]|^L\['args'\]\[0\]")


def _qualname(stack_path: str) -> str:
    """``"L['self'].blocks[0].fc"`` -> ``"blocks.0.fc"``."""
    path = _ROOT.sub("", stack_path).lstrip(".")
    return _STACK_INDEX.sub(r".\1", path).lstrip(".")


def _captured_modules(gm: fx.GraphModule) -> dict[str, type]:
    modules: dict[str, type] = {}
    for node in gm.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(cls, type):
                modules.setdefault(_qualname(path), cls)
    return modules


def _captured_parameters(gm: fx.GraphModule, example_inputs: list) -> dict[str, fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for node, value in zip(placeholders, example_inputs):
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = source.name if source is not None else ""
        parts = _SOURCE_PART.findall(name)
        if _ROOT.match(name) and parts and parts[-1][0] == "parameters" and isinstance(
                value, torch.nn.Parameter):
            found[".".join(p for _, p in parts)] = node
    return found


def _apply_policy(gm: fx.GraphModule, example_inputs: list, policy: Any) -> fx.GraphModule:
    from .passes import ACTIONS
    from .rewriter.match import resolve
    from .rewriter.rewrite import as_policy

    policy = as_policy(policy)
    captured = [name for name, spec in ACTIONS.items() if spec.captured is not None]
    for rule in policy.rules:
        # the backend never changes the user's module: tensors an action adds would live only in the compiled
        # graph, out of reach of the user's optimizer and state_dict
        if ACTIONS[rule.action].captured is None:
            raise policy.error(f"action {rule.action} cannot be applied by the torch.compile backend: "
                               f"{ACTIONS[rule.action].not_captured}, which the model's optimizer and state_dict "
                               "would never see; rewrite the model with seedrand.rewrite and compile the result "
                               f"(the backend applies {', '.join(captured)})", rule)
    parameters = _captured_parameters(gm, example_inputs)
    for target in resolve(policy, _captured_modules(gm)):
        ACTIONS[target.rule.action].captured(gm, target, parameters)
    gm.graph.lint()
    gm.recompile()
    return gm


def seedrand_backend(gm: fx.GraphModule, example_inputs: list, *, options: Optional[dict[str, Any]] = None,
                     mode: Optional[str] = None):
    """Compile a Dynamo-captured graph, applying ``options["policy"]`` first when given.

    Args:
        gm: the FX graph Dynamo captured (parameters lifted to placeholders).
        example_inputs: the real tensors (and Parameters) for ``gm``'s placeholders.
        options: ``torch.compile(..., options=...)``: ``{"policy": Policy | path | dict, "inductor": bool}`` (both
            optional; ``inductor`` defaults to ``True``).
        mode: ``torch.compile(..., mode=...)``, forwarded as Inductor's mode options.

    Returns:
        The compiled callable from ``torch._inductor.compile_fx.compile_fx`` (or from the ``aot_eager`` backend).

    Raises:
        SeedrandError: options not a dict, an unsupported option, ``inductor`` not a bool; PolicyError: the policy
            is malformed, does not fit the captured
            graph (strict matching applies to what Dynamo captured), or names an action the backend cannot apply.
    """
    if options is not None and not isinstance(options, dict):
        raise SeedrandError(f"the seedrand backend's options are a dict, not {type(options).__name__}")
    options = dict(options or {})
    unknown = sorted(map(str, set(options) - _SUPPORTED_OPTIONS))
    if unknown:
        raise SeedrandError(f"the seedrand backend does not support options {[shown(k) for k in unknown]} "
                            f"(supported: {sorted(_SUPPORTED_OPTIONS)})")
    if not isinstance(options.get("inductor", True), bool):
        raise SeedrandError(f"the seedrand backend's option inductor is true or false, not "
                            f"{shown(options['inductor'])}")
    if options.get("policy") is not None:
        gm = _apply_policy(gm, example_inputs, options["policy"])
    if not options.get("inductor", True):
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    config_patches = torch._inductor.list_mode_options(mode) if mode else None
    return compile_fx(gm, example_inputs, config_patches=config_patches)
