"""`python serve.py --model PATH`: load, warm up, serve until SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from mimo_jax.inference import SlotEngine
from mimo_jax.serving.http_server import App, make_server
from mimo_jax.serving.loading import load_served


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="serve.py", description="OpenAI-compatible HTTP server for MiMo-V2-Flash.")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory or train.py workdir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--num-slots", type=int, default=8, help="requests decoded together; more wait in a queue")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait while every slot is busy; more get 429 with Retry-After "
                             "(-1: no bound)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds a request may take from arrival, waiting included; then it ends with 503 "
                             "(default: no limit)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion tokens per request")
    parser.add_argument("--no-speculative", action="store_true", help="plain decoding even with MTP heads")
    parser.add_argument("--num-draft", type=int, default=None,
                        help="tokens drafted by the MTP heads per step (default: min(3, MTP heads))")
    parser.add_argument("--model-name", default=None, help="the 'model' clients ask for (default: the directory name)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="parameter/activation dtype for a Hugging Face directory (a workdir keeps its own)")
    parser.add_argument("--weights", default="dequantized", choices=("dequantized", "fp8"),
                        help="fp8: keep an FP8 checkpoint's quantised weights resident as e4m3 blocks (about half "
                             "the memory of bf16), dequantised inside each matmul")
    parser.add_argument("--api-key", default=os.environ.get("MIMO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MIMO_API_KEY; none: open)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    args = parser.parse_args(argv)
    if args.num_slots < 1:
        parser.error("--num-slots must be >= 1")
    if args.max_queue < -1:
        parser.error("--max-queue must be >= 0, or -1 for no bound")
    if args.request_timeout is not None and args.request_timeout <= 0:
        parser.error("--request-timeout must be > 0 seconds")

    def log(message: str):
        print(message, file=sys.stderr, flush=True)

    start = time.time()
    try:
        served = load_served(args.model, args.dtype, args.model_name, None if args.weights == "dequantized" else args.weights)
    except (OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    num_draft = args.num_draft or max(1, min(3, served.model.config.num_mtp_heads))
    engine = SlotEngine(served.model, num_slots=args.num_slots, max_seq_len=args.max_seq_len,
                        speculative=False if args.no_speculative else None, num_draft=num_draft)
    app = App(served, engine, api_key=args.api_key, log=log, access_log=not args.quiet,
              max_queue=None if args.max_queue == -1 else args.max_queue, request_timeout=args.request_timeout)
    resident = ", FP8-resident weights" if args.weights == "fp8" else ""
    log(f"loaded {served.name} ({type(served.tokenizer).__name__}, chat format: {app.formatter.kind}{resident}); "
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
