"""One turn of a conversation as a state machine, advanced one forward pass at a time.

Whoever runs the forwards drives it: `TurnStream` alone (one forward per step over the
session's own cache) or the `Scheduler` (one forward that packs a step of many turns).
Both share every decision below (KV reuse, sampling, stop conditions, streaming holds,
statistics), so a turn produces the same tokens whichever drives it.

    turn.begin()
    while not turn.done:
        ids = turn.next_input(limit)      # a prefill chunk, or the last sampled token
        logits = <forward ids over turn.session.cache with turn.ctx>
        deltas = turn.advance(ids, logits)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .hook import TurnContext
from .sampling import Sampler, SamplingParams

# Prefill progress: (layers done, layers in the model, tokens prefilled in this forward).
PrefillProgress = Callable[[int, int, int], None]


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


class Turn:
    """One turn of `session` after the token `prompt` (see the module docstring)."""

    def __init__(self, session, prompt: list[int], sampling: SamplingParams, messages: list[dict] | None,
                 progress: PrefillProgress | None = None):
        self.session = session
        self.prompt = prompt
        self.sampling = sampling
        self.messages = messages
        self.progress = progress
        self.stats = TurnStats(prompt_tokens=len(prompt), method=session.method.name)
        self.ctx: TurnContext | None = None
        self.reuse = 0
        self.pending: list[int] = []  # what the next forward(s) feed: prefill rest, or [token]
        self.chunkable = False  # set by begin(): whether a driver may split the prefill
        self.sampler: Sampler | None = None  # set once the prefill is complete
        self.generated: list[int] = []
        self.text = self.emitted = ""
        self.finish = "length"
        self.done = False
        self.result: TurnResult | None = None
        self._hold = max((len(x) for x in sampling.stop), default=1) - 1
        self._t0 = self._t_dec = 0.0

    @property
    def prefilling(self) -> bool:
        return self.sampler is None

    def begin(self) -> None:
        s, eng = self.session, self.session.engine
        # Longest shared prefix with what the cache holds; at least one token is prefilled
        # so that the next-token logits exist.
        reuse = common_prefix(s.token_ids, self.prompt) if s.reuse_kv else 0
        self.reuse = reuse = min(reuse, len(self.prompt) - 1)
        self._t0 = time.perf_counter()
        if reuse < len(s.token_ids):
            try:
                s.cache.crop(reuse - len(s.token_ids))
            except RuntimeError:  # bounded-mode eviction makes the tail uncroppable
                s.cache = eng.new_cache()
                self.reuse = reuse = 0
            s.token_ids = s.token_ids[:reuse]
        m = s.method
        self.ctx = TurnContext(s.cache, m.prefill, m.decode, q_start=reuse, input_end=len(self.prompt), num_layers=eng.num_layers)
        if self.progress is not None:
            progress = self.progress
            self.ctx.on_prefill_layer = lambda layer, n: progress(layer + 1, eng.num_layers, n)
        m.decode.begin_turn(self.ctx)
        self.pending = self.prompt[reuse:]
        self.stats.cached_tokens, self.stats.prefill_tokens = reuse, len(self.pending)
        self.chunkable = m.chunkable_turn(len(self.pending), len(self.prompt))

    def next_input(self, limit: int | None = None) -> list[int]:
        """The tokens of this turn's next forward: up to `limit` prefill tokens (all if None),
        or the last sampled token. Sets the forward's first position."""
        self.ctx.q_start = len(self.session.token_ids)
        return list(self.pending if limit is None else self.pending[: max(1, limit)])

    def advance(self, ids: list[int], logits: torch.Tensor) -> list[str]:
        """Account for a forward that fed `ids` (`logits`: (1, V) at its last position) and
        return the text deltas it releases (none while the prefill is incomplete)."""
        s, params = self.session, self.sampling
        s.token_ids.extend(ids)
        self.pending = self.pending[len(ids):]
        if self.sampler is None:
            if self.pending:
                return []  # more prefill chunks to come
            self.ctx.on_prefill_layer = None
            s.method.decode.after_prefill(self.ctx)
            self.stats.extra["prefill_attention_s"] = self.ctx.prefill_attention_s
            self.sampler = Sampler(params)
            tok = self.sampler(logits[-1:], self._history())
            self.stats.ttft_s = self.stats.prefill_s = time.perf_counter() - self._t0
            self._t_dec = time.perf_counter()
        else:
            tok = self.sampler(logits[-1:], self._history())
        return self._accept(tok)

    def _history(self) -> torch.Tensor | None:
        """The turn's tokens so far (1, n), for a sampler that reads them, else None."""
        return torch.tensor([self.prompt + self.generated], dtype=torch.long) if self.sampler.uses_history else None

    def _accept(self, tok: int) -> list[str]:
        s, eng, params = self.session, self.session.engine, self.sampling
        if tok in eng.eos_ids and not params.ignore_eos:
            self.finish = "stop"
            return self._complete()
        self.generated.append(tok)
        text = eng.tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = min((text.find(x) for x in params.stop if x in text), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        self.text = text
        if self.finish == "stop" or len(self.generated) >= params.max_new_tokens or len(s.token_ids) + 1 >= eng.max_context:
            return self._complete()
        self.pending = [tok]
        # Hold back an incomplete UTF-8 character and a possible stop-string prefix.
        safe = text[: len(text) - self._hold] if self._hold else text
        if not safe.endswith("\ufffd") and len(safe) > len(self.emitted) and safe.startswith(self.emitted):
            delta, self.emitted = safe[len(self.emitted):], safe
            return [delta]
        return []

    def _complete(self) -> list[str]:
        s, st = self.session, self.stats
        out = []
        # Flush what was held back (an incomplete character, a stop-string prefix).
        if len(self.text) > len(self.emitted) and self.text.startswith(self.emitted):
            out.append(self.text[len(self.emitted):])
        self.emitted = self.text
        st.new_tokens = len(self.generated)
        st.decode_s = time.perf_counter() - self._t_dec
        st.tpot_s = st.decode_s / max(st.new_tokens - 1, 1) if st.new_tokens > 1 else 0.0
        s.method.decode.end_turn(self.ctx)
        st.finish_reason = self.finish
        st.kv_tokens = s.cache.resident_tokens
        st.active_kv_tokens = s.cache.active_tokens
        st.kv_bytes = s.cache.nbytes
        st.peak_rss_mb = _peak_rss_mb()
        st.extra.update({k: sum(v) / len(v) for k, v in self.ctx.stats.items() if v})
        s.turns.append(st)
        if self.messages is not None:
            s.messages = self.messages + [{"role": "assistant", "content": self.emitted}]
        self.pending = []
        self.done = True
        self.result = TurnResult(self.emitted, self.generated, st)
        return out

    def abort(self) -> None:
        """Keep the session usable after a failure or cancellation: the cache must hold
        exactly `token_ids`. A failure mid-forward may have appended KV for some layers
        only, so cut back to the last consistent length (before this turn's new tokens)."""
        s = self.session
        keep = min(self.reuse, len(s.token_ids))
        try:
            for layer in s.cache.layers:
                layer.clear_view()
                if layer.length > keep and layer.is_initialized:
                    layer.crop(keep - layer.next_position)
            s.token_ids = s.token_ids[:keep]
        except RuntimeError:
            s.cache = s.engine.new_cache()
            s.token_ids = []
        self.pending = []
        self.done = True
