"""What a model directory provides for serving: the model (`checkpoint.load_model`), its tokenizer and
its chat template (rendered in a sandbox)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from mimo_jax.checkpoint import WORKDIR, load_model, model_source
from mimo_jax.config import load_config
from mimo_jax.tokenization import (
    HFTokenizer,
    check_tokenizer_fits,
    declared_special_tokens,
    make_tokenizer,
    read_tokenizer_config,
)

CHATML_END = "<|im_end|>"


@dataclasses.dataclass
class Served:
    """What a model directory provides for serving."""

    model: Any
    tokenizer: Any
    name: str
    add_bos: bool = False
    chat_template: str | None = None
    special_tokens: dict = dataclasses.field(default_factory=dict)  # bos/eos/pad token texts for templates


def load_served(path: str, dtype: str = "float32", name: str | None = None, weights: str | None = None) -> Served:
    """A model directory with its tokenizer, by `checkpoint.model_source`'s precedence: a train.py
    workdir (checkpoints/ and config.yaml; the tokenizer is its config's `data.tokenizer`), else a
    Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json; loaded in `dtype`,
    with `weights="fp8"` keeping an FP8 checkpoint's weights resident, `load_hf`)."""
    path = os.path.abspath(path)
    name = name or os.path.basename(path.rstrip(os.sep)) or "mimo"
    if model_source(path) == WORKDIR:
        if not os.path.isfile(os.path.join(path, "config.yaml")):
            raise FileNotFoundError(f"{path}: a train.py workdir without config.yaml (its tokenizer is named there)")
        data_cfg = load_config(os.path.join(path, "config.yaml")).data
        tokenizer = make_tokenizer(data_cfg)
        model = load_model(path, weights=weights)
        add_bos = data_cfg.add_bos
        tokenizer_dir = os.path.dirname(tokenizer.path) if hasattr(tokenizer, "path") else None
        tokenizer_config = read_tokenizer_config(tokenizer_dir) if tokenizer_dir else {}
        path = tokenizer_dir or path
    else:
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json next to config.json")
        tokenizer = HFTokenizer(path)
        model = load_model(path, jnp.dtype(dtype), weights)
        tokenizer_config = read_tokenizer_config(path)
        add_bos = bool(tokenizer_config.get("add_bos_token", False)) and tokenizer.bos_id is not None
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    return Served(model, tokenizer, name, add_bos, _read_chat_template(path, tokenizer_config),
                  declared_special_tokens(tokenizer_config))


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
    import jinja2  # optional (no dependency of ours brings it for sure): only chat templates need it
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # with jinja2, above

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
