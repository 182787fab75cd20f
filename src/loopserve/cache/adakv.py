"""AdaKV baseline: SnapKV scores with a per-head adaptive budget inside each layer.

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference" (arXiv 2407.11550), here on top of SnapKV as in the paper.

Per layer the selectable budget is `(budget - window) * H_kv` tokens: every KV head first
keeps its own top `safeguard * (budget - window)` keys (the safeguard of the authors' GQA
release and of kvpress' AdaKVPress), then the rest goes to the highest SnapKV scores over
**all heads of the layer at once**, so heads whose attention is spread out get more tokens
and peaked heads fewer. The observation window is kept in every head, as in SnapKV.

Storage (our choice, documented): the session cache gathers the kept keys into one dense
(H_kv, M, D) tensor, which needs the same count M per head; AdaKV's ragged per-head cache
(a varlen flash-attention kernel in the paper) has no CPU equivalent here and masking would
need a different attention kernel. So each head keeps its adaptively chosen keys and is then
**padded up to the largest head's count with its own next-best keys**. The padding is real
KV that decoding attends to, so the stats report both sizes honestly, per layer:
`adakv_logical_tokens` (mean chosen per head, window included: equals `budget`) and
`adakv_physical_tokens` (what is stored and attended per head: `kv_kept_tokens`, also the
session's `kv_tokens`). Compare quality at equal *physical* size when it matters.

Multi-turn: like SnapKV, it evicts after every turn's prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register_decode
from .snapkv import SnapKV


@register_decode
@dataclass
class AdaKV(SnapKV):
    """AdaKV (Feng et al., arXiv 2407.11550): SnapKV scores, budget shared adaptively across a layer's heads."""

    name = "adakv"
    description = "AdaKV: SnapKV scores with the layer's budget shared adaptively across KV heads (per-head counts differ)."
    paper = "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (Feng et al., arXiv 2407.11550)"

    safeguard: float = 0.2  # fraction of (budget - window) every head keeps from its own top scores

    def __post_init__(self):
        self.last_counts: dict[int, torch.Tensor] = {}  # layer -> chosen keys per head (before padding)

    def validate(self) -> None:
        super().validate()
        s = self.safeguard
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
            raise ValueError(f"invalid knob safeguard={s!r}: must be a number in [0, 1]")

    def allocate(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Bool (H_kv, P): the adaptively chosen keys, exactly k * H_kv of them (k per head on average)."""
        h, p = scores.shape
        k = min(k, p)
        chosen = torch.zeros(h, p, dtype=torch.bool, device=scores.device)
        if k == 0:
            return chosen
        ranked = scores.float().clone()
        n_safe = min(int(k * float(self.safeguard)), k)
        if n_safe:
            ranked.scatter_(1, ranked.topk(n_safe, dim=1).indices, float("inf"))
        flat = ranked.flatten().topk(k * h).indices
        chosen.view(-1)[flat] = True
        return chosen

    def choose(self, ctx, layer_idx, scores, k):
        chosen = self.allocate(scores, k)
        counts = chosen.sum(dim=1)
        m = int(counts.max()) if counts.numel() else 0
        # Pad every head to the largest count with its own next-best keys (see module docstring).
        ranked = scores.float().masked_fill(chosen, float("inf"))
        keep = ranked.topk(m, dim=1).indices.sort(dim=1).values
        w = ctx.cache.layers[layer_idx].length - scores.shape[1]  # observation window rows
        self.last_counts[layer_idx] = counts.cpu()
        ctx.record("adakv_logical_tokens", float(counts.float().mean()) + w)
        ctx.record("adakv_physical_tokens", m + w)
        return keep
