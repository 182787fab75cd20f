"""SnapKV re-scored from recent output tokens every N steps (a view over the full store).

The closest existing idea to LoopServe Phase 2 (SPEC section 3): the first selection is
SnapKV's (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS
2024, arXiv 2404.14469): the last `window` input queries score the keys, max-pooled, top
`budget` per KV head with the window kept. Then every `every` generated tokens the queries of
those tokens (buffered per layer, post-RoPE) become the new observation window: they re-score
every input key (history + this turn's input), pooled, and each KV head attends its top
`budget` input keys plus every token generated in this turn.

Unlike SnapKV this is a **view** (SessionLayer.set_view): the full KV store stays resident,
so a re-selection can bring back any token. What differs from LoopServe Phase 2 is the first
selection (the tail window, not probe rows spread over the input) and that nothing besides the
generated tokens is forced (no sinks, no recent input tokens).

Multi-turn: the store is lossless, so each turn starts from the full history (views are
cleared at the start of a turn), prefills against all of it, and selects anew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register_decode
from .scoring import QueryBuffer, attention_scores, select_top
from ..knobs import check_int_knob as _check_int
from .snapkv import SnapKV


@register_decode
@dataclass
class SnapKVRescored(SnapKV):
    """SnapKV selection after prefill, re-scored by the last `every` generated queries every `every` steps (view)."""

    name = "snapkv-rescored"
    description = "SnapKV's selection as a view, re-scored from the last `every` generated tokens' queries every `every` steps."
    paper = "SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469), re-scored during decoding (SPEC section 3)"

    every: int = 16

    def validate(self) -> None:
        super().validate()
        _check_int(self, "every", 1)

    def __post_init__(self):
        self.reselections = 0  # decode-time re-selections, summed over layers (tests, stats)
        self._buffers: QueryBuffer | None = None

    def apply(self, layer, keep: torch.Tensor) -> None:
        layer.set_view(keep)  # lossless: the store keeps every token

    def begin_turn(self, ctx) -> None:
        super().begin_turn(ctx)
        self._buffers = QueryBuffer(ctx.num_layers, self.every)

    def observe_decode(self, ctx, layer_idx, q, layer) -> None:
        queries = self._buffers.push(layer_idx, q)
        if queries is None:
            return
        n_in = int((layer.positions[0] < ctx.input_end).sum())  # store == positions (lossless)
        if n_in <= self.budget:
            return
        keep = select_top(attention_scores(queries, layer.keys[:, :, :n_in], ctx.scaling), self.budget, pool=self.pool)
        layer.set_view(keep, since=n_in)  # and every generated token
        self.reselections += 1
