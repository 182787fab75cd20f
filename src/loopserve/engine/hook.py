"""Binds LoopServe into transformers through its public attention and mask interfaces.

`AttentionInterface.register("loopserve", ...)` makes every attention layer call
`loopserve_attention`, which dispatches to the session's prefill method (q_len > 1) or
runs decode attention over whatever the cache layer returned (the full store or a compact
selected view), then lets the decode method observe the step. The mask interface gets a
matching "loopserve" entry that builds no mask: batch size is 1 with no padding, and each
method enforces causality from positions itself, so an (n x N) mask is never built.

Per-forward state arrives as the `loopserve_ctx` keyword, which transformers forwards from
`model(...)` down to the attention function. Without it (e.g. `model.generate()` on the
same model), attention is plain dense causal attention.

A `PackedContext` instead carries one step of several conversations packed along the
sequence (the scheduler's batch): the linear layers see every token at once, and attention
runs per segment over that conversation's own cache layer, with its own method and state,
exactly as the same step would run alone: prefill chunks one by one, and the decode tokens of
all conversations in one `decode_attention` call (the function a lone decode step also runs).
No padded mask over the batch is built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..attention.decode import decode_attention
from ..attention.dense import dense_attention

ATTN_NAME = "loopserve"


@dataclass
class TurnContext:
    """What per-turn selection needs inside every attention call of one forward pass."""

    cache: object  # SessionCache
    prefill: object  # PrefillMethod
    decode: object  # DecodeMethod
    q_start: int = 0  # absolute position of the first query token of this forward
    input_end: int = 0  # absolute position just after this turn's input (history + new input)
    num_layers: int = 0
    scaling: float = 0.0  # softmax scale of the model's attention (set by the hook)
    # Per-layer scratch space that methods keep for the duration of a turn.
    layer_state: list[dict] = field(default_factory=list)
    # Per-turn diagnostics methods report (e.g. prefill density per layer).
    stats: dict = field(default_factory=dict)
    # Seconds spent inside prefill attention (selection + kernel), for the attention share.
    prefill_attention_s: float = 0.0
    # Called after each layer's prefill attention with (layer index, query tokens): progress.
    on_prefill_layer: Callable[[int, int], None] | None = None

    def __post_init__(self):
        if not self.layer_state:
            self.layer_state = [{} for _ in range(self.num_layers)]

    def positions(self, n: int, device=None) -> torch.Tensor:
        """Absolute positions of the n query tokens of the current forward."""
        return torch.arange(self.q_start, self.q_start + n, device=device)

    def record(self, key: str, value: float) -> None:
        self.stats.setdefault(key, []).append(float(value))


@dataclass
class PackedContext:
    """One forward over a step of several turns: segment i is `lengths[i]` consecutive
    tokens of the turn whose context is `contexts[i]` (a prefill chunk or one decode token).
    `cache` is the PackedCache that hands each segment's keys/values back per layer."""

    contexts: list[TurnContext]
    lengths: list[int]
    cache: object  # PackedCache


def loopserve_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ctx = kwargs.get("loopserve_ctx")
    layer_idx = module.layer_idx
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if ctx is None:
        out = dense_attention(query, key, value, scaling)
    elif isinstance(ctx, PackedContext):
        out = _attend_packed(ctx, layer_idx, query, scaling)
    else:
        out = _attend(ctx, layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def _attend_packed(ctx: PackedContext, layer_idx: int, query, scaling: float) -> torch.Tensor:
    """Every segment's attention: prefill chunks one by one, the decode tokens of all
    conversations in one `decode_attention` call (each over its own cache layer)."""
    queries = query.split(ctx.lengths, dim=-2)
    kv = ctx.cache.segments(layer_idx)
    outs: list[torch.Tensor | None] = [None] * len(queries)
    decoding = [i for i, q in enumerate(queries) if q.shape[-2] == 1 and q.dtype == kv[i][0].dtype]
    if decoding:
        attended = _decode([ctx.contexts[i] for i in decoding], layer_idx, [queries[i] for i in decoding],
                           [kv[i] for i in decoding], scaling)
        for i, out in zip(decoding, attended):
            outs[i] = out
    for i, (c, q, (k, v)) in enumerate(zip(ctx.contexts, queries, kv)):
        if outs[i] is None:
            outs[i] = _attend(c, layer_idx, q.contiguous(), k, v, scaling)
    return torch.cat(outs, dim=-2)


def _decode(contexts: list[TurnContext], layer_idx: int, queries, kv, scaling: float) -> list[torch.Tensor]:
    """Decode steps of one or several conversations: one `decode_attention` call over what
    each cache layer returned (the full store, a compact selection, or the store with the
    view's rows to read from it, `view_rows`), then each decode method observes its step."""
    layers = [c.cache.layers[layer_idx] for c in contexts]
    outs = decode_attention(queries, [k for k, _ in kv], [v for _, v in kv], scaling, [layer.view_rows for layer in layers])
    for c, q, layer in zip(contexts, queries, layers):
        c.scaling = scaling
        c.decode.observe_decode(c, layer_idx, q, layer)
    return outs


def _attend(ctx: TurnContext, layer_idx: int, query, key, value, scaling: float) -> torch.Tensor:
    """One conversation's attention: its prefill method for new rows, else a decode step."""
    ctx.scaling = scaling
    if query.dtype != key.dtype:
        # Linear layers in a lower precision than the KV store (bf16 prefill): attention
        # runs in the store's precision, and hands back the layer's dtype.
        return _attend(ctx, layer_idx, query.to(key.dtype), key, value, scaling).to(query.dtype)
    if query.shape[-2] > 1:
        t0 = time.perf_counter()
        out = ctx.prefill.attend(query, key, value, layer_idx=layer_idx, scaling=scaling, ctx=ctx)
        ctx.prefill_attention_s += time.perf_counter() - t0
        ctx.decode.observe_prefill(ctx, layer_idx, query, key)
        if ctx.on_prefill_layer is not None:
            ctx.on_prefill_layer(layer_idx, query.shape[-2])
        return out
    return _decode([ctx], layer_idx, [query], [(key, value)], scaling)[0]


def no_mask(*args, **kwargs):
    """Mask function for the 'loopserve' implementation: causality is enforced in attention."""
    return None


_registered = False


def register() -> str:
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, loopserve_attention)
        AttentionMaskInterface.register(ATTN_NAME, no_mask)
        _registered = True
    return ATTN_NAME


def install(model) -> None:
    """Route `model`'s attention through LoopServe (idempotent)."""
    register()
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
