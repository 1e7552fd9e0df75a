"""Text from generated ids: incremental detokenization, stop-string matching with hold-back while
streaming, and one request's `Generation` state."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence

from mimo_jax.serving.loading import CHATML_END
from mimo_jax.serving.protocol import GenerationRequest


def stop_token_ids(tokenizer) -> list[int]:
    """EOS, and `<|im_end|>` where the tokenizer has it as one token."""
    ids = [int(tokenizer.eos_id)]
    im_end = tokenizer.encode(CHATML_END)
    if len(im_end) == 1 and tokenizer.decode(im_end) == "":  # a special token, not text
        ids.append(int(im_end[0]))
    return sorted(set(ids))


class IncrementalDetokenizer:
    """New text per generated id: decodes a short window of recent ids and emits what it adds, once it
    does not end in an incomplete UTF-8 sequence (U+FFFD)."""

    MAX_PENDING = 8  # ids; a character needs at most 4 bytes, so more than this never completes

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids[prefix:read] decoded to the text already emitted last time
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        pending = len(self.ids) - self.read
        if len(after) > len(before) and (final or not after.endswith("\ufffd") or pending >= self.MAX_PENDING):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class StopMatcher:
    """The text so far, cut at the first stop string; `sendable` holds back a possible stop's start."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0

    def add(self, delta: str) -> bool:
        """Appends text; True when a stop string appeared (the text is then cut before it)."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def sendable(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held()
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def _held(self) -> int:
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class Generation:
    """One request's life in the scheduler; its handler thread reads `events`:
    ("started",), ("text", str)..., then ("done", finish_reason, prompt_tokens, completion_tokens,
    scores) or ("error", http_status, message). `scores` is the `inference.TokenScores` of the
    prompt and `token_ids` where the request asked for log-probabilities, else None."""

    def __init__(self, request: GenerationRequest, tokenizer, stop_token_ids: Sequence[int]):
        self.request = request
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()  # the request timeout counts from here
        self.completion_tokens = 0
        self.token_ids: list[int] = []  # the completion's tokens; a stop token is not one
        self.finish_reason: str | None = None
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopMatcher(request.stop)

    def cancel(self):
        self.cancelled.set()

    def fail(self, status: int, message: str):
        self.finish_reason = "error"
        self.events.put(("error", status, message))

    def feed(self, tokens: Sequence[int], engine_finished: bool, engine_reason: str | None) -> bool:
        """Takes one step's tokens; True when the request is complete (the slot can be released)."""
        for token in tokens:
            self.completion_tokens += 1
            if int(token) in self.stop_token_ids:
                return self._finish("stop")
            self.token_ids.append(int(token))
            delta = self._detokenizer.add(int(token))
            if delta and self._matcher.add(delta):
                return self._finish("stop", cut=True)
            if self.completion_tokens >= self.request.max_tokens:
                return self._finish("length")
        if engine_finished:
            return self._finish(engine_reason or "length")
        text = self._matcher.sendable(final=False)
        if text:
            self.events.put(("text", text))
        return False

    def _finish(self, reason: str, cut: bool = False) -> bool:
        if not cut and self._matcher.add(self._detokenizer.flush()):
            reason = "stop"
        text = self._matcher.sendable(final=True)
        if text:
            self.events.put(("text", text))
        self.finish_reason = reason
        return True

    def done(self, scores=None):
        """Ends the request (after `feed` said it is complete): its final event."""
        self.events.put(("done", self.finish_reason, len(self.request.prompt_ids), self.completion_tokens, scores))
