"""Probe rows and their exact attention: the estimate Phase 1 selects lines from, and the
recall of a pattern against exact attention (see :mod:`loopserve.attention.lines`)."""

from __future__ import annotations

import math

import torch

from ..threads import parallel_map
from .pattern import LinePattern, pattern_mask

__all__ = ["attention_recall", "check_shapes", "probe_attention", "probe_rows"]


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


def check_shapes(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
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
    H, Hkv, n, N, D = check_shapes(q, k)
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
    H, Hkv, n, N, D = check_shapes(q, k)
    G = H // Hkv
    rows = torch.as_tensor(rows, dtype=torch.long).sort().values
    A, _ = probe_attention(q, k, rows, per_query_head=True, scale=scale)  # (H, r, N)
    recalls = []
    for h in range(H):
        ph = h if pattern.per_query_head else h // G
        mask = pattern_mask(pattern, ph, rows)
        recalls.append(float((A[h] * mask).sum() / A[h].sum()))
    return sum(recalls) / H
