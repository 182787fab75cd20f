"""StreamingLLM baseline: attention sinks plus a rolling window of recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024,
arXiv 2309.17453).

The KV cache holds the first `sinks` tokens of the conversation and the `window` most recent
tokens, nothing else; everything in between is **evicted** (SessionLayer.keep_only), as in the
paper's rolling cache. After each turn's prefill the cache is cut to sinks + window, and after
every decode step the oldest non-sink token is dropped, so between steps every layer holds
exactly `sinks + window` tokens (a decode step attends those plus its own new token).

Multi-turn: this is the paper's streaming setting, one rolling cache for the whole dialogue. A
later turn's prefill attends the sinks, the surviving window of the history and its own tokens;
the cut after that prefill keeps the sinks and the window of its most recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import check_int_knob
from .base import DecodeMethod, register_decode


@register_decode
@dataclass
class StreamingLLM(DecodeMethod):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): `sinks` first tokens + `window` recent ones."""

    name = "streamingllm"
    chunkable = True  # trims by position at the final chunk only, whatever the chunks were
    description = "StreamingLLM: keep the first `sinks` tokens plus a rolling window of the last `window` tokens; evict the rest."
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024, arXiv 2309.17453)"

    sinks: int = 4
    window: int = 1020  # sinks + window = 1024 tokens, the same KV size as the other baselines' default budget

    def validate(self) -> None:
        for knob, low in (("sinks", 0), ("window", 1)):
            check_int_knob(self, knob, low)

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def _trim(self, layer) -> None:
        n = layer.length
        if n <= self.capacity:
            return
        keep = torch.cat(
            [torch.arange(self.sinks, device=layer.device), torch.arange(n - self.window, n, device=layer.device)]
        )
        layer.keep_only(keep.expand(layer.keys.shape[1], -1))

    def observe_prefill(self, ctx, layer_idx, q, k) -> None:
        if ctx.q_start + q.shape[-2] < ctx.input_end:
            return  # not the final prefill chunk of this turn
        self._trim(ctx.cache.layers[layer_idx])

    def observe_decode(self, ctx, layer_idx, q, layer) -> None:
        self._trim(layer)
