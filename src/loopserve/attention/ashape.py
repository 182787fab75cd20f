"""A-shape sparse prefill: attention sinks plus a local band (StreamingLLM-style prefill).

Paper: the A-shape pattern of Xiao et al., "Efficient Streaming Language Models with
Attention Sinks" (ICLR 2024, arXiv 2309.17453), as the prefill baseline of MInference (Jiang et
al., NeurIPS 2024, arXiv 2407.02490) and SCBench (Li et al., arXiv 2412.10319). Defaults are
the MInference/SCBench kernel's: 128 initial (sink) columns and a 3968-token local band.

Every new row attends the first `sinks` keys (vertical lines) and the `local` most recent
keys, itself included (slash offsets 0 .. local-1), computed with the Phase 1 sparse kernel
(`sparse_prefill_attention` over a `LinePattern`), one pattern per KV head. When the band
already covers every key the result is dense attention, computed densely.

Multi-turn: the new rows attend the sinks and the band over the resident store (history +
new input). After a KV method has evicted tokens, "sinks" are the first resident tokens and
the band counts resident tokens, not absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import PrefillMethod, register_prefill
from .dense import dense_attention
from .pattern import a_shape_pattern, pattern_density
from .sparse import sparse_prefill_attention
from ..knobs import check_int_knob as _check_int


def a_shape_attention(q, k, v, *, sinks: int, local: int, scaling: float):
    """(out (1, H, n, D), density) of A-shape attention for q (1, H, n, D) over k, v (1, H_kv, N, D)."""
    n, N = q.shape[-2], k.shape[-2]
    if local >= N:
        return dense_attention(q, k, v, scaling), 1.0
    pattern = a_shape_pattern(k.shape[1], n, N, sinks=sinks, local=local)
    out = sparse_prefill_attention(q[0], k[0], v[0], pattern, scale=scaling)
    return out.unsqueeze(0), pattern_density(pattern)


@register_prefill
@dataclass
class AShapePrefill(PrefillMethod):
    """A-shape (StreamingLLM pattern, Xiao et al., arXiv 2309.17453; MInference/SCBench baseline): sinks + local band."""

    name = "ashape"
    description = "A-shape sparse prefill: the first `sinks` key columns plus a local band of `local` diagonals."
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024); A-shape as in MInference/SCBench"

    sinks: int = 128
    local: int = 3968

    def validate(self) -> None:
        _check_int(self, "sinks", 0)
        _check_int(self, "local", 1)

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        out, density = a_shape_attention(q, k, v, sinks=self.sinks, local=self.local, scaling=scaling)
        if ctx is not None:
            ctx.record("prefill_density", density)
        return out
