"""Phase 1 of LoopServe: online selection of attention lines and sparse prefill attention.

See :mod:`loopserve.attention.lines` (which lines, chosen how) and
:mod:`loopserve.attention.sparse` (the CPU kernel that computes attention on them).
"""

from .lines import (
    CoverResult,
    LinePattern,
    a_shape_pattern,
    attention_recall,
    greedy_cover,
    lines_from_topk,
    pattern_density,
    pattern_mask,
    probe_attention,
    probe_rows,
    select_lines,
)
from .sparse import dense_prefill_attention, sparse_prefill_attention

__all__ = [
    "CoverResult",
    "LinePattern",
    "a_shape_pattern",
    "attention_recall",
    "dense_prefill_attention",
    "greedy_cover",
    "lines_from_topk",
    "pattern_density",
    "pattern_mask",
    "probe_attention",
    "probe_rows",
    "select_lines",
    "sparse_prefill_attention",
]
