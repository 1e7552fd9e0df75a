"""serve.py / mimo_jax.serving: the OpenAI-compatible server, driven by the official `openai` client.

A small random model serves from a train.py-style workdir (byte tokenizer, ChatML) in this process,
and from a Hugging Face directory (tokenizer.json with special tokens, a Jinja chat template) through
the serve.py CLI in a subprocess. Its lm_head is cut to printable ASCII so that texts compare exactly.
Greedy results are checked against `inference.generate` on the same weights.
"""

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from mimo_jax import inference, serving
from mimo_jax.config import load_config
from mimo_jax.data import ByteTokenizer, HFTokenizer
from mimo_jax.model import MiMoV2Flash
from tests.conftest import write_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "model.vocab_size=259", "model.hidden_size=32", "model.num_layers=3", "model.layer_types=[global, swa, swa]",
    "model.mlp_types=[dense, moe, moe]", "model.qk_head_dim=24", "model.v_head_dim=16", "model.intermediate_size=48",
    "model.moe_intermediate_size=16", "model.num_experts=8", "model.num_experts_per_token=2",
    "model.sliding_window=7", "model.initializer_range=0.2",
]
CONTEXT = 1024  # long enough that a disconnected stream is still running when its client goes
SLOTS = 4
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
BYTES = ByteTokenizer()


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_hf_tokenizer(path):
    """A byte-level tokenizer.json whose ids match ByteTokenizer's (byte + 3), with <|im_start|> = 0,
    <|endoftext|> = 1 (EOS) and <|im_end|> = 2 as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|im_start|>", "<|endoftext|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({ch: b + 3 for b, ch in _bytes_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}, f)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A workdir (config.yaml + an Orbax checkpoint as train.py writes it) and an HF export of one model."""
    from mimo_jax import save_hf

    root = tmp_path_factory.mktemp("serving")
    cfg = load_config("tiny", SMALL)
    model = nnx.jit(lambda: MiMoV2Flash(cfg.model, rngs=nnx.Rngs(0)))()  # one compile, not one per parameter
    keep = np.zeros(cfg.model.vocab_size, bool)
    keep[[3 + 10, *range(3 + 32, 3 + 127)]] = True  # "\n" and printable ASCII
    lm_head = np.array(model.lm_head[...])
    lm_head[:, ~keep] = 0.0
    model.lm_head[...] = jnp.asarray(lm_head)

    workdir = root / "tiny-run"
    write_workdir(str(workdir), cfg, model)

    hf_dir, fp8_dir = root / "tiny-hf", root / "tiny-hf-fp8"
    save_hf(model, str(hf_dir), dtype=jnp.float32)
    save_hf(model, str(fp8_dir), dtype="fp8")
    for directory in (hf_dir, fp8_dir):
        _write_hf_tokenizer(str(directory))
    return {"workdir": str(workdir), "hf": str(hf_dir), "hf_fp8": str(fp8_dir)}


@pytest.fixture(scope="module")
def server(dirs):
    """The workdir's model served in this process: (base url, App)."""
    from mimo_jax.inference import SlotEngine

    logs = []
    served = serving.load_served(dirs["workdir"])
    engine = SlotEngine(served.model, num_slots=SLOTS, max_seq_len=CONTEXT)
    app = serving.App(served, engine, log=logs.append, access_log=False)
    app.start()
    httpd = serving.make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", app
    httpd.shutdown()
    httpd.server_close()
    app.close()
    assert not any("Traceback" in line for line in logs), "\n".join(logs)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


_REFERENCE_TOKENS = 40
_references = {}


def _greedy(model, prompt_ids, n, tokenizer=BYTES):
    """The text of the first `n` tokens of plain greedy decoding (inference.generate: no slots, no
    speculation). Always 40 tokens, then cut, so that few lengths compile."""
    assert n <= _REFERENCE_TOKENS
    key = (id(model), tuple(prompt_ids))
    if key not in _references:
        out = inference.generate(model, [prompt_ids], _REFERENCE_TOKENS, stop_token_ids=[tokenizer.eos_id])
        _references[key] = out.tokens[0, len(prompt_ids):out.lengths[0]].tolist()
    return tokenizer.decode(_references[key][:n])


def _chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _raw(base, method, path, body=None, headers=None):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


# ---------------------------------------------------------------------------------------------
# Pieces without a server


def test_stop_matcher_holds_back_a_possible_stop_and_cuts_before_it():
    m = serving.StopMatcher(["STOP", "<|im_end|>"])
    assert not m.add("abc ST") and m.sendable(final=False) == "abc "  # "ST" might start "STOP"
    assert not m.add("ill <|im") and m.sendable(final=False) == "STill "
    assert m.add("_end|> more") and m.text == "abc STill " and m.sendable(final=True) == ""
    m = serving.StopMatcher(["xyz"])
    assert not m.add("ab") and not m.add("x") and m.sendable(final=False) == "ab"
    assert not m.add("q") and m.sendable(final=True) == "xq"


def test_detokenizer_waits_for_whole_characters():
    ids = BYTES.encode("é→ok")  # 2-, 3- and 1-byte characters
    detok = serving.IncrementalDetokenizer(BYTES)
    deltas = [detok.add(t) for t in ids]
    assert deltas == ["", "é", "", "", "→", "o", "k"] and detok.flush() == ""
    detok = serving.IncrementalDetokenizer(BYTES)
    assert [detok.add(t) for t in BYTES.encode("é")[:1]] == [""] and detok.flush() == "\ufffd"


def test_chat_template_is_sandboxed_and_falls_back_to_chatml():
    warnings = []
    messages = [{"role": "user", "content": "hi"}]
    good = serving.ChatFormatter(TEMPLATE, log=warnings.append)
    assert good.kind == "template" and good.render(messages) == "<|im_start|>user: hi<|im_end|><|im_start|>assistant: "
    for bad in ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "{% for %}", "{{ raise_exception('no') }}"):
        formatter = serving.ChatFormatter(bad, log=warnings.append)
        assert formatter.kind == "chatml" and formatter.render(messages) == _chatml(messages)
    assert len(warnings) == 3 and all("using ChatML" in w for w in warnings)


def test_hf_directory_specials_and_template(dirs):
    served = serving.load_served(dirs["hf"], name="x")
    assert served.name == "x" and isinstance(served.tokenizer, HFTokenizer) and served.chat_template == TEMPLATE
    assert serving.stop_token_ids(served.tokenizer) == [1, 2]  # <|endoftext|> and the special <|im_end|>
    assert serving.stop_token_ids(BYTES) == [1]  # here <|im_end|> is text, a stop string


# ---------------------------------------------------------------------------------------------
# Through HTTP


def test_health_and_models(server, client):
    base = server[0]
    status, body = _raw(base, "GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-run"
    assert health["num_slots"] == SLOTS and health["max_seq_len"] == CONTEXT
    assert health["speculative"] is True  # the MTP heads draft by default, so greedy checks cover that path
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    assert client.models.retrieve("tiny-run").id == "tiny-run"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_completion_matches_greedy_decoding(server, client):
    model = server[1].served.model
    prompt = "def main():"
    out = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny-run" and out.id.startswith("cmpl-")
    assert out.choices[0].text == _greedy(model, BYTES.encode(prompt), 12)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 12, 23)
    by_ids = client.completions.create(model="tiny-run", prompt=BYTES.encode(prompt), max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    empty = client.completions.create(model="tiny-run", prompt="", max_tokens=3, temperature=0)  # after an EOS
    assert empty.usage.prompt_tokens == 1 and empty.choices[0].text == _greedy(model, [BYTES.eos_id], 3)


def _model_logprobs(model, ids, temperature=0.0, top_k=0, top_p=1.0, num_prompt=None):
    """log p(ids[i] | ids[:i]) for i >= 1 from one forward of the served model: raw for the prompt,
    after temperature / top-k / top-p for the completion (from position num_prompt)."""
    from mimo_jax.sampling import processed_probs

    logits = model(jnp.asarray([ids])).logits[0, :-1].astype(jnp.float32)
    n = len(ids) - 1
    want = np.asarray(jax.nn.log_softmax(logits))[np.arange(n), ids[1:]]
    if temperature > 0:
        probs = np.asarray(processed_probs(logits, jnp.full((n,), temperature), jnp.full((n,), top_k),
                                           jnp.full((n,), top_p)))
        want = np.where(np.arange(1, n + 1) >= num_prompt, np.log(probs[np.arange(n), ids[1:]]), want)
    return want


def test_echo_and_logprobs_are_the_models_own(server, client):
    """echo + max_tokens 0 (what evaluation harnesses send) scores the prompt; a greedy completion's
    log-probs are the raw ones and its chosen token tops the alternatives; a sampled one's are
    those of the distribution it was drawn from (temperature, top-k); chat carries them too."""
    model = server[1].served.model
    prompt = "def main():"
    ids = BYTES.encode(prompt)
    scored = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    want = _model_logprobs(model, ids)
    assert choice.text == prompt and choice.logprobs.tokens == list(prompt) and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.text_offset == list(range(len(prompt)))
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], want, atol=2e-5)
    assert all(len(top) in (2, 3) and top[t] == lp for top, t, lp in
               zip(choice.logprobs.top_logprobs[1:], prompt[1:], choice.logprobs.token_logprobs[1:]))

    greedy = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    logprobs = greedy.choices[0].logprobs
    assert "".join(logprobs.tokens) == greedy.choices[0].text == _greedy(model, ids, 6)
    want = _model_logprobs(model, ids + BYTES.encode(greedy.choices[0].text))
    np.testing.assert_allclose(logprobs.token_logprobs, want[len(ids) - 1:], atol=2e-5)
    assert all(max(top, key=top.get) == t for top, t in zip(logprobs.top_logprobs, logprobs.tokens))

    sampled = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=6, temperature=0.7, seed=1,
                                        logprobs=5, echo=True, extra_body={"top_k": 4})
    logprobs = sampled.choices[0].logprobs
    text = sampled.choices[0].text
    assert text.startswith(prompt) and "".join(logprobs.tokens) == text
    want = _model_logprobs(model, BYTES.encode(text), 0.7, 4, 1.0, num_prompt=len(ids))
    np.testing.assert_allclose(logprobs.token_logprobs[1:], want, atol=2e-5)
    assert all(len(top) <= 5 for top in logprobs.top_logprobs[len(ids):])  # top-k 4 cuts the 5th: not listed

    messages = [{"role": "user", "content": "Hi!"}]
    chat = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content and len(content) == 4
    prompt_ids = BYTES.encode(_chatml(messages))
    want = _model_logprobs(model, prompt_ids + BYTES.encode(chat.choices[0].message.content))
    np.testing.assert_allclose([c.logprob for c in content], want[len(prompt_ids) - 1:], atol=2e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)


def test_chat_completion_uses_chatml(server, client):
    model = server[1].served.model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=10, temperature=0)
    prompt_ids = BYTES.encode(_chatml(messages))
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _greedy(model, prompt_ids, 10)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 10
    assert out.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model="tiny-run", max_completion_tokens=10, temperature=0, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Hi!"}])
    assert again.choices[0].message.content == out.choices[0].message.content


def test_streaming_gives_the_same_text(server, client):
    full = client.completions.create(model="tiny-run", prompt="Hello", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny-run", prompt="Hello", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == 5 and all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Tell me"}]
    full = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=9, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=9, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length" and len({c.id for c in chunks}) == 1


def test_stop_strings_cut_the_text(server, client):
    base = client.completions.create(model="tiny-run", prompt="def main():", max_tokens=30, temperature=0)
    text = base.choices[0].text
    stop = text[10:13]
    expected = text[:text.find(stop)]
    for stream in (False, True):
        kwargs = {"model": "tiny-run", "prompt": "def main():", "max_tokens": 30, "temperature": 0,
                  "stop": ["\x00never", stop]}
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(**kwargs)
            got, reason = out.choices[0].text, out.choices[0].finish_reason
            assert out.usage.completion_tokens == len(expected) + len(stop)  # one byte per token
        assert (got, reason) == (expected, "stop")
    unchanged = client.completions.create(model="tiny-run", prompt="def main():", max_tokens=30, temperature=0,
                                          stop="\x00never")
    assert unchanged.choices[0].text == text and unchanged.choices[0].finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(server, client):
    def sample(seed, **kw):
        return client.completions.create(model="tiny-run", prompt="x = ", max_tokens=12, temperature=1.0,
                                         seed=seed, **kw).choices[0].text

    a = sample(7)
    assert sample(7) == a and len({a, sample(8), sample(9)}) > 1
    greedy = sample(3, extra_body={"top_k": 1})
    assert len(greedy) == 12 and greedy == sample(4, top_p=1e-6)  # both greedy in effect


BAD_REQUESTS = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'{"model": "tiny-run", "prompt": "a", "temperature": NaN}', 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "tiny-run"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-run", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny-run", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny-run"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a" * CONTEXT, "max_tokens": 1}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "user", "content": "a" * CONTEXT}]}, 400,
     "messages"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "temperature": 10**400}, 400, "temperature"),
    ("/v1/completions", {"model": "gpt-\ud800", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "top_k": -3}, 400, "top_k"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "seed": True}, 400, "seed"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "logprobs": 1, "stream": True}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "echo": "yes"}, 400, "echo"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "user", "content": "a"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny-run", "messages": [{"role": "user", "content": "a"}],
                              "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/completions", {"model": "tiny-run", "prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/nothing", {}, 404, None),
]


def test_bad_requests_get_openai_errors_while_a_good_one_runs(server, client):
    base, app = server
    prompt = "while True:"
    expected = _greedy(app.served.model, BYTES.encode(prompt), 40)
    result = {}

    def good():
        chunks = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=40, temperature=0, stream=True)
        result["text"] = "".join(c.choices[0].text for c in chunks)

    thread = threading.Thread(target=good)
    thread.start()
    for path, body, status, param in BAD_REQUESTS:
        got, payload = _raw(base, "POST", path, body)
        error = json.loads(payload)["error"]
        assert (got, error["param"]) == (status, param), (body, error)
        assert error["type"] == "invalid_request_error" and error["message"] and "code" in error
    assert _raw(base, "GET", "/v1/completions")[0] == 405
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-run", prompt="a", max_tokens=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])
    thread.join(120)
    assert result["text"] == expected
    assert app.scheduler.alive


def test_32_concurrent_clients_queue_for_4_slots(server, client):
    model = server[1].served.model
    prompts = [f"client {i}: {'x' * (i % 5)}" for i in range(32)]
    prompt_ids = [BYTES.encode(p) for p in prompts]
    expected = [_greedy(model, ids, 8) for ids in prompt_ids]
    results, errors = {}, []

    def run(i):
        try:
            if i % 3 == 0:
                chunks = client.completions.create(model="tiny-run", prompt=prompts[i], max_tokens=8, temperature=0,
                                                   stream=True)
                results[i] = "".join(c.choices[0].text for c in chunks)
            else:
                out = client.completions.create(model="tiny-run", prompt=prompts[i], max_tokens=8, temperature=0)
                assert out.usage.completion_tokens == 8
                results[i] = out.choices[0].text
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert [results.get(i) for i in range(32)] == expected


def test_client_disconnect_frees_its_slot(server, client, monkeypatch):
    """Streams whose clients hang up, and a plain request whose client hangs up, are cancelled."""
    base, app = server
    host, port = base.removeprefix("http://").split(":")
    before = app.scheduler.stats()["cancelled"]
    step = app.engine.step
    # >= 20 ms a step, so that no request can finish its ~1000 tokens before its client is seen to be gone.
    monkeypatch.setattr(app.engine, "step", lambda: (time.sleep(0.02), step())[1])

    def send(stream):
        body = json.dumps({"model": "tiny-run", "prompt": "abc", "max_tokens": CONTEXT - 4, "temperature": 0,
                           "stream": stream}).encode()  # greedy never picks EOS here (its logit is 0)
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return sock

    streams = [send(stream=True) for _ in range(SLOTS)]
    for sock in streams:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    send(stream=False).close()  # waits in the queue (or a slot) for a response that nobody reads
    for sock in streams:
        sock.close()
    deadline = time.time() + 30
    while app.scheduler.stats()["cancelled"] - before < SLOTS + 1 and time.time() < deadline:
        time.sleep(0.05)
    stats = app.scheduler.stats()
    assert (stats["active"], stats["queued"], stats["cancelled"] - before) == (0, 0, SLOTS + 1)
    out = client.completions.create(model="tiny-run", prompt="abc", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


def test_a_full_queue_gets_429_and_a_request_timeout_ends_waiting_and_running_requests(server, monkeypatch):
    """With every slot busy and --max-queue 1 waiting, the next request gets 429 with Retry-After while
    /health answers; then a request timeout ends the queued request (503) and the running streams
    (an error event), and the slots and the queue empty."""
    base, app = server
    host, port = base.removeprefix("http://").split(":")
    scheduler = app.scheduler
    monkeypatch.setattr(scheduler, "max_queue", 1)
    step = app.engine.step
    monkeypatch.setattr(app.engine, "step", lambda: (time.sleep(0.02), step())[1])  # streams outlast the test
    body = {"model": "tiny-run", "prompt": "abc", "max_tokens": CONTEXT - 4, "temperature": 0}

    def post(payload):
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"})
        return conn, conn.getresponse()

    streams = [post({**body, "stream": True}) for _ in range(SLOTS)]  # 200 once admitted
    assert [resp.status for _, resp in streams] == [200] * SLOTS
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(zip(("conn", "resp"), post(body))))
    waiter.start()
    deadline = time.time() + 30
    while scheduler.stats()["queued"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    conn, refused = post(body)
    error = json.loads(refused.read())["error"]
    assert (refused.status, refused.getheader("Retry-After"), error["code"]) == (429, "1", "queue_full"), error
    conn.close()
    status, health = _raw(base, "GET", "/health")
    assert status == 200 and json.loads(health)["queued"] == 1 and json.loads(health)["refused"] >= 1

    monkeypatch.setattr(scheduler, "request_timeout", 0.5)
    waiter.join(30)
    assert queued["resp"].status == 503 and "request timeout" in json.loads(queued["resp"].read())["error"]["message"]
    for conn, resp in streams:
        events = resp.read().decode()
        assert "did not finish within the server's request timeout" in events and events.endswith("data: [DONE]\n\n")
        conn.close()
    stats = scheduler.stats()
    assert (stats["active"], stats["queued"]) == (0, 0)


def test_serve_cli_on_a_hugging_face_fp8_directory_with_resident_weights(dirs):
    """serve.py --weights fp8 on the FP8 export: its greedy text is that of the model dequantised on loading."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model", dirs["hf_fp8"], "--weights", "fp8",
                             "--port", "0", "--num-slots", "2", "--max-seq-len", "64", "--model-name", "hf-tiny", "--api-key", "k1",
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    log = []
    try:
        while not any("serving 'hf-tiny' on http://" in line for line in log):
            assert proc.poll() is None, "".join(log)
            log.append(lines.get(timeout=120))
        url = log[-1].split(" on ")[-1].strip()
        assert "chat format: template, FP8-resident weights" in "".join(log)
        assert "speculative decoding on" in "".join(log)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        hf = openai.OpenAI(base_url=url, api_key="k1", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Hi"}]
        out = hf.chat.completions.create(model="hf-tiny", messages=messages, max_tokens=6, temperature=0)
        tokenizer = HFTokenizer(dirs["hf_fp8"])
        prompt_ids = tokenizer.encode("<|im_start|>user: Hi<|im_end|><|im_start|>assistant: ")
        assert prompt_ids[0] == 0 and out.usage.prompt_tokens == len(prompt_ids) == 3 + len("user: Hi") + len("assistant: ")
        model = serving.load_served(dirs["hf_fp8"]).model  # dequantised into fp32, as the server computes
        assert out.choices[0].message.content == _greedy(model, prompt_ids, 6, tokenizer)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
