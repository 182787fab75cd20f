"""Continuous batching: one forward per iteration carries a step of every running turn.

On a CPU a decode step costs mostly the reading of the weights, so one forward that holds
the next token of eight conversations costs little more than one that holds a single one.
Every `step()`:

1. admits waiting turns, oldest first, while the KV bytes reserved by the running ones
   (each: its full prompt plus `max_new_tokens`, or what it holds allocated if more) stay
   within `kv_budget_bytes`; one turn is always admitted when none runs;
2. packs into one forward the next token of every decoding turn, plus prefill of admitted
   turns up to `chunk_tokens` tokens (a turn whose method's selection depends on the whole
   turn's queries, see `chunkable_turn`, is prefilled in one piece when its turn comes), so
   a long new turn does not stall the others' decoding;
3. preempts, newest first, while the KV bytes actually allocated exceed the budget: the
   turn is cut back to its state before the turn and waits again at the front. Its text
   already streamed is not repeated when it runs again (a victim must be greedy, seeded,
   or have streamed nothing, so that the rerun reproduces it).

Each turn attends over its own session cache with its own method (hook.py, PackedCache),
and all turn logic is `Turn`'s, so greedy output is the same as the turn run alone.
One thread drives a Scheduler; a session has at most one turn in it at a time.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .sampling import SamplingParams
from .turn import Turn, TurnResult


@dataclass
class SchedulerStats:
    iterations: int = 0
    forwards: int = 0
    max_batch: int = 0  # most turns in one forward
    mixed_iterations: int = 0  # forwards that held both prefill and decode tokens
    preemptions: int = 0
    # Iterations that held decode steps only: their wall time (forward and sampling) and the
    # tokens they generated, i.e. batched decoding's own throughput.
    decode_only_s: float = 0.0
    decode_only_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    """One turn submitted to the scheduler. `status`: waiting, running, finished,
    cancelled or failed (then `error` holds the exception)."""

    seq_id: int
    session: object  # Session
    prompt: list[int]
    sampling: SamplingParams
    messages: list[dict] | None
    reserved_bytes: int
    on_delta: Callable[["Sequence", str], None] | None = None
    status: str = "waiting"
    turn: Turn | None = None
    error: BaseException | None = None
    text: str = ""  # streamed so far
    preemptions: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0  # last admitted (the turn's own timings count from here)
    t_first: float = 0.0  # first delta streamed
    t_done: float = 0.0
    _replayed: str = ""  # text regenerated after a preemption (not streamed twice)

    @property
    def done(self) -> bool:
        return self.status in ("finished", "cancelled", "failed")

    @property
    def result(self) -> TurnResult | None:
        return self.turn.result if self.turn is not None else None

    def _release(self, delta: str) -> None:
        if self.preemptions:  # skip what the first run already streamed
            self._replayed += delta
            if len(self._replayed) <= len(self.text):
                return
            delta = self._replayed[len(self.text):]
            self._replayed = self.text + delta
        if not delta:
            return
        self.text += delta
        if not self.t_first:
            self.t_first = time.perf_counter()
        if self.on_delta is not None:
            self.on_delta(self, delta)


class Scheduler:
    def __init__(self, engine, kv_budget_bytes: int | None = None, chunk_tokens: int = 512, max_running: int = 64):
        if kv_budget_bytes is not None and (not isinstance(kv_budget_bytes, int) or kv_budget_bytes < 1):
            raise ValueError(f"kv_budget_bytes must be a positive integer or None, got {kv_budget_bytes!r}")
        for name, value in (("chunk_tokens", chunk_tokens), ("max_running", max_running)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.engine = engine
        self.kv_budget_bytes = kv_budget_bytes
        self.chunk_tokens = chunk_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()
        self._ids = itertools.count()

    # -- requests ------------------------------------------------------------------------
    def submit(self, session, prompt: list[int], sampling: SamplingParams | None = None, messages: list[dict] | None = None,
               on_delta: Callable[[Sequence, str], None] | None = None) -> Sequence:
        """Queue a turn of `session` after the token `prompt` (validated now, raising before
        anything changes); `on_delta(seq, text)` receives the streamed text."""
        if session.engine is not self.engine:
            raise ValueError("the session belongs to another engine than this scheduler's")
        if any(s.session is session for s in itertools.chain(self.waiting, self.running)):
            raise ValueError("the session already has a turn in the scheduler; submit its next turn when that one is done")
        turn = session.prepare_turn(prompt, sampling, messages)  # validation only; a fresh Turn runs it
        limit = min(len(turn.prompt) + turn.sampling.max_new_tokens, self.engine.max_context)
        seq = Sequence(next(self._ids), session, turn.prompt, turn.sampling, messages, limit * self.engine.kv_bytes_per_token, on_delta)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` now: a running turn's session is cut back to its state before the turn."""
        if seq.done:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            seq.turn.abort()
        seq.status = "cancelled"
        seq.t_done = time.perf_counter()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        """Step until every submitted turn is done."""
        while self.has_work:
            self.step()

    # -- one iteration ---------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Admit, run one packed forward, preempt if over budget; returns the turns that ended."""
        self.stats.iterations += 1
        ended = self._admit()
        batch = self._plan()
        if not batch:
            return ended
        self.stats.forwards += 1
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        prefilling = sum(seq.turn.prefilling for seq, _ in batch)
        if 0 < prefilling < len(batch):
            self.stats.mixed_iterations += 1
        t0 = time.perf_counter()
        try:
            logits = self.engine.forward_packed([(ids, seq.session.cache, seq.turn.ctx) for seq, ids in batch])
        except Exception as e:  # which turn broke it is unknown: fail them all, sessions kept consistent
            for seq, _ in batch:
                ended.append(self._fail(seq, e))
            return ended
        for (seq, ids), lg in zip(batch, logits):
            try:
                for delta in seq.turn.advance(ids, lg):
                    seq._release(delta)
            except Exception as e:
                ended.append(self._fail(seq, e))
                continue
            if seq.turn.done:
                self.running.remove(seq)
                seq.status = "finished"
                seq.t_done = time.perf_counter()
                ended.append(seq)
        if not prefilling:
            self.stats.decode_only_s += time.perf_counter() - t0
            self.stats.decode_only_tokens += len(batch)
        self._preempt()
        return ended

    def _reserved(self) -> int:
        return sum(max(s.reserved_bytes, s.session.allocated_bytes) for s in self.running)

    def _admit(self) -> list[Sequence]:
        failed = []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            budget = self.kv_budget_bytes
            if self.running and budget is not None and self._reserved() + seq.reserved_bytes > budget:
                break
            self.waiting.popleft()
            seq.turn = Turn(seq.session, seq.prompt, seq.sampling, seq.messages)
            seq.status = "running"
            seq.t_admit = time.perf_counter()
            self.running.append(seq)
            try:
                seq.turn.begin()
            except Exception as e:
                failed.append(self._fail(seq, e))
        return failed

    def _plan(self) -> list[tuple[Sequence, list[int]]]:
        """Every decoding turn's next token, then prefill chunks within the chunk budget."""
        batch = [(s, s.turn.next_input()) for s in self.running if not s.turn.prefilling]
        room = self.chunk_tokens
        for s in self.running:
            if s.turn.prefilling and room > 0:
                ids = s.turn.next_input(room if s.turn.chunkable else None)
                room -= len(ids)
                batch.append((s, ids))
        return batch

    def _preempt(self) -> None:
        budget = self.kv_budget_bytes
        if budget is None:
            return
        while len(self.running) > 1 and sum(s.session.allocated_bytes for s in self.running) > budget:
            victims = [s for s in self.running[1:] if not s.text or s.sampling.temperature == 0 or s.sampling.seed is not None]
            if not victims:
                return
            seq = victims[-1]
            self.running.remove(seq)
            seq.turn.abort()
            seq.turn = None
            seq.status = "waiting"
            seq.preemptions += 1
            seq._replayed = ""
            self.stats.preemptions += 1
            self.waiting.appendleft(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> Sequence:
        if seq in self.running:
            self.running.remove(seq)
        if seq.turn is not None and not seq.turn.done:
            seq.turn.abort()
        seq.status = "failed"
        seq.error = error
        seq.t_done = time.perf_counter()
        return seq
