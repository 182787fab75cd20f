"""The session engine: one conversation's token ids and KV cache, kept between turns.

Each turn renders the chat template for the whole conversation, finds the longest prefix it
shares with the tokens already in the cache (normally everything, the model's own answer
included), and prefills only the rest. The prefill and decode attention go through the
session's bound method (see registry.py); dense is the reference.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from ..cache.session_cache import SessionCache
from ..threads import configure as configure_threads
from ..threads import ensure_configured as ensure_threads
from .hook import TurnContext, install
from .registry import BoundMethod, resolve_method
from .sampling import Sampler, SamplingParams


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # whole conversation prompt of this turn
    cached_tokens: int = 0  # reused from the KV cache, not prefilled
    prefill_tokens: int = 0  # prefilled this turn
    new_tokens: int = 0  # generated this turn
    ttft_s: float = 0.0
    tpot_s: float = 0.0  # mean time per output token after the first
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_tokens: int = 0  # resident per layer at the end of the turn
    active_kv_tokens: int = 0  # attended per KV head at the last decode step
    kv_bytes: int = 0  # resident KV bytes, all layers
    peak_rss_mb: float = 0.0
    finish_reason: str = ""
    method: str = ""
    extra: dict = field(default_factory=dict)  # method diagnostics (density, recall, ...)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TurnResult:
    text: str
    token_ids: list[int]
    stats: TurnStats


def _peak_rss_mb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (slice comparisons run at C speed)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


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
        install(self.model)
        self.num_layers = self.model.config.num_hidden_layers
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

    def encode_messages(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- the forward pass both phases share ---------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: list[int], cache: SessionCache, ctx: TurnContext, all_logits: bool = False) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(ctx.q_start, ctx.q_start + len(ids)).unsqueeze(0)
        out = self.model(
            input_ids=input_ids,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            loopserve_ctx=ctx,
        )
        return out.logits[0]


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
        self.cache = SessionCache(self.engine.num_layers)
        self.turns: list[TurnStats] = []

    # -- public API ----------------------------------------------------------------------
    def chat(self, text: str, sampling: SamplingParams | None = None) -> TurnResult:
        stream = self.stream(text, sampling)
        for _ in stream:
            pass
        return stream.result

    def stream(self, text: str, sampling: SamplingParams | None = None) -> "TurnStream":
        """Validate now (raising before anything changes), generate lazily."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty message: the user message must contain non-whitespace text")
        sampling = (sampling or SamplingParams()).validate()
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.engine.encode_messages(messages)
        self._check_fits(prompt)
        return TurnStream(self, prompt, sampling, messages)

    def stream_ids(self, prompt: list[int], sampling: SamplingParams | None = None) -> "TurnStream":
        """Generate after an explicit token prompt (the server's path: it owns the messages)."""
        if not prompt:
            raise ValueError("empty prompt")
        sampling = (sampling or SamplingParams()).validate()
        self._check_fits(prompt)
        return TurnStream(self, list(prompt), sampling, None)

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
    def prefill(self, ids: list[int]) -> None:
        """Append `ids` to the history by one prefill forward, generating nothing (rebuilds
        of a lost history, benchmark set-ups). A failed forward starts the session over."""
        if not ids:
            return
        eng, m = self.engine, self.method
        self._check_fits(self.token_ids + list(ids))
        start = len(self.token_ids)
        ctx = TurnContext(self.cache, m.prefill, m.decode, q_start=start, input_end=start + len(ids), num_layers=eng.num_layers)
        m.decode.begin_turn(ctx)
        try:
            eng.forward(list(ids), self.cache, ctx)
        except BaseException:
            self.reset()  # a half-written forward
            raise
        self.token_ids.extend(ids)
        self.cache.clear_views()

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
    """Iterator of text deltas for one turn; `.result` holds the TurnResult when done."""

    def __init__(self, session: Session, prompt: list[int], sampling: SamplingParams, messages: list[dict] | None):
        self.session = session
        self.prompt = prompt
        self.sampling = sampling
        self.messages = messages
        self.result: TurnResult | None = None
        self._gen = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def _run(self) -> Iterator[str]:
        s, eng = self.session, self.session.engine
        method = s.method
        prompt, params = self.prompt, self.sampling
        stats = TurnStats(prompt_tokens=len(prompt), method=method.name)
        # Longest shared prefix with what the cache holds; at least one token is prefilled
        # so that the next-token logits exist.
        reuse = common_prefix(s.token_ids, prompt) if s.reuse_kv else 0
        reuse = min(reuse, len(prompt) - 1)
        t0 = time.perf_counter()
        try:
            if reuse < len(s.token_ids):
                try:
                    s.cache.crop(reuse - len(s.token_ids))
                except RuntimeError:  # bounded-mode eviction makes the tail uncroppable
                    s.cache = SessionCache(eng.num_layers)
                    reuse = 0
                s.token_ids = s.token_ids[:reuse]
            ctx = TurnContext(s.cache, method.prefill, method.decode, q_start=reuse, input_end=len(prompt), num_layers=eng.num_layers)
            method.decode.begin_turn(ctx)
            new = prompt[reuse:]
            logits = eng.forward(new, s.cache, ctx)
            s.token_ids.extend(new)
            method.decode.after_prefill(ctx)
            stats.cached_tokens, stats.prefill_tokens = reuse, len(new)
            stats.extra["prefill_attention_s"] = ctx.prefill_attention_s
            sampler = Sampler(params)
            generated: list[int] = []
            history = torch.tensor([prompt], dtype=torch.long)
            tok = sampler(logits[-1:], history)
            stats.ttft_s = stats.prefill_s = time.perf_counter() - t0
            text = emitted = ""
            finish = "length"
            hold = max((len(x) for x in params.stop), default=1) - 1
            t_dec = time.perf_counter()
            while True:
                if tok in eng.eos_ids and not params.ignore_eos:
                    finish = "stop"
                    break
                generated.append(tok)
                text = eng.tokenizer.decode(generated, skip_special_tokens=True)
                cut = min((text.find(x) for x in params.stop if x in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                if finish == "stop" or len(generated) >= params.max_new_tokens or len(s.token_ids) + 1 >= eng.max_context:
                    break
                # Hold back an incomplete UTF-8 character and a possible stop-string prefix.
                safe = text[: len(text) - hold] if hold else text
                if not safe.endswith("\ufffd") and len(safe) > len(emitted) and safe.startswith(emitted):
                    yield safe[len(emitted):]
                    emitted = safe
                ctx.q_start = len(s.token_ids)
                logits = eng.forward([tok], s.cache, ctx)
                s.token_ids.append(tok)
                history = torch.tensor([prompt + generated], dtype=torch.long)
                tok = sampler(logits[-1:], history)
            # Flush what was held back (an incomplete character, a stop-string prefix).
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
            emitted = text
            stats.new_tokens = len(generated)
            stats.decode_s = time.perf_counter() - t_dec
            stats.tpot_s = stats.decode_s / max(len(generated) - 1, 1) if len(generated) > 1 else 0.0
            method.decode.end_turn(ctx)
        except BaseException:
            # Keep the session usable: the cache must hold exactly `token_ids`. A failure
            # mid-forward may have appended KV for some layers only, so cut back to the
            # last consistent length (everything before this turn's new tokens).
            self._restore(reuse)
            raise
        finish = finish if finish else "length"
        stats.finish_reason = finish
        stats.kv_tokens = s.cache.resident_tokens
        stats.active_kv_tokens = s.cache.active_tokens
        stats.kv_bytes = s.cache.nbytes
        stats.peak_rss_mb = _peak_rss_mb()
        stats.extra.update({k: sum(v) / len(v) for k, v in ctx.stats.items() if v})
        s.turns.append(stats)
        if self.messages is not None:
            s.messages = self.messages + [{"role": "assistant", "content": emitted}]
        self.result = TurnResult(emitted, generated, stats)

    def _restore(self, keep: int) -> None:
        s = self.session
        keep = min(keep, len(s.token_ids))
        try:
            for layer in s.cache.layers:
                layer.clear_view()
                if layer.length > keep and layer.is_initialized:
                    layer.crop(keep - layer.next_position)
            s.token_ids = s.token_ids[:keep]
        except RuntimeError:
            s.cache = SessionCache(s.engine.num_layers)
            s.token_ids = []
