"""Greedy maximum coverage of a probe attention matrix by vertical and slash lines (the
selection step of Phase 1; :mod:`loopserve.attention.lines` runs it). The rounds run in C
where :mod:`loopserve.native` builds, on numpy otherwise, with the same picks."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from ..native import native_kernels
from ..threads import intra_op_threads

__all__ = ["CoverResult", "greedy_cover", "raise_row_floor", "row_coverage"]


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
    causal_zero: bool = False,
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
    a round on the 2-core box). ``causal_zero``: ``A`` is already 0 above the diagonal
    (as :func:`~loopserve.attention.probe.probe_attention` returns it).
    """
    with intra_op_threads(1):  # hundreds of tiny ops: no gain from threads (see helper)
        return _greedy_cover(A, pos, alpha, max_lines, forced_vertical, forced_slash, eps, causal_zero)


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


def raise_row_floor(A, pos, cover: CoverResult, floor: float, max_rounds: int = 4) -> int:
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
