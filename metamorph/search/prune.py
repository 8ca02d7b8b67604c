"""GeneCAI's pruning phase uses the models layer's channel pruning
(:mod:`metamorph.models.pruning`: saliency criteria, masks, physical pruning); re-exported here."""

from metamorph.models.pruning import (
    CRITERIA,
    ChannelMasks,
    channel_order,
    channel_saliency,
    hidden_width,
    keep_most_salient,
    kept_channels,
    prunable_blocks,
    prune_physical,
    prune_to_widths,
)

__all__ = [
    "CRITERIA",
    "ChannelMasks",
    "channel_order",
    "channel_saliency",
    "hidden_width",
    "keep_most_salient",
    "kept_channels",
    "prunable_blocks",
    "prune_physical",
    "prune_to_widths",
]
