"""H2O baseline: heavy hitters (accumulated attention) plus recent tokens.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (NeurIPS 2023, arXiv 2306.14048).

Every resident token carries its *accumulated attention*: the softmax attention it has
received, summed over every query that attended it (with GQA, over the query heads of each
KV head). The cache keeps, per KV head, the `recent` most recent tokens plus the
`budget - recent` others with the largest accumulated attention, and **evicts** the rest
(SessionLayer.keep_only), so the KV size never exceeds `budget` after a step.

- Prefill: the new rows' attention over all resident keys is added to the accumulators and
  the cache is cut to `budget`. By default every prefill row is used, exact as in the H2O
  reference code (`attn_weights.sum(-2)`), at the cost of one more score pass (QK^T +
  softmax, no PV) chunked over rows. `prefill_rows > 0` is a cheaper **approximation**: that
  many rows evenly spaced over the new input (the last row included) stand in for all of them,
  their sums rescaled by n / prefill_rows.
- Decode: each step's attention over the resident keys is added, then the cache is cut back to
  `budget` (one token evicted per step once full), as in the paper.

Multi-turn: one cache and one set of accumulators for the whole dialogue. Scores keep
accumulating across turns (older tokens have had more queries; that is H2O's rule), the next
turn's prefill sees only the surviving tokens, and each turn's prefill ends with a cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..knobs import check_int_knob
from .base import DecodeMethod, register_decode
from .scoring import attention_scores, topk_with_forced


@register_decode
@dataclass
class H2O(DecodeMethod):
    """H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): accumulated-attention heavy hitters + recent window."""

    name = "h2o"
    description = "H2O: keep the `recent` newest tokens plus the heaviest accumulated-attention ones, `budget` in all; evict per step."
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., NeurIPS 2023, arXiv 2306.14048)"

    budget: int = 1024
    recent: int = 512  # H2O's default split: half heavy hitters, half recent tokens
    prefill_rows: int = 0  # 0: every prefill row (exact); > 0: evenly spaced rows (approximation)

    row_chunk: ClassVar[int] = 256  # prefill rows scored at once (bounds memory to H x 256 x N)

    def validate(self) -> None:
        for knob, low in (("budget", 1), ("recent", 0), ("prefill_rows", 0)):
            check_int_knob(self, knob, low)
        if self.recent > self.budget:
            raise ValueError(f"invalid knob recent={self.recent}: must not exceed budget={self.budget}")

    def __post_init__(self):
        self._acc: dict[int, torch.Tensor] = {}  # layer -> (H_kv, resident) accumulated attention

    def accumulated(self, layer_idx: int) -> torch.Tensor | None:
        """(H_kv, resident tokens) accumulated attention of a layer (tests, diagnostics)."""
        return self._acc.get(layer_idx)

    def _aligned(self, layer_idx: int, layer, old_len: int, new: int) -> torch.Tensor:
        """Accumulators for the `old_len` tokens already resident, extended by `new` zeros.

        Robust to the engine cropping the cache (re-tokenisation) or starting a fresh one.
        """
        h = layer.keys.shape[1]
        acc = self._acc.get(layer_idx)
        if acc is None or acc.shape[0] != h:
            acc = torch.zeros(h, 0, device=layer.device)
        if acc.shape[1] > old_len:
            acc = acc[:, :old_len]
        grow = old_len + new - acc.shape[1]
        return torch.cat([acc, acc.new_zeros(h, grow)], dim=1) if grow else acc

    def _evict(self, layer_idx: int, layer) -> None:
        n = layer.length
        if n <= self.budget:
            return
        acc = self._acc[layer_idx]
        forced = torch.zeros(n, dtype=torch.bool, device=acc.device)
        if self.recent:
            forced[n - self.recent :] = True
        keep = topk_with_forced(acc, self.budget - self.recent, forced)
        layer.keep_only(keep)
        self._acc[layer_idx] = acc.gather(1, keep)

    def observe_prefill(self, ctx, layer_idx, q, k) -> None:
        layer = ctx.cache.layers[layer_idx]
        n = q.shape[-2]
        acc = self._aligned(layer_idx, layer, layer.length - n, n)
        rows = torch.arange(n, device=q.device)
        weight = 1.0
        if 0 < self.prefill_rows < n:
            rows = torch.linspace(0, n - 1, self.prefill_rows, device=q.device).round().long().unique()
            weight = n / len(rows)
        q_pos = ctx.positions(n, device=q.device)
        keys, k_pos = layer.keys, layer.positions
        for r0 in range(0, len(rows), self.row_chunk):
            r = rows[r0 : r0 + self.row_chunk]
            acc += weight * attention_scores(q[:, :, r], keys, ctx.scaling, q_pos[r], k_pos)
        self._acc[layer_idx] = acc
        if ctx.q_start + n >= ctx.input_end:  # final prefill chunk of the turn
            self._evict(layer_idx, layer)
        ctx.record("kv_kept_tokens", layer.length)

    def observe_decode(self, ctx, layer_idx, q, layer) -> None:
        acc = self._aligned(layer_idx, layer, layer.length - 1, 1)
        acc += attention_scores(q, layer.keys, ctx.scaling)
        self._acc[layer_idx] = acc
        self._evict(layer_idx, layer)
