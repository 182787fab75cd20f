"""The session KV cache: a full KV store per layer plus an optional compact *active view*.

It is a transformers `Cache` built from our own `CacheLayerMixin` subclass, so models use it
through the public API (`model(..., cache=SessionCache(...))`) with no patching.

Why a custom layer rather than `DynamicLayer`:
- `DynamicLayer` grows by `torch.cat` at every step, an O(N) copy per generated token. The
  store here grows by doubling, so appending one token is O(1) amortised; the dense
  baseline benefits from this too, which keeps the dense-vs-ours comparison fair.
- Phase 2 (and the KV baselines) decode over a *selection* of the input tokens. `update()`
  then returns a compact gathered tensor (selected keys + this turn's generated keys), so
  decode attention does not touch, or mask, the full-length tensor at all.
- `bounded` mode evicts tokens per KV head, so every layer keeps the absolute positions of
  what it holds (`positions`, shape (H_kv, N)).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention.decode import view_indices


_VIEW_SLACK = 128


def _grown(buf: torch.Tensor, need: int) -> torch.Tensor:
    """Return `buf` (..., cap, D) with capacity >= need along dim -2, doubling to amortise."""
    cap = buf.shape[-2]
    if need <= cap:
        return buf
    new_cap = max(need, 2 * cap, 64)
    out = buf.new_empty(*buf.shape[:-2], new_cap, buf.shape[-1])
    out[..., :cap, :] = buf
    return out


class SessionLayer(CacheLayerMixin):
    """One layer's KV: a store of `length` tokens per KV head, plus an optional active view."""

    is_sliding = False
    is_croppable = True

    def __init__(self, dtype: torch.dtype | None = None, index_views: bool = False, **kwargs):
        super().__init__()
        self.kv_dtype = dtype  # None: the dtype of the first keys stored
        # Index views: a selection keeps only its store indices (no copy of the rows); decode
        # attention reads them from the store (`view_rows`), see `update`.
        self.index_views = index_views
        self.length = 0  # tokens resident per KV head
        self._k = self._v = None  # (1, H_kv, cap, D)
        self._pos = None  # (H_kv, cap) absolute positions of resident tokens
        # (length, next position) after the last append: a decode step reads its position
        # from here, not from the tensor (crop and keep_only, which move both, reset it).
        self._next = (0, 0)
        # Active view (decode over a selection): `_view_base` (H_kv, L0) store indices chosen
        # at the last selection, plus every store index from `_view_start` on (tokens
        # appended since). `_vk`/`_vv` hold the gathered keys/values compactly.
        self._view_base: torch.Tensor | None = None
        self._view_start = 0
        self._vk = self._vv = None  # (1, H_kv, cap, D)
        self.view_len = 0

    # -- CacheLayerMixin API -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if b != 1:
            raise ValueError("SessionCache holds one conversation: batch size must be 1")
        self.device = key_states.device
        dtype = self.kv_dtype or key_states.dtype
        self._k = key_states.new_empty(1, h, 0, d, dtype=dtype)
        self._v = value_states.new_empty(1, h, 0, value_states.shape[-1], dtype=dtype)
        self._pos = torch.empty(h, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        start = self.length
        self._k = _grown(self._k, start + n)
        self._v = _grown(self._v, start + n)
        # narrow + copy_: one view op each (slicing with an Ellipsis makes several), per layer and step.
        self._k.narrow(2, start, n).copy_(key_states)
        self._v.narrow(2, start, n).copy_(value_states)
        if self._pos.shape[1] < start + n:
            pos = self._pos.new_empty(self._pos.shape[0], max(start + n, 2 * self._pos.shape[1], 64))
            pos[:, :start] = self._pos[:, :start]
            self._pos = pos
        next_pos = self._next[1] if self._next[0] == start else self.next_position
        if n == 1:  # a decode step: a scalar fill, no arange (this runs per layer and token)
            self._pos.select(1, start).fill_(next_pos)
        else:
            self._pos[:, start : start + n] = torch.arange(next_pos, next_pos + n, device=self.device)
        self.length = start + n
        self._next = (self.length, next_pos + n)
        if self._view_base is None:
            return self.keys, self.values
        if self.index_views:
            # The store, whole: attention reads the view's rows through `view_rows`.
            self.view_len += n
            return self.keys, self.values
        # Active view: new tokens are always attended (they are this turn's own tokens).
        m = self.view_len
        self._vk = _grown(self._vk, m + n)
        self._vv = _grown(self._vv, m + n)
        self._vk.narrow(2, m, n).copy_(key_states)
        self._vv.narrow(2, m, n).copy_(value_states)
        self.view_len = m + n
        return self._vk[..., : self.view_len, :], self._vv[..., : self.view_len, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.kv_dtype, self.index_views)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` logical tokens (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized or self.length == 0:
            return
        cut = self.next_position + tokens_to_remove  # first absolute position to drop
        keep = self._pos[:, : self.length] < cut
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()) or not bool(keep[:, : int(counts[0])].all()):
            raise RuntimeError("cannot crop into tokens evicted differently per head")
        self.length = int(counts[0])
        self._next = (0, 0)
        self.clear_view()

    # -- store access ----------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self._k[..., : self.length, :]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None
        pass

    @property
    def values(self) -> torch.Tensor:
        return self._v[..., : self.length, :]

    @values.setter
    def values(self, value):
        pass

    @property
    def positions(self) -> torch.Tensor:
        """(H_kv, N) absolute positions of the resident tokens."""
        return self._pos[:, : self.length]

    @property
    def next_position(self) -> int:
        if self._next[0] == self.length:
            return self._next[1]
        return int(self._pos[0, self.length - 1]) + 1 if self.length else 0

    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        per_token = self._k.shape[1] * (self._k.shape[-1] * self._k.element_size() + self._v.shape[-1] * self._v.element_size())
        return self.length * per_token

    @property
    def allocated_bytes(self) -> int:
        """Bytes held allocated: store and view capacity (not only the resident tokens) and positions."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v, self._vk, self._vv, self._pos) if t is not None)

    @property
    def active_tokens(self) -> int:
        """Tokens attended per KV head at the next decode step."""
        return self.view_len if self._view_base is not None else self.length

    @property
    def view_rows(self) -> tuple[torch.Tensor, int] | None:
        """With an index view active: ``(rows, tail)``, the selected store indices (H_kv, L0)
        and the first store index appended since (all attended); else None (the tensors
        `update` returned are what decode attends)."""
        if self._view_base is None or not self.index_views:
            return None
        return self._view_base, self._view_start

    @property
    def view_idx(self) -> torch.Tensor | None:
        """(H_kv, L) store indices the next decode step attends to, or None (all)."""
        if self._view_base is None:
            return None
        return view_indices(self._view_base, self._view_start, self.length)

    # -- selection -------------------------------------------------------------------
    def set_view(self, idx: torch.Tensor, since: int | None = None) -> None:
        """Attend only to store indices `idx` (H_kv, L), sorted per head, from now on, and
        with `since` given, to every stored token from index `since` on too (idx then lies
        below it)."""
        idx = idx.to(self.device, torch.long)
        h, L = idx.shape
        end = self.length if since is None else since
        if not 0 <= end <= self.length:
            raise IndexError(f"view start since={since} must lie in [0, {self.length}] (the tokens stored)")
        if L:
            lo, hi = idx.aminmax()
            if int(lo) < 0 or int(hi) >= end:
                raise IndexError(f"view indices must lie in [0, {end}) (the tokens stored"
                                 + (")" if since is None else f" before since={since})"))
        if self.index_views:
            self._view_base = idx.contiguous()
            self._view_start = end
            self.view_len = L + self.length - end
            return
        if end < self.length:
            idx = view_indices(idx, end, self.length)
            L = idx.shape[1]
        # Leave room for the tokens decoded until the next selection: no regrowth per step.
        cap = L + _VIEW_SLACK
        # The previous view's buffers are reused when they are large enough: a selection
        # every few tokens would otherwise allocate (and page in) two fresh tensors.
        if self._vk is None or self._vk.shape[1] != h or self._vk.shape[2] < L:
            self._vk = self._k.new_empty(1, h, cap, self._k.shape[-1])
            self._vv = self._v.new_empty(1, h, cap, self._v.shape[-1])
        # Row copies per head (index_select): torch.gather reads an index per element, much slower.
        for head in range(h):
            torch.index_select(self.keys[0, head], 0, idx[head], out=self._vk[0, head, :L])
            torch.index_select(self.values[0, head], 0, idx[head], out=self._vv[0, head, :L])
        self._view_base = idx
        self._view_start = self.length
        self.view_len = L

    def clear_view(self) -> None:
        self._view_base = None
        self._vk = self._vv = None
        self.view_len = 0

    def keep_only(self, idx: torch.Tensor) -> None:
        """Evict everything but store indices `idx` (H_kv, M), per head (bounded mode)."""
        idx = idx.to(self.device, torch.long).sort(dim=1).values
        h, M = idx.shape
        g = idx.view(1, h, M, 1)
        self._k = torch.gather(self.keys, 2, g.expand(1, h, M, self._k.shape[-1])).contiguous()
        self._v = torch.gather(self.values, 2, g.expand(1, h, M, self._v.shape[-1])).contiguous()
        self._pos = torch.gather(self.positions, 1, idx).contiguous()
        self.length = M
        self._next = (0, 0)
        self.clear_view()


class SessionCache(Cache):
    """A `Cache` of `SessionLayer`s, one per decoder layer."""

    def __init__(self, num_layers: int, dtype: torch.dtype | None = None, index_views: bool = False):
        """``dtype``: the KV storage dtype (keys and values written in another are converted);
        None stores them as the model computes them. ``index_views``: selections keep store
        indices instead of copies (for a decode attention that reads rows by index)."""
        super().__init__(layers=[SessionLayer(dtype, index_views) for _ in range(num_layers)])
        self.kv_dtype = dtype
        self.index_views = index_views

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Logical length (absolute position of the next token), not the resident count, so
        # that positions keep counting up after bounded-mode eviction.
        return self.layers[layer_idx].next_position if layer_idx < len(self.layers) else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes for layer in self.layers)

    def prefix_copy(self, n: int) -> "SessionCache | None":
        """A new cache holding a copy of the first n tokens' KV, or None when the cache
        cannot be cut there (bounded-mode eviction left per-head holes, or fewer tokens)."""
        out = SessionCache(len(self.layers), self.kv_dtype, self.index_views)
        if n <= 0:
            return out
        for src, dst in zip(self.layers, out.layers):
            if not src.is_initialized or src.length < n or src.next_position != src.length:
                return None
            dst.update(src.keys[..., :n, :], src.values[..., :n, :])
        return out

    @property
    def resident_tokens(self) -> int:
        return max((layer.length for layer in self.layers), default=0)

    @property
    def active_tokens(self) -> int:
        """Mean over layers of the tokens attended per KV head at decode."""
        if not self.layers:
            return 0
        return round(sum(layer.active_tokens for layer in self.layers) / len(self.layers))

    def clear_views(self) -> None:
        for layer in self.layers:
            layer.clear_view()
