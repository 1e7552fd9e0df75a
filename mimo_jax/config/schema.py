"""The configuration tree: one frozen dataclass per section, built from plain dicts (YAML, overrides).

Window convention (used everywhere in this package): `sliding_window` is the number of *previous*
positions a sliding-window query sees besides itself. The released model uses 128, which is
SGLang's `sliding_window_size` and transformers' `sliding_window - 1` (transformers counts the
query too, so it stores 129).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import yaml

GLOBAL = "global"
SWA = "swa"
DENSE = "dense"
MOE = "moe"

# "auto" is the Pallas kernel where Pallas TPU kernels compile (a TPU, or model.kernel_mode=mosaic
# for ahead-of-time TPU compiles) and the fast XLA path everywhere else (ModelConfig.resolved_*_impl).
ATTENTION_IMPLS = ("auto", "xla", "dense", "pallas")
MOE_IMPLS = ("auto", "xla", "ragged_dot", "pallas", "dense")
KERNEL_MODES = ("auto", "mosaic", "interpret")
REMAT_MODES = ("none", "full", "dots", "dots_saveable")

class ConfigError(ValueError):
    """A configuration that cannot describe a MiMo-V2-Flash model."""


def release_layer_types(num_layers: int = 48) -> tuple[str, ...]:
    """Global attention at layer 0 and every 6th layer; sliding window elsewhere."""
    return tuple(GLOBAL if i == 0 or (i + 1) % 6 == 0 else SWA for i in range(num_layers))


def release_mlp_types(num_layers: int = 48) -> tuple[str, ...]:
    return (DENSE,) + (MOE,) * (num_layers - 1)


def check_choices(field: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    for v in values:
        if v not in allowed:
            raise ConfigError(f"{field}: {v!r} is not one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """One attention variant of the hybrid stack (`ModelConfig.attention_kind`): the released model
    has global layers (4 kv heads, theta 5e6, no sinks, no window) and sliding-window layers (8 kv
    heads, theta 1e4, learned sinks, 128 previous tokens)."""

    name: str  # GLOBAL or SWA
    kv_heads: int
    rope_theta: float
    sinks: bool
    window: int | None  # previous positions a query sees besides itself; None: every earlier one


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a MiMo-V2-Flash model. Defaults are the released 309B model."""

    vocab_size: int = 152576
    hidden_size: int = 4096
    num_layers: int = 48
    layer_types: tuple[str, ...] = release_layer_types()
    mlp_types: tuple[str, ...] = release_mlp_types()
    num_attention_heads: int = 64
    global_kv_heads: int = 4
    swa_kv_heads: int = 8
    qk_head_dim: int = 192
    v_head_dim: int = 128
    partial_rotary_factor: float = 0.334
    global_rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    sliding_window: int = 128
    attention_value_scale: float = 0.707
    swa_attention_sinks: bool = True
    global_attention_sinks: bool = False
    intermediate_size: int = 16384
    moe_intermediate_size: int = 2048
    num_experts: int = 256
    num_experts_per_token: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    num_mtp_heads: int = 3
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = 151645
    pad_token_id: int | None = 151643
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    # Attention: "xla" is block-local (work grows as T*W for sliding windows) where queries and keys
    # are the same tokens, else dense; "dense" is the full [T, S] reference; "pallas" the TPU kernel.
    attention_impl: str = "auto"
    # Grouped expert matmul: "xla" loops over row tiles (`mimo_jax.blocked_gmm`), "ragged_dot" is
    # jax.lax.ragged_dot, "pallas" the TPU kernel, "dense" runs every expert on every token.
    moe_impl: str = "auto"
    # Expert parallelism: slots per (device, expert shard) as a multiple of the even share of
    # token choices; 0 means dropless (every choice fits, the default).
    moe_capacity_factor: float = 0.0
    # How Pallas kernels run: "mosaic" compiles them for TPU (also ahead of time from a CPU
    # machine), "interpret" runs them in the Pallas interpreter, "auto" interprets on CPU only.
    kernel_mode: str = "auto"
    # Rematerialisation of each decoder layer in the backward pass (mimo_jax.model.REMAT_POLICIES).
    remat: str = "none"
    # Unroll the layer scans into straight-line code: compile time grows with depth. The plan's cost
    # model (mimo_jax.plan.cost) compiles unrolled probes, so XLA counts every layer it runs.
    unroll_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_types", tuple(self.mlp_types))
        for name in ("layer_types", "mlp_types"):
            if len(getattr(self, name)) != self.num_layers:
                raise ConfigError(
                    f"model.{name} has {len(getattr(self, name))} entries but model.num_layers is {self.num_layers}"
                )
        check_choices("model.layer_types", self.layer_types, (GLOBAL, SWA))
        check_choices("model.mlp_types", self.mlp_types, (DENSE, MOE))
        check_choices("model.attention_impl", (self.attention_impl,), ATTENTION_IMPLS)
        check_choices("model.moe_impl", (self.moe_impl,), MOE_IMPLS)
        check_choices("model.kernel_mode", (self.kernel_mode,), KERNEL_MODES)
        check_choices("model.remat", (self.remat,), REMAT_MODES)
        for heads_field in ("global_kv_heads", "swa_kv_heads"):
            kv = getattr(self, heads_field)
            if kv <= 0 or self.num_attention_heads % kv:
                raise ConfigError(
                    f"model.{heads_field}={kv} must divide model.num_attention_heads={self.num_attention_heads}"
                )
        if not 0 < self.rotary_dim <= self.qk_head_dim or self.rotary_dim % 2:
            raise ConfigError(
                f"model.partial_rotary_factor={self.partial_rotary_factor} gives rotary dim {self.rotary_dim}, "
                f"which must be even and in (0, qk_head_dim={self.qk_head_dim}]"
            )
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window must be >= 0, got {self.sliding_window}")
        if MOE in self.mlp_types:
            if not 0 < self.num_experts_per_token <= self.num_experts:
                raise ConfigError(
                    f"model.num_experts_per_token={self.num_experts_per_token} must be in [1, num_experts={self.num_experts}]"
                )
            if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise ConfigError(
                    f"model.n_group={self.n_group} must divide num_experts={self.num_experts} and "
                    f"model.topk_group={self.topk_group} must be in [1, n_group]"
                )
            if self.n_group > 1 and self.num_experts // self.n_group < 2:
                raise ConfigError("group-limited routing scores a group by its top-2 experts: each group needs >= 2")
            if self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_token:
                raise ConfigError(
                    f"model.topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts "
                    f"cannot supply num_experts_per_token={self.num_experts_per_token} experts"
                )
        if self.num_mtp_heads < 0:
            raise ConfigError(f"model.num_mtp_heads must be >= 0, got {self.num_mtp_heads}")

    @property
    def pallas_interpret(self) -> bool:
        if self.kernel_mode == "auto":
            return not self.compiles_mosaic
        return self.kernel_mode == "interpret"

    @property
    def compiles_mosaic(self) -> bool:
        """Whether Pallas TPU kernels compile here: on a TPU, or for one ahead of time (mosaic)."""
        if self.kernel_mode == "auto":
            return jax.default_backend() == "tpu"
        return self.kernel_mode == "mosaic"

    @property
    def resolved_attention_impl(self) -> str:
        if self.attention_impl == "auto":
            return "pallas" if self.compiles_mosaic else "xla"
        return self.attention_impl

    @property
    def resolved_moe_impl(self) -> str:
        if self.moe_impl == "auto":
            return "pallas" if self.compiles_mosaic else "xla"
        return self.moe_impl

    @property
    def rotary_dim(self) -> int:
        return int(self.qk_head_dim * self.partial_rotary_factor)

    def attention_kind(self, layer_type: str) -> AttentionKind:
        """What a layer of `layer_type` (GLOBAL or SWA) attends with; the one place the two differ."""
        if layer_type == GLOBAL:
            return AttentionKind(GLOBAL, self.global_kv_heads, self.global_rope_theta, self.global_attention_sinks, None)
        return AttentionKind(SWA, self.swa_kv_heads, self.swa_rope_theta, self.swa_attention_sinks, self.sliding_window)

    def check_num_draft(self, num_draft: int) -> int:
        """`num_draft` if the MTP heads can draft that many tokens a step (1..num_mtp_heads), else ValueError."""
        if not self.num_mtp_heads:
            raise ValueError("speculative decoding needs MTP heads; this model has none (model.num_mtp_heads=0)")
        if not 1 <= num_draft <= self.num_mtp_heads:
            raise ValueError(f"num_draft must be in 1..{self.num_mtp_heads} (the model's MTP heads), got {num_draft}")
        return num_draft

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.mlp_types) if t == MOE)


MESH_AXES = ("data", "fsdp", "expert", "tensor")


SOURCES = ("stdlib", "text", "jsonl", "parquet")  # data.source


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is tokenized (the `data:` section of a config)."""

    # stdlib: this interpreter's standard library .py files (no download); text: one document per
    # file; jsonl: one JSON object per line; parquet: one row per document.
    source: str = "stdlib"
    # Files, directories (searched recursively) or glob patterns; unused for stdlib.
    paths: tuple[str, ...] = ()
    # Held-out files for eval; when empty, eval is a hash-chosen `eval_fraction` of the documents.
    eval_paths: tuple[str, ...] = ()
    # JSON field / Parquet column holding the document text.
    text_field: str = "text"
    # "bytes" (built-in byte-level tokenizer) or a path to a HF tokenizer.json (or its directory).
    tokenizer: str = "bytes"
    # Special tokens of a HF tokenizer by their text; empty means tokenizer_config.json next to
    # tokenizer.json, else a common name (<|endoftext|>, </s>, ...). Pad falls back to EOS.
    eos_token: str = ""
    pad_token: str = ""
    bos_token: str = ""
    # Put the tokenizer's BOS before every document (EOS always follows every document).
    add_bos: bool = False
    eval_fraction: float = 0.02
    # Train rows are shuffled within windows of this many packed rows, so that the rows of a batch
    # come from different documents (a long document fills many consecutive rows). 0 turns it off.
    row_shuffle_window: int = 1024
    # Threads that read and tokenize documents; > 0 also prefetches batches in a background thread.
    num_threads: int = 0
    prefetch_batches: int = 2

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "eval_paths", tuple(self.eval_paths))
        if self.source not in SOURCES:
            raise ConfigError(f"data.source: {self.source!r} is not one of {list(SOURCES)}")
        if self.source != "stdlib" and not self.paths:
            raise ConfigError(f"data.source={self.source!r} needs data.paths (files, directories or globs)")
        if self.source == "stdlib" and (self.paths or self.eval_paths):
            raise ConfigError("data.source='stdlib' takes no data.paths / data.eval_paths")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.num_threads < 0 or self.prefetch_batches < 0 or self.row_shuffle_window < 0:
            raise ConfigError("data.num_threads, data.prefetch_batches and data.row_shuffle_window must be >= 0")
        if not self.text_field:
            raise ConfigError("data.text_field must not be empty")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh: {num_devices} devices do not divide by the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                              f"there are {num_devices}")
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host (multi-process) JAX; the defaults mean a single process.

    Each field may also come from MIMO_COORDINATOR_ADDRESS / MIMO_NUM_PROCESSES / MIMO_PROCESS_ID;
    see `mimo_jax.distributed.initialize` for how they combine.
    """

    coordinator_address: str = ""  # "host:port" of process 0's coordination service
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout: int = 300  # seconds to wait for every process to connect


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axes (in order); empty means replicated. See mimo_jax.sharding."""

    # parameters (and their optimizer state)
    vocab: tuple[str, ...] = ("tensor",)
    embed: tuple[str, ...] = ("fsdp",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)
    mlp: tuple[str, ...] = ("tensor",)
    experts: tuple[str, ...] = ("expert",)
    layers: tuple[str, ...] = ()
    # activations
    batch: tuple[str, ...] = ("data", "fsdp", "expert")
    seq: tuple[str, ...] = ()
    act_embed: tuple[str, ...] = ()
    act_heads: tuple[str, ...] = ("tensor",)
    act_vocab: tuple[str, ...] = ("tensor",)
    # KV caches
    cache_batch: tuple[str, ...] = ("data", "fsdp", "expert")
    cache_seq: tuple[str, ...] = ()
    cache_heads: tuple[str, ...] = ("tensor",)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            axes = tuple(getattr(self, f.name))
            object.__setattr__(self, f.name, axes)
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"sharding.{f.name}: unknown mesh axes {bad}; mesh axes are {list(MESH_AXES)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training (train.py). Defaults follow the paper where it gives numbers: AdamW 0.9/0.95, weight
    decay 0.1, clip 1.0, MTP weight 0.3, balance coefficient 1e-5, bias update rate 1e-3."""

    steps: int = 1000
    batch_size: int = 8  # global rows per step
    seq_len: int = 256
    seed: int = 0
    learning_rate: float = 3.2e-4  # peak
    min_learning_rate: float = 1.0e-4  # end of the cosine decay
    warmup_steps: int = 100
    constant_steps: int = 0  # at the peak, between warm-up and decay
    decay: str = "cosine"  # cosine | constant
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # How the Adam moments are stored: "" in the parameters' dtype; "bfloat16" halves the optimizer
    # state of fp32 parameters (a memory lever; the update is computed in fp32 either way).
    moment_dtype: str = ""
    grad_accum_steps: int = 1
    mtp_weight: float = 0.3
    balance_weight: float = 1e-5
    bias_update_rate: float = 1e-3
    z_loss_weight: float = 0.0
    # The LM and MTP cross-entropy computed this many vocabulary columns at a time, so no
    # [batch, seq, vocab] fp32 logits exist (mimo_jax.objective.vocab_chunked_stats); 0: whole.
    loss_vocab_chunk: int = 0
    # lm | mtp_distill (freeze the main model, fit the MTP heads to its distribution) | mopd (the
    # `mopd:` section: on-policy distillation from per-domain teachers)
    mode: str = "lm"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    init_from: str = ""  # "" (from scratch) | a HF checkpoint directory | a train.py workdir

    def __post_init__(self):
        check_choices("train.decay", (self.decay,), ("cosine", "constant"))
        check_choices("train.mode", (self.mode,), ("lm", "mtp_distill", "mopd"))
        check_choices("train.moment_dtype", (self.moment_dtype,), ("", "float32", "bfloat16"))
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.grad_accum_steps < 1:
            raise ConfigError("train.steps, batch_size, grad_accum_steps must be >= 1 and seq_len >= 2")
        if self.loss_vocab_chunk < 0:
            raise ConfigError(f"train.loss_vocab_chunk must be >= 0 (0: unchunked), got {self.loss_vocab_chunk}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.batch_size={self.batch_size} must divide by grad_accum_steps={self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class MOPDConfig:
    """Multi-teacher on-policy distillation (`train.mode=mopd`, paper section 4.4).

    Each step samples `prompts_per_step` prompts, `rollouts_per_prompt` student rollouts each; the
    teacher of each prompt's domain scores every token in one forward; the student follows the
    token advantage log pi_teacher - log pi_student (+ outcome_weight x a GRPO-normalised outcome
    reward), with importance weights pi_student / mu_sampler kept only inside [eps_low, eps_high].
    """

    prompts: str = ""  # JSONL: {"prompt": str, "domain": str, "answer": str (for rewards / accuracy)}
    eval_prompts: str = ""  # JSONL like `prompts`: per-domain greedy accuracy at each eval
    teachers: tuple[str, ...] = ()  # "domain=path": a train.py workdir or a HF checkpoint directory
    rewards: tuple[str, ...] = ()  # "domain=fn": a name in mimo_jax.mopd.REWARDS or "module:function"
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0  # of the rollouts (1.0 keeps the sampler on the training policy)
    eps_low: float = 0.5
    eps_high: float = 2.0
    outcome_weight: float = 0.0  # alpha; needs a reward for every domain
    # 0: the paper's token advantage on the sampled token only. K > 0: at each rollout position, the
    # exact reverse KL over the teacher's top-K tokens plus one bucket for the rest of the vocabulary
    # (K >= vocab: the full KL). Its expected gradient is the same; its variance is far lower.
    teacher_top_k: int = 0
    eval_max_prompts: int = 200  # per domain

    def __post_init__(self):
        for name in ("teachers", "rewards"):
            for entry in getattr(self, name):
                if not isinstance(entry, str) or "=" not in entry or not entry.split("=", 1)[0]:
                    raise ConfigError(f"mopd.{name}: expected \"domain=value\" entries, got {entry!r}")
        if self.prompts_per_step < 1 or self.rollouts_per_prompt < 1 or self.max_new_tokens < 1:
            raise ConfigError("mopd.prompts_per_step, rollouts_per_prompt and max_new_tokens must be >= 1")
        if not 0 <= self.eps_low <= 1 <= self.eps_high:
            raise ConfigError(f"mopd: need 0 <= eps_low <= 1 <= eps_high, got {self.eps_low}, {self.eps_high}")
        if self.temperature <= 0:
            raise ConfigError(f"mopd.temperature must be > 0, got {self.temperature}")
        if self.teacher_top_k < 0:
            raise ConfigError(f"mopd.teacher_top_k must be >= 0, got {self.teacher_top_k}")

    def mapping(self, name: str) -> dict[str, str]:
        """`teachers` or `rewards` as {domain: value}."""
        return dict(entry.split("=", 1) for entry in getattr(self, name))


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration tree; each later subsystem adds its own section."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    sharding: ShardingRules = ShardingRules()
    distributed: DistributedConfig = DistributedConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mopd: MOPDConfig = MOPDConfig()


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts (YAML, overrides)


def _field_types(cls) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls, data: Mapping[str, Any], where: str = ""):
    """Builds dataclass `cls` from a nested mapping; unknown keys are errors listing valid ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        field = fields[name]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, path)
        else:
            kwargs[name] = coerce(path, value, default)
    return cls(**kwargs)


def coerce(path: str, value: Any, default: Any) -> Any:
    """Checks a leaf against the type of its default (YAML gives ints for floats, lists for tuples)."""
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, int) or default is None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if default is None or not isinstance(value, float) or not value.is_integer():
                raise ConfigError(f"{path}: expected an integer, got {value!r}")
            value = int(value)
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def to_dict(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Applies `dotted.key=value` strings; values are parsed as YAML (`model.num_layers=4`)."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                here = ".".join(parts[:i]) or "the top level"
                valid = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"override {item!r}: no key {part!r} under {here}; valid keys: {', '.join(valid)}")
            if i == len(parts) - 1:
                node[part] = yaml.safe_load(raw)
            else:
                node = node[part]
    return from_dict(Config, data)
