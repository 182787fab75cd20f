"""The lines one sparse prefill attends over (:class:`LinePattern`), and their size.

Vocabulary. The n new tokens of a turn are the query rows; row ``r`` sits at absolute
position ``pos_r = N - n + r`` among the N keys (cached history + new tokens) and may
attend keys ``0..pos_r`` (causal). A *vertical line* is a key column ``j``; a *slash
line* is a diagonal of offset ``o = pos_r - j`` (offset 0 is the main diagonal).
Pure tensor functions: no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LinePattern", "a_shape_pattern", "causal_cells", "pattern_density", "pattern_mask"]


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


def a_shape_pattern(n_heads: int, n: int, N: int, *, sinks: int = 4, local: int = 1024) -> LinePattern:
    """A-shape (StreamingLLM-style prefill) baseline: sink columns plus a local band."""
    v = torch.arange(min(sinks, N))
    s = torch.arange(min(local, N))
    return LinePattern.from_lines([v] * n_heads, [s] * n_heads, n, N)


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
