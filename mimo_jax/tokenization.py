"""Tokenizers: the built-in byte tokenizer and Hugging Face tokenizer.json files, without grain.

Training data (`mimo_jax.data`), serving and MOPD all tokenize through `make_tokenizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tokenizers

from mimo_jax.config import ConfigError, DataConfig


class DataError(ValueError):
    """A corpus, file or tokenizer that cannot feed training; the message names the culprit."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3, after pad = 0, eos = 1, bos = 2 (vocab 259).

    Pad is 0 so that zero-filled buffers are padding, matching `pad_token_id: 0` in tiny.yaml; the
    259 ids fit any model vocabulary of at least 259 (tiny.yaml has 512).
    """

    pad_id = 0
    eos_id = 1
    bos_id = 2
    byte_offset = 3
    vocab_size = 259

    def encode_array(self, text: str) -> np.ndarray:
        # Lone surrogates (possible in JSON strings) cannot be UTF-8; they become "?".
        raw = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return raw.astype(np.int32) + self.byte_offset

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= self.byte_offset) & (ids < self.vocab_size)]  # special ids carry no text
        return (ids - self.byte_offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json (the fast-tokenizer file every hub model ships)."""

    def __init__(self, path: str, eos_token: str = "", pad_token: str = "", bos_token: str = ""):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(f"tokenizer {path}: no such file (data.tokenizer is 'bytes' or a tokenizer.json path)")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 (the Rust loader raises plain Exception)
            raise DataError(f"tokenizer {path}: cannot load ({e})") from None
        self.path = path
        declared = declared_special_tokens(read_tokenizer_config(os.path.dirname(path)))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos = self._special_id("eos", eos_token or declared.get("eos_token"), _EOS_CANDIDATES)
        if eos is None:
            raise DataError(
                f"tokenizer {path}: cannot tell its end-of-document token (none of {list(_EOS_CANDIDATES)}); "
                "set data.eos_token"
            )
        self.eos_id = eos
        pad = self._special_id("pad", pad_token or declared.get("pad_token"), _PAD_CANDIDATES)
        self.pad_id = eos if pad is None else pad  # padding is masked by segment id 0; any id works
        self.bos_id = self._special_id("bos", bos_token or declared.get("bos_token"), _BOS_CANDIDATES)

    def _special_id(self, role: str, explicit: str | None, candidates: Sequence[str]) -> int | None:
        if explicit:
            token_id = self._tokenizer.token_to_id(explicit)
            if token_id is None:
                raise DataError(f"tokenizer {self.path}: {role} token {explicit!r} is not in its vocabulary")
            return token_id
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def read_tokenizer_config(directory: str) -> dict:
    """A directory's transformers tokenizer_config.json as a dict ({} when there is none)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            declared = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    return declared if isinstance(declared, dict) else {}


def declared_special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """The bos/eos/pad/unk token texts a tokenizer_config declares, by key ("eos_token", ...)."""
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, dict):  # older files store AddedToken dicts
            value = value.get("content")
        if isinstance(value, str) and value:
            out[key] = value
    return out


def make_tokenizer(data_cfg: DataConfig) -> Tokenizer:
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    return HFTokenizer(data_cfg.tokenizer, data_cfg.eos_token, data_cfg.pad_token, data_cfg.bos_token)


def check_tokenizer_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Every id the tokenizer emits must index the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(
            f"{tokenizer!r} has {tokenizer.vocab_size} ids but model.vocab_size is {model_vocab_size}"
        )
