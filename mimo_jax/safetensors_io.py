"""Streaming safetensors reading and writing, one tensor at a time.

Our own reader (rather than the `safetensors` package) because it must memory-map bf16 and FP8
tensors into numpy (via ml_dtypes) and name the file and tensor in every error: truncated files,
bad headers, unknown dtypes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as this model; the message names the file and tensor."""


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header (declares {header_len} bytes, file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape} {info['dtype']}")
            if self._data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {name} needs bytes up to {self._data_start + end}, file has {size}"
                )
            self._entries[name] = (dtype, shape, begin)

    def keys(self):
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> np.ndarray:
        """A read-only memory map of the tensor: only the bytes used are read from disk."""
        dtype, shape, begin = self._entries[name]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def write_safetensors(path: str, entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors whose shapes and dtypes are known up front; each is produced only when written."""
    entries = list(entries)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name} was produced with shape {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes())
    os.replace(tmp, path)


class CheckpointReader:
    """All tensors of a HF checkpoint directory: `model.safetensors`, or an index and its shards,
    plus `model_mtp.safetensors` when present (the release keeps the MTP heads there)."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: not a directory")
        self.directory = directory
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index_path):
            with open(index_path) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            weight_map, files = None, ["model.safetensors"]
        else:
            raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        if "model_mtp.safetensors" not in files and os.path.exists(os.path.join(directory, "model_mtp.safetensors")):
            files.append("model_mtp.safetensors")
        self._files = {}
        self._where: dict[str, SafetensorsFile] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: lists {name}, which does not exist")
            st = self._files[name] = SafetensorsFile(path)
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key} is in both {self._where[key].path} and {path}")
                self._where[key] = st
        if weight_map is not None:
            for key, file in weight_map.items():
                if key not in self._where:
                    raise CheckpointError(f"{index_path}: lists tensor {key} in {file}, which does not contain it")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def file_of(self, name: str) -> str:
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: missing tensor {name}")
        return self._where[name].read(name)
