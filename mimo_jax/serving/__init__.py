"""An OpenAI-compatible HTTP server over `SlotEngine` (continuous batching): `python serve.py --model PATH`.

`/v1/completions`, `/v1/chat/completions` (both with SSE streaming), `/v1/models` and `/health`,
on the standard library's `ThreadingHTTPServer`. One scheduler thread owns the engine: HTTP handler
threads validate a request, put it on the scheduler's queue and read its text back from a queue of
its own. Between two decode steps the scheduler admits queued requests into free slots (prefill)
and releases finished or abandoned ones, so requests join and leave the batch at any step. Text is
decoded incrementally from the generated ids; stop strings are matched on the text, and while
streaming, text that could be the start of a stop string is held back until it is decided.

See docs/serving.md.

Modules: `errors`, `loading` (model, tokenizer, chat template), `protocol` (request validation),
`detokenize` (ids to text, stop strings), `scheduler`, `http_server`, `cli`.
"""

from mimo_jax.serving.cli import main
from mimo_jax.serving.detokenize import Generation, IncrementalDetokenizer, StopMatcher, stop_token_ids
from mimo_jax.serving.errors import RequestError, error_body
from mimo_jax.serving.http_server import MAX_BODY_BYTES, App, Handler, Server, make_server
from mimo_jax.serving.loading import CHATML_END, ChatFormatter, Served, load_served
from mimo_jax.serving.protocol import DEFAULT_COMPLETION_MAX_TOKENS, MAX_STOP_STRINGS, GenerationRequest, RequestParser
from mimo_jax.serving.scheduler import Scheduler

__all__ = ['App', 'CHATML_END', 'ChatFormatter', 'DEFAULT_COMPLETION_MAX_TOKENS', 'Generation', 'GenerationRequest', 'Handler', 'IncrementalDetokenizer', 'MAX_BODY_BYTES', 'MAX_STOP_STRINGS', 'RequestError', 'RequestParser', 'Scheduler', 'Served', 'Server', 'StopMatcher', 'error_body', 'load_served', 'main', 'make_server', 'stop_token_ids']
