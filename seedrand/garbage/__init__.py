"""``seedrand.collect_garbage``: remove dead channels from a rewritten model in place (Leclerc, Castro Fernandez &
Madden, ShrinkNets: dead channels are removed during training by propagating removal events through the graph).

The channel dependency graph (:class:`seedrand.garbage.graph.ChannelGraph`) says which channels are provably
dead (gates with ``theta <= 0``, zero weight rows with zero bias, channels no layer reads) and which must go
together (through BatchNorm, activations, pooling, residual ``add``, ``mul`` (SE blocks), ``cat``, ``split``/``chunk``,
``flatten``/``view``/``reshape``, grouped and depthwise convolutions). Every other op is a barrier: the channels it
reads are kept and ``explain`` says which op kept them. Never guess.

Parameters shrink in place (values and ``.grad`` are sliced into the same ``Parameter`` objects with
``torch.utils.swap_tensors``), and when an optimizer is passed every per-parameter state tensor of the parameter's
shape (momentum, Adam moments; plain, foreach and fused variants keep state per parameter alike) is sliced the same
way, so training simply continues. The decision is made for the whole model before anything changes.

The package: :mod:`~seedrand.garbage.slots` (the union-find of channel slots), :mod:`~seedrand.garbage.rules`
(what each op does to channels, registered once per op), :mod:`~seedrand.garbage.graph` (the channel dependency
graph), :mod:`~seedrand.garbage.plan` (what one collection changes), :mod:`~seedrand.garbage.surgery` (slicing
parameters and optimizer state) and :mod:`~seedrand.garbage.sizes` (size attributes following tensors), with
:mod:`~seedrand.garbage.collect` driving them.
"""

from .collect import GarbageReport, collect_garbage, drop_inactive, replay_collections
from .graph import ChannelGraph
from .rules import register_channel_rule
from .sizes import follow_tensors, register_size_rule

__all__ = ["collect_garbage", "drop_inactive", "GarbageReport", "replay_collections", "register_size_rule",
           "follow_tensors", "register_channel_rule", "ChannelGraph"]
