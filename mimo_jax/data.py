"""Training data: corpora, document packing, and a checkpointable grain pipeline.

The pipeline for one host is

    corpus split (random access: one document per index)
      -> this host's shard (every `shard_count`-th document)
      -> global shuffle, reshuffled each epoch (seed + epoch), repeated     [train]
      -> tokenize each document lazily, EOS appended                        [grain map]
      -> concatenate-then-split packing into rows of `seq_len` tokens
      -> shuffle of rows within windows of `row_shuffle_window` rows        [train]
      -> batches of `batch_size // shard_count` rows
      -> optional background-thread prefetch

and every stage is a grain dataset whose iterator state is small and JSON-safe, so
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` resume it exactly
(a restore re-reads the current row-shuffle window and the document being cut).

A batch is a dict of int32 numpy arrays of shape [rows, seq_len]:
  input_ids    token ids; padding holds the tokenizer's pad id
  segment_ids  1, 2, 3, ... for the documents (or document pieces) of a row, 0 for padding
  positions    position inside the row's piece of its document (restarts at 0 for each piece)
Packing pads only the final row of a finite (eval) stream, and only the final batch of such a
stream has all-padding rows (so shapes never change); training rows are always full.

The default corpus (`source: stdlib`) is the running interpreter's own standard library `.py`
files, so `train.py --config configs/tiny.yaml` trains with no download.

Threads only (no worker processes): the work per document is small, and it avoids the absl-flags
and pickling requirements of grain's multiprocessing workers.
"""

from __future__ import annotations

import abc
import collections
import functools
import glob
import hashlib
import json
import mmap
import os
import sysconfig
import threading
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimo_jax.config import SOURCES, ConfigError, DataConfig
from mimo_jax.tokenization import ByteTokenizer, DataError, HFTokenizer, Tokenizer, check_tokenizer_fits, make_tokenizer  # noqa: F401 - re-exported: the tokenizers lived here

SPLITS = ("train", "eval")
# `num_epochs` default: forever for train, one pass for eval.
SPLIT_DEFAULT = object()

# A corpus split needs a few held-out documents to give a meaningful eval loss; with hashing alone a
# small corpus could end up with none.
MIN_EVAL_DOCUMENTS = 4

# Directory entries of a corpus list only files with these endings (single files and globs are
# taken as given).
_DIRECTORY_SUFFIXES = {"text": None, "jsonl": (".jsonl", ".ndjson", ".json"), "parquet": (".parquet",)}

# Standard-library subdirectories that are not library code: installed packages and test suites
# (the test suites hold deliberately odd encodings and huge generated files).
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


# ---------------------------------------------------------------------------------------------
# Corpora: random-access sequences of documents (grain data sources)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: turns sequential keys into uniformly spread ones."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))) & _MASK64


def _string_key(text: str) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class _Corpus(abc.ABC):
    """Documents by index. `split_keys` gives each document a stable 64-bit key for the eval split."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> str: ...

    @abc.abstractmethod
    def split_keys(self) -> np.ndarray: ...


class FileCorpus(_Corpus):
    """One document per file. Keys are the files' paths relative to the corpus root."""

    def __init__(self, files: Sequence[str], keys: Sequence[str]):
        self.files = list(files)
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        path = self.files[index]
        try:
            # Undecodable bytes become U+FFFD: one odd file must not stop a long run.
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None

    def split_keys(self) -> np.ndarray:
        return _mix64(np.array([_string_key(k) for k in self.keys], dtype=np.uint64))


def _record_keys(file_key: str, count: int) -> np.ndarray:
    """Keys for the records of one file: its name's hash mixed with the record number."""
    with np.errstate(over="ignore"):
        base = np.uint64(_string_key(file_key))
        return _mix64(base + np.arange(count, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03))


class JsonlCorpus(_Corpus):
    """One JSON object per non-blank line; the document is its `text_field` string.

    Opening indexes every line's byte range (a newline scan over a memory map, no parsing), so any
    record can be read on its own with one positioned read.
    """

    def __init__(self, files: Sequence[str], text_field: str):
        self.files = list(files)
        self.text_field = text_field
        starts, ends, lines, counts = [], [], [], []
        for path in self.files:
            s, e, n = _index_lines(path)
            starts.append(s)
            ends.append(e)
            lines.append(n)
            counts.append(len(s))
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self._line_numbers = np.concatenate(lines) if lines else np.zeros(0, np.int64)
        self._file_of = np.repeat(np.arange(len(self.files)), counts)
        self._counts = counts
        # A wrong field name or a non-JSON file shows up now, not hours into training.
        first = 0
        for count in counts:
            if count:
                self[first]
            first += count

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> str:
        path = self.files[self._file_of[index]]
        start, end = int(self._starts[index]), int(self._ends[index])
        where = f"{path}: line {int(self._line_numbers[index])}"
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                raw = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        return _text_of(record, self.text_field, where)

    def split_keys(self) -> np.ndarray:
        return np.concatenate(
            [_record_keys(os.path.basename(p), c) for p, c in zip(self.files, self._counts)]
        ) if self.files else np.zeros(0, np.uint64)


def _text_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with field {field!r}, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(sorted(map(str, record))[:20])
        raise DataError(f"{where}: no field {field!r} (fields: {fields}); set data.text_field")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, 1-based line number) of each non-blank line of a file."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            data = np.frombuffer(mm, dtype=np.uint8)
            newlines = np.flatnonzero(data == ord("\n"))
            starts = np.concatenate([[0], newlines + 1])
            ends = np.concatenate([newlines, [size]])
            lengths = ends - starts
            # Blank lines (also "\r" alone, from Windows line ends) hold no record.
            short = np.flatnonzero(lengths == 1)
            blank = lengths == 0
            blank[short] = data[starts[short]] == ord("\r")
            del data  # the memory map cannot close while a view of it is alive
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    keep = ~blank
    return starts[keep].astype(np.int64), ends[keep].astype(np.int64), np.flatnonzero(keep).astype(np.int64) + 1


class ParquetCorpus(_Corpus):
    """One document per row; the document is the `text_field` string column.

    Rows are read a row group at a time and the last few row groups are cached, so a global
    shuffle costs about one row-group read per document: write files with small row groups
    (a few MB) for shuffled training.
    """

    _CACHED_ROW_GROUPS = 4

    def __init__(self, files: Sequence[str], text_field: str):
        self.files = list(files)
        self.text_field = text_field
        self._row_groups = []  # (file index, row group index in file, its first row in file) per global group
        rows_per_group = []
        self._counts = []
        for file_index, path in enumerate(self.files):
            try:
                metadata = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: cannot read as Parquet ({e})") from None
            schema = metadata.schema_arrow
            if text_field not in schema.names:
                raise DataError(
                    f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); set data.text_field"
                )
            column_type = schema.field(text_field).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                    or getattr(pa.types, "is_string_view", lambda t: False)(column_type)):
                raise DataError(f"{path}: column {text_field!r} has type {column_type}, not string")
            file_rows = 0
            for group in range(metadata.num_row_groups):
                n = metadata.metadata.row_group(group).num_rows
                if n:
                    self._row_groups.append((file_index, group, file_rows))
                    rows_per_group.append(n)
                    file_rows += n
            self._counts.append(file_rows)
        self._group_starts = np.concatenate([[0], np.cumsum(rows_per_group, dtype=np.int64)])
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._open_files: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self._group_starts[-1])

    def _row_group(self, group: int):
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            file_index, file_group, _ = self._row_groups[group]
            path = self.files[file_index]
            try:
                if file_index not in self._open_files:
                    self._open_files[file_index] = pq.ParquetFile(path)
                column = self._open_files[file_index].read_row_group(file_group, columns=[self.text_field])
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: cannot read row group {file_group} ({e})") from None
            self._cache[group] = column.column(0)
            if len(self._cache) > self._CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
            return self._cache[group]

    def __getitem__(self, index: int) -> str:
        group = int(np.searchsorted(self._group_starts, index, side="right")) - 1
        row_in_group = index - int(self._group_starts[group])
        text = self._row_group(group)[row_in_group].as_py()
        if text is None:
            file_index, _, first_row = self._row_groups[group]
            raise DataError(f"{self.files[file_index]}: row {first_row + row_in_group}: column {self.text_field!r} is null")
        return text

    def __getstate__(self):  # open files and the cache stay with their process
        state = dict(self.__dict__)
        state.update(_cache=collections.OrderedDict(), _lock=None, _open_files={})
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def split_keys(self) -> np.ndarray:
        return np.concatenate(
            [_record_keys(os.path.basename(p), c) for p, c in zip(self.files, self._counts)]
        ) if self.files else np.zeros(0, np.uint64)


class SubsetCorpus(_Corpus):
    """The documents of `corpus` at `indices` (a train or eval split)."""

    def __init__(self, corpus: _Corpus, indices: np.ndarray):
        self.corpus = corpus
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> str:
        return self.corpus[int(self.indices[index])]

    def split_keys(self) -> np.ndarray:
        return self.corpus.split_keys()[self.indices]


@functools.cache
def stdlib_files() -> tuple[tuple[str, str], ...]:
    """(absolute path, path relative to the stdlib) of the interpreter's stdlib .py files, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                found.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    found.sort(key=lambda item: item[1])
    return tuple(found)


def resolve_files(entries: Sequence[str], source: str) -> tuple[list[str], list[str]]:
    """(files, keys): each entry is a file, a directory (recursive) or a glob; order is sorted per entry.

    A key is the file's path relative to its directory entry (or as matched), so the eval split
    does not depend on where the corpus is mounted.
    """
    suffixes = _DIRECTORY_SUFFIXES[source]
    files, keys, seen = [], [], set()
    for entry in entries:
        expanded = os.path.expanduser(entry)
        if os.path.isdir(expanded):
            matched = []
            for directory, subdirs, names in os.walk(expanded):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                for name in names:
                    if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                        continue
                    path = os.path.join(directory, name)
                    matched.append((path, os.path.relpath(path, expanded).replace(os.sep, "/")))
            if not matched:
                wanted = f" ending in {', '.join(suffixes)}" if suffixes else ""
                raise DataError(f"data.paths entry {entry!r}: directory has no files{wanted}")
        elif os.path.isfile(expanded):
            matched = [(expanded, os.path.basename(expanded))]
        else:
            matched = [(p, p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
            if not matched:
                raise DataError(f"data.paths entry {entry!r}: no such file, directory, or glob match")
        for path, key in sorted(matched, key=lambda item: item[1]):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
                keys.append(key)
    return files, keys


def open_corpus(source: str, entries: Sequence[str], text_field: str = "text") -> _Corpus:
    """The whole corpus of `source` ("text" | "jsonl" | "parquet") over the given path entries."""
    files, keys = resolve_files(entries, source)
    if source == "text":
        corpus: _Corpus = FileCorpus(files, keys)
    elif source == "jsonl":
        corpus = JsonlCorpus(files, text_field)
    elif source == "parquet":
        corpus = ParquetCorpus(files, text_field)
    else:
        raise ConfigError(f"data.source: {source!r} is not one of {list(SOURCES[1:])} for files")
    if len(corpus) == 0:
        raise DataError(f"no documents in {', '.join(files)}")
    return corpus


def _eval_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Documents whose key falls in the lowest `fraction` of the key space, at least a few of them."""
    if fraction <= 0.0:
        return np.zeros(len(keys), bool)
    uniform = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53
    mask = uniform < fraction
    needed = min(MIN_EVAL_DOCUMENTS, len(keys) - 1)
    if mask.sum() < needed:
        mask[np.argsort(uniform, kind="stable")[:needed]] = True
    return mask


def load_split(data_cfg: DataConfig, split: str) -> _Corpus:
    """The documents of the train or eval split; the two never share a document (or a file)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_cfg.source == "stdlib":
        listing = stdlib_files()
        if not listing:
            raise DataError(f"no .py files under the standard library {sysconfig.get_paths()['stdlib']}")
        corpus: _Corpus = FileCorpus([p for p, _ in listing], [k for _, k in listing])
    elif data_cfg.eval_paths:
        train_files, _ = resolve_files(data_cfg.paths, data_cfg.source)
        eval_files, _ = resolve_files(data_cfg.eval_paths, data_cfg.source)
        shared = {os.path.realpath(p) for p in train_files} & {os.path.realpath(p) for p in eval_files}
        if shared:
            raise DataError(f"file(s) in both data.paths and data.eval_paths: {', '.join(sorted(shared))}")
        entries = data_cfg.paths if split == "train" else data_cfg.eval_paths
        return open_corpus(data_cfg.source, entries, data_cfg.text_field)
    else:
        corpus = open_corpus(data_cfg.source, data_cfg.paths, data_cfg.text_field)
    in_eval = _eval_mask(corpus.split_keys(), data_cfg.eval_fraction)
    indices = np.flatnonzero(in_eval if split == "eval" else ~in_eval)
    if len(indices) == 0:
        raise DataError(
            f"the {split} split of data.source={data_cfg.source!r} has no documents "
            f"({len(corpus)} in all, data.eval_fraction={data_cfg.eval_fraction})"
        )
    return SubsetCorpus(corpus, indices)


# ---------------------------------------------------------------------------------------------
# Tokenizing and packing


class DocumentEncoder:
    """text -> int32 token ids of one document: [BOS] + tokens + EOS."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool = False):
        if add_bos and tokenizer.bos_id is None:
            raise DataError(f"data.add_bos is set but {tokenizer!r} has no BOS token; set data.bos_token")
        self.tokenizer = tokenizer
        self.prefix = np.array([tokenizer.bos_id] if add_bos else [], dtype=np.int32)
        self.suffix = np.array([tokenizer.eos_id], dtype=np.int32)

    def __call__(self, text: str) -> np.ndarray:
        return np.concatenate([self.prefix, self.tokenizer.encode_array(text), self.suffix])


class _PackedRowsIterator(grain.DatasetIterator):
    """Concatenates documents and cuts the stream into rows of `seq_len` tokens.

    State: the parent's state from just before the document being cut, plus how many of its tokens
    are already in earlier rows. Restoring re-reads that one document; the state is plain ints,
    so it survives the JSON round trip of grain's checkpoint handler. (grain 0.2.18's
    ConcatThenSplitIterDataset does not: its tuple sentinel turns into a list, which drops a document.)
    """

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._positions = np.arange(seq_len, dtype=np.int32)
        self._document: np.ndarray | None = None
        self._document_parent_state: Any = None
        self._offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        ids = np.full(self._seq_len, self._pad_id, dtype=np.int32)
        segment_ids = np.zeros(self._seq_len, dtype=np.int32)
        positions = np.zeros(self._seq_len, dtype=np.int32)
        filled = 0
        segment = 0
        while filled < self._seq_len:
            if self._document is None:
                state_before = self._parent.get_state()
                try:
                    document = next(self._parent)
                except StopIteration:
                    break
                if len(document) == 0:
                    continue
                self._document, self._document_parent_state, self._offset = document, state_before, 0
            take = min(self._seq_len - filled, len(self._document) - self._offset)
            segment += 1
            ids[filled:filled + take] = self._document[self._offset:self._offset + take]
            segment_ids[filled:filled + take] = segment
            positions[filled:filled + take] = self._positions[:take]
            filled += take
            self._offset += take
            if self._offset == len(self._document):
                self._document = None
        if filled == 0:
            raise StopIteration
        return {"input_ids": ids, "segment_ids": segment_ids, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        if self._document is None:
            return {"parent": self._parent.get_state(), "document_offset": 0}
        return {"parent": self._document_parent_state, "document_offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._document = None
        self._offset = 0
        if state["document_offset"]:
            self._document_parent_state = state["parent"]
            self._document = next(self._parent)
            self._offset = int(state["document_offset"])


class PackedRowsIterDataset(grain.IterDataset):
    """Rows {input_ids, segment_ids, positions} of `seq_len` tokens from a stream of token arrays.

    Documents are laid end to end; one that does not fit is split, its rest opening the next row.
    Every row is full except the last of a finite stream, which is padded (segment id 0).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._seq_len})"


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], *, batch_rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch, topping a short final batch up with all-padding rows."""
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    missing = batch_rows - len(rows)
    if missing:
        seq_len = batch["input_ids"].shape[1]
        fill = {"input_ids": pad_id, "segment_ids": 0, "positions": 0}
        batch = {key: np.concatenate([value, np.full((missing, seq_len), fill[key], np.int32)])
                 for key, value in batch.items()}
    return batch


# ---------------------------------------------------------------------------------------------
# Entry points


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def make_iter_dataset(
    data_cfg: DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    split: str = "train",
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    tokenizer: Tokenizer | None = None,
    num_epochs: int | None | object = SPLIT_DEFAULT,
    shuffle: bool | None = None,
) -> grain.IterDataset:
    """The batched pipeline of this host as a grain IterDataset; see `make_dataset`."""
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    if batch_size <= 0 or batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} (global) must be a positive multiple of shard_count={shard_count}")
    if num_epochs is SPLIT_DEFAULT:
        num_epochs = None if split == "train" else 1
    if shuffle is None:
        shuffle = split == "train"
    tokenizer = tokenizer or make_tokenizer(data_cfg)
    corpus = load_split(data_cfg, split)
    if len(corpus) < shard_count:
        raise DataError(
            f"the {split} split has {len(corpus)} documents, fewer than the {shard_count} shards (hosts) reading it"
        )
    documents = grain.MapDataset.source(corpus)[shard_index::shard_count]
    if shuffle:
        documents = documents.shuffle(seed)  # a new permutation each epoch: seed + epoch
    if num_epochs != 1:
        documents = documents.repeat(num_epochs)
    tokens = documents.map(DocumentEncoder(tokenizer, data_cfg.add_bos))
    read_options = grain.ReadOptions(num_threads=data_cfg.num_threads,
                                     prefetch_buffer_size=max(4 * data_cfg.num_threads, 1))
    rows = PackedRowsIterDataset(tokens.to_iter_dataset(read_options), seq_len=seq_len, pad_id=tokenizer.pad_id)
    if shuffle and data_cfg.row_shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=data_cfg.row_shuffle_window, seed=seed)
    batch_rows = batch_size // shard_count
    batches = rows.batch(batch_rows, batch_fn=functools.partial(_stack_rows, batch_rows=batch_rows,
                                                                  pad_id=tokenizer.pad_id))
    if data_cfg.num_threads > 0 and data_cfg.prefetch_batches > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data_cfg.prefetch_batches)
    return batches


def make_dataset(data_cfg: DataConfig, **kwargs) -> grain.DatasetIterator:
    """A checkpointable iterator of this host's batches (dicts of int32 [batch_size // shard_count, seq_len]);
    the keyword arguments are `make_iter_dataset`'s (seq_len, batch_size, split, seed, ...).

    `batch_size` is the global batch; each of `shard_count` hosts (default: jax.process_count(),
    this one jax.process_index()) reads every shard_count-th document and yields its share of rows.
    Train (default): shuffled (a new order per epoch from `seed`), repeated forever. Eval (default):
    in corpus order, one pass, the final batch topped up with padding rows; pass `num_epochs=None`
    to repeat it, e.g. to take the same fixed number of batches on every host.
    `iterator.get_state()` / `set_state()` resume exactly; grain.checkpoint.CheckpointSave/Restore
    store them with Orbax.
    """
    return iter(make_iter_dataset(data_cfg, **kwargs))


def unigram_entropy(data_cfg: DataConfig, *, tokenizer: Tokenizer | None = None, split: str = "eval",
                    max_documents: int | None = None) -> float:
    """Entropy (nats/token) of the split's own token frequencies over the tokens a model predicts.

    That is the loss of the best context-free predictor for this very split, so a model whose eval
    loss falls well below it has learned to use context. Targets are every token of each document
    but the first (EOS included), as in the packed next-token objective.
    """
    tokenizer = tokenizer or make_tokenizer(data_cfg)
    encode = DocumentEncoder(tokenizer, data_cfg.add_bos)
    corpus = load_split(data_cfg, split)
    count = len(corpus) if max_documents is None else min(max_documents, len(corpus))
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for index in range(count):
        counts += np.bincount(encode(corpus[index])[1:], minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
    total = counts.sum()
    if total == 0:
        raise DataError(f"the {split} split has no tokens to predict")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())

