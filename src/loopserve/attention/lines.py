"""Online selection of attention *lines* for sparse prefill (SPEC section 1, Phase 1).

Vocabulary. The n new tokens of a turn are the query rows; row ``r`` sits at absolute
position ``pos_r = N - n + r`` among the N keys (cached history + new tokens) and may
attend keys ``0..pos_r`` (causal). A *vertical line* is a key column ``j``; a *slash
line* is a diagonal of offset ``o = pos_r - j`` (offset 0 is the main diagonal).

Selection, per input and per head:

1. probe rows are sampled uniformly at random over the whole new input (plus the last
   few rows), so the estimate is position-agnostic: a question at the start or in the
   middle of the turn is seen as well as one at the end (:func:`probe_rows`);
2. the exact causal attention of the probe rows over all keys is computed
   (:func:`probe_attention`, cost s x N);
3. lines are chosen by greedy maximum coverage of that probe attention until a
   fraction ``alpha`` of its mass is covered (:func:`greedy_cover`), on top of forced
   sink columns and local diagonals.

GQA: by default lines are chosen **per KV head** -- the probe masses of the query heads
that share a KV head are summed and one pattern serves the whole group. The sparse
kernel (:mod:`loopserve.attention.sparse`) gathers each KV head's selected keys/values
once and serves all query heads of the group in the same batched call (each key row
read once for the G heads); per-query-head patterns would multiply the gathers by the
group size and break that batching. ``per_query_head=True`` is available for
comparison (the kernel then runs one query head per pattern head).

Everything here is a pure tensor function: no model code, no transformers.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from ..native import native_kernels
from ..threads import intra_op_threads, parallel_map

__all__ = [
    "CoverResult",
    "LinePattern",
    "a_shape_pattern",
    "attention_recall",
    "greedy_cover",
    "lines_from_topk",
    "pattern_density",
    "pattern_mask",
    "probe_attention",
    "probe_rows",
    "row_coverage",
    "select_lines",
    "spike_columns",
    "spike_rows",
]


# --------------------------------------------------------------------------------------
# Pattern container
# --------------------------------------------------------------------------------------


@dataclass
class LinePattern:
    """The selected lines of one attention layer for one input of ``n`` new rows over ``N`` keys.

    ``vertical[h]`` holds the sorted key indices (0..N-1) and ``slash[h]`` the sorted
    offsets (0..N-1) chosen for pattern head ``h``. Pattern heads are KV heads
    (``per_query_head=False``, the default: one pattern shared by the query heads of a
    GQA group) or query heads (``per_query_head=True``).

    Diagnostics from the selection: ``probe_idx`` (the probe rows, indices into the new
    rows) and ``probe_mass`` (per head, fraction of the probe attention mass covered).
    """

    vertical: list[torch.Tensor]
    slash: list[torch.Tensor]
    n: int
    N: int
    per_query_head: bool = False
    probe_idx: torch.Tensor | None = None
    probe_mass: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.vertical) != len(self.slash):
            raise ValueError("vertical and slash must have one entry per head")
        if not 0 < self.n <= self.N:
            raise ValueError(f"need 0 < n <= N, got n={self.n}, N={self.N}")

    @property
    def n_heads(self) -> int:
        return len(self.vertical)

    @classmethod
    def from_lines(
        cls,
        vertical_per_head,
        slash_per_head,
        n: int,
        N: int,
        *,
        per_query_head: bool = False,
        **diagnostics,
    ) -> "LinePattern":
        """Build a pattern from explicit lines (baselines, tests, hand-made patterns).

        Each entry may be any integer sequence; it is de-duplicated, sorted and clipped
        to the valid range (keys ``0..N-1``, offsets ``0..N-1``).
        """

        def clean(lines) -> torch.Tensor:
            t = torch.as_tensor(lines, dtype=torch.long).flatten()
            t = t[(t >= 0) & (t < N)]
            return torch.unique(t)  # sorted

        vertical = [clean(x) for x in vertical_per_head]
        slash = [clean(x) for x in slash_per_head]
        return cls(vertical, slash, n, N, per_query_head=per_query_head, **diagnostics)

    def padded(self, sentinel: int = -1):
        """Padded form ``(vertical, vertical_valid, slash, slash_valid)``.

        ``vertical`` is ``(heads, nv_max)`` with ``sentinel`` in unused slots and
        ``vertical_valid`` the matching bool mask; same for slashes.
        """

        def pad(lines: list[torch.Tensor]):
            width = max((len(x) for x in lines), default=0)
            out = torch.full((len(lines), width), sentinel, dtype=torch.long)
            valid = torch.zeros((len(lines), width), dtype=torch.bool)
            for h, x in enumerate(lines):
                out[h, : len(x)] = x
                valid[h, : len(x)] = True
            return out, valid

        return (*pad(self.vertical), *pad(self.slash))

    def num_lines(self) -> torch.Tensor:
        """Lines per head (verticals + slashes)."""
        return torch.tensor([len(v) + len(s) for v, s in zip(self.vertical, self.slash)])


# --------------------------------------------------------------------------------------
# Probe rows and probe attention
# --------------------------------------------------------------------------------------


def probe_rows(
    n: int,
    *,
    n_probe: int | None = None,
    n_last: int = 8,
    seed: int = 0,
    min_probe: int = 64,
    frac: float = 0.02,
    stratified: bool = False,
) -> torch.Tensor:
    """RandomSelect: the probe rows (sorted indices into the ``n`` new rows).

    ``s = max(min_probe, ceil(frac * n))`` rows (or ``n_probe``) drawn uniformly without
    replacement from the whole input, so the probe is position-agnostic, plus the last
    ``n_last`` rows (the first generated token attends from there). If the input is not
    larger than that, every row is a probe row. Deterministic for a given seed.

    ``stratified``: one row drawn uniformly from each of ``s`` equal consecutive strata
    instead: still uniform per row, but no stretch of the input longer than two strata
    goes unprobed (a question anywhere in the turn is probed as often as its length
    deserves, never by luck alone).
    """
    s = n_probe if n_probe is not None else max(min_probe, math.ceil(frac * n))
    n_last = min(max(n_last, 0), n)
    if n <= s + n_last:
        return torch.arange(n)
    head = n - n_last  # the random part never duplicates the forced tail
    g = torch.Generator().manual_seed(int(seed))
    if stratified:
        edges = torch.linspace(0, head, s + 1).long()
        width = (edges[1:] - edges[:-1]).clamp_min(1)
        sample = (edges[:-1] + (torch.rand(s, generator=g) * width).long().clamp_max(width - 1)).unique()
    else:
        sample = torch.randperm(head, generator=g)[:s].sort().values
    return torch.cat([sample, torch.arange(head, n)])


def _check_shapes(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError("expected q (H, n, D) and k (H_kv, N, D)")
    H, n, D = q.shape
    Hkv, N, Dk = k.shape
    if Dk != D or H % Hkv or n > N:
        raise ValueError(f"incompatible shapes q={tuple(q.shape)} k={tuple(k.shape)}")
    return H, Hkv, n, N, D


def probe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    *,
    per_query_head: bool = False,
    scale: float | None = None,
    group: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact causal attention of the probe rows over all N keys, in fp32.

    Returns ``(A, pos)``: ``A`` is ``(B, s, N)`` with B = H_kv (query heads of a group
    summed, so each row of a head sums to the group size) or B = H if
    ``per_query_head``; ``pos`` is the absolute position of each probe row. Rows are
    returned in ascending order (``rows`` is sorted first).
    """
    H, Hkv, n, N, D = _check_shapes(q, k)
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    rows = torch.as_tensor(rows, dtype=torch.long).sort().values
    pos = (N - n) + rows
    s = len(rows)
    A = torch.empty(H if per_query_head else Hkv, s, N)
    # A group of rows at a time: a group only needs the keys up to its last row (about
    # 2/3 of the work without history), and its scores stay small. Groups and heads are
    # independent items for the worker threads (each writes its own block of A).

    def attend(item: tuple[int, int]) -> None:
        a, h = item
        b = min(s, a + group)
        end = int(pos[b - 1]) + 1
        first = int(pos[a]) + 1  # keys before this are causal for every row of the group
        qp = q[h * G : (h + 1) * G, rows[a:b]].float().reshape(-1, D)
        sc = (qp @ k[h, :end].float().T).mul_(scale).view(G, b - a, end)
        sc[:, :, first:].masked_fill_(torch.arange(first, end)[None, :] > pos[a:b, None], float("-inf"))
        sc = torch.softmax(sc, dim=-1)
        if per_query_head:
            A[h * G : (h + 1) * G, a:b, :end] = sc
            A[h * G : (h + 1) * G, a:b, end:] = 0.0
        else:
            torch.sum(sc, 0, out=A[h, a:b, :end])
            A[h, a:b, end:] = 0.0

    parallel_map(attend, [(a, h) for a in range(0, s, group) for h in range(Hkv)])
    return A, pos


# --------------------------------------------------------------------------------------
# Greedy maximum coverage
# --------------------------------------------------------------------------------------


@dataclass
class CoverResult:
    """Outcome of :func:`greedy_cover` for B heads.

    ``vertical`` / ``slash`` are bool masks ``(B, N)`` of chosen columns / offsets
    (forced lines included). ``covered`` and ``total`` are the covered and total probe
    mass per head. ``picks[b]`` lists the lines in the order they were taken,
    ``(kind, index)`` with kind 0 = vertical, 1 = slash, forced lines first, and
    ``gains[b]`` their marginal gains at the time. ``rounds`` counts greedy rounds
    (type alternations).
    """

    vertical: torch.Tensor
    slash: torch.Tensor
    covered: torch.Tensor
    total: torch.Tensor
    picks: list[torch.Tensor]
    gains: list[torch.Tensor]
    n_forced: list[int]
    rounds: int

    @property
    def fraction(self) -> torch.Tensor:
        return self.covered / self.total.clamp_min(torch.finfo(torch.float64).tiny)


def greedy_cover(
    A: torch.Tensor,
    pos: torch.Tensor,
    *,
    alpha: float | None = 0.9,
    max_lines: int | None = None,
    forced_vertical=None,
    forced_slash=None,
    eps: float = 1e-12,
) -> CoverResult:
    """Greedy maximum coverage of a probe attention matrix by vertical and slash lines.

    ``A`` is ``(s, N)`` or ``(B, s, N)`` (non-negative; entries above the causal
    diagonal ``j > pos[r]`` are ignored) and ``pos`` the absolute position of each of the
    ``s`` rows. Forced lines are taken first; then lines with the largest *marginal*
    mass are added until the covered mass reaches ``alpha`` of the total (``alpha=None``:
    no mass target), ``max_lines`` non-forced lines have been taken, or no line has a
    marginal gain above ``eps`` (relative to the total).

    This is exact greedy, batched. Two verticals never share a cell, nor do two
    slashes; a vertical ``j`` and a slash ``o`` share exactly the cell of the row with
    ``pos_r - j == o``. So taking a vertical changes only slash gains (they only drop)
    and vice versa. Each round takes, in gain order, the leading run of the candidate
    list sorted by current gain: all lines of the leading kind whose gain is at least
    the best gain of the other kind. Their gains are exact (same kind, no interaction)
    and every line of the other kind has gain at most the next one's, which only goes
    down as the run is taken -- precisely the choices one-at-a-time greedy makes. The
    run is cut where ``alpha`` (or ``max_lines``) is reached, the other kind's gains are
    updated with one vectorised scatter, and the next round starts. Rounds = kind
    alternations, from a few dozen to several hundred on real activations. Gains are
    fp64. Where the native kernels of :mod:`loopserve.native` build, the rounds
    run in C (the same rule; a lazy heap per kind, so a round costs the lines it takes,
    not a scan of all gains); otherwise on numpy views (~40 small numpy ops, ~150-300 us
    a round on the 2-core box).
    """
    with intra_op_threads(1):  # hundreds of tiny ops: no gain from threads (see helper)
        return _greedy_cover(A, pos, alpha, max_lines, forced_vertical, forced_slash, eps)


def _greedy_cover(
    A, pos, alpha, max_lines, forced_vertical, forced_slash, eps, causal_zero: bool = False
) -> CoverResult:
    """:func:`greedy_cover`; ``causal_zero``: A is already 0 above the diagonal (probe output)."""
    squeeze = A.dim() == 2
    if squeeze:
        A = A[None]
    B, s, N = A.shape
    pos = torch.as_tensor(pos, dtype=torch.long)
    if pos.shape != (s,):
        raise ValueError("pos must hold one position per row of A")
    if int(pos.max()) >= N or int(pos.min()) < 0:
        raise ValueError("row positions must lie in 0..N-1")

    A = A.float().cpu().contiguous()  # the rounds run on the CPU (numpy or C)
    pos = pos.cpu().contiguous()
    cols = torch.arange(N)
    rows = torch.arange(s)
    native = native_kernels()  # its C greedy (native/greedy_cover.c) replaces the numpy rounds
    # gain[b, 0, j]: marginal mass of vertical j; gain[b, 1, o]: of slash o (-inf once taken).
    # Initial masses are accumulated in fp64 (so that a fully covered line ends near 1e-16,
    # not at fp32 round-off; the C and torch sums add in different orders, so they agree
    # to rounding). Slash o of row r is the cell (r, pos_r - o).
    gain = torch.zeros(B, 2, N, dtype=torch.float64)
    if native is not None:
        native.greedy_line_mass(A.data_ptr(), pos.data_ptr(), B, s, N, gain.data_ptr())
    else:
        for a in range(0, s, 16):  # a few rows at a time keeps temporaries small
            p = pos[a : a + 16, None]
            chunk = A[:, a : a + 16] if causal_zero else A[:, a : a + 16].masked_fill(cols[None, :] > p, 0.0)
            gain[:, 0] += chunk.sum(1, dtype=torch.float64)
            by_offset = chunk.gather(2, (p - cols[None, :]).clamp_min(0).expand(B, -1, N))
            gain[:, 1] += by_offset.masked_fill(cols[None, :] > p, 0.0).sum(1, dtype=torch.float64)
    # The rounds are many tiny steps on (B, 2, N) arrays: numpy on zero-copy views costs
    # ~1 us per step where a torch op costs ~5-10 us.
    gain_np = gain.numpy()
    A_np = A.numpy()
    pos_np = pos.numpy()
    total = gain_np[:, 0].sum(1)
    tol = eps * np.maximum(total, np.finfo(np.float64).tiny)
    covered = np.zeros(B)
    chosen = np.zeros((B, 2, N), dtype=bool)
    flat_gain, flat_chosen = gain_np.reshape(-1), chosen.reshape(-1)
    rows_np = np.arange(s)
    log: list[tuple[np.ndarray, ...]] = []

    def take(b: np.ndarray, kind: np.ndarray, x: np.ndarray) -> None:
        """Take lines ``x`` of kinds ``kind`` (0 vertical, 1 slash) in heads ``b``."""
        own = (b * 2 + kind) * N + x
        g = np.maximum(flat_gain[own], 0.0)
        log.append((b, kind, x, g))
        covered[:] += np.bincount(b, weights=g, minlength=B)
        flat_gain[own] = -np.inf  # never taken again
        flat_chosen[own] = True
        # Vertical j meets slash pos_r - j in row r; slash o meets vertical pos_r - o: in
        # both cases the other line is pos_r - x, and the cell is causal iff that is >= 0.
        # The cell's mass no longer counts for the other line.
        other_x = pos_np[None, :] - x[:, None]  # (m, s)
        causal = other_x >= 0
        other_x = np.maximum(other_x, 0)
        key = np.where(kind[:, None] == 0, x[:, None], other_x)  # the cell's key column
        cells = np.where(causal, A_np[b[:, None], rows_np[None, :], key], 0.0)
        other = ((b * 2 + 1 - kind) * N)[:, None] + other_x
        # Only the touched gains change (a round takes few lines: far fewer cells than
        # gains). One line's cells hit distinct lines; lines of one call may share some,
        # so their cells are summed per target first (as a full bincount would).
        idx, w = other[causal], cells[causal]
        if len(x) > 1:
            idx, inv = np.unique(idx, return_inverse=True)
            w = np.bincount(inv, weights=w)
        flat_gain[idx] -= w

    def take_forced(kind: int, lines) -> int:
        if lines is None:
            return 0
        x = torch.as_tensor(lines, dtype=torch.long).flatten()
        x = torch.unique(x[(x >= 0) & (x < N)]).numpy()
        if len(x):
            b = np.repeat(np.arange(B), len(x))
            take(b, np.full_like(b, kind), np.tile(x, B))
        return len(x)

    n_forced = take_forced(0, forced_vertical) + take_forced(1, forced_slash)

    target = total * alpha if alpha is not None else np.full(B, np.inf)
    lines_left = np.full(B, max_lines if max_lines is not None else 2 * N + 1, dtype=np.int64)
    heads = np.arange(B)
    rounds = 0
    if native is not None:
        # The same rounds in C (one call; the numpy loop below costs ~40 small ops a round).
        cap = 2 * B * N
        lb, lk, lx = (np.empty(cap, dtype=np.int64) for _ in range(3))
        lg = np.empty(cap)
        n_log = ctypes.c_int64(0)
        target = np.ascontiguousarray(target, dtype=np.float64)
        tol_c = np.ascontiguousarray(tol, dtype=np.float64)
        heap = np.empty(4 * N)  # two heaps of N (gain, line) entries
        rounds = native.greedy_rounds(
            gain_np.ctypes.data, chosen.ctypes.data, A_np.ctypes.data, pos_np.ctypes.data, B, s, N,
            covered.ctypes.data, target.ctypes.data, tol_c.ctypes.data, lines_left.ctypes.data,
            lb.ctypes.data, lk.ctypes.data, lx.ctypes.data, lg.ctypes.data, ctypes.byref(n_log),
            heap.ctypes.data,
        )
        k = n_log.value
        if k:
            log.append((lb[:k], lk[:k], lx[:k], lg[:k]))
    while native is None:
        best_of_kind = gain_np.max(2)  # (B, 2)
        lead = best_of_kind.argmax(1)  # kind of the best line (ties: vertical)
        best = best_of_kind[heads, lead]
        active = (covered < target) & (best > tol) & (lines_left > 0)
        if not active.any():
            break
        rounds += 1
        bound = best_of_kind.min(1)  # best gain of the other kind: an upper bound for it
        cand = gain_np[heads, lead]  # (B, N) lines of the leading kind
        # run = (cand >= bound) & (cand > tol) & active, as one comparison per head.
        thr = np.where(active, np.where(bound > tol, bound, np.nextafter(tol, np.inf)), np.inf)
        b, x = np.nonzero(cand >= thr[:, None])
        g = cand[b, x]
        order = np.lexsort((-g, b))  # by head, then gain descending (ties: any order is greedy)
        b, x, g = b[order], x[order], g[order]
        start = np.searchsorted(b, heads)  # first run entry of each head
        rank = np.arange(len(b)) - start[b]
        cum = np.cumsum(g)
        before = cum - g - (cum - g)[start[b]]  # gain taken by this head's earlier run entries
        accept = (before < (target - covered)[b]) & (rank < lines_left[b])
        b, x = b[accept], x[accept]
        lines_left -= np.bincount(b, minlength=B)
        take(b, lead[b], x)

    # Per-head pick order: a stable sort of the log by head keeps the taking order.
    if log:
        bs, kinds, xs, gs = (np.concatenate(parts) for parts in zip(*log))
    else:
        bs = kinds = xs = np.zeros(0, dtype=np.int64)
        gs = np.zeros(0)
    order = np.argsort(bs, kind="stable")
    counts = np.bincount(bs, minlength=B).tolist()
    picks = list(torch.from_numpy(np.stack([kinds[order], xs[order]], 1)).split(counts))
    gains = list(torch.from_numpy(gs[order]).split(counts))
    chosen_t = torch.from_numpy(chosen)
    vmask, smask = chosen_t[:, 0], chosen_t[:, 1]
    covered, total = torch.from_numpy(covered), torch.from_numpy(total)

    result = CoverResult(vmask, smask, covered, total, picks, gains, [n_forced] * B, rounds)
    if squeeze:
        result.vertical, result.slash = vmask[0], smask[0]
    return result


# --------------------------------------------------------------------------------------
# Public selection entry points
# --------------------------------------------------------------------------------------


def _covered_cells(pos: torch.Tensor, vertical: torch.Tensor, slash: torch.Tensor, N: int) -> torch.Tensor:
    """``(B, s, N)``: which cells of the probe rows at ``pos`` the chosen lines (bool masks
    ``(B, N)``) cover; a cell is covered by its column or by the slash through it."""
    offset = (pos[:, None] - torch.arange(N)[None, :]).clamp_min(0)  # (s, N): the slash through each cell
    return vertical[:, None, :] | slash[:, offset]


def row_coverage(A: torch.Tensor, pos: torch.Tensor, vertical: torch.Tensor, slash: torch.Tensor) -> torch.Tensor:
    """``(B, s)``: the fraction of each probe row's attention mass that the chosen lines
    (bool masks ``(B, N)``) cover; each cell counts once."""
    covered = _covered_cells(pos, vertical, slash, A.shape[-1])
    mass = A.sum(-1).clamp_min(torch.finfo(A.dtype).tiny)
    return (A * covered).sum(-1) / mass


def _raise_row_floor(A, pos, cover: CoverResult, floor: float, max_rounds: int = 4) -> int:
    """Add lines until every probe row has at least ``floor`` of its mass covered.

    Mean coverage (the greedy's target) lets a few rows with attention of their own --
    a question's rows reaching back into an earlier turn -- fall far below ``alpha``:
    their lines carry little mass summed over all probe rows. Each round runs the same
    greedy on the *uncovered* mass of the rows still below the floor only, until that
    restricted mass is covered as far as the floor asks. Rows still short after
    ``max_rounds`` get the columns of their own largest uncovered cells, so the floor
    always holds. Returns the greedy rounds run.
    """
    mass = A.sum(-1)
    for rounds in range(max_rounds + 1):
        uncovered = ~_covered_cells(pos, cover.vertical, cover.slash, A.shape[-1])
        residual = A * uncovered
        short = (floor * mass - (mass - residual.sum(-1))).clamp_min(0)  # (B, s) mass still needed
        low = short > 1e-6 * mass
        if not low.any():
            return rounds
        if rounds == max_rounds:
            break
        residual = residual * low[:, :, None]
        have = residual.sum((-2, -1)).clamp_min(torch.finfo(A.dtype).tiny)
        target = float((short.sum(-1) / have).clamp(0, 1).max())
        extra = _greedy_cover(residual, pos, target, None, None, None, 1e-12, causal_zero=True)
        cover.vertical |= extra.vertical
        cover.slash |= extra.slash
    for b, r in low.nonzero().tolist():
        cells = residual[b, r].sort(descending=True)
        take = int((cells.values.cumsum(0) < short[b, r]).sum()) + 1
        cover.vertical[b, cells.indices[:take]] = True
    return max_rounds


def spike_rows(n: int, stride: int, offset: int = 0) -> torch.Tensor:
    """Every ``stride``-th of ``n`` new rows, starting at ``offset % stride``, plus the last
    row (``stride`` 0: the last row only)."""
    if stride <= 0:
        return torch.arange(max(0, n - 1), n)
    rows = torch.arange(offset % stride if stride > 1 else 0, n, stride)
    return torch.cat([rows, torch.tensor([n - 1])]).unique() if n else rows


def outlier_rows(qg: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction`` of the n rows of one head group's queries ``(G, n, D)`` that lie
    farthest from the group's mean query (summed over its heads): rows unlike the text
    around them, such as a question's."""
    n = qg.shape[1]
    m = min(n, math.ceil(fraction * n))
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    qg = qg.float()
    return (qg - qg.mean(1, keepdim=True)).norm(dim=-1).sum(0).topk(m).indices


def spike_columns(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tau: float,
    sinks: int,
    local: int,
    stride: int = 1,
    offset: int = 0,
    outliers: float = 0.0,
    dilate: int = 0,
    history_only: bool = False,
    row_cap: int = 0,
    row_chunk: int = 64,
    scale: float | None = None,
) -> list[torch.Tensor]:
    """Key columns (per KV head) to which one of the rows :func:`spike_rows` picks gives at
    least ``tau`` of the attention mass it gives its sinks and local window.

    Probe rows estimate the lines most rows need. A row that attends somewhere of its
    own -- a question's tokens reaching back to one fact in an earlier turn -- is seen
    only if it happens to be probed, and its columns carry little mass summed over the
    probes, so coverage of the probe mass skips them. This pass scores a dense grid of
    rows exactly (one matmul per head group: 1/``stride`` of the QK work of dense
    attention, with no softmax and no PV) and tests each cell against its own row:
    ``exp(score - lse_r) >= tau``, where ``lse_r`` is the log-sum-exp of row r over its
    sinks and local window (cells every pattern holds). A question's rows come in runs,
    so a grid finds them; the caller varies ``offset`` by layer so that every row is
    tested in some layers. ``outliers`` > 0 also tests that fraction of the rows whose
    queries lie farthest from their head group's mean query (rows unlike the text
    around them). ``dilate`` > 0 also keeps the ``dilate`` columns on each side of every
    column found (a fact spans several tokens; a row that reaches one of them needs its
    neighbours to read it). ``history_only``: test only the keys before the new rows
    (earlier turns), at a cost proportional to the history; a first turn costs nothing.
    ``row_cap`` > 0: a row with more than ``row_cap`` spike columns is a diffuse row, not one
    reaching for a fact: it adds only its ``row_cap`` strongest columns, not widened.
    """
    H, Hkv, n, N, D = _check_shapes(q, k)
    G = H // Hkv
    end = N - n if history_only else N  # columns past `end` are never tested
    if end <= sinks:
        return [torch.zeros(0, dtype=torch.long) for _ in range(Hkv)]
    scale = D**-0.5 if scale is None else scale
    log_tau = math.log(tau)
    grid = spike_rows(n, stride, offset)
    win = torch.arange(-min(local, N) + 1, 1)  # offsets of the local window
    col_idx = torch.arange(end)

    def test_rows(kh: torch.Tensor, khT: torch.Tensor, h: int, r: torch.Tensor):
        """For rows ``r`` of head ``h``: per column, the max over them of score - threshold,
        and the strongest columns of its diffuse rows (if capped)."""
        pos = N - n + r  # absolute positions of these rows
        qs = q[h * G : (h + 1) * G, r].float() * scale  # (G, r, D)
        # Log-sum-exp over each row's sinks + local window, from those keys alone.
        idx = pos[:, None] + win[None, :]  # (r, L)
        loc = torch.einsum("grd,rld->grl", qs, kh[idx.clamp_min(0)]).masked_fill(idx < 0, float("-inf"))
        parts = [loc]
        if sinks:
            sink_keys = kh[: min(sinks, N)]
            # a sink inside the local window is already counted there
            early = torch.arange(len(sink_keys))[None, :] > (pos[:, None] - len(win))
            parts.append((qs @ sink_keys.T).masked_fill(early, float("-inf")))
        threshold = torch.logsumexp(torch.cat(parts, -1), -1, keepdim=True) + log_tau  # (G, r, 1)
        # score - threshold in one batched matmul, reduced over the group's query heads
        # (chunks of rows small enough that the scores stay in cache while reduced)
        over = torch.baddbmm(-threshold, qs, khT).amax(0)  # (r, end)
        # a row may reach columns before its local window only (causal, not already held)
        over.masked_fill_((col_idx[None, :] > (pos - len(win))[:, None]) | (col_idx < sinks)[None, :], float("-inf"))
        capped = None
        if row_cap > 0:
            diffuse = (over >= 0).sum(1) > row_cap
            if bool(diffuse.any()):
                capped = over[diffuse].topk(min(row_cap, end), dim=1).indices.flatten()
                over = over[~diffuse]
        return (over.amax(0) if len(over) else None), capped

    out = []
    for h in range(Hkv):  # one head's keys at a time; its chunks of rows in parallel
        kh = k[h].float()
        khT = kh[:end].T.contiguous().expand(G, -1, -1)
        rows = grid
        if outliers > 0:
            rows = torch.cat([grid, outlier_rows(q[h * G : (h + 1) * G], outliers)]).unique()
        chunks = [rows[a : a + row_chunk] for a in range(0, len(rows), row_chunk)]
        best = torch.full((end,), float("-inf"))  # per column: max over tested rows of score - threshold
        capped = torch.zeros(end, dtype=torch.bool)  # the strongest columns of diffuse rows
        for colmax, strongest in parallel_map(partial(test_rows, kh, khT, h), chunks):
            if colmax is not None:
                best = torch.maximum(best, colmax)
            if strongest is not None:
                capped[strongest] = True
        cols = best >= 0
        if dilate > 0 and bool(cols.any()):
            hits = cols.nonzero().flatten()
            around = (hits[:, None] + torch.arange(-dilate, dilate + 1)[None, :]).flatten()
            cols[around[(around >= sinks) & (around < end)]] = True
        out.append((cols | capped).nonzero().flatten())
    return out


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
    (:func:`_raise_row_floor`). ``stratified``: probe rows one per stratum (see
    :func:`probe_rows`). ``spike_tau`` > 0: columns where a row of a grid of every
    ``spike_stride``-th new row (offset by ``seed``) has a spike of attention
    (:func:`spike_columns`; ``spike_history_only``: columns of earlier turns only) join
    the verticals.
    """
    q, k = q.cpu(), k.cpu()  # selection runs on the CPU (native greedy); kernels take the lines anywhere
    H, Hkv, n, N, D = _check_shapes(q, k)
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
        cover = _greedy_cover(A, pos, alpha, None, forced_vertical, forced_slash, 1e-12, causal_zero=True)
        floor_rounds = _raise_row_floor(A, pos, cover, row_floor) if row_floor > 0 else 0
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
    H, Hkv, n, N, D = _check_shapes(q, k)
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


def a_shape_pattern(n_heads: int, n: int, N: int, *, sinks: int = 4, local: int = 1024) -> LinePattern:
    """A-shape (StreamingLLM-style prefill) baseline: sink columns plus a local band."""
    v = torch.arange(min(sinks, N))
    s = torch.arange(min(local, N))
    return LinePattern.from_lines([v] * n_heads, [s] * n_heads, n, N)


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------


def causal_cells(rows: int, before: int) -> int:
    """Cells of `rows` consecutive query rows under the causal mask when `before` keys
    precede the first of them: row i sees before + i + 1 keys."""
    return rows * before + rows * (rows + 1) // 2


def pattern_density(pattern: LinePattern, n: int | None = None, N: int | None = None) -> float:
    """Fraction of the causal cells (n new rows over N keys) the pattern covers.

    Counts the union: a vertical/slash intersection is counted once; only causal cells
    count. Averaged over pattern heads. Exact, O((nv + ns) log) per head.
    """
    n = pattern.n if n is None else n
    N = pattern.N if N is None else N
    off = N - n
    cells = causal_cells(n, off)
    fractions = []
    for v, s in zip(pattern.vertical, pattern.slash):
        v = v[v < N]
        s = s[s < N]
        # Column j is attended by rows with pos >= j; diagonal o exists in rows with pos >= o.
        v_cells = (n - (v - off).clamp_min(0)).sum()
        s_cells = (n - (s - off).clamp_min(0)).sum()
        # Vertical j and slash o meet iff some row has pos = j + o, i.e. off <= j + o <= N-1.
        lo = torch.searchsorted(s, (off - v).clamp_min(0))
        hi = torch.searchsorted(s, N - 1 - v, right=True)
        both = (hi - lo).clamp_min(0).sum()
        fractions.append(float(v_cells + s_cells - both) / cells)
    return sum(fractions) / max(len(fractions), 1)


def pattern_mask(pattern: LinePattern, head: int, rows: torch.Tensor) -> torch.Tensor:
    """Bool mask ``(len(rows), N)`` of the pattern's causal cells for the given new rows.

    Materialises one row per requested row: meant for tests and diagnostics on a few rows.
    """
    N, off = pattern.N, pattern.N - pattern.n
    pos = off + torch.as_tensor(rows, dtype=torch.long)
    mask = torch.zeros(len(pos), N, dtype=torch.bool)
    mask[:, pattern.vertical[head]] = True
    keys = pos[:, None] - pattern.slash[head][None, :]
    r = torch.arange(len(pos))[:, None].expand_as(keys)
    ok = keys >= 0
    mask[r[ok], keys[ok]] = True
    return mask & (torch.arange(N)[None, :] <= pos[:, None])


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    pattern: LinePattern,
    rows: torch.Tensor,
    *,
    scale: float | None = None,
) -> float:
    """Fraction of the dense attention mass of ``rows`` that falls inside the pattern.

    Dense causal attention is computed for the given new rows only (use rows outside
    the probe set for an unbiased estimate); the recall is averaged over query heads.
    """
    q, k = q.cpu(), k.cpu()  # selection runs on the CPU (native greedy); kernels take the lines anywhere
    H, Hkv, n, N, D = _check_shapes(q, k)
    G = H // Hkv
    rows = torch.as_tensor(rows, dtype=torch.long).sort().values
    A, _ = probe_attention(q, k, rows, per_query_head=True, scale=scale)  # (H, r, N)
    recalls = []
    for h in range(H):
        ph = h if pattern.per_query_head else h // G
        mask = pattern_mask(pattern, ph, rows)
        recalls.append(float((A[h] * mask).sum() / A[h].sum()))
    return sum(recalls) / H
