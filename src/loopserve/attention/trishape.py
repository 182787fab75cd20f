"""Tri-shape sparse prefill: A-shape plus dense attention for the last rows.

Paper: Li et al., "SCBench: A KV Cache-Centric Analysis of Long-Context Methods" (ICLR 2025,
arXiv 2412.10319), which introduces Tri-shape: the A-shape pattern (sinks + local band) for
every row except the last `dense_last` rows, which attend densely to every key. The last rows
are the ones the first generated token (and SnapKV-style observation windows) depend on.
Defaults follow the MInference/SCBench kernel: 128 sinks, 3968-token band, 100 dense rows.

The A-shape part runs on the Phase 1 sparse kernel; the dense rows on SDPA. Inputs of at
most `dense_last` rows are dense throughout.

Multi-turn: as A-shape, over the resident store (history + new input); the dense rows attend
the whole resident history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import check_int_knob as _check_int
from .ashape import a_shape_attention
from .base import PrefillMethod, register_prefill
from .dense import dense_attention
from .pattern import causal_cells


@register_prefill
@dataclass
class TriShapePrefill(PrefillMethod):
    """Tri-shape (SCBench, Li et al., arXiv 2412.10319): A-shape plus dense attention for the last `dense_last` rows."""

    name = "trishape"
    description = "Tri-shape sparse prefill: A-shape (`sinks` + `local` band) plus dense attention for the last `dense_last` rows."
    paper = "SCBench: A KV Cache-Centric Analysis of Long-Context Methods (Li et al., ICLR 2025, arXiv 2412.10319)"

    sinks: int = 128
    local: int = 3968
    dense_last: int = 100

    def validate(self) -> None:
        _check_int(self, "sinks", 0)
        _check_int(self, "local", 1)
        _check_int(self, "dense_last", 1)

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        n, N = q.shape[-2], k.shape[-2]
        last = self.dense_last
        if n <= last or self.local >= N:
            out, density = dense_attention(q, k, v, scaling), 1.0
        else:
            # Rows 0 .. n-last-1 only see keys 0 .. N-last-1, so the A-shape part runs on that prefix.
            head, d_head = a_shape_attention(
                q[:, :, : n - last], k[:, :, : N - last], v[:, :, : N - last],
                sinks=self.sinks, local=self.local, scaling=scaling,
            )
            tail = dense_attention(q[:, :, n - last :], k, v, scaling)
            out = torch.cat([head, tail], dim=2)
            off = N - n
            cells_head, cells_all = causal_cells(n - last, off), causal_cells(n, off)
            density = (d_head * cells_head + (cells_all - cells_head)) / cells_all
        if ctx is not None:
            ctx.record("prefill_density", density)
        return out
