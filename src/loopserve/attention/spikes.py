"""The spike pass of Phase 1: columns that single rows reach for (a question's rows reading
one fact in an earlier turn), which coverage of the probe rows' summed mass skips."""

from __future__ import annotations

import math

import torch

from ..threads import parallel_map
from .probe import check_shapes

__all__ = ["outlier_rows", "spike_columns", "spike_rows"]


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
    col_block: int = 2048,
    scale: float | None = None,
) -> list[torch.Tensor]:
    """Key columns (per KV head) to which one of the rows :func:`spike_rows` picks gives at
    least ``tau`` of the attention mass it gives its sinks and local window.

    Probe rows estimate the lines most rows need. A row that attends somewhere of its
    own -- a question's tokens reaching back to one fact in an earlier turn -- is seen
    only if it happens to be probed, and its columns carry little mass summed over the
    probes, so coverage of the probe mass skips them. This pass scores a dense grid of
    rows exactly (matmuls per head group: 1/``stride`` of the QK work of dense
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

    Work items are chunks of at most ``row_chunk`` tested rows (of every head at once, run
    on the thread budget); each scores ``col_block`` columns at a time, and only the
    columns before its rows' local windows (a chunk of early rows skips the rest).
    """
    H, Hkv, n, N, D = check_shapes(q, k)
    G = H // Hkv
    end = N - n if history_only else N  # columns past `end` are never tested
    if end <= sinks:
        return [torch.zeros(0, dtype=torch.long) for _ in range(Hkv)]
    scale = D**-0.5 if scale is None else scale
    log_tau = math.log(tau)
    grid = spike_rows(n, stride, offset)
    L = min(local, N)
    win = torch.arange(-L + 1, 1)  # offsets of the local window
    col_idx = torch.arange(end)
    keys = [k[h].float() for h in range(Hkv)]  # fp32 once per head (a no-op for fp32 keys)

    def test_rows(item: tuple[int, torch.Tensor]):
        """For rows ``r`` of head ``h``: per column, the max over them of score - threshold,
        and the strongest columns of its diffuse rows (if capped)."""
        h, r = item
        kh = keys[h]
        pos = N - n + r  # absolute positions of these rows
        qs = q[h * G : (h + 1) * G, r].float() * scale  # (G, r, D)
        # Log-sum-exp over each row's sinks + local window, from those keys alone.
        idx = pos[:, None] + win[None, :]  # (r, L)
        loc = torch.einsum("grd,rld->grl", qs, kh[idx.clamp_min(0)]).masked_fill(idx < 0, float("-inf"))
        parts = [loc]
        if sinks:
            sink_keys = kh[: min(sinks, N)]
            # a sink inside the local window is already counted there
            early = torch.arange(len(sink_keys))[None, :] > (pos[:, None] - L)
            parts.append((qs @ sink_keys.T).masked_fill(early, float("-inf")))
        threshold = torch.logsumexp(torch.cat(parts, -1), -1, keepdim=True) + log_tau  # (G, r, 1)
        # score - threshold, reduced over the group's query heads, a block of columns at a
        # time: one matmul over K's rows as they lie (no transposed copy), its scores small
        # enough to stay in cache while reduced.
        first_masked = pos - L + 1  # a row may reach columns before its local window only
        stop = max(0, min(end, int(first_masked.max())))  # no row of the chunk reaches past this
        # Per row and column only when diffuse rows are capped (they need their own
        # columns); otherwise each block is reduced over the rows at once.
        over = torch.full((len(r), end), float("-inf")) if row_cap > 0 else None
        colmax = torch.full((end,), float("-inf"))
        for c0 in range(0, stop, col_block):
            c1 = min(stop, c0 + col_block)
            blk = (qs @ kh[c0:c1].T).sub_(threshold).amax(0)  # (r, c1 - c0)
            if c1 > int(first_masked.min()):
                blk.masked_fill_(col_idx[None, c0:c1] >= first_masked[:, None], float("-inf"))
            if c0 < sinks:
                blk[:, : sinks - c0] = float("-inf")  # sinks are always held
            if over is None:
                torch.amax(blk, 0, out=colmax[c0:c1])
            else:
                over[:, c0:c1] = blk
        capped = None
        if over is not None:
            diffuse = (over >= 0).sum(1) > row_cap
            if bool(diffuse.any()):
                capped = over[diffuse].topk(min(row_cap, end), dim=1).indices.flatten()
                over = over[~diffuse]
            colmax = over.amax(0) if len(over) else None
        return h, colmax, capped

    items = []
    for h in range(Hkv):
        rows = grid
        if outliers > 0:
            rows = torch.cat([grid, outlier_rows(q[h * G : (h + 1) * G], outliers)]).unique()
        parts = max(1, -(-len(rows) // row_chunk))  # near-equal chunks: the workers finish together
        items += [(h, c) for c in rows.tensor_split(parts) if len(c)]
    best = torch.full((Hkv, end), float("-inf"))  # per column: max over tested rows of score - threshold
    capped = torch.zeros(Hkv, end, dtype=torch.bool)  # the strongest columns of diffuse rows
    for h, colmax, strongest in parallel_map(test_rows, items):
        if colmax is not None:
            torch.maximum(best[h], colmax, out=best[h])
        if strongest is not None:
            capped[h, strongest] = True
    out = []
    for h in range(Hkv):
        cols = best[h] >= 0
        if dilate > 0 and bool(cols.any()):
            hits = cols.nonzero().flatten()
            around = (hits[:, None] + torch.arange(-dilate, dilate + 1)[None, :]).flatten()
            cols[around[(around >= sinks) & (around < end)]] = True
        out.append((cols | capped[h]).nonzero().flatten())
    return out
