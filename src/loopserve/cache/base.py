"""The decode-method hook: which cached tokens decoding attends to, and what is kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

DECODE_METHODS: dict[str, type["DecodeMethod"]] = {}


def register_decode(cls: type["DecodeMethod"]) -> type["DecodeMethod"]:
    """Class decorator: make a decode / KV method available by its `name`."""
    DECODE_METHODS[cls.name] = cls
    return cls


@dataclass
class DecodeMethod:
    """A KV policy. The engine calls, per turn:

    `begin_turn(ctx)` before the turn's prefill; `observe_prefill(ctx, layer_idx, q, k)` in
    every layer during prefill (post-RoPE queries of the new rows, all resident keys);
    `after_prefill(ctx)` once the prefill forward is done; `observe_decode(ctx, layer_idx, q,
    layer)` after each decode step's attention in every layer (q: (1, H, 1, D)); and
    `end_turn(ctx)` when the answer is complete. A method narrows what decoding attends to
    with `layer.set_view(idx)` and evicts with `layer.keep_only(idx)` (see SessionLayer).
    """

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # True when the method's state after a chunked prefill equals that after one forward
    # (see PrefillMethod.chunkable); methods that score the final chunk's queries are not.
    chunkable: ClassVar[bool] = False

    def chunkable_turn(self, n_new: int, n_total: int) -> bool:
        """Whether this turn's prefill may be split (see PrefillMethod.chunkable_turn)."""
        return self.chunkable

    def validate(self) -> None:
        """Raise ValueError naming the bad knob."""

    def begin_turn(self, ctx) -> None:
        # Every turn starts from the full resident store; selections are per turn.
        ctx.cache.clear_views()

    def observe_prefill(self, ctx, layer_idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        pass

    def after_prefill(self, ctx) -> None:
        pass

    def observe_decode(self, ctx, layer_idx: int, q: torch.Tensor, layer) -> None:
        pass

    def end_turn(self, ctx) -> None:
        pass


@register_decode
@dataclass
class DenseDecode(DecodeMethod):
    name = "dense"
    chunkable = True
    description = "Full KV cache: decoding attends to every cached token."
