"""LoopServe Phase 1: online vertical-slash sparsification of every turn's prefill.

For each layer and each turn, `select_lines` samples probe rows spread over the whole new
input, computes their exact attention over every key (history + new), and greedily picks
the vertical/slash lines that cover `alpha` of that mass; `sparse_prefill_attention` then
computes exact softmax attention of all new rows over just those cells, except the last
`dense_last` rows, which attend densely (the answer is generated from them). Lines are chosen
per KV head (see attention/lines.py for why). Below `min_keys` keys or `min_new` new rows
the selection costs more than it saves, so attention stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..knobs import check_int_knob
from .base import PrefillMethod, register_prefill
from .dense import dense_attention
from .lines import select_lines
from .pattern import LinePattern, causal_cells, pattern_density
from .probe import attention_recall
from .spikes import outlier_rows
from .sparse import sparse_prefill_attention


def exact_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, scale: float,
                         chunk: int = 64) -> torch.Tensor:
    """Causal softmax attention of some rows: q ``(G, r, D)`` of one KV head's query heads,
    the rows at absolute positions ``pos`` ``(r,)``, over k/v ``(N, D)``. Returns ``(G, r, D)``."""
    out = torch.empty_like(q)
    cols = torch.arange(k.shape[0])
    for a in range(0, q.shape[1], chunk):
        scores = (q[:, a : a + chunk] @ k.T) * scale
        scores.masked_fill_(cols[None, None, :] > pos[a : a + chunk, None][None], float("-inf"))
        out[:, a : a + chunk] = torch.softmax(scores, -1) @ v
    return out


@register_prefill
@dataclass
class LoopServePrefill(PrefillMethod):
    name = "loopserve"
    description = "LoopServe Phase 1: per-input vertical/slash lines by greedy coverage of probe-row attention."
    paper = "LoopServe (arXiv 2507.13681), online prefill sparsification"

    # The share of the probe rows' attention mass the lines cover. SPEC's 0.9 leaves every row
    # a small part of its mass short at every layer, and with the question inside a long
    # turn that diffuse loss can flip whether the model answers or summarises; 0.95 keeps
    # answers measurably closer to dense's for a little more density (docs/benchmarks.md).
    alpha: float = 0.95
    probe: int = 64  # minimum probe rows; 2% of the new rows when that is more
    sinks: int = 4
    local: int = 64
    min_keys: int = 2048  # dense below this many keys (where sparse pays: docs/benchmarks.md, "Where sparse prefill starts to pay")
    # Dense for fewer new rows than this: below it the probe rows and the dense last rows
    # are a quarter of the rows or more, and sparse was measured slower than dense
    # (docs/benchmarks.md, "Where sparse prefill starts to pay").
    min_new: int = 512
    seed: int = 0
    recall_rows: int = 0  # >0: measure recall on this many held-out rows (diagnostics only)
    # Every probe row gets at least this fraction of its own mass covered (0: off), on top
    # of alpha of the total: see lines.select_lines.
    row_floor: float = 0.0
    stratified: int = 0  # 1: probe rows one per stratum of the input instead of uniform
    # The spike pass (spikes.spike_columns): probe rows alone miss a question's rows that
    # reach back to an earlier turn's fact, because those columns carry little of the
    # probes' summed mass. The rows least like the rest (`spike_outliers`) are tested
    # exactly against every key; a column where one of them puts at least `spike_tau` of
    # the mass of its sinks + local window joins the verticals, with `spike_dilate`
    # neighbours on each side (a fact spans several tokens). Testing earlier turns' keys
    # only (`spike_history_only=1`) makes a first turn free but answers drift further from
    # dense's over a conversation; a dense grid of rows (`spike_stride`) costs more than the
    # sparse prefill saves (docs/benchmarks.md, "Answer quality across turns").
    # spike_tau=0 turns the pass off.
    spike_tau: float = 0.1
    spike_stride: int = 0  # >0: also test every spike_stride-th row (0: outlier rows and the last row)
    spike_outliers: float = 0.05  # fraction of rows tested: the queries farthest from their group's mean
    spike_dilate: int = 3  # also keep this many columns on each side of a spike column
    spike_history_only: int = 0  # 1: test only earlier turns' keys (a first turn pays nothing)
    # A tested row with more spike columns than this is diffuse (not reaching for a fact): it
    # adds only that many of its strongest columns, not widened (0: no cap).
    spike_row_cap: int = 0
    # 1: the rows the spike pass tests (`spike_outliers`, the queries least like the rest,
    # such as a question's) also attend densely, wherever they sit in the input.
    dense_outliers: int = 0
    # The rows nearest the answer decide its first tokens (TriShape's observation, SCBench):
    # the last `dense_last` new rows attend densely, at dense_last / n of dense attention's
    # cost; `dense_first` does the same for the first rows.
    dense_last: int = 64
    dense_first: int = 0
    # Whole layers that attend densely: the first `dense_first_layers` (a miss there changes
    # the hidden states, so the keys and values, of every later layer, and the next turns
    # read them from the cache) and the last `dense_last_layers` (where the selection keeps
    # least of a question's mass).
    dense_first_layers: int = 0
    dense_last_layers: int = 0

    def validate(self) -> None:
        if not isinstance(self.alpha, (int, float)) or not (0.0 < float(self.alpha) <= 1.0):
            raise ValueError(f"invalid knob alpha={self.alpha!r}: must be in (0, 1]")
        if not isinstance(self.row_floor, (int, float)) or not (0.0 <= float(self.row_floor) <= 1.0):
            raise ValueError(f"invalid knob row_floor={self.row_floor!r}: must be in [0, 1]")
        if not isinstance(self.spike_outliers, (int, float)) or not (0.0 <= float(self.spike_outliers) <= 1.0):
            raise ValueError(f"invalid knob spike_outliers={self.spike_outliers!r}: must be in [0, 1]")
        if not isinstance(self.spike_tau, (int, float)) or not (0.0 <= float(self.spike_tau) < 1.0):
            raise ValueError(f"invalid knob spike_tau={self.spike_tau!r}: must be in [0, 1)")
        for knob in ("stratified", "spike_history_only", "dense_outliers"):
            if getattr(self, knob) not in (0, 1):
                raise ValueError(f"invalid knob {knob}={getattr(self, knob)!r}: must be 0 or 1")
        for knob in ("probe", "sinks", "local", "min_keys", "min_new", "seed", "recall_rows", "dense_last", "dense_first",
                     "spike_row_cap", "dense_first_layers", "dense_last_layers"):
            check_int_knob(self, knob, 0)
        check_int_knob(self, "spike_stride", 0)
        check_int_knob(self, "spike_dilate", 0)

    def attends_densely(self, n_new: int, n_total: int) -> bool:
        """Whether `n_new` new rows over `n_total` keys attend densely (below `min_keys` keys
        or `min_new` new rows, where sparse does not pay)."""
        return n_total < self.min_keys or n_new < self.min_new

    def chunkable_turn(self, n_new: int, n_total: int) -> bool:
        # Such a turn attends densely in every layer, and so does each chunk of it (no chunk
        # has more keys or rows than the turn).
        return self.attends_densely(n_new, n_total)

    def select(self, q: torch.Tensor, k: torch.Tensor, *, layer_idx: int, scaling: float) -> LinePattern:
        """The lines this layer's sparse rows attend over (q ``(1, H, n, D)``, k ``(1, H_kv, N, D)``)."""
        n_probe = max(self.probe, math.ceil(0.02 * q.shape[-2]))
        return select_lines(
            q[0], k[0], alpha=float(self.alpha), n_probe=n_probe, sinks=self.sinks, local=self.local,
            seed=self.seed + layer_idx, scale=scaling, row_floor=float(self.row_floor),
            stratified=bool(self.stratified), spike_tau=float(self.spike_tau), spike_stride=self.spike_stride,
            spike_outliers=float(self.spike_outliers), spike_dilate=self.spike_dilate,
            spike_history_only=bool(self.spike_history_only), spike_row_cap=self.spike_row_cap,
        )

    def attend(self, q, k, v, *, layer_idx, scaling, ctx):
        n, N = q.shape[-2], k.shape[-2]
        dense_layer = layer_idx < self.dense_first_layers or (
            self.dense_last_layers > 0 and ctx.num_layers > 0 and layer_idx >= ctx.num_layers - self.dense_last_layers)
        if self.attends_densely(n, N) or dense_layer:
            ctx.record("prefill_density", 1.0)
            return dense_attention(q, k, v, scaling)
        pattern = self.select(q, k, layer_idx=layer_idx, scaling=scaling)
        # Phase 2 starts decoding from these position-agnostic probe rows.
        ctx.layer_state[layer_idx]["probe_rows"] = pattern.probe_idx
        out = sparse_prefill_attention(q[0], k[0], v[0], pattern, scale=scaling)
        density, off = pattern_density(pattern), N - n
        cells = causal_cells(n, off)
        # Rows attended densely: their cells count as computed (the pattern's density on
        # them is taken as the average, an estimate).
        if self.dense_last:
            t = min(self.dense_last, n)
            out[:, n - t:] = dense_attention(q[:, :, n - t:], k, v, scaling)[0]
            density += (1.0 - density) * causal_cells(t, N - t) / cells
        if self.dense_outliers and self.spike_outliers > 0:
            g, rows_done = q.shape[1] // k.shape[1], 0
            for h in range(k.shape[1]):
                heads = slice(h * g, (h + 1) * g)
                rows = outlier_rows(q[0, heads], float(self.spike_outliers))
                out[heads, rows] = exact_rows_attention(q[0, heads, rows], k[0, h], v[0, h], off + rows, scaling)
                rows_done += len(rows)
            # (each outlier row taken as seeing about N keys)
            density += (1.0 - density) * min(1.0, rows_done / k.shape[1] * N / cells)
        if self.dense_first:
            f = min(self.dense_first, n)
            out[:, :f] = dense_attention(q[:, :, :f], k[:, :, : off + f], v[:, :, : off + f], scaling)[0]
            density += (1.0 - density) * causal_cells(f, off) / cells
        ctx.record("prefill_density", density)
        ctx.record("probe_mass", float(pattern.probe_mass.mean()))
        if self.recall_rows:
            g = torch.Generator().manual_seed(self.seed + 7919 * (layer_idx + 1))
            held = torch.ones(n, dtype=torch.bool)
            held[pattern.probe_idx] = False
            candidates = held.nonzero().flatten()
            rows = candidates[torch.randperm(len(candidates), generator=g)[: self.recall_rows]]
            if len(rows):
                ctx.record("recall", attention_recall(q[0], k[0], pattern, rows, scale=scaling))
        return out.unsqueeze(0)
