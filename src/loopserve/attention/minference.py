"""MInference vertical-slash sparse prefill: lines estimated from the last 64 queries.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention" (NeurIPS 2024, arXiv 2407.02490), its `vertical_and_slash` pattern.

Per head, the attention of the last `last_q` new rows over all keys is computed exactly;
column sums give vertical masses and diagonal sums slash masses. The top `vertical_size`
columns and top `slash_size` diagonals by **raw** mass are kept (no marginal gains, no mass
target), and the first `sinks` = 30 columns and the `local` = 100 nearest diagonals are
always among them (MInference sets their mass to +inf before its top-k, so they count inside
the two sizes). Attention over those lines runs on the Phase 1 sparse kernel.

Defaults are MInference's default head pattern ("vertical_and_slash", 1000, 6096), the one its
code uses for any head without a searched config; like MInference, the sizes are capped at
the number of keys, so short inputs keep everything (dense, computed densely). Note that on
contexts of at most 8k tokens 6096 slashes are close to dense: pass smaller sizes to study
sparser operating points. Lines are chosen per **query head** (`per_query_head=True`,
MInference repeats K/V across a GQA group and searches per attention head);
`per_query_head=False` shares one pattern per KV head, like LoopServe's Phase 1.

Multi-turn: the new rows attend history + new input; the estimate comes from the last
`last_q` rows of the *new* input (the tail bias LoopServe avoids).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..knobs import check_int_knob as _check_int
from .base import PrefillMethod, register_prefill
from .dense import dense_attention
from .lines import lines_from_topk
from .pattern import LinePattern, pattern_density
from .sparse import sparse_prefill_attention


@register_prefill
@dataclass
class MInferencePrefill(PrefillMethod):
    """MInference (Jiang et al., NeurIPS 2024, arXiv 2407.02490): vertical-slash lines from the last 64 queries."""

    name = "minference"
    description = "MInference vertical-slash prefill: top-k columns/diagonals by raw mass of the last `last_q` queries (+30 sinks, 100 local)."
    paper = "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention (Jiang et al., NeurIPS 2024)"

    vertical_size: int = 1000  # columns per head, forced sinks included
    slash_size: int = 6096  # diagonals per head, forced local diagonals included
    last_q: int = 64
    sinks: int = 30
    local: int = 100
    per_query_head: bool = True

    def validate(self) -> None:
        for knob in ("vertical_size", "slash_size", "last_q"):
            _check_int(self, knob, 1)
        for knob in ("sinks", "local"):
            _check_int(self, knob, 0)
        if not isinstance(self.per_query_head, bool):
            raise ValueError(f"invalid knob per_query_head={self.per_query_head!r}: must be true or false")

    def pattern(self, q, k, scaling) -> LinePattern:
        """The vertical-slash pattern for q (H, n, D) over k (H_kv, N, D)."""
        N = k.shape[-2]
        n_sinks, n_local = min(self.sinks, N), min(self.local, N)
        return lines_from_topk(
            q, k,
            n_vertical=max(self.vertical_size - n_sinks, 0),
            n_slash=max(self.slash_size - n_local, 0),
            last_q=self.last_q, sinks=self.sinks, local=self.local,
            per_query_head=self.per_query_head, scale=scaling,
        )

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        N = k.shape[-2]
        if min(max(self.slash_size, self.local), N) >= N:
            out, density = dense_attention(q, k, v, scaling), 1.0  # every diagonal kept: dense
        else:
            pattern = self.pattern(q[0], k[0], scaling)
            out = sparse_prefill_attention(q[0], k[0], v[0], pattern, scale=scaling).unsqueeze(0)
            density = pattern_density(pattern)
        if ctx is not None:
            ctx.record("prefill_density", density)
        return out
