"""Helpers that find a module's tensors in a traced GraphModule, whichever strategy traced it."""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["own_parameters", "full_args", "inline_module", "install", "insert_after", "substitute_tensor",
           "erase_with_dead_inputs", "reads_module"]


def own_parameters(gm: fx.GraphModule, qualname: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(fully qualified name, parameter)`` for each parameter the module ``qualname`` owns directly.

    Works on symbolically traced graphs (the module is a submodule) and on exported ones (the parameters keep their
    fully qualified names under plain container modules). Tied parameters appear under every name that holds them.
    Parameters the traced forward never reads are absent: tracing drops them. Raises nothing; an unknown
    ``qualname`` gives an empty list.
    """
    prefix = f"{qualname}." if qualname else ""
    return [(n, p) for n, p in gm.named_parameters(remove_duplicate=False)
            if n.startswith(prefix) and "." not in n[len(prefix):]]


def full_args(node: fx.Node) -> tuple:
    """A call's positional arguments with its op schema's defaults filled in, as far as they are positional and not
    given by keyword (an export omits arguments equal to their default, e.g. ``dropout_p=0.0``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return tuple(node.args)
    extra = []
    for arg in [a for a in schema.arguments if not a.kwarg_only][len(node.args):]:
        if arg.name in node.kwargs or not arg.has_default_value():
            break
        extra.append(arg.default_value)
    return tuple(node.args) + tuple(extra)


def install(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    """Set the submodule ``qualname`` of ``gm`` to ``module``, replacing what was there (and its tensors)."""
    parent_name, _, name = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    if name in parent._parameters or name in parent._buffers:
        delattr(parent, name)  # nn.Module refuses to assign a module over a tensor
    setattr(parent, name, module)


def substitute_tensor(gm: fx.GraphModule, name: str, module: nn.Module) -> int:
    """Install ``module`` (a forward with no inputs that returns a tensor) at ``name``, the qualified name of a
    parameter or buffer, and make every ``get_attr`` node reading that tensor call the module instead.

    Returns:
        The number of ``get_attr`` nodes replaced (0: the traced forward never reads the tensor; it is still
        replaced, so that the state dict follows the module).
    """
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    install(gm, name, module)
    for node in readers:
        with gm.graph.inserting_before(node):
            called = gm.graph.call_module(name)
        called.meta = dict(node.meta)
        node.replace_all_uses_with(called)
        gm.graph.erase_node(node)
    return len(readers)


def reads_module(gm: fx.GraphModule, qualname: str) -> bool:
    """The graph calls module ``qualname`` (the root: always) or reads a tensor of it or of its children. Raises
    nothing."""
    prefix = f"{qualname}."
    return not qualname or any(n.op in ("call_module", "get_attr") and (n.target == qualname or
                                                                        n.target.startswith(prefix))
                               for n in gm.graph.nodes)


def erase_with_dead_inputs(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` (which nothing reads) and every input that nothing reads after it and that has no side
    effect (the ``W.T`` feeding a replaced ``x @ W.T``, the ``get_attr`` of a replaced weight). Raises nothing."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for value in inputs:
        if not value.users and value.op in ("call_function", "call_method", "get_attr") and not value.is_impure():
            erase_with_dead_inputs(graph, value)


def insert_after(gm: fx.GraphModule, node: fx.Node, module_name: str) -> fx.Node:
    """Call the submodule ``module_name`` on ``node``'s value right after it, and make every former user of
    ``node`` read the result instead. Returns the new ``call_module`` node."""
    users = list(node.users)
    with gm.graph.inserting_after(node):
        inserted = gm.graph.call_module(module_name, (node,))
    inserted.meta = dict(node.meta)
    for user in users:
        user.replace_input_with(node, inserted)
    return inserted


def inline_module(gm: fx.GraphModule, qualname: str) -> None:
    """Replace every ``call_module`` node of the leaf ``qualname`` by the module's own forward, traced symbolically,
    so that its tensors are read by ``get_attr`` nodes (as in an exported graph) and a pass can substitute them. The
    module itself becomes a plain ``nn.Module`` holding the same parameters, buffers and children. A graph that does
    not call it (an exported one) is left as it is.

    Raises:
        torch.fx.proxy.TraceError: the module's forward cannot be traced symbolically.
        ValueError: its forward takes ``*args``/``**kwargs`` or returns more than one tensor.
    """
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == qualname]
    if not calls:
        return
    module = gm.get_submodule(qualname)
    body = fx.Tracer().trace(module, concrete_args=_defaults_left(module, calls))
    placeholders = [n for n in body.nodes if n.op == "placeholder"]
    if any(p.target.startswith("*") for p in placeholders):
        raise ValueError(f"cannot inline {qualname}: its forward takes *args or **kwargs")
    for call in calls:
        env = {p: _bound(p, i, call) for i, p in enumerate(placeholders)}
        with gm.graph.inserting_before(call):
            for node in body.nodes:
                if node.op == "output":
                    result = fx.map_arg(node.args[0], env.__getitem__)
                elif node.op != "placeholder":
                    env[node] = gm.graph.node_copy(node, env.__getitem__)
                    if node.op in ("get_attr", "call_module"):
                        env[node].target = f"{qualname}.{node.target}"
        if not isinstance(result, fx.Node):
            raise ValueError(f"cannot inline {qualname}: its forward does not return a single tensor")
        result.meta = {**call.meta, **result.meta}
        call.replace_all_uses_with(result)
        gm.graph.erase_node(call)
    install(gm, qualname, _container(module))


def _defaults_left(module: nn.Module, calls: list[fx.Node]) -> dict[str, object]:
    """The forward's arguments that no call passes, at their defaults: traced as constants, so that the forward's
    branches on them (``if output_size is None`` of ``nn.ConvTranspose2d``) are taken as in the calls."""
    parameters = list(inspect.signature(module.forward).parameters.values())
    return {p.name: p.default for i, p in enumerate(parameters) if p.default is not p.empty
            and all(i >= len(c.args) and p.name not in c.kwargs for c in calls)}


def _bound(placeholder: fx.Node, position: int, call: fx.Node):
    """The value a ``call_module`` node passes for the forward argument ``placeholder``."""
    if position < len(call.args):
        return call.args[position]
    if placeholder.target in call.kwargs:
        return call.kwargs[placeholder.target]
    if placeholder.args:
        return placeholder.args[0]  # the argument's default
    raise ValueError(f"cannot inline {call.target}: no value for argument {placeholder.target!r}")


def _container(module: nn.Module) -> nn.Module:
    container = nn.Module()
    container._parameters, container._modules = module._parameters, module._modules
    container._buffers, container._non_persistent_buffers_set = module._buffers, module._non_persistent_buffers_set
    return container
