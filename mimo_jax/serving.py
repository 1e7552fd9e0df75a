"""An OpenAI-compatible HTTP server over `SlotEngine` (continuous batching): `python serve.py --model PATH`.

`/v1/completions`, `/v1/chat/completions` (both with SSE streaming), `/v1/models` and `/health`,
on the standard library's `ThreadingHTTPServer`. One scheduler thread owns the engine: HTTP handler
threads validate a request, put it on the scheduler's queue and read its text back from a queue of
its own. Between two decode steps the scheduler admits queued requests into free slots (prefill)
and releases finished or abandoned ones, so requests join and leave the batch at any step. Text is
decoded incrementally from the generated ids; stop strings are matched on the text, and while
streaming, text that could be the start of a stop string is held back until it is decided.

See docs/serving.md.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
import queue
import secrets
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHATML_END = "<|im_end|>"
MAX_BODY_BYTES = 32 * 2**20
MAX_STOP_STRINGS = 16
DEFAULT_COMPLETION_MAX_TOKENS = 16  # as OpenAI's /v1/completions; chat defaults to the rest of the context
_POLL_S = 0.2  # how often a waiting handler checks whether its client hung up


# ---------------------------------------------------------------------------------------------
# Errors


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Model, tokenizer and chat template


@dataclasses.dataclass
class Served:
    """What a model directory provides for serving."""

    model: Any
    tokenizer: Any
    name: str
    add_bos: bool = False
    chat_template: str | None = None
    special_tokens: dict = dataclasses.field(default_factory=dict)  # bos/eos/pad token texts for templates


def load_served(path: str, dtype: str = "float32", name: str | None = None) -> Served:
    """A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json) or a train.py workdir
    (config.yaml, checkpoints/; the tokenizer is its config's `data.tokenizer`)."""
    import jax.numpy as jnp

    from mimo_jax.config import load_config
    from mimo_jax.data import HFTokenizer, check_tokenizer_fits, make_tokenizer
    from mimo_jax.training import load_model

    path = os.path.abspath(path)
    name = name or os.path.basename(path.rstrip(os.sep)) or "mimo"
    if os.path.isfile(os.path.join(path, "config.json")):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json next to config.json")
        tokenizer = HFTokenizer(path)
        model = load_model(path, jnp.dtype(dtype))
        tokenizer_config = _read_tokenizer_config(path)
        add_bos = bool(tokenizer_config.get("add_bos_token", False)) and tokenizer.bos_id is not None
    elif os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "checkpoints")):
        data_cfg = load_config(os.path.join(path, "config.yaml")).data
        tokenizer = make_tokenizer(data_cfg)
        model = load_model(path)
        add_bos = data_cfg.add_bos
        tokenizer_dir = os.path.dirname(tokenizer.path) if hasattr(tokenizer, "path") else None
        tokenizer_config = _read_tokenizer_config(tokenizer_dir) if tokenizer_dir else {}
        path = tokenizer_dir or path
    else:
        raise FileNotFoundError(f"{path}: neither a Hugging Face checkpoint directory (config.json) nor a train.py "
                                "workdir (config.yaml and checkpoints/)")
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    return Served(model, tokenizer, name, add_bos, _read_chat_template(path, tokenizer_config), specials)


def _read_tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _read_chat_template(directory: str, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if not template and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    return template if isinstance(template, str) and template.strip() else None


class ChatFormatter:
    """Messages -> prompt text: the model's Jinja chat template, rendered in jinja2's sandbox, when it
    compiles and renders a probe conversation; otherwise ChatML."""

    def __init__(self, template: str | None = None, special_tokens: dict | None = None, log: Callable = print):
        self.special_tokens = dict(special_tokens or {})
        self._template = None
        if template:
            try:
                self._template = _compile_template(template)
                self.render([{"role": "user", "content": "Hello"}])
            except Exception as e:  # noqa: BLE001 (anything the template does wrong means: do not use it)
                self._template = None
                log(f"warning: the chat template cannot be used ({type(e).__name__}: {e}); using ChatML")

    @property
    def kind(self) -> str:
        return "template" if self._template is not None else "chatml"

    def render(self, messages: list[dict]) -> str:
        if self._template is None:
            parts = [f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages]
            return "".join(parts) + "<|im_start|>assistant\n"
        return self._template.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                     **self.special_tokens)


def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# Request validation


@dataclasses.dataclass
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # inference.SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


_COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
    "logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "user",
}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "store", "metadata", "service_tier",
}
_ROLES = ("system", "developer", "user", "assistant", "tool")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object", type(None): "null"}


def _typed(body: dict, key: str, types: tuple, default=None):
    """body[key] if it is one of `types` (null means absent); bools are never numbers."""
    value = body.get(key)
    if value is None:
        return default
    numeric = (int, float) if float in types else (int,) if int in types else ()
    if isinstance(value, bool) and bool not in types:
        ok = False
    elif isinstance(value, numeric):
        ok = True
    else:
        ok = isinstance(value, tuple(t for t in types if t not in (int, float)))
    if not ok:
        expected = " or ".join(_TYPE_NAMES[t] for t in types)
        raise RequestError(f"Invalid type for '{key}': expected {expected}, but got {_json_type(value)}.", key)
    return value


def _float(body: dict, key: str, default: float) -> float:
    value = _typed(body, key, (float,), default)
    try:
        value = float(value)
    except OverflowError:  # an integer too big for a float
        value = math.inf
    if not math.isfinite(value):
        raise RequestError(f"'{key}' must be a finite number.", key)
    return value


def _json_type(value) -> str:
    for t, name in _TYPE_NAMES.items():
        if type(value) is t:
            return name
    return type(value).__name__


class RequestParser:
    """Turns request bodies into `GenerationRequest`s, or raises `RequestError`."""

    def __init__(self, tokenizer, model_name: str, max_seq_len: int, formatter: ChatFormatter, add_bos: bool = False,
                 vocab_size: int | None = None):
        self.tokenizer, self.model_name, self.max_seq_len, self.formatter = tokenizer, model_name, max_seq_len, formatter
        self.add_bos = add_bos
        self.vocab_size = vocab_size or tokenizer.vocab_size

    def completion(self, body: Any) -> GenerationRequest:
        self._common_checks(body, _COMPLETION_FIELDS)
        if body.get("echo"):
            raise RequestError("'echo' is not supported.", "echo")
        if _typed(body, "best_of", (int,), 1) != 1:
            raise RequestError("Only best_of=1 is supported.", "best_of")
        if _typed(body, "suffix", (str,), ""):
            raise RequestError("'suffix' is not supported.", "suffix")
        if _typed(body, "logprobs", (int,), 0):
            raise RequestError("'logprobs' is not supported.", "logprobs")
        prompt_ids = self._prompt_ids(body.get("prompt"))
        return self._finish(body, prompt_ids, chat=False, max_tokens_key="max_tokens",
                            default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS)

    def chat(self, body: Any) -> GenerationRequest:
        self._common_checks(body, _CHAT_FIELDS)
        if _typed(body, "logprobs", (bool,), False) or _typed(body, "top_logprobs", (int,), 0):
            raise RequestError("'logprobs' is not supported.", "logprobs")
        if _typed(body, "tools", (list,), []):
            raise RequestError("'tools' are not supported.", "tools")
        tool_choice = body.get("tool_choice")
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("'tool_choice' is not supported.", "tool_choice")
        response_format = _typed(body, "response_format", (dict,), {"type": "text"})
        if response_format.get("type", "text") != "text":
            raise RequestError("Only response_format {'type': 'text'} is supported.", "response_format")
        messages = self._messages(body.get("messages"))
        try:
            text = self.formatter.render(messages)
        except Exception as e:  # noqa: BLE001 (the template may raise anything on odd conversations)
            raise RequestError(f"The chat template cannot render these messages: {e}", "messages") from None
        prompt_ids = self._encode(text, "messages")
        max_tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return self._finish(body, prompt_ids, chat=True, max_tokens_key=max_tokens_key,
                            default_max_tokens=None, extra_stop=(CHATML_END,))

    # -- pieces

    def _common_checks(self, body: Any, fields: set):
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        unknown = sorted(set(body) - fields)
        if unknown:
            raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        model = body.get("model")
        if model is None:
            raise RequestError("You must provide a model parameter.", "model")
        if not isinstance(model, str):
            _typed(body, "model", (str,))
        if model != self.model_name:
            raise RequestError(f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                               "model", status=404, code="model_not_found")
        if _typed(body, "n", (int,), 1) != 1:
            raise RequestError("Only n=1 is supported.", "n")
        for key in ("presence_penalty", "frequency_penalty"):
            if _float(body, key, 0.0) != 0.0:
                raise RequestError(f"'{key}' is not supported.", key)
        if _typed(body, "logit_bias", (dict,), {}):
            raise RequestError("'logit_bias' is not supported.", "logit_bias")
        _typed(body, "user", (str,))

    def _prompt_ids(self, prompt) -> list[int]:
        if prompt is None:
            raise RequestError("You must provide a prompt.", "prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self._encode(prompt, "prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise RequestError("The prompt must not be empty.", "prompt")
            if any(not 0 <= t < self.vocab_size for t in prompt):
                raise RequestError(f"Prompt token ids must be in [0, {self.vocab_size}).", "prompt")
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError("Only one prompt per request is supported.", "prompt")
        raise RequestError("'prompt' must be a string, an array of token ids, or an array of one of those.", "prompt")

    def _messages(self, messages) -> list[dict]:
        if messages is None:
            raise RequestError("You must provide messages.", "messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty array.", "messages")
        out = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise RequestError(f"Invalid type for '{where}': expected an object.", where)
            role = message.get("role")
            if role not in _ROLES:
                raise RequestError(f"Invalid value for '{where}.role': expected one of {', '.join(_ROLES)}.",
                                   f"{where}.role")
            content = message.get("content")
            if content is None:
                content = ""
            elif isinstance(content, list):
                texts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise RequestError(f"Only text content parts are supported in '{where}.content'.",
                                           f"{where}.content")
                    texts.append(part["text"])
                content = "".join(texts)
            elif not isinstance(content, str):
                raise RequestError(f"Invalid type for '{where}.content': expected a string or an array of parts.",
                                   f"{where}.content")
            item = {"role": role, "content": content}
            if isinstance(message.get("name"), str):
                item["name"] = message["name"]
            out.append(item)
        return out

    def _encode(self, text: str, param: str) -> list[int]:
        try:
            ids = [int(t) for t in self.tokenizer.encode(text)]
        except Exception as e:  # noqa: BLE001 (e.g. text the tokenizer cannot take)
            raise RequestError(f"Cannot tokenize the {param}: {e}", param) from None
        if self.add_bos:
            ids = [self.tokenizer.bos_id] + ids
        if not ids:  # nothing to condition on: start a document as training does, after the previous one's EOS
            ids = [self.tokenizer.eos_id]
        return ids

    def _finish(self, body: dict, prompt_ids: list[int], *, chat: bool, max_tokens_key: str,
                default_max_tokens: int | None, extra_stop: tuple = ()) -> GenerationRequest:
        from mimo_jax.inference import SamplingParams

        n_prompt, context = len(prompt_ids), self.max_seq_len
        if n_prompt >= context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your "
                f"{'messages' if chat else 'prompt'} resulted in {n_prompt} tokens. Please reduce the length.",
                "messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = _typed(body, max_tokens_key, (int,))
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else context - n_prompt
        if max_tokens < 1:
            raise RequestError(f"'{max_tokens_key}' must be at least 1, got {max_tokens}.", max_tokens_key)
        if n_prompt + max_tokens > context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the {'messages' if chat else 'prompt'}, {max_tokens} "
                "in the completion). Please reduce the length of the prompt or completion.",
                max_tokens_key, code="context_length_exceeded")
        temperature = _float(body, "temperature", 1.0)
        if not 0.0 <= temperature <= 2.0:
            raise RequestError(f"'temperature' must be between 0 and 2, got {temperature}.", "temperature")
        top_p = _float(body, "top_p", 1.0)
        if not 0.0 < top_p <= 1.0:
            raise RequestError(f"'top_p' must be in (0, 1], got {top_p}.", "top_p")
        top_k = _typed(body, "top_k", (int,), 0)
        if top_k == -1:  # vLLM's spelling of "off"
            top_k = 0
        if top_k < 0:
            raise RequestError(f"'top_k' must be >= 0 (0 or -1: off), got {top_k}.", "top_k")
        top_k = min(top_k, self.vocab_size)  # k >= vocabulary size keeps every token
        seed = _typed(body, "seed", (int,))
        if seed is None:
            seed = secrets.randbits(31)
        elif not -(2**63) <= seed < 2**63:
            raise RequestError("'seed' must fit in 64 bits.", "seed")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise RequestError("'stop' must be a string or an array of strings.", "stop")
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise RequestError(f"'stop' takes up to {MAX_STOP_STRINGS} non-empty strings.", "stop")
        stream = _typed(body, "stream", (bool,), False)
        options = _typed(body, "stream_options", (dict,), {})
        if options and not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be a boolean.", "stream_options")
        sampling = SamplingParams(temperature=temperature, top_k=int(top_k), top_p=top_p, seed=seed % 2**31)
        stops = tuple(dict.fromkeys([*stop, *extra_stop]))
        return GenerationRequest(chat, prompt_ids, int(max_tokens), sampling, stops, stream, include_usage)


# ---------------------------------------------------------------------------------------------
# Text from generated ids


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
    ("started",), ("text", str)..., then ("done", finish_reason, prompt_tokens, completion_tokens)
    or ("error", http_status, message)."""

    def __init__(self, request: GenerationRequest, tokenizer, stop_token_ids: Sequence[int]):
        self.request = request
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.completion_tokens = 0
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
        self.events.put(("done", reason, len(self.request.prompt_ids), self.completion_tokens))
        return True


# ---------------------------------------------------------------------------------------------
# Scheduler


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


# ---------------------------------------------------------------------------------------------
# HTTP


class App:
    """The server's state shared by the handler threads."""

    def __init__(self, served: Served, engine, *, api_key: str | None = None, log: Callable = print,
                 access_log: bool = True):
        self.served = served
        self.engine = engine
        self.tokenizer = served.tokenizer
        self.model_name = served.name
        self.api_key = api_key
        self.log = log
        self.access_log = access_log
        self.created = int(time.time())
        self.formatter = ChatFormatter(served.chat_template, served.special_tokens, log=log)
        self.parser = RequestParser(served.tokenizer, served.name, engine.max_seq_len, self.formatter,
                                    served.add_bos, served.model.config.vocab_size)
        self.stop_token_ids = stop_token_ids(served.tokenizer)
        self.scheduler = Scheduler(engine, log=log)

    def start(self, warmup: bool = True):
        self.scheduler.start()
        if warmup:  # compiles prefill and decode before the first client waits for it
            request = self.parser.completion({"model": self.model_name, "prompt": "Hello", "max_tokens": 2,
                                              "temperature": 0})
            gen = Generation(request, self.tokenizer, self.stop_token_ids)
            self.scheduler.submit(gen)
            while (event := gen.events.get())[0] not in ("done", "error"):
                pass
            if event[0] == "error":
                raise RuntimeError(f"warm-up request failed: {event[2]}")

    def close(self):
        self.scheduler.close()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mimo-jax",
                "max_model_len": self.engine.max_seq_len}


def stop_token_ids(tokenizer) -> list[int]:
    """EOS, and `<|im_end|>` where the tokenizer has it as one token."""
    ids = [int(tokenizer.eos_id)]
    im_end = tokenizer.encode(CHATML_END)
    if len(im_end) == 1 and tokenizer.decode(im_end) == "":  # a special token, not text
        ids.append(int(im_end[0]))
    return sorted(set(ids))


class _ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mimo-jax"
    app: App  # set on the subclass made by make_server

    # -- routing

    def do_GET(self):
        self._dispatch({"/health": self._health, "/v1/models": self._models}, prefix_routes={"/v1/models/": self._model})

    def do_POST(self):
        self._dispatch({"/v1/completions": self._completions, "/v1/chat/completions": self._chat_completions})

    def _dispatch(self, routes: dict, prefix_routes: dict | None = None):
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            body = self._read_body()
            route = routes.get(path)
            arg = ()
            if route is None:
                for prefix, handler in (prefix_routes or {}).items():
                    if path.startswith(prefix):
                        route, arg = handler, (path[len(prefix):],)
            if route is None:
                known = path in ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions")
                raise RequestError(f"{'Method not allowed for' if known else 'Unknown path'} {self.command} {path}",
                                   status=405 if known else 404)
            if path != "/health" and self.app.api_key is not None and not secrets.compare_digest(
                    self.headers.get("Authorization", "").encode(), f"Bearer {self.app.api_key}".encode()):
                raise RequestError("Incorrect API key provided.", status=401, code="invalid_api_key")
            route(body, *arg)
        except RequestError as e:
            self._send_json(e.status, e.body())
        except _ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 (one request's bug must not take the server down)
            self.app.log(f"error handling {self.command} {path}:\n{traceback.format_exc()}")
            try:
                self._send_json(500, error_body(f"Internal error: {type(e).__name__}: {e}", "server_error"))
            except OSError:
                self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError("Chunked request bodies are not supported; send Content-Length.", status=411)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise RequestError("Invalid Content-Length.") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"The request body exceeds {MAX_BODY_BYTES} bytes.", status=413)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _parse_json(body: bytes):
        def no_constants(name):
            raise ValueError(f"{name} is not valid JSON")

        try:
            return json.loads(body.decode("utf-8"), parse_constant=no_constants)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise RequestError(f"The request body is not valid JSON: {e}") from None

    # -- endpoints

    def _health(self, _body):
        scheduler = self.app.scheduler
        ok = scheduler.alive
        self._send_json(200 if ok else 503, {
            "status": "ok" if ok else "unavailable", "model": self.app.model_name,
            "num_slots": self.app.engine.num_slots, "max_seq_len": self.app.engine.max_seq_len,
            "speculative": bool(self.app.engine.speculative), **scheduler.stats(),
        })

    def _models(self, _body):
        self._send_json(200, {"object": "list", "data": [self.app.model_card()]})

    def _model(self, _body, name: str):
        if name != self.app.model_name:
            raise RequestError(f"The model '{name}' does not exist.", "model", status=404, code="model_not_found")
        self._send_json(200, self.app.model_card())

    def _completions(self, body: bytes):
        self._generate(self.app.parser.completion(self._parse_json(body)))

    def _chat_completions(self, body: bytes):
        self._generate(self.app.parser.chat(self._parse_json(body)))

    def _generate(self, request: GenerationRequest):
        app = self.app
        if not app.scheduler.alive:
            raise RequestError("The server is shutting down.", status=503, type="server_error")
        gen = Generation(request, app.tokenizer, app.stop_token_ids)
        app.scheduler.submit(gen)
        self._checked_at = time.monotonic()
        try:
            if request.stream:
                self._stream(gen)
            else:
                self._complete(gen)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            gen.cancel()
            raise
        finally:
            if gen.finish_reason is None:
                gen.cancel()

    def _complete(self, gen: Generation):
        request = gen.request
        pieces = []
        while True:
            event = self._next_event(gen)
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                raise RequestError(event[2], status=event[1], type="invalid_request_error" if event[1] < 500
                                   else "server_error")
            elif event[0] == "done":
                break
        _, reason, n_prompt, n_completion = event
        text = "".join(pieces)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}
        if request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            body = self._envelope("chatcmpl", "chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            body = self._envelope("cmpl", "text_completion", [choice])
        body["usage"] = usage
        self._send_json(200, body)

    def _stream(self, gen: Generation):
        request = gen.request
        event = self._next_event(gen)  # wait until admitted, so a refusal can still be a plain error response
        if event[0] == "error":
            raise RequestError(event[2], status=event[1], type="invalid_request_error" if event[1] < 500
                               else "server_error")
        chat = request.chat
        prefix, obj = ("chatcmpl", "chat.completion.chunk") if chat else ("cmpl", "text_completion")
        envelope = self._envelope(prefix, obj, [])
        if request.include_usage:
            envelope["usage"] = None

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {**envelope, "choices": [choice]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if chat:
            self._send_event(chunk(None, role=True))
        while True:
            if event[0] == "text":
                text, following = event[1], None
                while following is None:  # coalesce what is already queued into one chunk
                    try:
                        following = gen.events.get_nowait()
                    except queue.Empty:
                        break
                    if following[0] == "text":
                        text, following = text + following[1], None
                self._send_event(chunk(text))
                event = following if following is not None else self._next_event(gen)
            elif event[0] == "done":
                _, reason, n_prompt, n_completion = event
                self._send_event(chunk(None if chat else "", reason))
                if request.include_usage:
                    self._send_event({**envelope, "choices": [], "usage": {
                        "prompt_tokens": n_prompt, "completion_tokens": n_completion,
                        "total_tokens": n_prompt + n_completion}})
                break
            elif event[0] == "error":
                self._send_event(error_body(event[2], "server_error" if event[1] >= 500 else "invalid_request_error"))
                break
            else:  # "started"
                event = self._next_event(gen)
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    # -- plumbing

    def _envelope(self, prefix: str, obj: str, choices: list) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": self.app.model_name, "system_fingerprint": None, "choices": choices}

    def _next_event(self, gen: Generation):
        """The request's next event; checks every _POLL_S whether the client is still there (also while
        events flow, since a non-streaming response writes nothing that could fail until the end)."""
        while True:
            now = time.monotonic()
            if now - self._checked_at >= _POLL_S:
                self._checked_at = now
                if self._peer_closed():
                    raise _ClientGone()
            try:
                return gen.events.get(timeout=_POLL_S)
            except queue.Empty:
                pass

    def _peer_closed(self) -> bool:
        """True once the client has closed its end (EOF), without consuming any pipelined bytes."""
        try:
            if hasattr(socket, "MSG_DONTWAIT"):
                return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            readable, _, _ = select.select([self.connection], [], [], 0)  # fds < 1024 only
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # nothing to read: still connected
            return False
        except OSError:
            return True

    def _send_json(self, status: int, obj: dict):
        data = json.dumps(obj).encode("ascii")  # \u escapes: valid even for lone surrogates from a client
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_event(self, obj: dict):
        self._write_chunk(b"data: " + json.dumps(obj).encode("ascii") + b"\n\n")

    def _write_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def log_message(self, format, *args):
        if self.app.access_log:
            self.app.log(f"{self.address_string()} - {format % args}")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: bursts of clients connect at once
    app: App

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client hung up between requests
            return
        self.app.log(f"error on the connection from {client_address[0]}:\n{traceback.format_exc()}")


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> Server:
    server = Server((host, port), type("BoundHandler", (Handler,), {"app": app}))
    server.app = app
    return server


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible HTTP server for MiMo-V2-Flash.")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory or train.py workdir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--num-slots", type=int, default=8, help="requests decoded together; more wait in a queue")
    parser.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion tokens per request")
    parser.add_argument("--no-speculative", action="store_true", help="plain decoding even with MTP heads")
    parser.add_argument("--num-draft", type=int, default=None,
                        help="tokens drafted by the MTP heads per step (default: min(3, MTP heads))")
    parser.add_argument("--model-name", default=None, help="the 'model' clients ask for (default: the directory name)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter/activation dtype for a Hugging Face directory (a workdir keeps its own)")
    parser.add_argument("--api-key", default=os.environ.get("MIMO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MIMO_API_KEY; none: open)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)
    if args.num_slots < 1:
        parser.error("--num-slots must be >= 1")

    def log(message: str):
        print(message, file=sys.stderr, flush=True)

    from mimo_jax.inference import SlotEngine

    start = time.time()
    try:
        served = load_served(args.model, args.dtype, args.model_name)
    except (OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    num_draft = args.num_draft or max(1, min(3, served.model.config.num_mtp_heads))
    engine = SlotEngine(served.model, num_slots=args.num_slots, max_seq_len=args.max_seq_len,
                        speculative=False if args.no_speculative else None, num_draft=num_draft)
    app = App(served, engine, api_key=args.api_key, log=log, access_log=not args.quiet)
    log(f"loaded {served.name} ({type(served.tokenizer).__name__}, chat format: {app.formatter.kind}); "
        f"{engine.num_slots} slots of {engine.max_seq_len} tokens, speculative decoding "
        f"{'on' if engine.speculative else 'off'}; warming up")
    app.start()
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]

    def stop(_signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)  # before "ready": a client may stop the server as soon as it reads that line
    log(f"ready in {time.time() - start:.1f}s: serving '{served.name}' on http://{host}:{port}/v1")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
    log("stopped")
    return 0
