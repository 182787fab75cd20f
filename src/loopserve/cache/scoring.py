"""Key scoring and top-B selection shared by LoopServe Phase 2 and the KV baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import choose_backend, require_triton
from ..native import native_kernels, scratch_buffer


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention of query rows over keys, summed over rows and over each KV head's
    query heads (GQA): the mass each key receives. Returns float32 (H_kv, N).

    q: (1, H, w, D) post-RoPE queries; k: (1, H_kv, N, D). With positions given, a row at
    position p only sees keys at positions <= p (k_pos may be (N,) or (H_kv, N)).

    ``backend``: None picks by device (:func:`loopserve.kernels.choose_backend`); on CUDA
    a Triton kernel computes the same masses without materialising the (H_kv, G*w, N)
    logits (:mod:`loopserve.kernels.key_scores`). On the CPU, without positions, the native
    kernel (``native/key_scores.c``) does when it is available, else torch ops.
    """
    if choose_backend(q.device, backend) == "triton":
        require_triton("key scoring", q.device)
        from ..kernels.key_scores import key_attention_mass  # imports Triton: only when used

        positions = (q_pos, k_pos) if q_pos is not None and k_pos is not None else (None, None)
        return key_attention_mass(q[0], k[0], scaling, *positions)
    _, h, w, d = q.shape
    h_kv, n = k.shape[1], k.shape[2]
    g = h // h_kv
    # Scale the (few) queries rather than the (many) logits: one pass less over the logits.
    qf = (q[0].float() * scaling).reshape(h_kv, g * w, d)
    kf = k[0].float()
    masked = q_pos is not None and k_pos is not None
    if not masked:
        native = _native_scores(qf, kf)
        if native is not None:
            return native
    rows = q_pos.repeat(g).view(g * w, 1) if masked else None
    out = torch.empty(h_kv, n, dtype=torch.float32, device=q.device)
    # One KV head at a time: its (g*w, N) logits stay in cache through the softmax and the
    # sum below (all heads at once spill to memory between the passes).
    for head in range(h_kv):
        logits = torch.mm(qf[head], kf[head].t())
        if masked:
            cols = (k_pos[head] if k_pos.dim() == 2 else k_pos).view(1, n)
            logits.masked_fill_(cols > rows, float("-inf"))
        # Softmax in place, and its sum over rows as one product with the rows' 1 / sum: no
        # second (g*w, N) tensor (a fresh one costs more in page faults than the arithmetic).
        probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        inv = probs.sum(-1, keepdim=True).reciprocal_()  # (g*w, 1)
        torch.mm(inv.t(), probs, out=out[head : head + 1])
    return out


def _kernels_for(t: torch.Tensor):
    """The native kernels where they can take t (a CPU float32 tensor), else None."""
    return native_kernels() if t.device.type == "cpu" and t.dtype == torch.float32 else None


def _native_scores(qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor | None:
    """attention_scores without positions by the native kernel, or None where it cannot run:
    qf (H_kv, R, D) scaled rows, kf (H_kv, N, D) with each head's tokens packed."""
    h_kv, r, d = qf.shape
    n = kf.shape[1]
    kernels = _kernels_for(kf)
    if kernels is None or n == 0 or kf.stride(-1) != 1 or kf.stride(-2) != d or not kernels.key_scores_supported(r, d):
        return None
    qf = qf.contiguous()
    out = torch.empty(h_kv, n, dtype=torch.float32)
    # The kernel keeps every logit of the heads it scores at once: a few heads per call at
    # long contexts, so the (kept) scratch stays near one head's logits, as the torch path's.
    per_head = kernels.key_scores_scratch_floats(1, n, r, d)
    group = max(1, min(h_kv, _SCORES_SCRATCH_FLOATS // per_head))
    scratch = scratch_buffer(kernels.key_scores_scratch_floats(group, n, r, d))
    for h in range(0, h_kv, group):
        heads = min(group, h_kv - h)
        kernels.key_scores(qf[h].data_ptr(), kf[h].data_ptr(), kf.stride(0), n, heads, r, d, out[h].data_ptr(),
                           scratch.data_ptr(), torch.get_num_threads())
    return out


_SCORES_SCRATCH_FLOATS = 1 << 22  # 16 MB: SmolLM2's three KV heads in one call up to ~29k keys


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool scores over neighbouring positions (SnapKV's clustering), same length."""
    if kernel <= 1:
        return scores
    return F.max_pool1d(scores.unsqueeze(1), kernel_size=kernel, stride=1, padding=kernel // 2).squeeze(1)[..., : scores.shape[-1]]


def topk_with_forced(scores: torch.Tensor, budget: int, forced: torch.Tensor) -> torch.Tensor:
    """Per head, the `forced` positions plus the top-`budget` others by score.

    scores: (H_kv, N); forced: bool (N,) or (H_kv, N). Returns sorted indices (H_kv, L),
    the same L for every head (so the kept keys gather into one dense tensor).
    """
    if budget < 0:
        raise ValueError(f"topk_with_forced takes a budget >= 0, got {budget}")
    h, n = scores.shape
    forced = forced.expand(h, n) if forced.dim() == 1 else forced
    n_forced = int(forced.sum(dim=1).max())
    free = n - n_forced
    take = min(budget, max(free, 0))
    # Forced positions get +inf so they always make the cut; heads with fewer forced
    # positions than the maximum simply keep a few more scored ones.
    ranked = scores.float().masked_fill(forced, float("inf"))
    return top_rows(ranked, min(n_forced + take, n))


def select_top(scores: torch.Tensor, budget: int, *, pool: int = 1, head: int = 0, tail: int = 0) -> torch.Tensor:
    """Per head of scores (H_kv, N): the first `head` and last `tail` positions, plus the
    top-`budget` others by their scores max-pooled over `pool` neighbours (ties to the lower
    index). Sorted indices (H_kv, L), the same L for every head: what
    ``topk_with_forced(max_pool(scores, pool), budget, forced)`` returns with those positions
    forced, in one native pass where it can run."""
    if min(budget, pool, head, tail) < 0:
        raise ValueError(f"select_top takes budget, pool, head and tail >= 0, got {budget}, {pool}, {head}, {tail}")
    h, n = scores.shape
    n_forced = min(n, min(head, n) + min(tail, n))
    k = min(n_forced + min(budget, n - n_forced), n)
    kernels = _kernels_for(scores)
    if kernels is not None:
        scores = scores.contiguous()
        out = torch.empty(h, k, dtype=torch.long)
        kernels.pooled_top_rows(scores.data_ptr(), h, n, pool, head, tail, k, out.data_ptr(), scratch_buffer(n).data_ptr())
        return out
    forced = torch.zeros(n, dtype=torch.bool, device=scores.device)
    forced[:head] = True
    if tail:
        forced[-tail:] = True
    return topk_with_forced(max_pool(scores, pool), budget, forced)


def top_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of values (H, N), the indices of its k largest entries, ascending; among
    equal values the lower index is taken (natively, or by a stable sort)."""
    h, n = values.shape
    if not 0 <= k <= n:
        raise ValueError(f"top_rows takes 0 <= k <= {n} (the values per row), got k={k}")
    kernels = _kernels_for(values)
    if kernels is not None:
        values = values.contiguous()
        out = torch.empty(h, k, dtype=torch.long)
        kernels.top_rows(values.data_ptr(), h, n, k, out.data_ptr())
        return out
    # A stable descending sort keeps equal values in index order: ties to the lower index.
    idx = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return idx.sort(dim=1).values


class QueryBuffer:
    """Post-RoPE queries of the latest generated tokens, per layer, released every `every` steps.

    Shared by the methods that re-score keys from what the model is generating (LoopServe
    Phase 2, SnapKV re-scored). Each layer's queries go into one tensor allocated on the
    first push, not one small tensor per step: thousands of small long-lived allocations
    between the large temporaries of a batched prefill made the allocator hand those out
    more slowly (elementwise ops 3-6x slower in the scheduler's mixed iterations)."""

    def __init__(self, num_layers: int, every: int, first: int | None = None):
        self.every = every
        self.first = every if first is None else first  # the first release may come sooner
        self._buf: list[torch.Tensor | None] = [None] * num_layers
        # Per layer, the buffer's row slots as (1, H, 1, D) views, made once: a push is then
        # one copy_ (indexing the buffer at every push costs several times more).
        self._slots: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._count = [0] * num_layers
        self._released = [False] * num_layers

    def push(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor | None:
        """Add q (1, H, 1, D); after `first` calls, then every `every` calls, returns the
        buffered (1, H, n, D) and empties the buffer. The returned tensor is a view of the
        buffer: use it before the next push."""
        buf, n = self._buf[layer_idx], self._count[layer_idx]
        if buf is None:
            buf = self._buf[layer_idx] = q.new_empty(q.shape[0], q.shape[1], max(self.first, self.every), q.shape[3])
            self._slots[layer_idx] = list(buf.split(1, dim=2))
        self._slots[layer_idx][n].copy_(q)
        n += 1
        if n < (self.every if self._released[layer_idx] else self.first):
            self._count[layer_idx] = n
            return None
        self._count[layer_idx] = 0
        self._released[layer_idx] = True
        return buf[:, :, :n]

    def pending(self, layer_idx: int) -> torch.Tensor | None:
        """The queries buffered since the last release, or None."""
        n = self._count[layer_idx]
        return self._buf[layer_idx][:, :, :n] if n else None
