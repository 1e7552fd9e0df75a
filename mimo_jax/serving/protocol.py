"""Request validation: an OpenAI completions or chat body becomes a `GenerationRequest` (or a
`RequestError` naming the field)."""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

from mimo_jax.sampling import SamplingParams
from mimo_jax.serving.errors import RequestError
from mimo_jax.serving.loading import CHATML_END, ChatFormatter

DEFAULT_COMPLETION_MAX_TOKENS = 16  # as OpenAI's /v1/completions; chat defaults to the rest of the context


MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits on the alternatives per token
MAX_CHAT_TOP_LOGPROBS = 20


@dataclasses.dataclass
class GenerationRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # sampling.SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: none; n: each token's log-prob and its n most likely alternatives
    echo: bool = False  # completions: the prompt's tokens come first in the text and the log-probs


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
        echo = _typed(body, "echo", (bool,), False)
        if _typed(body, "best_of", (int,), 1) != 1:
            raise RequestError("Only best_of=1 is supported.", "best_of")
        if _typed(body, "suffix", (str,), ""):
            raise RequestError("'suffix' is not supported.", "suffix")
        logprobs = _typed(body, "logprobs", (int,))
        if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise RequestError(f"'logprobs' must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {logprobs}.",
                               "logprobs")
        prompt_ids = self._prompt_ids(body.get("prompt"))
        return self._finish(body, prompt_ids, chat=False, max_tokens_key="max_tokens",
                            default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, logprobs=logprobs, echo=echo)

    def chat(self, body: Any) -> GenerationRequest:
        self._common_checks(body, _CHAT_FIELDS)
        top_logprobs = _typed(body, "top_logprobs", (int,))
        if not _typed(body, "logprobs", (bool,), False):
            if top_logprobs is not None:
                raise RequestError("'top_logprobs' needs 'logprobs' to be true.", "top_logprobs")
        elif top_logprobs is None:
            top_logprobs = 0
        elif not 0 <= top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
            raise RequestError(f"'top_logprobs' must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, got {top_logprobs}.",
                               "top_logprobs")
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
                            default_max_tokens=None, extra_stop=(CHATML_END,), logprobs=top_logprobs)

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
                default_max_tokens: int | None, extra_stop: tuple = (), logprobs: int | None = None,
                echo: bool = False) -> GenerationRequest:
        n_prompt, context = len(prompt_ids), self.max_seq_len
        if n_prompt >= context:
            raise RequestError(
                f"This model's maximum context length is {context} tokens. However, your "
                f"{'messages' if chat else 'prompt'} resulted in {n_prompt} tokens. Please reduce the length.",
                "messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = _typed(body, max_tokens_key, (int,))
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else context - n_prompt
        if max_tokens < (0 if echo else 1):  # echo with max_tokens 0 scores the prompt: what harnesses send
            raise RequestError(f"'{max_tokens_key}' must be at least {0 if echo else 1}, got {max_tokens}.",
                               max_tokens_key)
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
        if stream and (logprobs is not None or echo):
            key = "echo" if echo else "logprobs"
            raise RequestError(f"'{key}' is not supported with 'stream': the log-probabilities are computed once the "
                               "completion is complete.", key)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be a boolean.", "stream_options")
        sampling = SamplingParams(temperature=temperature, top_k=int(top_k), top_p=top_p, seed=seed % 2**31)
        stops = tuple(dict.fromkeys([*stop, *extra_stop]))
        return GenerationRequest(chat, prompt_ids, int(max_tokens), sampling, stops, stream, include_usage,
                                 logprobs, echo)
