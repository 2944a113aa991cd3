"""Continuous batching: one thread owns the engine and runs step after step. Between steps new
requests take free KV slots and finished or cancelled ones give theirs back. Every step carries
each decoding sequence's one token and, within a budget of `prefill_chunk` tokens, the next
chunk of prompts still being prefilled, so a long prompt never stalls running streams.

Each request has its own slot, positions, sampler and seed, and the same tokens as
coordinator/generate.py: stop on BOS or EOS, the token sampled at the last position of the
context is emitted but not fed. Events reach the submitter through its callback, called on the
scheduler's thread (the HTTP app hands them to its event loop)."""

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmtp.common.formats.tokenizer import Tokenizer
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.common.model.transformer import StepSequence

from .metrics import SchedulerMetrics
from .text_stream import TextStream


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_id: int


@dataclass(frozen=True)
class Finished:
    """reason: "stop" (EOS or a stop string), "length" (max_tokens or the context), "cancelled",
    or "error" (with `error`)."""

    reason: str
    prompt_tokens: int
    token_ids: tuple[int, ...]
    error: str | None = None


@dataclass(frozen=True)
class Rejected:
    """Never started: status 503 (no slot in time, retry after `retry_after` s) or 400."""

    status: int
    message: str
    retry_after: float | None = None


Event = TextDelta | Finished | Rejected


@dataclass
class Ticket:
    """A submitted request, as its submitter holds it."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    on_event: Callable[[Event], None]
    deadline: float  # monotonic time by which it must have a slot
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Running:
    ticket: Ticket
    slot: int
    sampler: Sampler
    text: TextStream
    n_prefilled: int = 0
    next_token: int | None = None  # sampled, not yet fed
    generated: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        return len(self.ticket.prompt_ids) + len(self.generated) - (self.next_token is not None)


class Scheduler:
    def __init__(self, engine, tokenizer: Tokenizer, prefill_chunk: int = 64, queue_timeout: float = 30.0,
                 max_waiting: int = 256, bos_id: int = 1, eos_id: int = 2):
        self.engine = engine
        self.tokenizer = tokenizer
        self.seq_len = engine.config.seq_len
        self.prefill_chunk = prefill_chunk
        self.queue_timeout = queue_timeout
        self.max_waiting = max_waiting
        self.end_ids = (bos_id, eos_id)
        self.metrics = SchedulerMetrics(n_slots=engine.n_slots)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Ticket] = deque()
        self._running: list[_Running] = []
        self._free_slots = list(range(engine.n_slots))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmtp-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               queue_timeout: float | None = None) -> Ticket:
        """Queue a request; its events arrive through on_event. prompt_ids: BOS included."""
        wait = self.queue_timeout if queue_timeout is None else queue_timeout
        ticket = Ticket(tuple(prompt_ids), params, on_event, time.monotonic() + wait)
        self.metrics.requests_received += 1
        if not 1 <= len(prompt_ids) < self.seq_len:
            self._send(ticket, Rejected(400, f"prompt is {len(prompt_ids)} tokens; the context holds "
                                             f"{self.seq_len} and needs room for one more"))
        elif self._stopping.is_set():
            self._send(ticket, Rejected(503, "server is shutting down", retry_after=5.0))
        else:
            self._inbox.put(ticket)
        return ticket

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop (running requests end with an error) and wait for it; the engine stays open."""
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    # --- the loop (scheduler thread only) ---

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._take_inbox(block=not self._running)
            self._drop_cancelled()
            self._expire_waiting()
            self._admit()
            self.metrics.waiting = len(self._waiting)
            if self._running:
                self._step()
        for ticket in list(self._waiting) + self._drain_inbox():
            self._send(ticket, Rejected(503, "server is shutting down", retry_after=5.0))
        for running in list(self._running):
            self._finish(running, "error", "server is shutting down")

    def _take_inbox(self, block: bool) -> None:
        timeout = None
        if block:
            timeout = 0.5 if not self._waiting else max(0.0, min(t.deadline for t in self._waiting) - time.monotonic())
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        for ticket in [item] + self._drain_inbox():
            if ticket is None:
                continue
            if len(self._waiting) >= self.max_waiting:
                self._send(ticket, Rejected(503, f"{self.max_waiting} requests are already waiting",
                                            retry_after=self._retry_after()))
            else:
                self._waiting.append(ticket)

    def _drain_inbox(self) -> list:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return [item for item in items if item is not None]

    def _drop_cancelled(self) -> None:
        for running in [r for r in self._running if r.ticket.cancelled.is_set()]:
            self._finish(running, "cancelled")
        kept = [t for t in self._waiting if not t.cancelled.is_set()]
        self.metrics.cancelled += len(self._waiting) - len(kept)
        self._waiting = deque(kept)

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        while self._waiting and self._waiting[0].deadline <= now and not self._free_slots:
            ticket = self._waiting.popleft()
            self.metrics.rejected += 1
            self._send(ticket, Rejected(503, f"no free slot of {self.engine.n_slots} within the wait",
                                        retry_after=self._retry_after()))

    def _retry_after(self) -> float:
        return max(1.0, round(self.metrics.mean_step_seconds() * 32))

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            ticket = self._waiting.popleft()
            params = ticket.params
            sampler = Sampler(SamplerConfig(temperature=params.temperature, topp=params.top_p,
                                            topk=params.top_k, seed=params.seed))
            text = TextStream(self.tokenizer, params.stop, previous_id=ticket.prompt_ids[-1])
            self._running.append(_Running(ticket, self._free_slots.pop(0), sampler, text))
            self.metrics.running = len(self._running)

    def _step(self) -> None:
        """One engine step: all decoding sequences, then prompt chunks within the budget."""
        chosen: list[tuple[_Running, list[int]]] = []
        for running in self._running:
            if running.next_token is not None:
                chosen.append((running, [running.next_token]))
        budget = self.prefill_chunk
        for running in self._running:
            remaining = len(running.ticket.prompt_ids) - running.n_prefilled
            if running.next_token is None and remaining > 0 and budget > 0:
                take = min(remaining, budget)
                chosen.append((running, list(running.ticket.prompt_ids[running.n_prefilled:running.n_prefilled + take])))
                budget -= take
        sequences = [StepSequence(r.slot, r.position if r.next_token is not None else r.n_prefilled, len(tokens))
                     for r, tokens in chosen]
        started = time.perf_counter()
        try:
            logits = self.engine.step(np.asarray([t for _, tokens in chosen for t in tokens]), sequences)
        except Exception as error:  # a lost worker that recovery could not bring back, or a bug
            print(f"llmtp: serve: step failed: {error}", file=sys.stderr)
            for running in list(self._running):
                self._finish(running, "error", f"engine step failed: {error}")
            return
        self.metrics.record_step(time.perf_counter() - started, sum(len(tokens) for _, tokens in chosen))
        for row, (running, tokens) in enumerate(chosen):
            if running.next_token is None:
                running.n_prefilled += len(tokens)
                self.metrics.prompt_tokens += len(tokens)
                if running.n_prefilled < len(running.ticket.prompt_ids):
                    continue
            running.next_token = None
            self._take_sample(running, running.sampler.sample(logits[row]))

    def _take_sample(self, running: _Running, token: int) -> None:
        if token in self.end_ids:
            return self._finish(running, "stop")
        running.generated.append(token)
        self.metrics.completion_tokens += 1
        text = running.text.push(token)
        if text or not running.text.stopped:
            self._send(running.ticket, TextDelta(text, token))
        if running.text.stopped:
            return self._finish(running, "stop")
        if len(running.generated) >= running.ticket.params.max_tokens:
            return self._finish(running, "length")
        position = len(running.ticket.prompt_ids) + len(running.generated) - 1
        if position >= self.seq_len:  # the context is full: emitted, never fed
            return self._finish(running, "length")
        running.next_token = token

    def _finish(self, running: _Running, reason: str, error: str | None = None) -> None:
        self._running.remove(running)
        self._free_slots.append(running.slot)
        self._free_slots.sort()
        self.metrics.running = len(self._running)
        if reason in ("stop", "length"):
            tail = running.text.finish()
            if tail:
                self._send(running.ticket, TextDelta(tail, -1))
            self.metrics.completed += 1
        elif reason == "cancelled":
            self.metrics.cancelled += 1
        else:
            self.metrics.failed += 1
        self._send(running.ticket, Finished(reason, len(running.ticket.prompt_ids), tuple(running.generated), error))

    @staticmethod
    def _send(ticket: Ticket, event: Event) -> None:
        try:
            ticket.on_event(event)
        except Exception as error:  # a submitter's bug must not stop everyone else's streams
            print(f"llmtp: serve: event callback failed: {error!r}", file=sys.stderr)
