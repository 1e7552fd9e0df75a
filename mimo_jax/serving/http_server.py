"""HTTP: the `App` (formatter, parser, scheduler), the request handler (JSON and SSE), the server."""

from __future__ import annotations

import json
import queue
import secrets
import select
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mimo_jax.serving.detokenize import Generation, stop_token_ids
from mimo_jax.serving.errors import RequestError, error_body
from mimo_jax.serving.loading import ChatFormatter, Served
from mimo_jax.serving.protocol import GenerationRequest, RequestParser
from mimo_jax.serving.scheduler import Scheduler

_POLL_S = 0.2  # how often a waiting handler checks whether its client hung up


MAX_BODY_BYTES = 32 * 2**20


class App:
    """The server's state shared by the handler threads."""

    def __init__(self, served: Served, engine, *, api_key: str | None = None, log: Callable = print,
                 access_log: bool = True, max_queue: int | None = None, request_timeout: float | None = None):
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
        self.scheduler = Scheduler(engine, log=log, max_queue=max_queue, request_timeout=request_timeout)

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


LOGPROB_FLOOR = -9999.0  # stands for -inf (a token top-k / top-p cut), which JSON cannot carry


def token_logprobs(tokenizer, ids: list[int], scores, start: int, top: int, chat: bool) -> dict:
    """OpenAI's `logprobs` object for tokens ids[start:] (`scores`: `inference.TokenScores` of all
    of `ids`; the first token of a prompt has no log-prob). Completions: tokens, token_logprobs,
    top_logprobs (each a dict of the `top` most likely tokens plus the chosen one) and text_offset
    (into the returned text); chat: a `content` list of {token, logprob, bytes, top_logprobs}."""
    def piece(token_id: int) -> str:
        return tokenizer.decode([int(token_id)])

    def value(logprob) -> float:
        return max(float(logprob), LOGPROB_FLOOR)

    entries = []  # (token text, logprob or None, [(alternative text, logprob)])
    for i in range(start, len(ids)):
        if i == 0:
            entries.append((piece(ids[0]), None, []))
            continue
        alternatives = [(piece(t), value(lp)) for t, lp in zip(scores.top_ids[i - 1][:top], scores.top_logprobs[i - 1][:top])
                        if lp > -float("inf")]
        entries.append((piece(ids[i]), value(scores.logprobs[i - 1]), alternatives))
    if chat:
        return {"content": [
            {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
             "top_logprobs": [{"token": t, "logprob": a, "bytes": list(t.encode("utf-8"))} for t, a in alternatives]}
            for text, lp, alternatives in entries]}
    offsets = [0]
    for text, _, _ in entries[:-1]:
        offsets.append(offsets[-1] + len(text))
    return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {**dict(alternatives), text: lp} for text, lp, alternatives in entries],
            "text_offset": offsets[: len(entries)]}


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
            self._send_json(e.status, e.body(), e.headers)
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
        _, reason, n_prompt, n_completion, scores = event
        text = "".join(pieces)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}
        logprobs = None
        if request.logprobs is not None:
            logprobs = token_logprobs(self.app.tokenizer, request.prompt_ids + gen.token_ids, scores,
                                      0 if request.echo else len(request.prompt_ids), request.logprobs, request.chat)
        if request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": reason}
            body = self._envelope("chatcmpl", "chat.completion", [choice])
        else:
            if request.echo:
                text = self.app.tokenizer.decode(request.prompt_ids) + text
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
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
                _, reason, n_prompt, n_completion, _ = event
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

    def _send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None):
        data = json.dumps(obj).encode("ascii")  # \u escapes: valid even for lone surrogates from a client
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
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
