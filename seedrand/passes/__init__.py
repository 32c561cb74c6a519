"""One module per policy action: its parameters (a pydantic model), its pass, and the modules it installs, registered
in :data:`seedrand.actions.ACTIONS` when the module is imported. A pass is ``fn(gm, targets) -> None``: it rewrites
the GraphModule ``gm`` for one rule, given the :class:`~seedrand.rewriter.match.Target` (module, rule) pairs it
selected in model order, using nothing but its arguments. Actions that treat each module on its own are written per
module and applied in turn (:func:`seedrand.actions.per_module`); an action whose modules share state (``subspace``
with ``scope: global``) takes them all."""

from __future__ import annotations

from ..actions import ACTIONS
# imported for their registrations, in the order of a rule's fields, of error messages and of the reference table
from . import freeze, freeze_fraction, random, insert_random, filter_gates, subspace, grow  # noqa: F401, I001

__all__ = ["ACTIONS"]
