"""The scheduler thread that owns the `SlotEngine`: admits queued requests into free slots between
decode steps, and releases finished, abandoned or timed-out ones. The queue is bounded: past
`max_queue` waiting requests a submission is refused with 429 and a Retry-After."""

from __future__ import annotations

import collections
import queue
import threading
import time
import traceback
from collections.abc import Callable

from mimo_jax.serving.detokenize import Generation
from mimo_jax.serving.errors import RequestError

RETRY_AFTER_S = 1  # what a refused client is told to wait: slots free up within a few decode steps


class Scheduler:
    """Owns the engine on one thread: admits queued requests into free slots, steps, routes tokens."""

    def __init__(self, engine, log: Callable = print, max_queue: int | None = None,
                 request_timeout: float | None = None):
        """max_queue: requests that may wait while every slot is busy (None: no bound; 0: none
        wait); request_timeout: seconds from submission after which a request is ended with 503,
        queued or running (None: none)."""
        self.engine = engine
        self.log = log
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted nor dropped
        self._inbox: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()
        self._active: dict[int, Generation] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mimo-scheduler", daemon=True)
        self.steps = 0  # engine steps
        self.completed = 0  # requests that ran to a finish reason
        self.cancelled = 0  # requests abandoned by their clients (in a slot or still queued)
        self.refused = 0  # submissions refused because the queue was full
        self.timed_out = 0  # requests ended by request_timeout

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    def stats(self) -> dict:
        return {"active": len(self._active), "queued": self._queued, "max_queue": self.max_queue,
                "completed": self.completed, "cancelled": self.cancelled, "refused": self.refused,
                "timed_out": self.timed_out}

    def start(self):
        self._thread.start()

    def submit(self, gen: Generation):
        """Queues `gen`; raises RequestError (429, with Retry-After) when `max_queue` are waiting."""
        if not self.alive:
            gen.fail(503, "The server is shutting down.")
            return
        with self._lock:
            free = max(0, self.engine.num_slots - len(self._active))  # those submitted now are admitted next
            if self.max_queue is not None and self._queued >= self.max_queue + free:
                self.refused += 1
                raise RequestError(f"The server is at capacity: {self._queued} requests are waiting for a slot "
                                   f"(--max-queue {self.max_queue}). Retry later.", status=429, code="queue_full",
                                   type="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._queued += 1
        self._inbox.put(gen)

    def close(self, timeout: float = 30.0):
        self._closed.set()
        self._inbox.put(None)  # wakes the loop
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self):
        try:
            while not self._closed.is_set():
                self._receive(block=not self._active and not self._pending)
                self._drop_cancelled()
                self._drop_expired()
                self._admit()
                if self._active:
                    self._step()
        except BaseException:  # noqa: BLE001 (a bug here must not leave clients waiting forever)
            self.log("scheduler crashed:\n" + traceback.format_exc())
        finally:
            self._closed.set()
            for gen in [*self._active.values(), *self._pending, *self._drain_inbox()]:
                gen.fail(503, "The server is shutting down.")
            for slot in list(self._active):
                self._release(slot)

    def _drain_inbox(self) -> list[Generation]:
        out = []
        while True:
            try:
                gen = self._inbox.get_nowait()
            except queue.Empty:
                return out
            if gen is not None:
                out.append(gen)

    def _receive(self, block: bool):
        if block:
            gen = self._inbox.get()
            if gen is not None:
                self._pending.append(gen)
        self._pending.extend(self._drain_inbox())

    def _drop_cancelled(self):
        for slot, gen in list(self._active.items()):
            if gen.cancelled.is_set():
                self.cancelled += 1
                self._release(slot)
        gone = sum(g.cancelled.is_set() for g in self._pending)
        if gone:
            self.cancelled += gone
            self._unqueue(gone)
            self._pending = collections.deque(g for g in self._pending if not g.cancelled.is_set())

    def _drop_expired(self):
        if self.request_timeout is None:
            return
        now, limit = time.monotonic(), self.request_timeout
        for slot, gen in list(self._active.items()):
            if now - gen.submitted > limit:
                self.timed_out += 1
                gen.fail(503, f"The request did not finish within the server's request timeout ({limit:g} s).")
                self._release(slot)
        expired = [g for g in self._pending if now - g.submitted > limit]
        for gen in expired:
            self.timed_out += 1
            gen.fail(503, f"The request waited for a slot longer than the server's request timeout ({limit:g} s).")
        if expired:
            self._unqueue(len(expired))
            self._pending = collections.deque(g for g in self._pending if g.finish_reason is None)

    def _unqueue(self, n: int):
        with self._lock:
            self._queued -= n

    def _admit(self):
        free = sorted(self.engine.free_slots()) if self._pending else []
        while self._pending and free:
            gen = self._pending.popleft()
            self._unqueue(1)
            request = gen.request
            if request.max_tokens == 0:  # echo only: the prompt is scored, nothing is generated
                gen.finish_reason = "length"
                self._deliver(gen)
                continue
            slot = free.pop(0)
            try:
                self.engine.insert(slot, request.prompt_ids, max_new_tokens=request.max_tokens,
                                   sampling=request.sampling, stop_token_ids=sorted(gen.stop_token_ids))
            except ValueError as e:
                gen.fail(400, str(e))
                free = sorted(self.engine.free_slots())
                continue
            except Exception as e:  # noqa: BLE001
                self.log(f"insert failed:\n{traceback.format_exc()}")
                gen.fail(500, f"The engine failed on this request: {type(e).__name__}: {e}")
                self._release(slot)
                free = sorted(self.engine.free_slots())
                continue
            self._active[slot] = gen
            gen.events.put(("started",))

    def _step(self):
        try:
            updates = self.engine.step()
        except Exception as e:  # noqa: BLE001
            self.log(f"engine step failed:\n{traceback.format_exc()}")
            for slot, gen in list(self._active.items()):
                gen.fail(500, f"The engine failed: {type(e).__name__}: {e}")
                self._release(slot)
            return
        self.steps += 1
        for slot, update in updates.items():
            gen = self._active.get(slot)
            if gen is None:
                continue
            try:
                done = gen.feed(update.new_tokens, update.finished, update.finish_reason)
            except Exception as e:  # noqa: BLE001
                self.log(f"decoding a result failed:\n{traceback.format_exc()}")
                gen.fail(500, f"{type(e).__name__}: {e}")
                done = True
            if done:
                self._release(slot)
                if gen.finish_reason != "error":
                    self._deliver(gen)

    def _deliver(self, gen: Generation):
        """Sends a complete request its final event, with the log-probabilities it asked for."""
        request, scores = gen.request, None
        if request.logprobs is not None:
            try:
                scores = self.engine.score(request.prompt_ids + gen.token_ids, len(request.prompt_ids),
                                           request.sampling) if len(request.prompt_ids) + len(gen.token_ids) > 1 \
                    else None
            except Exception as e:  # noqa: BLE001
                self.log(f"scoring failed:\n{traceback.format_exc()}")
                gen.fail(500, f"Computing the log-probabilities failed: {type(e).__name__}: {e}")
                return
        self.completed += 1
        gen.done(scores)

    def _release(self, slot: int):
        self._active.pop(slot, None)
        try:
            self.engine.release(slot)
        except Exception:  # noqa: BLE001
            self.log(f"release of slot {slot} failed:\n{traceback.format_exc()}")
