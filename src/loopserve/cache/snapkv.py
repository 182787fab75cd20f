"""SnapKV baseline: keep the keys the last input tokens attend to, once per prefill.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024,
arXiv 2404.14469).

After the prefill, the queries of the last `window` input tokens (the *observation window*)
score every earlier key: softmax attention summed over the window rows (and, with GQA, over
the query heads of each KV head), max-pooled over neighbouring positions (`pool`). Per KV head
the top `budget - window` keys are kept together with the window itself; everything else is
**evicted** (SessionLayer.keep_only), as the paper does. Decoding then attends the kept keys
plus the generated tokens, which are never compressed.

Multi-turn: SnapKV compresses once per prefill, so here it compresses **after every turn's
prefill**: the resident history (already compressed by earlier turns, plus the previous
answer) and the new input are scored together by the new input's last `window` tokens and
cut back to `budget` per KV head. Evicted tokens are gone for later turns. The observation
window is the tail of the turn's input (for chat templates: the end of the user message and
the assistant header), which is the position bias LoopServe avoids.

`budget` counts every input token kept per KV head and layer, the observation window
included (the paper's `max_capacity_prompt`).

This module also holds the SnapKV machinery that AdaKV, PyramidKV and SnapKV-rescored reuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DecodeMethod, register_decode
from ..knobs import check_int_knob as _check_int
from ..attention.decode import view_indices
from .scoring import attention_scores, max_pool


def observation_scores(q: torch.Tensor, layer, ctx, window: int, pool: int) -> tuple[torch.Tensor, int]:
    """SnapKV scores of the keys before the observation window.

    q: (1, H, n, D) post-RoPE queries of the n new rows (the last n resident tokens).
    Returns (scores (H_kv, N - w) float32, max-pooled, w): w = min(window, n) window rows.
    """
    n = q.shape[-2]
    w = min(window, n)
    q_pos = ctx.positions(n, device=q.device)[n - w :]
    scores = attention_scores(q[:, :, n - w :], layer.keys, ctx.scaling, q_pos, layer.positions)
    return max_pool(scores[:, : layer.length - w], pool), w


@register_decode
@dataclass
class SnapKV(DecodeMethod):
    """SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): observation-window scoring, top-B once per prefill."""

    name = "snapkv"
    description = "SnapKV: after each turn's prefill, evict to the top-`budget` keys scored by the last `window` input queries."
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., NeurIPS 2024, arXiv 2404.14469)"

    budget: int = 1024
    window: int = 32
    pool: int = 7

    def validate(self) -> None:
        _check_int(self, "budget", 1)
        _check_int(self, "window", 1)
        _check_int(self, "pool", 1)
        if self.window >= self.budget:
            raise ValueError(f"invalid knob window={self.window}: must be smaller than budget={self.budget}")

    # -- hooks for the variants ------------------------------------------------------------
    def layer_budget(self, ctx, layer_idx: int) -> int:
        """Input tokens kept per KV head in this layer, window included."""
        return self.budget

    def choose(self, ctx, layer_idx: int, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Per KV head, the indices (sorted, (H_kv, M)) of the prefix keys to keep: top-k."""
        return scores.topk(min(k, scores.shape[1]), dim=1).indices.sort(dim=1).values

    def apply(self, layer, keep: torch.Tensor) -> None:
        """SnapKV evicts; SnapKV-rescored overrides this with a view."""
        layer.keep_only(keep)

    # -- selection ---------------------------------------------------------------------------
    def select(self, ctx, layer_idx: int, q: torch.Tensor) -> torch.Tensor | None:
        """Store indices (H_kv, M) to keep, or None when the layer already fits its budget."""
        layer = ctx.cache.layers[layer_idx]
        n_total = layer.length
        budget = self.layer_budget(ctx, layer_idx)
        if n_total <= budget:
            return None
        scores, w = observation_scores(q, layer, ctx, self.window, self.pool)
        prefix = self.choose(ctx, layer_idx, scores, budget - w)
        return view_indices(prefix, n_total - w, n_total)  # and the observation window

    def observe_prefill(self, ctx, layer_idx, q, k) -> None:
        if ctx.q_start + q.shape[-2] < ctx.input_end:
            return  # not the final prefill chunk of this turn
        keep = self.select(ctx, layer_idx, q)
        layer = ctx.cache.layers[layer_idx]
        if keep is not None:
            self.apply(layer, keep)
        ctx.record("kv_kept_tokens", keep.shape[1] if keep is not None else layer.length)
