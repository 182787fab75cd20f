"""Online selection of attention *lines* for sparse prefill (SPEC section 1, Phase 1).

Vocabulary. The n new tokens of a turn are the query rows; row ``r`` sits at absolute
position ``pos_r = N - n + r`` among the N keys (cached history + new tokens) and may
attend keys ``0..pos_r`` (causal). A *vertical line* is a key column ``j``; a *slash
line* is a diagonal of offset ``o = pos_r - j`` (offset 0 is the main diagonal).

Selection, per input and per head:

1. probe rows are sampled uniformly at random over the whole new input (plus the last
   few rows), so the estimate is position-agnostic: a question at the start or in the
   middle of the turn is seen as well as one at the end
   (:func:`~loopserve.attention.probe.probe_rows`);
2. the exact causal attention of the probe rows over all keys is computed
   (:func:`~loopserve.attention.probe.probe_attention`, cost s x N);
3. lines are chosen by greedy maximum coverage of that probe attention until a
   fraction ``alpha`` of its mass is covered (:mod:`loopserve.attention.cover`), on top
   of forced sink columns and local diagonals;
4. the spike pass adds the columns single rows reach for (:mod:`loopserve.attention.spikes`).

The pattern itself is :class:`~loopserve.attention.pattern.LinePattern`.

GQA: by default lines are chosen **per KV head** -- the probe masses of the query heads
that share a KV head are summed and one pattern serves the whole group. The sparse
kernel (:mod:`loopserve.attention.sparse`) gathers each KV head's selected keys/values
once and serves all query heads of the group in the same batched call (each key row
read once for the G heads); per-query-head patterns would multiply the gathers by the
group size and break that batching. ``per_query_head=True`` is available for
comparison (the kernel then runs one query head per pattern head).

Everything here is a pure tensor function: no model code, no transformers. This module
also holds the MInference-style top-k selection the baseline uses.
"""

from __future__ import annotations

import math

import torch

from ..threads import intra_op_threads
from .cover import greedy_cover, raise_row_floor
from .pattern import LinePattern
from .probe import check_shapes, probe_attention, probe_rows
from .spikes import spike_columns

__all__ = ["lines_from_topk", "select_lines"]


def select_lines(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    alpha: float = 0.9,
    n_probe: int | None = None,
    n_last: int = 8,
    sinks: int = 4,
    local: int = 64,
    seed: int = 0,
    probe_idx: torch.Tensor | None = None,
    per_query_head: bool = False,
    scale: float | None = None,
    row_floor: float = 0.0,
    stratified: bool = False,
    spike_tau: float = 0.0,
    spike_stride: int = 8,
    spike_outliers: float = 0.0,
    spike_dilate: int = 0,
    spike_history_only: bool = False,
    spike_row_cap: int = 0,
) -> LinePattern:
    """LoopServe Phase 1 selection: probe rows -> probe attention -> greedy coverage.

    ``q`` is ``(H, n, D)`` (post-RoPE queries of the n new tokens), ``k`` is
    ``(H_kv, N, D)`` (all keys, history first). Lines are chosen per KV head unless
    ``per_query_head``. The first ``sinks`` columns and the ``local`` smallest offsets
    are always included. ``probe_idx`` overrides the random probe rows.

    ``row_floor`` > 0: after the greedy reaches ``alpha`` of the probe mass, more lines
    are added until every probe row has at least that fraction of its own mass covered
    (:func:`~loopserve.attention.cover.raise_row_floor`). ``stratified``: probe rows one per stratum (see
    :func:`probe_rows`). ``spike_tau`` > 0: columns where a row of a grid of every
    ``spike_stride``-th new row (offset by ``seed``) has a spike of attention
    (:func:`spike_columns`; ``spike_history_only``: columns of earlier turns only) join
    the verticals.
    """
    q, k = q.cpu(), k.cpu()  # selection runs on the CPU (native greedy); kernels take the lines anywhere
    H, Hkv, n, N, D = check_shapes(q, k)
    rows = (
        probe_rows(n, n_probe=n_probe, n_last=n_last, seed=seed, stratified=stratified)
        if probe_idx is None
        else torch.as_tensor(probe_idx, dtype=torch.long).unique()
    )
    forced_vertical, forced_slash = torch.arange(min(sinks, N)), torch.arange(min(local, N))
    # One intra-op thread: the probe's small matmuls spread over the budget as separate
    # items (parallel_map) and the greedy is one C call; on a machine shared with other
    # work, threads inside small ops cost far more in barrier waits than they save
    # (measured 10x; see loopserve.threads).
    with intra_op_threads(1):
        A, pos = probe_attention(q, k, rows, per_query_head=per_query_head, scale=scale)
        cover = greedy_cover(A, pos, alpha=alpha, forced_vertical=forced_vertical, forced_slash=forced_slash,
                             causal_zero=True)
        floor_rounds = raise_row_floor(A, pos, cover, row_floor) if row_floor > 0 else 0
    if spike_tau > 0:
        if per_query_head:
            raise ValueError("spike_tau needs per-KV-head patterns")
        spikes = spike_columns(q, k, tau=spike_tau, sinks=sinks, local=local, stride=spike_stride, offset=seed,
                                outliers=spike_outliers, dilate=spike_dilate, history_only=spike_history_only, row_cap=spike_row_cap,
                                scale=scale)
        for h, extra in enumerate(spikes):
            cover.vertical[h, extra] = True
    vertical = [m.nonzero().flatten() for m in cover.vertical]
    slash = [m.nonzero().flatten() for m in cover.slash]
    return LinePattern(
        vertical,
        slash,
        n,
        N,
        per_query_head=per_query_head,
        probe_idx=rows,
        probe_mass=cover.fraction.float(),
        meta={"alpha": alpha, "rounds": cover.rounds, "row_floor_rounds": floor_rounds},
    )


def lines_from_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    n_vertical: int,
    n_slash: int,
    last_q: int = 64,
    sinks: int = 30,
    local: int = 100,
    per_query_head: bool = False,
    scale: float | None = None,
) -> LinePattern:
    """MInference-style vertical-slash baseline.

    Estimates line masses from the attention of the last ``last_q`` new rows only (the
    tail bias LoopServe avoids) and keeps the top ``n_vertical`` columns and top
    ``n_slash`` offsets by raw mass (no marginal gains), plus ``sinks`` forced columns
    and ``local`` forced diagonals (MInference defaults 30 and 100).
    """
    q, k = q.cpu(), k.cpu()  # selection runs on the CPU (native greedy); kernels take the lines anywhere
    H, Hkv, n, N, D = check_shapes(q, k)
    rows = torch.arange(max(0, n - last_q), n)
    A, pos = probe_attention(q, k, rows, per_query_head=per_query_head, scale=scale)
    cols = torch.arange(N)
    key_of = (pos[:, None] - cols[None, :]).clamp_min(0)
    vmass = A.sum(1)
    smass = torch.where(cols[None, :] <= pos[:, None], A.gather(2, key_of.expand_as(A)), 0).sum(1)
    vmass[:, : min(sinks, N)] = math.inf
    smass[:, : min(local, N)] = math.inf
    nv = min(N, n_vertical + min(sinks, N))
    ns = min(N, n_slash + min(local, N))
    vertical = [x.topk(nv).indices for x in vmass]
    slash = [x.topk(ns).indices for x in smass]
    return LinePattern.from_lines(vertical, slash, n, N, per_query_head=per_query_head)
