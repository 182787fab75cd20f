"""Phase 1 of LoopServe: online selection of attention lines and sparse prefill attention.

See :mod:`loopserve.attention.lines` (which lines, chosen how: probe rows in
:mod:`~loopserve.attention.probe`, greedy coverage in :mod:`~loopserve.attention.cover`,
the spike pass in :mod:`~loopserve.attention.spikes`, the pattern in
:mod:`~loopserve.attention.pattern`) and
:mod:`loopserve.attention.sparse` (the CPU kernel that computes attention on them).
"""

from .cover import CoverResult, greedy_cover
from .lines import lines_from_topk, select_lines
from .pattern import LinePattern, a_shape_pattern, pattern_density, pattern_mask
from .probe import attention_recall, probe_attention, probe_rows
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
