"""The session engine: one conversation's token ids and KV cache, kept between turns.

Each turn renders the chat template for the whole conversation, finds the longest prefix it
shares with the tokens already in the cache (normally everything, the model's own answer
included), and prefills only the rest. The prefill and decode attention go through the
session's bound method (see registry.py); dense is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..attention.decode import reads_views_by_index
from ..cache.packed_cache import PackedCache
from ..cache.session_cache import SessionCache
from ..models.native_linear import use_native_linears
from ..threads import configure as configure_threads
from ..threads import ensure_configured as ensure_threads
from .hook import PackedContext, TurnContext, install
from .registry import BoundMethod, resolve_method
from .sampling import SamplingParams
from .turn import PrefillProgress, Turn, TurnResult, TurnStats, common_prefix

__all__ = ["ContextLengthError", "Engine", "PrefillResult", "Session", "TurnResult", "TurnStats", "TurnStream", "common_prefix"]


@dataclass
class PrefillResult:
    """What `Session.prefill` returns: next-token logits ``(positions, vocab)`` and the
    prefill method's diagnostics of that forward."""

    logits: torch.Tensor
    stats: dict


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context window."""


class Engine:
    """A loaded model routed through LoopServe's attention hook, and a session factory."""

    def __init__(self, loaded, method: str = "dense", knobs: dict | None = None, threads: int | None = None):
        """``threads``: the process's thread budget (:func:`loopserve.threads.configure`);
        None keeps the one configured before, or configures the default (the physical cores)."""
        if threads is not None:
            configure_threads(threads)  # a bad value fails here, before anything else
        else:
            ensure_threads()
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.method = method
        self.knobs = dict(knobs or {})
        resolve_method(method, self.knobs)  # fail fast on a bad name or knob
        # Prefill forwards may run another copy of the weights (``--dtype bf16-prefill``);
        # the KV cache keeps the decode weights' dtype either way.
        self.prefill_model = loaded.prefill_model if loaded.prefill_model is not None else self.model
        self.dtype = loaded.dtype
        self.device = loaded.device  # every tensor the engine, cache and methods create follows it
        install(self.model)
        install(self.prefill_model)
        # Decode steps' few rows read each weight once (a batch of them costs little more
        # than one row); prefill keeps sgemm. The prefill copy in bf16, if any, is left as is.
        use_native_linears(self.model)
        self.num_layers = self.model.config.num_hidden_layers
        cfg = self.model.config
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._index_views = reads_views_by_index(cfg.num_attention_heads, self.kv_heads, self.head_dim,
                                                 self.model.dtype, self.device)
        self.max_context = loaded.max_context
        eos = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for e in [self.tokenizer.eos_token_id, gen_eos]:
            if isinstance(e, int):
                eos.add(e)
            elif isinstance(e, (list, tuple)):
                eos.update(int(x) for x in e)
        self.eos_ids = eos

    def new_session(self, method: str | None = None, knobs: dict | None = None, **kw) -> "Session":
        method = method or self.method
        if knobs is None:  # the engine's knobs belong to the engine's method only
            knobs = self.knobs if method == self.method else {}
        return Session(self, method, knobs, **kw)

    def new_cache(self) -> SessionCache:
        """An empty KV cache for one conversation, stored in the decode weights' dtype; its
        selections are index views when decode attention reads rows by index."""
        return SessionCache(self.num_layers, self.model.dtype, self._index_views)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- the forward pass both phases share ---------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: list[int], cache: SessionCache, ctx: TurnContext, all_logits: bool = False) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(ctx.q_start, ctx.q_start + len(ids), device=self.device).unsqueeze(0)
        out = self._weights(ctx)(
            input_ids=input_ids,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            loopserve_ctx=ctx,
        )
        return out.logits[0].float()

    def _weights(self, ctx: TurnContext) -> torch.nn.Module:
        """The model copy a forward runs: the prefill weights while the turn's input is being
        read (every chunk of it, however long), the decode weights after."""
        return self.prefill_model if ctx.q_start < ctx.input_end else self.model

    @torch.inference_mode()
    def forward_packed(self, steps: list[tuple[list[int], SessionCache, TurnContext]]) -> list[torch.Tensor]:
        """One forward over a step of several conversations, each `(ids, cache, ctx)`, packed
        along the sequence: the linear layers read the weights once for all of them, and
        attention runs per conversation over its own cache (hook.py, PackedCache). Returns
        each conversation's (1, V) logits at its last token.

        With separate prefill weights, prefill chunks and decode tokens go in two forwards,
        so that every step runs with the weights it would use alone."""
        if self.prefill_model is not self.model:
            groups = [[i for i, (_, _, ctx) in enumerate(steps) if self._weights(ctx) is model]
                      for model in (self.prefill_model, self.model)]
            if all(groups):
                out: list[torch.Tensor | None] = [None] * len(steps)
                for group in groups:
                    for i, lg in zip(group, self._forward_packed([steps[i] for i in group])):
                        out[i] = lg
                return out
        return self._forward_packed(steps)

    def _forward_packed(self, steps: list[tuple[list[int], SessionCache, TurnContext]]) -> list[torch.Tensor]:
        lengths = [len(ids) for ids, _, _ in steps]
        packed = PackedCache([cache for _, cache, _ in steps], lengths)
        dev = self.device
        input_ids = torch.tensor([[t for ids, _, _ in steps for t in ids]], dtype=torch.long, device=dev)
        pos = torch.cat([torch.arange(ctx.q_start, ctx.q_start + len(ids), device=dev) for ids, _, ctx in steps]).unsqueeze(0)
        last = torch.tensor(lengths, device=dev).cumsum(0) - 1
        out = self._weights(steps[0][2])(
            input_ids=input_ids,
            position_ids=pos,
            cache=packed,
            use_cache=True,
            logits_to_keep=last,
            loopserve_ctx=PackedContext([ctx for _, _, ctx in steps], lengths, packed),
        )
        return [out.logits[0, i : i + 1].float() for i in range(len(steps))]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes in a full (dense) cache, all layers."""
        itemsize = next(self.model.parameters()).element_size()
        return self.num_layers * self.kv_heads * self.head_dim * 2 * itemsize


class Session:
    """One conversation. Use `chat()` for a whole answer or `stream()` for text deltas."""

    def __init__(self, engine: Engine, method: str, knobs: dict | None = None, system_prompt: str | None = None, reuse_kv: bool = True):
        self.engine = engine
        self.method: BoundMethod = resolve_method(method, knobs)
        self.reuse_kv = reuse_kv
        self.system_prompt = system_prompt
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self.token_ids: list[int] = []  # exactly the tokens whose KV is in the cache
        self.cache = self.engine.new_cache()
        self.turns: list[TurnStats] = []

    # -- public API ----------------------------------------------------------------------
    def chat(self, text: str, sampling: SamplingParams | None = None) -> TurnResult:
        stream = self.stream(text, sampling)
        for _ in stream:
            pass
        return stream.result

    def stream(self, text: str, sampling: SamplingParams | None = None,
               progress: PrefillProgress | None = None) -> "TurnStream":
        """Validate now (raising before anything changes), generate lazily.

        ``progress(layers_done, num_layers, tokens)`` is called after each layer of the
        turn's prefill (a long prefill takes seconds before the first token).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty message: the user message must contain non-whitespace text")
        sampling = (sampling or SamplingParams()).validate()
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.engine.encode_messages(messages)
        self._check_fits(prompt)
        return TurnStream(Turn(self, prompt, sampling, messages, progress))

    def stream_ids(self, prompt: list[int], sampling: SamplingParams | None = None) -> "TurnStream":
        """Generate after an explicit token prompt (the server's path: it owns the messages)."""
        return TurnStream(self.prepare_turn(prompt, sampling))

    def prepare_turn(self, prompt: list[int], sampling: SamplingParams | None = None, messages: list[dict] | None = None) -> Turn:
        """A validated, not yet started turn after the token `prompt`, for a driver of the
        forwards such as the Scheduler (validation raises before anything changes)."""
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("the prompt must be a non-empty list of token ids")
        sampling = (sampling or SamplingParams()).validate()
        self._check_fits(prompt)
        return Turn(self, list(prompt), sampling, messages)

    def _check_fits(self, prompt: list[int]) -> None:
        limit = self.engine.max_context
        if len(prompt) >= limit:
            raise ContextLengthError(
                f"prompt is {len(prompt)} tokens, beyond the model's context window of {limit} tokens "
                "(one position must remain for the answer)"
            )

    def checkpoint(self) -> tuple[int, list[dict], int]:
        """A point to `rewind()` to (benchmarks repeat a turn from the same state)."""
        return len(self.token_ids), list(self.messages), len(self.turns)

    def rewind(self, checkpoint: tuple[int, list[dict], int]) -> None:
        n, messages, turns = checkpoint
        if n < len(self.token_ids):
            self.cache.clear_views()
            self.cache.crop(n - len(self.token_ids))
            self.token_ids = self.token_ids[:n]
        self.messages = list(messages)
        self.turns = self.turns[:turns]

    # -- lifecycle operations (the server and benchmarks use only these) ------------------
    def prefill(self, ids: list[int], all_logits: bool = False) -> "PrefillResult | None":
        """Append `ids` to the history by one prefill forward, generating nothing (rebuilds
        of a lost history, benchmark set-ups and diagnostics). Returns the next-token logits
        (of the last position, or of every position with `all_logits`) and the prefill
        method's per-forward diagnostics (e.g. `prefill_density`, one value per layer); None
        for no ids. A failed forward starts the session over."""
        if not ids:
            return None
        eng, m = self.engine, self.method
        self._check_fits(self.token_ids + list(ids))
        start = len(self.token_ids)
        ctx = TurnContext(self.cache, m.prefill, m.decode, q_start=start, input_end=start + len(ids), num_layers=eng.num_layers)
        m.decode.begin_turn(ctx)
        try:
            logits = eng.forward(list(ids), self.cache, ctx, all_logits=all_logits)
        except BaseException:
            self.reset()  # a half-written forward
            raise
        self.token_ids.extend(ids)
        self.cache.clear_views()
        return PrefillResult(logits, {k: list(v) for k, v in ctx.stats.items()})

    def fork(self, n: int | None = None, method: str | None = None, knobs: dict | None = None) -> "Session | None":
        """A new session (method and knobs as in `Engine.new_session`) whose cache holds a
        copy of this one's first `n` tokens (default all), or None when the cache cannot be
        cut there (bounded-mode eviction). This session is left untouched."""
        n = len(self.token_ids) if n is None else n
        if not 0 <= n <= len(self.token_ids):
            raise ValueError(f"cannot fork {n} tokens of a session holding {len(self.token_ids)}")
        cache = self.cache.prefix_copy(n)
        if cache is None:
            return None
        child = self.engine.new_session(method=method, knobs=knobs, system_prompt=self.system_prompt, reuse_kv=self.reuse_kv)
        child.cache = cache
        child.token_ids = list(self.token_ids[:n])
        return child

    @property
    def allocated_bytes(self) -> int:
        """KV bytes this session holds allocated (capacity included): what budgets count."""
        return self.cache.allocated_bytes

    def stats_table(self) -> list[dict]:
        return [t.as_dict() for t in self.turns]


class TurnStream:
    """Iterator of text deltas for one turn, run alone (one forward per step over the
    session's own cache); `.result` holds the TurnResult when done."""

    def __init__(self, turn: Turn):
        self.session = turn.session
        self.turn = turn
        self._gen = self._run()

    @property
    def result(self) -> TurnResult | None:
        return self.turn.result

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _run(self) -> Iterator[str]:
        turn, eng = self.turn, self.session.engine
        try:
            turn.begin()
            while not turn.done:
                ids = turn.next_input()
                logits = eng.forward(ids, self.session.cache, turn.ctx)
                yield from turn.advance(ids, logits)
        except BaseException:
            if not turn.done:  # a finished turn's cache is already consistent
                turn.abort()
            raise
