"""The server's session pool, prompt builder and generation worker.

- `PromptBuilder` turns OpenAI messages into prompt token ids with the chat template, but
  splices in the ids the model generated for every assistant message it finds in the
  store (see store.py), so a resent answer matches the cached history token for token.
- `SessionPool` keeps live `Session`s (one KV cache each). A request goes to the idle
  session whose history is the longest token prefix of its prompt: continued in place when
  the whole history is a prefix, otherwise forked (the shared prefix's KV is copied into a
  new session; a session busy with another request is only ever forked). When no live
  session holds the history, it is rebuilt by prefill up to the
  last spliced answer (the state the conversation was persisted in), and the new turn is
  prefilled on top. Idle sessions are evicted least recently used first while the KV
  bytes of all sessions exceed the budget.
- `Worker` is the one thread that touches the model. It drives the engine's `Scheduler`
  (engine/scheduler.py) with up to `max_active` requests: every iteration is one forward
  that carries the next token of every decoding request plus a chunk of a new request's
  prefill (so a new request's first token does not wait for whole answers of earlier
  ones, and eight conversations cost about one weight read per token, not eight). It
  checks cancellation between iterations, and persists every finished turn before it
  reports the end of the answer.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable


from ..engine.registry import resolve_method
from ..engine.sampling import SamplingParams
from ..engine.scheduler import Scheduler, Sequence
from ..engine.session import Engine, Session, common_prefix
from .hashing import IdsHasher
from .store_api import ConversationStore

log = logging.getLogger("loopserve.server")


def kv_bytes(session: Session) -> int:
    """Bytes the session's KV cache holds allocated (store capacity and active view)."""
    return session.allocated_bytes


# -- prompt building -------------------------------------------------------------------------
@dataclass
class BuiltPrompt:
    ids: list[int]
    history_end: int = 0  # tokens up to the end of the last spliced answer (a persisted state)
    conversation_id: str | None = None  # the conversation that answer belongs to
    spliced: int = 0  # assistant messages whose generated ids were spliced in


class PromptBuilder:
    """Chat template + token splicing of the model's own answers (see module docstring).

    Safe to call from several threads: each gets its own tokenizer copy (prompts are built
    off the worker thread, and one long prompt must not hold up the others)."""

    def __init__(self, tokenizer, store: ConversationStore | None, model_key: str):
        self._source = tokenizer
        self._local = threading.local()
        self.store = store
        self.model_key = model_key
        # A token never covers more characters than the longest vocabulary entry (byte-level
        # and byte-fallback entries are at least as long as the text they decode to).
        self.max_chars_per_token = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1

    @property
    def tokenizer(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            try:
                tok = copy.deepcopy(self._source)
            except Exception:  # pragma: no cover - tokenizers that cannot be copied
                tok = self._source
            self._local.tokenizer = tok
        return tok

    def min_tokens(self, messages: list[dict]) -> int:
        """A lower bound on the prompt's token count, from its characters alone (no tokenising)."""
        chars = sum(len(m.get("content") or "") for m in messages)
        return -(-chars // self.max_chars_per_token)

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, messages: list[dict]) -> BuiltPrompt:
        full = self.render(messages)
        out = BuiltPrompt(ids=[])
        if self.store is None:
            out.ids = self.encode_text(full)
            return out
        ids: list[int] = []
        hasher = IdsHasher()
        pos = 0
        for k, m in enumerate(messages):
            content = m.get("content")
            if k == 0 or m.get("role") != "assistant" or not isinstance(content, str) or not content:
                continue
            head = self.render(messages[:k])
            start = len(head)
            if start < pos or not full.startswith(head) or full[start : start + len(content)] != content:
                continue  # the template does not render this answer verbatim after its prompt
            seg = self.encode_text(full[pos:start])
            h = hasher.copy().update(seg)
            rec = self.store.find_answer(self.model_key, h.hexdigest(), content)
            if rec is None or not rec.token_ids:
                continue
            if self.tokenizer.decode(rec.token_ids, skip_special_tokens=True) != content:
                continue  # a store written with another tokenizer
            ids += seg
            ids += rec.token_ids
            h.update(rec.token_ids)
            hasher = h
            pos = start + len(content)
            out.history_end = len(ids)
            out.conversation_id = rec.conversation_id if rec.exact else None
            out.spliced += 1
        ids += self.encode_text(full[pos:])
        out.ids = ids
        return out


# -- the pool ----------------------------------------------------------------------------------
@dataclass
class PooledSession:
    sid: str
    session: Session
    conversation_id: str
    knobs: dict
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False


@dataclass
class Acquired:
    pooled: PooledSession
    kind: str  # "continue" | "fork" | "new" (+ "+rebuild" when history was prefilled first)
    reused: int  # tokens of KV found live (kept in place or copied)
    rebuilt: int  # tokens of history prefilled before the turn (rebuild of a lost session)


class SessionPool:
    """Live sessions with LRU eviction under a KV byte budget. Used only by the worker."""

    def __init__(self, engine: Engine, budget_bytes: int, method: str | None = None, knobs: dict | None = None):
        self.engine = engine
        self.budget_bytes = int(budget_bytes)
        self.method = method or engine.method
        self.knobs = dict(engine.knobs if knobs is None else knobs)
        self.sessions: dict[str, PooledSession] = {}
        self.evictions = 0
        self.forks = 0
        self.rebuilds = 0

    def _new(self, session: Session | None, conversation_id: str | None, knobs: dict) -> PooledSession:
        s = session if session is not None else self.engine.new_session(method=self.method, knobs=knobs)
        p = PooledSession(uuid.uuid4().hex[:12], s, conversation_id or f"conv-{uuid.uuid4().hex[:16]}", dict(knobs))
        self.sessions[p.sid] = p
        return p

    def acquire(self, prompt: list[int], knobs: dict | None = None, history_end: int = 0, conversation_id: str | None = None) -> Acquired:
        knobs = dict(self.knobs if knobs is None else knobs)
        best_in_place, in_place_len = None, 0
        best_fork, fork_len = None, 0
        for p in self.sessions.values():
            # A busy session is never continued, but it may be forked: between two worker
            # steps its cache holds exactly its token_ids.
            hist = p.session.token_ids
            n = common_prefix(hist, prompt)
            if not p.busy and n == len(hist) and n > in_place_len:
                best_in_place, in_place_len = p, n
            if n > fork_len or (n == fork_len and best_fork is not None and best_fork.busy and not p.busy):
                best_fork, fork_len = p, n
        if best_in_place is not None and in_place_len >= fork_len:
            pooled, kind, reused = best_in_place, "continue", in_place_len
        else:
            pooled = None
            if best_fork is not None:
                n = min(fork_len, len(prompt) - 1)
                child = best_fork.session.fork(n, method=self.method, knobs=knobs)
                if child is not None:
                    pooled = self._new(child, conversation_id, knobs)
                    kind, reused = "fork", n
                    self.forks += 1
            if pooled is None:
                pooled = self._new(None, conversation_id, knobs)
                kind, reused = "new", 0
        pooled.busy = True
        pooled.last_used = time.monotonic()
        try:
            if pooled.knobs != knobs:
                pooled.session.method = resolve_method(self.method, knobs)
                pooled.knobs = dict(knobs)
            rebuilt = 0
            have = len(pooled.session.token_ids)
            end = min(history_end, len(prompt) - 1)
            # (A live session that lacks only the last answer token, which decoding never feeds
            # back, is not a lost history: the turn's prefill covers that token.)
            if end - have > 1 and common_prefix(pooled.session.token_ids, prompt) == have:
                pooled.session.prefill(prompt[have:end])
                rebuilt = end - have
                kind += "+rebuild"
                self.rebuilds += 1
        except BaseException:
            self.drop(pooled)
            raise
        return Acquired(pooled, kind, reused, rebuilt)

    def release(self, pooled: PooledSession) -> None:
        pooled.busy = False
        pooled.last_used = time.monotonic()
        if not pooled.session.token_ids:
            self.drop(pooled)

    def drop(self, pooled: PooledSession) -> None:
        self.sessions.pop(pooled.sid, None)

    def total_bytes(self) -> int:
        return sum(kv_bytes(p.session) for p in self.sessions.values())

    def enforce_budget(self) -> int:
        """Evict idle sessions, least recently used first, until within budget."""
        sizes = {sid: kv_bytes(p.session) for sid, p in self.sessions.items()}
        total = sum(sizes.values())
        evicted = 0
        for p in sorted((p for p in self.sessions.values() if not p.busy), key=lambda p: p.last_used):
            if total <= self.budget_bytes:
                break
            total -= sizes[p.sid]
            self.drop(p)
            evicted += 1
        self.evictions += evicted
        return evicted


# -- the worker --------------------------------------------------------------------------------
class Job:
    """One chat-completion request as the worker sees it.

    `sink(kind, payload)` reports to the request's handler (thread-safe): ("delta", text),
    ("done", info dict), ("error", exception) or ("cancelled", None); exactly one of the
    last three ends the job.
    """

    def __init__(self, prompt: BuiltPrompt, sampling: SamplingParams, knobs: dict, messages: list[dict],
                 sink: Callable[[str, object], None], request_id: str = ""):
        self.prompt = prompt
        self.sampling = sampling
        self.knobs = knobs
        self.messages = messages
        self.sink = sink
        self.request_id = request_id or uuid.uuid4().hex
        self.cancel_event = threading.Event()
        # A job still in the queue can be withdrawn (its client left) and its slot freed at
        # once; the worker claims a job before starting it. The lock makes it one or the other.
        self._claim_lock = threading.Lock()
        self._claimed = self._withdrawn = False
        self.t_submit = time.perf_counter()
        self.t_start = 0.0
        self.t_first = 0.0
        self.acquired: Acquired | None = None
        self.seq: Sequence | None = None  # the turn in the worker's scheduler
        self.deltas = 0

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def withdraw(self) -> bool:
        """Cancel a job the worker has not started: True when it never will."""
        self.cancel()
        with self._claim_lock:
            if not self._claimed:
                self._withdrawn = True
            return self._withdrawn

    def claim(self) -> bool:
        """The worker takes the job: False when it was cancelled or withdrawn before."""
        with self._claim_lock:
            if self._withdrawn or self.cancelled:
                return False
            self._claimed = True
            return True


class Worker:
    def __init__(self, pool: SessionPool, store: ConversationStore | None, model_key: str, metrics=None, max_active: int = 4,
                 pause_file: str | None = None, chunk_tokens: int = 512):
        self.pool = pool
        # While this file exists, admitted requests wait before their next step (failure
        # drills: a request provably in flight when a replica is killed).
        self.pause_file = pause_file
        self.store = store
        self.model_key = model_key
        self.metrics = metrics
        self.max_active = max(1, int(max_active))
        # The pool's LRU budget governs the KV of idle sessions; running turns are bounded
        # by max_active, so the scheduler itself takes no byte budget here.
        self.scheduler = Scheduler(pool.engine, chunk_tokens=chunk_tokens, max_running=self.max_active)
        self._jobs: dict[int, Job] = {}  # scheduler sequence id -> job
        self._q: "queue.Queue[Job | None]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.active: list[Job] = []

    # -- control -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loopserve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        self._q.put(job)

    @property
    def waiting(self) -> int:
        return self._q.qsize()

    def _m(self, fn: str, *args) -> None:
        if self.metrics is not None:
            try:
                getattr(self.metrics, fn)(*args)
            except Exception:  # pragma: no cover - metrics never break serving
                log.exception("metrics update failed")

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.pause_file and os.path.exists(self.pause_file):
                    self._stop.wait(0.01)
                    continue
                for job in list(self.active):
                    self._step(job)
                if self.active:
                    self._iterate()
            except Exception:  # pragma: no cover - the loop must survive anything
                log.exception("worker loop error")
        for job in list(self.active):
            self._cancel(job)
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.sink("error", RuntimeError("server shutting down"))

    def _admit(self) -> None:
        while len(self.active) < self.max_active:
            try:
                job = self._q.get(timeout=0.2) if not self.active else self._q.get_nowait()
            except queue.Empty:
                return
            if job is None:
                return
            if not job.claim():
                self._m("cancelled", 0)
                job.sink("cancelled", None)
                continue
            try:
                self._start(job)
            except Exception as e:
                log.exception("request %s failed to start", job.request_id)
                self._m("failed")
                job.sink("error", e)
                continue
            self.active.append(job)

    def _start(self, job: Job) -> None:
        job.t_start = time.perf_counter()
        self._m("queue_wait", job.t_start - job.t_submit)
        p = job.prompt
        acq = self.pool.acquire(p.ids, job.knobs, history_end=p.history_end, conversation_id=p.conversation_id)
        job.acquired = acq
        try:
            job.seq = self.scheduler.submit(acq.pooled.session, p.ids, job.sampling, on_delta=lambda seq, d: self._delta(job, d))
        except BaseException:
            self.pool.release(acq.pooled)
            raise
        self._jobs[job.seq.seq_id] = job
        self.pool.enforce_budget()

    def _step(self, job: Job) -> None:
        """Between two scheduler iterations, per running job: a cancelled one leaves now."""
        if job.cancelled:
            self._cancel(job)

    def _iterate(self) -> None:
        """One scheduler iteration (one forward for every running job); report what ended."""
        for seq in self.scheduler.step():
            job = self._jobs.pop(seq.seq_id, None)
            if job is None or job not in self.active:
                continue
            self.active.remove(job)
            if seq.status == "finished":
                self._finish(job)
            else:
                log.error("request %s failed: %r", job.request_id, seq.error)
                self.pool.drop(job.acquired.pooled)
                self._m("failed")
                job.sink("error", seq.error or RuntimeError(f"generation ended as {seq.status}"))

    def _delta(self, job: Job, delta: str) -> None:
        if not job.t_first:
            job.t_first = time.perf_counter()
        job.deltas += 1
        job.sink("delta", delta)

    def _cancel(self, job: Job) -> None:
        if job in self.active:
            self.active.remove(job)
        generated = 0
        if job.acquired is not None:
            s = job.acquired.pooled.session
            generated = max(0, len(s.token_ids) - len(job.prompt.ids))
            if job.seq is not None:
                self._jobs.pop(job.seq.seq_id, None)
                try:
                    self.scheduler.cancel(job.seq)  # the engine cuts the cache back to its last consistent state
                except Exception:  # pragma: no cover
                    log.exception("cancelling a running turn failed")
                    self.pool.drop(job.acquired.pooled)
            self.pool.release(job.acquired.pooled)
        self._m("cancelled", generated)
        job.sink("cancelled", None)

    def _finish(self, job: Job) -> None:
        acq = job.acquired
        res = job.seq.result
        pooled = acq.pooled
        tok = pooled.session.engine.tokenizer
        text = res.text
        decoded = tok.decode(res.token_ids, skip_special_tokens=True)
        answer_ids = list(res.token_ids) if decoded == text else None
        st = res.stats
        persisted = False
        if self.store is not None:
            try:
                self.store.save_turn(
                    pooled.conversation_id, model=self.model_key, method=self.pool.method, knobs=pooled.knobs,
                    messages=job.messages + [{"role": "assistant", "content": text}],
                    prompt_ids=job.prompt.ids, answer_text=text, answer_ids=answer_ids,
                )
                persisted = True
            except Exception:
                log.exception("could not persist conversation %s", pooled.conversation_id)
                self._m("persist_failed")
        self.pool.release(pooled)
        self.pool.enforce_budget()
        now = time.perf_counter()
        info = {
            "text": text,
            "finish_reason": st.finish_reason or "length",
            "prompt_tokens": st.prompt_tokens,
            "completion_tokens": st.new_tokens,
            # Reused from a live KV cache; history rebuilt by prefill in this request is not "cached".
            "cached_tokens": max(0, st.cached_tokens - acq.rebuilt),
            "prefill_tokens": st.prefill_tokens + acq.rebuilt,
            "rebuilt_tokens": acq.rebuilt,
            "session": acq.kind,
            "session_id": pooled.sid,
            "conversation_id": pooled.conversation_id,
            "spliced_answers": job.prompt.spliced,
            "persisted": persisted,
            "method": st.method,
            "queue_s": round(job.t_start - job.t_submit, 6),
            "ttft_s": round((job.t_first or now) - job.t_submit, 6),
            "prefill_s": round(st.prefill_s, 6),
            "decode_s": round(st.decode_s, 6),
            "kv_tokens": st.kv_tokens,
            "active_kv_tokens": st.active_kv_tokens,
        }
        self._m("finished", info)
        job.sink("done", info)
