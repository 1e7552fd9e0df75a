"""The scheduler thread that owns the `SlotEngine`: admits queued requests into free slots between
decode steps, and releases finished or abandoned ones."""

from __future__ import annotations

import collections
import queue
import threading
import traceback
from collections.abc import Callable

from mimo_jax.serving.detokenize import Generation


class Scheduler:
    """Owns the engine on one thread: admits queued requests into free slots, steps, routes tokens."""

    def __init__(self, engine, log: Callable = print):
        self.engine = engine
        self.log = log
        self._inbox: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()
        self._active: dict[int, Generation] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mimo-scheduler", daemon=True)
        self.steps = 0  # engine steps
        self.completed = 0  # requests that ran to a finish reason
        self.cancelled = 0  # requests abandoned by their clients (in a slot or still queued)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    def stats(self) -> dict:
        return {"active": len(self._active), "queued": len(self._pending) + self._inbox.qsize(),
                "completed": self.completed, "cancelled": self.cancelled}

    def start(self):
        self._thread.start()

    def submit(self, gen: Generation):
        if not self.alive:
            gen.fail(503, "The server is shutting down.")
            return
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
        if any(g.cancelled.is_set() for g in self._pending):
            self.cancelled += sum(g.cancelled.is_set() for g in self._pending)
            self._pending = collections.deque(g for g in self._pending if not g.cancelled.is_set())

    def _admit(self):
        free = sorted(self.engine.free_slots()) if self._pending else []
        while self._pending and free:
            gen = self._pending.popleft()
            slot = free.pop(0)
            request = gen.request
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
                self.completed += 1
                self._release(slot)

    def _release(self, slot: int):
        self._active.pop(slot, None)
        try:
            self.engine.release(slot)
        except Exception:  # noqa: BLE001
            self.log(f"release of slot {slot} failed:\n{traceback.format_exc()}")
