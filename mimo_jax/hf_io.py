"""Hugging Face checkpoints: `load_hf` (hub or transformers layout, bf16/fp32/FP8) and `save_hf`.

Every model parameter knows the HF tensors it comes from (`_TensorSpec`), so loading is one pass
over our parameters: each is built with `jax.make_array_from_callback`, whose callback reads only
the tensors (and, for experts, only the experts) of the shard it is asked for. Peak host memory
is one parameter shard, never the checkpoint. Shapes, missing and unexpected tensors are checked
against the safetensors headers before any weight is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mimo_jax import fp8
from mimo_jax.config import GLOBAL, SWA, ConfigError, ModelConfig, model_config_from_hf, model_config_to_hf
from mimo_jax.fp8_resident import Fp8Weight, scale_shape
from mimo_jax.model import MiMoV2Flash, abstract_model
from mimo_jax.safetensors_io import CheckpointError, CheckpointReader, write_safetensors

SCALE_SUFFIX = "_scale_inv"
MTP_FILE = "model_mtp.safetensors"
_MTP_LAYER = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
_KV_PROJ = re.compile(r"(.*self_attn\.)([kv])_proj\.weight")  # k and v: their FP8 scales are read as a pair


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    """How one of our (per-layer, per-expert) arrays is stored in HF.

    `n_in` is None for tensors stored as they are; otherwise the HF tensor is a Linear weight
    [out, in] and our array is laid out [in dims (n_in of them)..., out dims...].
    """

    name: str
    n_in: int | None = None
    per_expert: bool = False
    alt: str | None = None  # transformers' name: fused experts or `sinks`
    alt_part: int | None = None  # which half of a fused gate_up tensor
    quantizable: bool = False


def _layer_specs(post_attn_norm: str) -> dict[tuple[str, ...], _TensorSpec]:
    lin = dict(n_in=1, quantizable=True)
    return {
        ("input_norm", "weight"): _TensorSpec("input_layernorm.weight"),
        ("post_attn_norm", "weight"): _TensorSpec(post_attn_norm),
        ("attn", "q"): _TensorSpec("self_attn.q_proj.weight", **lin),
        ("attn", "k"): _TensorSpec("self_attn.k_proj.weight", **lin),
        ("attn", "v"): _TensorSpec("self_attn.v_proj.weight", **lin),
        ("attn", "o"): _TensorSpec("self_attn.o_proj.weight", n_in=2),
        ("attn", "sinks"): _TensorSpec("self_attn.attention_sink_bias", alt="self_attn.sinks"),
        ("mlp", "gate"): _TensorSpec("mlp.gate_proj.weight", **lin),
        ("mlp", "up"): _TensorSpec("mlp.up_proj.weight", **lin),
        ("mlp", "down"): _TensorSpec("mlp.down_proj.weight", **lin),
        ("mlp", "router"): _TensorSpec("mlp.gate.weight", n_in=1),
        ("mlp", "bias"): _TensorSpec("mlp.gate.e_score_correction_bias"),
        ("mlp", "w_gate"): _TensorSpec("mlp.experts.{e}.gate_proj.weight", per_expert=True, alt="mlp.experts.gate_up_proj", alt_part=0, **lin),
        ("mlp", "w_up"): _TensorSpec("mlp.experts.{e}.up_proj.weight", per_expert=True, alt="mlp.experts.gate_up_proj", alt_part=1, **lin),
        ("mlp", "w_down"): _TensorSpec("mlp.experts.{e}.down_proj.weight", per_expert=True, alt="mlp.experts.down_proj", **lin),
    }


_LAYER_SPECS = _layer_specs("post_attention_layernorm.weight")
_MTP_SPECS = {
    ("enorm", "weight"): _TensorSpec("enorm.weight"),
    ("hnorm", "weight"): _TensorSpec("hnorm.weight"),
    ("eh_proj",): _TensorSpec("eh_proj.weight", n_in=1),
    ("final_norm", "weight"): _TensorSpec("final_layernorm.weight"),
    **{("block",) + k: v for k, v in _layer_specs("pre_mlp_layernorm.weight").items()},
}
_TOP_SPECS = {
    ("embed",): _TensorSpec("model.embed_tokens.weight"),
    ("lm_head",): _TensorSpec("lm_head.weight", n_in=1),
    ("final_norm", "weight"): _TensorSpec("model.norm.weight"),
}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One of our parameters: its HF spec, its stack dims (layers) and where each stack entry lives."""

    path: tuple
    spec: _TensorSpec
    stack: tuple[int, ...]
    prefix: Callable[[tuple[int, ...]], str]  # HF name prefix of one stack entry
    shape: tuple[int, ...]  # full shape, stack dims first
    dtype: np.dtype
    layer_type: str | None  # attention type of the layer holding it
    logical_axes: tuple | None

    @property
    def base_shape(self):
        return self.shape[len(self.stack):]

    @property
    def tensor_shape(self):
        """Our shape of what one HF tensor holds: one expert's slice for expert weights."""
        return self.base_shape[1:] if self.spec.per_expert else self.base_shape

    @property
    def fp8_in_axis(self) -> int:
        """The input axis of a quantised weight, counted from the end (`Fp8Weight.in_axis`)."""
        return -len(self.tensor_shape)

    def hf_shape(self) -> tuple[int, ...]:
        base = self.tensor_shape
        if self.spec.n_in is None:
            return tuple(base)
        return (math.prod(base[self.spec.n_in:]), math.prod(base[: self.spec.n_in]))

    def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
        return hf_array if self.spec.n_in is None else hf_array.T.reshape(self.tensor_shape)

    def scales_to_ours(self, scales_RC: np.ndarray) -> np.ndarray:
        """Per-row block scales [out rows, in blocks] of a Linear weight in our layout, the input axis
        in blocks: [in blocks, out dims...] (`Fp8Weight.scale`)."""
        return scales_RC.T.reshape((scales_RC.shape[1],) + tuple(self.tensor_shape[self.spec.n_in:]))

    def source(self, prefix: str, reader: CheckpointReader) -> str:
        """The stored name of a non-expert tensor: the hub's, else transformers' alternative."""
        name = prefix + self.spec.name
        if name not in reader and self.spec.alt and prefix + self.spec.alt in reader:
            return prefix + self.spec.alt
        return name

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.spec.n_in is None:
            return ours
        return ours.reshape(math.prod(ours.shape[: self.spec.n_in]), -1).T


def _leaves(model_state, plan) -> list[_Leaf]:
    """Our parameters with their HF names, in the order of the model state."""
    leaves = []
    for path, var in nnx.to_flat_state(model_state):
        value = var.get_value()
        if path[0] == "segments":
            segment = plan[path[1]]
            run = segment.runs[path[3]]
            specs, rel, stack = _LAYER_SPECS, path[4:], value.shape[:2]

            def prefix(idx, segment=segment, run=run):
                return f"model.layers.{segment.layer_index(idx[0], run, idx[1])}."

            layer_type = run.kind[0]
        elif path[0] == "mtp":
            specs, rel, stack, layer_type = _MTP_SPECS, path[1:], value.shape[:1], SWA

            def prefix(idx):
                return f"model.mtp.layers.{idx[0]}."

        else:
            specs, rel, stack, layer_type = _TOP_SPECS, path, (), None

            def prefix(idx):
                return ""

        if rel not in specs:
            raise KeyError(f"parameter {'.'.join(map(str, path))} has no Hugging Face name")
        leaves.append(_Leaf(path, specs[rel], tuple(stack), prefix, tuple(value.shape), np.dtype(value.dtype), layer_type,
                             var.get_metadata().get("logical_axes")))
    return leaves


# ---------------------------------------------------------------------------------------------
# Loading


class _HFTensors:
    """Reads HF tensors by name as float32 (FP8 dequantised) or their stored dtype."""

    def __init__(self, reader: CheckpointReader, cfg: ModelConfig):
        self.reader = reader
        self.cfg = cfg

    def describe(self, name: str) -> str:
        return f"tensor {name} in {self.reader.file_of(name)}" if name in self.reader else f"tensor {name}"

    def read(self, name: str) -> np.ndarray:
        """The tensor in float32 if it is FP8 (dequantised), else as stored."""
        array = self.reader.read(name)
        if name + SCALE_SUFFIX not in self.reader:
            if array.dtype == fp8.FP8:
                raise CheckpointError(f"{self.describe(name)} is FP8 but has no {name + SCALE_SUFFIX}")
            return array
        return fp8.dequantize_rows(array, self.row_scales(name))

    def read_fp8(self, name: str) -> np.ndarray:
        """An FP8 tensor's e4m3 values, as stored (their scales: `row_scales`)."""
        array = self.reader.read(name)
        if array.dtype != fp8.FP8 or name + SCALE_SUFFIX not in self.reader:
            raise CheckpointError(f"{self.describe(name)} is {array.dtype}, not FP8 with a {name + SCALE_SUFFIX}: "
                                  "FP8-resident weights need the FP8 checkpoint (or load it dequantised, weights=None)")
        return array

    def row_scales(self, name: str) -> np.ndarray:
        """Each row's block scales [rows, column blocks] of an FP8 tensor (global-layer k/v: from
        their fused per-shard [K | V] grid)."""
        scale = self.reader.read(name + SCALE_SUFFIX)
        kv = _KV_PROJ.fullmatch(name)
        try:
            if kv:
                prefix, which = kv.groups()
                k_name, v_name = prefix + "k_proj.weight", prefix + "v_proj.weight"
                k_scale, v_scale = self.reader.read(k_name + SCALE_SUFFIX), self.reader.read(v_name + SCALE_SUFFIX)
                k_rows, v_rows = self.reader.shape(k_name)[0], self.reader.shape(v_name)[0]
                num_kv = k_rows // self.cfg.qk_head_dim
                shards = fp8.kv_shards(k_scale.shape[0], v_scale.shape[0], num_kv, self.cfg.qk_head_dim, self.cfg.v_head_dim)
                if shards is not None:
                    k, v = fp8.fused_kv_row_scales(k_scale, v_scale, k_rows, v_rows, shards)
                    return k if which == "k" else v
            shape = self.reader.shape(name)
            fp8.check_grid(shape, scale)
            return fp8.row_scales(scale, shape[0])
        except ValueError as e:
            raise CheckpointError(f"{self.describe(name)}: {e}") from None

    def expert(self, leaf: _Leaf, prefix: str, e: int, read: Callable | None = None):
        """Expert e's tensor by `read` (default `self.read`); another reader takes the hub's
        per-expert names only."""
        name = prefix + leaf.spec.name.format(e=e)
        if name in self.reader:
            return (read or self.read)(name)
        if read is not None:
            raise CheckpointError(f"{self.describe(prefix + leaf.spec.alt)}: FP8-resident experts are read from "
                                  f"per-expert tensors ({name}), the release's layout")
        fused = self.read(prefix + leaf.spec.alt)[e]
        if leaf.spec.alt_part is None:
            return fused
        half = fused.shape[0] // 2
        return fused[leaf.spec.alt_part * half : (leaf.spec.alt_part + 1) * half]


def _expected_tensors(leaf: _Leaf, prefix: str, reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """The HF tensors this stack entry needs, with their shapes (scales are checked when read)."""
    spec = leaf.spec
    if spec.per_expert:
        num_experts = leaf.base_shape[0]
        names = [prefix + spec.name.format(e=e) for e in range(num_experts)]
        if any(n in reader for n in names) or prefix + spec.alt not in reader:
            return {n: leaf.hf_shape() for n in names}
        out, inn = leaf.hf_shape()
        fused_rows = out * (2 if spec.alt_part is not None else 1)
        return {prefix + spec.alt: (num_experts, fused_rows, inn)}
    return {leaf.source(prefix, reader): leaf.hf_shape()}


def _count_mtp_heads(reader: CheckpointReader) -> int:
    heads = {int(m.group(1)) for name in reader.keys() if (m := _MTP_LAYER.match(name))}
    if heads and heads != set(range(len(heads))):
        raise CheckpointError(f"{reader.directory}: MTP layers {sorted(heads)} are not numbered 0..{len(heads) - 1}")
    return len(heads)


def _progress(enabled: bool, total: int):
    start = time.time()

    def report(i: int, what: str):
        if enabled:
            print(f"\r[{i}/{total}] {time.time() - start:6.1f}s {what:<70.70}", end="" if i < total else "\n",
                  file=sys.stderr, flush=True)

    return report


def load_hf(path: str, dtype=jnp.bfloat16, *, sharding: Callable | None = None, progress: bool | None = None,
            weights: str | None = None, **config_overrides) -> MiMoV2Flash:
    """Loads a MiMo-V2-Flash HF checkpoint directory into a model whose params and activations use `dtype`.

    Router weights, the correction bias and sinks stay fp32. `sharding(path, shape, logical_axes)`
    may return a `jax.sharding.Sharding` per parameter (default: the first device). `config_overrides`
    replace ModelConfig fields (e.g. `moe_impl="dense"`). Progress goes to stderr for big checkpoints.

    `weights="fp8"` keeps an FP8 checkpoint's quantised weights (attention q/k/v, dense FFN, experts;
    main model and MTP heads) as its e4m3 values and block scales (`fp8_resident.Fp8Weight`), about
    half the bytes of bf16, dequantised inside each matmul; for inference (generate, serve.py), not
    training. The default dequantises every weight into `dtype` on loading.
    """
    if weights not in (None, "fp8"):
        raise ValueError(f"load_hf: weights={weights!r}; expected None (dequantise into dtype) or 'fp8'")
    fp8_resident = weights == "fp8"
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    reader = CheckpointReader(path)
    # The release's config does not state its MTP head count: the weights do. A config that states
    # a count the weights lack fails below on the first missing MTP tensor.
    num_mtp_heads = _count_mtp_heads(reader) or hf_config.get("num_nextn_predict_layers", 0)
    cfg = model_config_from_hf(hf_config, source=config_path, num_mtp_heads=num_mtp_heads)
    dtype_name = jnp.dtype(dtype).name
    try:
        cfg = dataclasses.replace(cfg, param_dtype=dtype_name, dtype=dtype_name, **config_overrides)
    except TypeError as e:
        raise ConfigError(f"load_hf: {e}") from None

    abstract = abstract_model(cfg)
    graphdef, abstract_state = nnx.split(abstract)
    leaves = _leaves(abstract_state, abstract.plan)

    expected: dict[str, tuple[int, ...]] = {}
    for leaf in leaves:
        for idx in np.ndindex(*leaf.stack):
            expected.update(_expected_tensors(leaf, leaf.prefix(idx), reader))
    for name, shape in expected.items():
        if name not in reader:
            raise CheckpointError(f"{path}: missing tensor {name}")
        if reader.shape(name) != shape:
            raise CheckpointError(
                f"{path}: tensor {name} in {reader.file_of(name)} has shape {list(reader.shape(name))}, expected {list(shape)}"
            )
    consumed = set(expected) | {n + SCALE_SUFFIX for n in expected if n + SCALE_SUFFIX in reader}
    unexpected = sorted(set(reader.keys()) - consumed)
    if unexpected:
        shown = ", ".join(f"{n} ({os.path.basename(reader.file_of(n))})" for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: unexpected tensor(s) {shown}{more}")

    tensors = _HFTensors(reader, cfg)
    total_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)
    report = _progress(progress if progress is not None else total_bytes > 2**30, len(leaves))
    flat_state = nnx.to_flat_state(abstract_state)
    arrays = {}
    for i, leaf in enumerate(leaves, 1):
        report(i, f"{'.'.join(map(str, leaf.path))} {list(leaf.shape)}")
        arrays[leaf.path] = _load_leaf(leaf, tensors, sharding, fp8_resident)
    new_flat = [(p, v.replace(arrays[p])) for p, v in flat_state]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def fp8_resident_params(params, plan):
    """Abstract parameters (ShapeDtypeStructs, `abstract_model_state`) as `load_hf(..., weights="fp8")`
    gives them: each quantised weight an `Fp8Weight` of e4m3 values and float32 block scales. For
    planning and compiling FP8-resident programs without a checkpoint."""
    quantised = {leaf.path: leaf for leaf in _leaves(params, plan) if leaf.spec.quantizable}

    def resident(path, var):
        leaf = quantised.get(path)
        if leaf is None:
            return var
        values = var.get_value()
        return var.replace(Fp8Weight(jax.ShapeDtypeStruct(values.shape, fp8.FP8),
                                     jax.ShapeDtypeStruct(scale_shape(values.shape, leaf.fp8_in_axis), jnp.float32),
                                     leaf.fp8_in_axis))

    return nnx.from_flat_state([(path, resident(path, var)) for path, var in nnx.to_flat_state(params)])


def _load_leaf(leaf: _Leaf, tensors: _HFTensors, sharding: Callable | None, fp8_resident: bool):
    """The parameter as a (sharded) array, or as an `Fp8Weight` of its e4m3 values and per-row
    block scales when `fp8_resident` and the parameter is one the release quantises."""
    if not (fp8_resident and leaf.spec.quantizable):
        return _assemble(leaf, leaf.shape, leaf.dtype, sharding,
                         lambda prefix, index: _read_entry(leaf, tensors, prefix, index))
    in_axis = leaf.fp8_in_axis

    def values(prefix, index):
        return _read_entry(leaf, tensors, prefix, index, tensors.read_fp8, leaf.to_ours)

    def scales(prefix, index):
        return _read_entry(leaf, tensors, prefix, index, tensors.row_scales, leaf.scales_to_ours)

    return Fp8Weight(_assemble(leaf, leaf.shape, fp8.FP8, sharding, values),
                     _assemble(leaf, scale_shape(leaf.shape, in_axis), np.dtype(np.float32), sharding, scales), in_axis)


def _assemble(leaf: _Leaf, shape: tuple[int, ...], dtype, sharding: Callable | None, read_entry: Callable):
    """A global array of `shape` placed by `sharding`, each shard filled stack entry by stack entry
    from `read_entry(hf_prefix, index into the entry)`."""
    target = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharding is None else sharding(leaf.path, shape, leaf.logical_axes)
    n_stack = len(leaf.stack)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        stack_ranges = [range(*s.indices(n)) for s, n in zip(index[:n_stack], leaf.stack)]
        base_index = index[n_stack:]
        out_shape = [len(r) for r in stack_ranges] + [len(range(*s.indices(n))) for s, n in zip(base_index, shape[n_stack:])]
        out = np.empty(out_shape, dtype)
        for pos in np.ndindex(*[len(r) for r in stack_ranges]):
            stack_idx = tuple(r[p] for r, p in zip(stack_ranges, pos))
            out[pos] = read_entry(leaf.prefix(stack_idx), base_index)
        return out

    return jax.make_array_from_callback(shape, target, callback)


def _read_entry(leaf: _Leaf, tensors: _HFTensors, prefix: str, base_index: tuple[slice, ...],
                read: Callable | None = None, ours: Callable | None = None):
    """One stack entry of the parameter (indexed by `base_index`): the HF tensor (each expert's,
    stacked) in our layout and dtype; or, with `read` and `ours`, what `ours` makes of `read`'s
    array (the FP8 values or their row scales, as stored)."""
    raw = read is not None
    read = read or tensors.read
    ours = ours or (lambda tensor: leaf.to_ours(np.asarray(tensor)))
    if leaf.spec.per_expert:
        experts = range(*base_index[0].indices(leaf.base_shape[0]))
        entry = np.stack([ours(tensors.expert(leaf, prefix, e, read if raw else None))[base_index[1:]] for e in experts])
    else:
        entry = ours(read(leaf.source(prefix, tensors.reader)))[base_index]
    return entry if raw else entry.astype(leaf.dtype)


# ---------------------------------------------------------------------------------------------
# Saving

FP8_DTYPES = ("fp8", "float8_e4m3fn")
_KEEP_FP32 = ("router", "bias", "sinks")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One HF tensor to write: produced (as float32 in HF layout) only when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]
    file_group: str  # "main" or "mtp"


def save_hf(model: MiMoV2Flash, path: str, dtype=None, *, max_shard_bytes: int = 5 * 2**30,
            progress: bool | None = None) -> None:
    """Writes a hub-layout checkpoint: `config.json`, `model-*.safetensors` shards with
    `model.safetensors.index.json`, and the MTP heads in `model_mtp.safetensors`.

    `dtype=None` keeps each parameter's dtype (an exact round trip); a float dtype casts to it;
    `"fp8"` writes FP8 e4m3 with 128x128 block scales in the release's layout (global-layer k/v
    blocked per kv head over [K_h | V_h] where that differs from uniform blocks). Router weights, the
    correction bias and sinks stay fp32; with FP8 the unquantised tensors are bf16.
    """
    cfg: ModelConfig = model.config
    quantized = isinstance(dtype, str) and dtype.lower() in FP8_DTYPES
    cast = None if dtype is None or quantized else np.dtype(jnp.dtype(dtype))
    plain = np.dtype(ml_dtypes.bfloat16) if quantized else cast
    _, state = nnx.split(model)
    values = dict(nnx.to_flat_state(state))
    resident = [".".join(map(str, p)) for p, v in values.items() if isinstance(v.get_value(), Fp8Weight)]
    if resident:
        raise ValueError(f"save_hf: {resident[0]} (and {len(resident) - 1} more) hold FP8-resident weights; "
                         "save a model loaded without weights='fp8' (its FP8 checkpoint is already that layout)")

    # Entries are written in order, so the experts of one layer share one host copy of its slice.
    @functools.lru_cache(maxsize=1)
    def host_slice(path, idx):
        return np.asarray(jax.device_get(values[path].get_value()[idx]))

    entries = []
    for leaf in _leaves(state, model.plan):
        out_dtype = np.dtype(np.float32) if leaf.path[-1] in _KEEP_FP32 else (plain or leaf.dtype)
        group = "mtp" if leaf.path[0] == "mtp" else "main"
        for idx in np.ndindex(*leaf.stack):
            for e in range(leaf.base_shape[0]) if leaf.spec.per_expert else [None]:

                def produce(leaf=leaf, idx=idx, e=e):
                    host = host_slice(leaf.path, idx)
                    return leaf.to_hf(host if e is None else host[e]).astype(np.float32)

                entry = _Entry(leaf.prefix(idx) + leaf.spec.name.format(e=e), leaf.hf_shape(), out_dtype, produce, group)
                entries.append((entry, quantized and leaf.spec.quantizable, leaf.layer_type))
    if quantized:
        entries = _quantize_entries(entries, cfg)
    else:
        entries = [entry for entry, _, _ in entries]

    os.makedirs(path, exist_ok=True)
    weight_map, total = _write_files(path, entries, max_shard_bytes, progress)
    hf_config = model_config_to_hf(cfg)
    hf_config["torch_dtype"] = "bfloat16" if quantized else (plain or np.dtype(cfg.param_dtype)).name
    if quantized:
        hf_config["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [fp8.BLOCK, fp8.BLOCK],
            "ignored_layers": [e.name[: -len(".weight")] for e in entries if e.name.endswith("o_proj.weight")],
        }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _quantize_entries(entries, cfg: ModelConfig) -> list[_Entry]:
    """FP8 payload + scale for each quantisable tensor. Global-layer k/v are blocked per kv head over
    [K_h | V_h] (the release's layout) where that differs from uniform blocks."""
    producers = {entry.name: entry.produce for entry, _, _ in entries}
    out = []
    for entry, quantize, layer_type in entries:
        if not quantize:
            out.append(entry)
            continue
        rows, cols = entry.shape
        kv = _KV_PROJ.fullmatch(entry.name)
        shards = None
        if kv and layer_type == GLOBAL:
            dqk, dv, num_kv = cfg.qk_head_dim, cfg.v_head_dim, cfg.global_kv_heads
            k_rows = num_kv * math.ceil(dqk / fp8.BLOCK)
            v_rows = num_kv * math.ceil((dqk + dv) / fp8.BLOCK) - k_rows
            if fp8.kv_shards(k_rows, v_rows, num_kv, dqk, dv) is not None:
                shards = num_kv
        if shards:
            which = "kv".index(kv.group(2))
            k_make, v_make = producers[kv.group(1) + "k_proj.weight"], producers[kv.group(1) + "v_proj.weight"]

            @functools.lru_cache(maxsize=1)
            def make(which=which, k_make=k_make, v_make=v_make, shards=shards):
                kq, ks, vq, vs = fp8.quantize_fused_kv(k_make(), v_make(), shards)
                return ((kq, ks), (vq, vs))[which]

            scale_rows = (k_rows, v_rows)[which]
        else:

            @functools.lru_cache(maxsize=1)
            def make(produce=entry.produce):
                return fp8.quantize(produce())

            scale_rows = math.ceil(rows / fp8.BLOCK)
        # Payload and scale are written one after the other: `make` quantises once for both.
        out.append(dataclasses.replace(entry, dtype=fp8.FP8, produce=lambda make=make: make()[0]))
        out.append(_Entry(entry.name + SCALE_SUFFIX, (scale_rows, math.ceil(cols / fp8.BLOCK)), np.dtype(np.float32),
                          lambda make=make: make()[1], entry.file_group))
    return out


def _write_files(path: str, entries: list[_Entry], max_shard_bytes: int, progress: bool | None):
    """Main tensors into `model-0000i-of-0000n.safetensors` shards, MTP tensors into their own file."""
    def nbytes(e: _Entry) -> int:
        return math.prod(e.shape) * e.dtype.itemsize

    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in (e for e in entries if e.file_group == "main"):
        if shards[-1] and size + nbytes(entry) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry)
    files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": group for i, group in enumerate(shards)}
    mtp = [e for e in entries if e.file_group == "mtp"]
    if mtp:
        files[MTP_FILE] = mtp
    total = sum(nbytes(e) for e in entries)
    report = _progress(progress if progress is not None else total > 2**30, len(entries))
    done = 0
    weight_map = {}
    for file_name, group in files.items():

        def counted(entry: _Entry, file_name=file_name):
            nonlocal done
            done += 1
            report(done, f"{file_name}: {entry.name}")
            return entry.produce()

        write_safetensors(os.path.join(path, file_name),
                          [(e.name, e.shape, e.dtype, lambda e=e: counted(e)) for e in group], {"format": "pt"})
        weight_map.update({e.name: file_name for e in group})
    return weight_map, total
