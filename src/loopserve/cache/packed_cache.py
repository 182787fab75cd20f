"""A transformers `Cache` for one forward that packs a step of several conversations.

The scheduler feeds many conversations in one forward, their tokens concatenated along the
sequence (batch size 1, no padding). Each decoder layer hands this cache the packed new
keys/values; `PackedLayer.update` splits them by segment and appends each segment to its
own conversation's `SessionLayer`, which returns that conversation's keys/values (its full
store or its active view). The attention hook (engine/hook.py) reads them back per segment
with `segments(layer_idx)`: every conversation attends over its own cache only.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .session_cache import SessionCache, SessionLayer


class PackedLayer(CacheLayerMixin):
    """One decoder layer of several conversations' caches."""

    is_sliding = False
    is_croppable = False

    def __init__(self, targets: list[SessionLayer], lengths: list[int]):
        super().__init__()
        self.targets = targets
        self.lengths = lengths
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the conversations' own layers initialise themselves

    def update(self, key_states, value_states, *args, **kwargs):
        ks = key_states.split(self.lengths, dim=-2)
        vs = value_states.split(self.lengths, dim=-2)
        self.segments = [t.update(k, v) for t, k, v in zip(self.targets, ks, vs)]
        # The packed tensors go on to attention, which uses `segments` instead.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0  # positions are per conversation and always passed explicitly

    def get_max_length(self) -> int:
        return -1


class PackedCache(Cache):
    """The caches of the conversations in one packed forward; segment i has `lengths[i]` tokens."""

    def __init__(self, caches: list[SessionCache], lengths: list[int]):
        if not caches or len(caches) != len(lengths) or min(lengths) < 1:
            raise ValueError(f"a packed forward needs one or more segments of >= 1 token each (got lengths {lengths})")
        num_layers = len(caches[0].layers)
        if any(len(c.layers) != num_layers for c in caches):
            raise ValueError("the caches of a packed forward must have the same number of layers")
        super().__init__(layers=[PackedLayer([c.layers[i] for c in caches], list(lengths)) for i in range(num_layers)])

    def segments(self, layer_idx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each segment's (keys, values) as its conversation's cache layer returned them."""
        return self.layers[layer_idx].segments
