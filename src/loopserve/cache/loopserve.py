"""LoopServe Phase 2: progressive KV selection during decoding (SPEC section 2).

Every `n_d` generated tokens, the queries of those tokens (post-RoPE, buffered per layer)
re-score every input key (history + this turn's input); each KV head then attends only to
its top-`budget` keys, the sink tokens, the last `recent` input tokens and everything
generated in this turn, gathered into a compact tensor (SessionLayer.set_view), so the
time per token stops growing with the conversation.

Before the first re-scoring (`first`): by default the first `n_d` generated tokens attend
densely and their own queries make the first selection (`first="dense"`). The SPEC's rule,
a selection from probe rows spread over the new input (Phase 1's RandomSelect rows when the
prefill method recorded them), is `first="probe"`; SnapKV's last-window rule is
`first="window"`. Measured on 14 L-Eval prompts of ~3.7k tokens with the question before
the document (docs/benchmarks.md), ROUGE-L of the greedy answers against dense's was 0.76
with "dense", 0.61 with a 4-token dense warm-up (`n_first=4`), 0.46 with "window" and 0.28
with "probe". The first interval decides most of the answer, and the dense warm-up costs
only its n_d decode steps.

Across turns: `lossless` keeps the full store and re-selects per turn; `bounded` evicts the
history at the end of each turn down to `memory_budget` tokens per KV head, by the scores
gathered during that turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..knobs import check_int_knob
from .base import DecodeMethod, register_decode
from .scoring import QueryBuffer, attention_scores, select_top


def probe_rows(n: int, seed: int, min_probe: int = 64, frac: float = 0.02, n_last: int = 8) -> torch.Tensor:
    """RandomSelect rows of an n-row input: uniform random rows plus the last few."""
    s = max(min_probe, math.ceil(frac * n))
    if n <= s + n_last:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    rand = torch.randperm(n - n_last, generator=g)[:s]
    return torch.cat([rand.sort().values, torch.arange(n - n_last, n)])


@register_decode
@dataclass
class LoopServeDecode(DecodeMethod):
    name = "loopserve"
    description = "LoopServe Phase 2: re-select the top-B input keys every n_d generated tokens from their own queries."
    paper = "LoopServe (arXiv 2507.13681), section on progressive KV compression"

    n_d: int = 16
    budget: int = 1024
    sinks: int = 4
    recent: int = 32
    pool: int = 7
    mode: str = "lossless"
    memory_budget: int = 4096
    seed: int = 0
    # The selection before the first re-scoring (see the module docstring): "dense" (none),
    # "probe" (SPEC: Phase 1's probe rows spread over the input) or "window" (SnapKV's rule:
    # the last `recent` input rows).
    first: str = "dense"
    # Generated tokens before the first re-scoring (0: n_d). With first="dense", a shorter
    # dense warm-up trades fidelity for speed (see the module docstring).
    n_first: int = 0

    def validate(self) -> None:
        for knob in ("n_first",):
            check_int_knob(self, knob, 0)
        for knob in ("n_d", "budget", "memory_budget"):
            check_int_knob(self, knob, 1)
        for knob in ("sinks", "recent", "pool", "seed"):
            check_int_knob(self, knob, 0)
        if self.first not in ("probe", "window", "dense"):
            raise ValueError(f"invalid knob first={self.first!r}: must be 'probe', 'window' or 'dense'")
        if self.mode not in ("lossless", "bounded"):
            raise ValueError(f"invalid knob mode={self.mode!r}: must be 'lossless' or 'bounded'")
        if self.mode == "bounded" and self.memory_budget <= self.sinks + self.recent:
            raise ValueError(f"invalid knob memory_budget={self.memory_budget}: must exceed sinks + recent")

    def chunkable_turn(self, n_new: int, n_total: int) -> bool:
        # With a dense first interval the prefill observes nothing; the other rules select
        # from the final prefill forward's rows.
        return self.first == "dense"

    def __post_init__(self):
        self.reselections = 0  # decode-time re-selections, summed over layers (tests, stats)

    # -- helpers -------------------------------------------------------------------------
    def _input_count(self, layer, ctx) -> int:
        """Resident tokens that belong to the input (history + this turn's input)."""
        pos = layer.positions[0]
        return int((pos < ctx.input_end).sum())

    def _select(self, ctx, layer, scores: torch.Tensor, n_in: int) -> None:
        """Attend to sinks + last `recent` inputs + top-`budget` scored + generated tokens."""
        keep = select_top(scores, self.budget, pool=self.pool, head=self.sinks, tail=self.recent)
        layer.set_view(keep, since=n_in)  # and every token from the first generated one on

    def _needs_selection(self, n_in: int) -> bool:
        # With room for every input token, selection would change nothing: stay exact.
        return n_in > self.budget + self.sinks + self.recent

    # -- hooks ---------------------------------------------------------------------------
    def begin_turn(self, ctx) -> None:
        super().begin_turn(ctx)
        self._buffers = QueryBuffer(ctx.num_layers, self.n_d, first=self.n_first or self.n_d)
        self._turn_scores = [None] * ctx.num_layers
        self._decode_inputs: list[int | None] = [None] * ctx.num_layers

    def observe_prefill(self, ctx, layer_idx, q, k) -> None:
        layer = ctx.cache.layers[layer_idx]
        n_in = self._input_count(layer, ctx)
        if not self._needs_selection(n_in) or ctx.q_start + q.shape[-2] < ctx.input_end or self.first == "dense":
            return  # short input, not the final prefill chunk of this turn, or a dense first interval
        state = ctx.layer_state[layer_idx]
        rows = state.get("probe_rows")
        if self.first == "window":
            rows = torch.arange(max(0, q.shape[-2] - max(self.recent, 1)), q.shape[-2])
        elif rows is None:
            rows = probe_rows(q.shape[-2], self.seed + layer_idx)
        rows = rows.to(q.device)
        q_pos = ctx.positions(q.shape[-2], device=q.device)[rows]
        scores = attention_scores(q[:, :, rows], k, ctx.scaling, q_pos, layer.positions)
        self._accumulate(layer_idx, scores)
        self._select(ctx, layer, scores, n_in)

    def observe_decode(self, ctx, layer_idx, q, layer) -> None:
        queries = self._buffers.push(layer_idx, q)
        if queries is None:
            return
        # The input's tokens stay the same while this turn decodes: count them once.
        n_in = self._decode_inputs[layer_idx]
        if n_in is None:
            n_in = self._decode_inputs[layer_idx] = self._input_count(layer, ctx)
        if not self._needs_selection(n_in):
            return
        self.reselections += 1
        scores = attention_scores(queries, layer.keys[:, :, :n_in], ctx.scaling)
        self._accumulate(layer_idx, scores)
        self._select(ctx, layer, scores, n_in)

    def _accumulate(self, layer_idx, scores) -> None:
        if self.mode != "bounded":
            return
        acc = self._turn_scores[layer_idx]
        if acc is None or acc.shape != scores.shape:
            self._turn_scores[layer_idx] = scores.clone()
        else:
            acc += scores

    def end_turn(self, ctx) -> None:
        if self.mode != "bounded":
            return
        for layer_idx, layer in enumerate(ctx.cache.layers):
            if layer.length <= self.memory_budget:
                continue
            n = layer.length
            scores = torch.zeros(layer.keys.shape[1], n, device=layer.keys.device)
            acc = self._turn_scores[layer_idx]
            if acc is not None:
                scores[:, : acc.shape[1]] += acc
            latest = self._buffers.pending(layer_idx)
            if latest is not None:  # the latest generated queries also vote, over every resident token
                scores += attention_scores(latest, layer.keys, ctx.scaling)
            n_forced = min(n, self.sinks + self.recent)
            keep = select_top(scores, self.memory_budget - n_forced, pool=self.pool, head=self.sinks, tail=self.recent)
            layer.keep_only(keep)
