"""The MiMo-V2-Flash model in Flax NNX: embedding, scanned hybrid-attention stack, MTP heads."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax import sharding
from mimo_jax.config import DENSE, SWA, ModelConfig
from mimo_jax.fp8_resident import Fp8Weight
from mimo_jax.kv_cache import KVCache
from mimo_jax.layer_plan import Segment, plan_layers
from mimo_jax.layer_view import LayerView
from mimo_jax.layers import Attention, DenseMLP, RMSNorm, make_param
from mimo_jax.moe import MoE

ACTIVATION_AXES = ("batch", "seq", "act_embed")  # the residual stream [B, T, D]

# What a layer keeps for the backward pass (model.remat): "none" keeps everything, "full" only
# the layer input (recomputes the layer), "dots" the matmul outputs without a batch dimension.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V]; None from model(..., logits=False)
    mtp_logits: jax.Array | None  # [K, B, T, V]; head k at position j predicts token j + k + 2
    hidden: jax.Array  # [B, T, D], after the final norm (what the MTP heads read)
    # RouterStats per MoE run, keyed "segment/run", each stacked [repeats, length, ...] like the
    # run's parameters (so the router-bias update lines up with the RouterBias variables).
    router: dict = flax.struct.field(default_factory=dict)
    cache: KVCache | None = None  # the updated cache, when the call was given one
    # From model(..., logits=False) without a cache, for a loss that makes the logits itself
    # (objective.vocab_chunked_stats): the heads' final hidden states and the shared LM head.
    mtp_hidden: jax.Array | None = None  # [K, B, T, D]
    lm_head_DV: jax.Array | None = None


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)). FFN is dense SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, layer_type: str, mlp_type: str, stack=(), *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg, stack, rngs=rngs)
        self.attn = Attention(cfg, layer_type, stack, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg, stack, rngs=rngs)
        self.mlp = DenseMLP(cfg, stack, rngs=rngs) if mlp_type == DENSE else MoE(cfg, stack, rngs=rngs)

    def stack_read_params(self) -> frozenset:
        """Paths of the parameters that a layer loop may hand over as `LayerView`s of their stacks."""
        if isinstance(self.mlp, MoE) and self.mlp.reads_layers_in_place:
            return frozenset(("mlp", name) for name in MoE.EXPERT_WEIGHTS)
        return frozenset()

    def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, cache=None, step=None):
        """(x, RouterStats or None for a dense FFN, updated cache or None)."""
        attn = self.attn(self.input_norm(x_BTD), positions_BT, segment_ids_BT, cache, step)
        attn_BTD, cache = attn if cache is not None else (attn, None)
        x_BTD = x_BTD + attn_BTD
        h_BTD = self.post_attn_norm(x_BTD)
        y_BTD = self.mlp(h_BTD, segment_ids_BT) if isinstance(self.mlp, MoE) else self.mlp(h_BTD)
        y_BTD, stats = y_BTD if isinstance(y_BTD, tuple) else (y_BTD, None)
        return x_BTD + y_BTD, stats, cache


class LayerSegment(nnx.Module):
    """`repeats` x (runs of identical layers); params of run r are stacked [repeats, length, ...]."""

    def __init__(self, cfg: ModelConfig, segment: Segment, *, rngs: nnx.Rngs):
        self.segment = segment
        self.remat = cfg.remat
        self.unroll = cfg.unroll_layers
        self.slice_layers_in_place = cfg.compiles_mosaic
        self.runs = nnx.List(
            [DecoderLayer(cfg, *run.kind, stack=(segment.repeats, run.length), rngs=rngs) for run in segment.runs]
        )

    def __call__(self, x_BTD, positions_BT, segment_ids_BT=None, caches=None, step=None):
        """(x, [RouterStats stacked [repeats, length] or None, per run], [updated cache per run] or None).

        `caches` holds one `kv_cache.LayerKV` per run, stacked like the run's parameters."""
        splits = [nnx.split(run) for run in self.runs]
        graphdefs, stacks = [g for g, _ in splits], tuple(s for _, s in splits)
        if caches is not None and self.slice_layers_in_place:
            return self._in_place(x_BTD, positions_BT, segment_ids_BT, tuple(caches), step, graphdefs, stacks)

        def period(x, xs):
            states, period_caches = xs
            run_stats, run_caches = [], []
            for graphdef, state, cache in zip(graphdefs, states, period_caches):

                def layer(x, layer_xs, graphdef=graphdef):
                    layer_state, layer_cache = layer_xs
                    x, stats, layer_cache = nnx.merge(graphdef, layer_state)(x, positions_BT, segment_ids_BT, layer_cache, step)
                    return sharding.constrain(x, ACTIVATION_AXES), (stats, layer_cache)

                if self.remat != "none":
                    # CSE of the recomputation is harmless inside a scan, but unrolled it would undo the remat.
                    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=self.unroll)
                x, (stats, cache) = jax.lax.scan(layer, x, (state, cache), unroll=self.unroll)
                run_stats.append(stats)
                run_caches.append(cache)
            return x, (run_stats, run_caches)

        period_caches = tuple(caches) if caches is not None else (None,) * len(splits)
        x_BTD, (run_stats, run_caches) = jax.lax.scan(period, x_BTD, (stacks, period_caches), unroll=self.unroll)
        return x_BTD, run_stats, (run_caches if caches is not None else None)

    def _in_place(self, x_BTD, positions_BT, segment_ids_BT, caches, step, graphdefs, stacks):
        """A cached call on TPU (inference, never differentiated): layer [p, j] reads its slice of
        the stacked parameters and caches where they lie, and writes its cache slice back into the
        stack carried through the loops. Scanning over the stacks instead makes XLA copy each
        period's parameters (for the release, 2.5 GiB of FP8 experts per weight per v5p chip)
        before slicing a layer, and write the updated caches into a second stack. The expert
        weights go to the Pallas grouped matmul as `LayerView`s: it reads them from the stack, so
        not even the layer's slice is copied out (a kernel operand is a whole array). XLA:CPU runs the
        tiny model's decode 10-30% slower this way, so it is kept for TPU programs."""

        def period(carry, p):
            x, caches = carry
            run_stats, run_caches = [], []
            for run, decoder, graphdef, stack, cache in zip(self.segment.runs, self.runs, graphdefs, stacks, caches):
                in_kernel = decoder.stack_read_params()

                def layer(carry, j, graphdef=graphdef, stack=stack, in_kernel=in_kernel):
                    x, cache = carry
                    module = nnx.merge(graphdef, _layer_of(stack, p, j, in_kernel))
                    x, stats, layer_cache = module(x, positions_BT, segment_ids_BT, jax.tree.map(lambda a: a[p, j], cache), step)
                    cache = jax.tree.map(lambda whole, new: whole.at[p, j].set(new), cache, layer_cache)
                    return (sharding.constrain(x, ACTIVATION_AXES), cache), stats

                (x, cache), stats = jax.lax.scan(layer, (x, cache), jnp.arange(run.length), unroll=self.unroll)
                run_stats.append(stats)
                run_caches.append(cache)
            return (x, tuple(run_caches)), run_stats

        (x_BTD, caches), run_stats = jax.lax.scan(period, (x_BTD, caches), jnp.arange(self.segment.repeats),
                                                 unroll=self.unroll)
        return x_BTD, run_stats, list(caches)


def _layer_of(stack, p, j, in_kernel=frozenset()):
    """Layer [p, j] of a run's stacked parameters: sliced, except those whose paths are in
    `in_kernel`, which become `LayerView`s that their consumer reads from the stack itself."""
    index = jnp.stack([p, j]).astype(jnp.int32)

    def pick(path, value):
        names = tuple(key.key for key in path if isinstance(key, jax.tree_util.DictKey))
        if names in in_kernel:
            return LayerView(value, index)
        return jax.tree.map(lambda a: a[p, j], value)

    return jax.tree_util.tree_map_with_path(pick, stack, is_leaf=lambda x: isinstance(x, Fp8Weight))


class MTPHead(nnx.Module):
    """One multi-token-prediction block; the model stacks K of them on a leading axis.

    z = eh_proj([enorm(embed(token j+k+1)), hnorm(h_j)]); z += SWA-attn(norm(z)); z += FFN(norm(z));
    returns final_norm(z), to be read by the shared lm_head.
    """

    def __init__(self, cfg: ModelConfig, stack=(), *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.enorm = RMSNorm(cfg, stack, rngs=rngs)
        self.hnorm = RMSNorm(cfg, stack, rngs=rngs)
        self.eh_proj = make_param(rngs, (2 * d, d), (None, "embed"), cfg.param_dtype, stack, std=cfg.initializer_range)
        self.block = DecoderLayer(cfg, SWA, DENSE, stack, rngs=rngs)
        self.final_norm = RMSNorm(cfg, stack, rngs=rngs)

    def __call__(self, hidden_BTD, token_embeds_BTD, positions_BT, segment_ids_BT=None, cache=None, step=None):
        """(final_norm(z), updated cache or None)."""
        dt = hidden_BTD.dtype
        token_embeds_BTD = sharding.constrain(token_embeds_BTD, ACTIVATION_AXES)
        eh_BT2D = jnp.concatenate([self.enorm(token_embeds_BTD), self.hnorm(hidden_BTD)], axis=-1)
        # Without these the partitioner takes eh_proj's `embed` split for z and keeps every head's
        # activations whole over the batch and sequence axes.
        z_BTD = sharding.constrain(eh_BT2D @ self.eh_proj[...].astype(dt), ACTIVATION_AXES)
        z_BTD, _, cache = self.block(z_BTD, positions_BT, segment_ids_BT, cache, step)
        return sharding.constrain(self.final_norm(z_BTD), ACTIVATION_AXES), cache


def positions_from_segments(segment_ids_BT):
    """Each packed document counts positions from 0."""
    t = segment_ids_BT.shape[1]
    idx_BT = jnp.broadcast_to(jnp.arange(t), segment_ids_BT.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return idx_BT - jax.lax.cummax(jnp.where(starts, idx_BT, 0), axis=1)


def shift_tokens(input_ids_BT, shift: int, fill: int = 0):
    """Token j + shift at position j; positions past the end get `fill` (their outputs have no target)."""
    return jnp.concatenate([input_ids_BT[:, shift:], jnp.full_like(input_ids_BT[:, :shift], fill)], axis=1)


class MiMoV2Flash(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        std, dt = cfg.initializer_range, cfg.param_dtype
        self.embed = make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, std=std)
        self.plan = plan_layers(tuple(zip(cfg.layer_types, cfg.mlp_types)))
        self.segments = nnx.List([LayerSegment(cfg, seg, rngs=rngs) for seg in self.plan])
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        self.lm_head = make_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt, std=std)
        self.mtp = MTPHead(cfg, stack=(cfg.num_mtp_heads,), rngs=rngs) if cfg.num_mtp_heads else None

    def embed_tokens(self, ids):
        return sharding.take_rows(self.embed[...], ids, self.config.dtype)

    def logits(self, hidden):
        logits = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...].astype(hidden.dtype), preferred_element_type=jnp.float32)
        return sharding.constrain(logits, (None,) * (logits.ndim - 3) + ("batch", "seq", "act_vocab"))

    def __call__(self, input_ids_BT, segment_ids_BT=None, positions_BT=None, *, cache: KVCache | None = None,
                 valid_BT=None, logits: bool = True) -> ModelOutput:
        """Training / scoring without `cache`; with one, a prefill chunk, decode or verify step.

        A cached step writes the new tokens' keys at `positions_BT` (rows may be at different
        positions; `valid_BT` False marks padding that is not written) and skips the MTP heads,
        which decoding drives itself (`mtp_heads`). `logits=False` leaves the logits out: with a
        cache it returns the hidden state only; without one, also the MTP heads' hidden states and
        the LM head, from which a vocabulary-chunked loss computes its logits block by block.
        """
        if positions_BT is None:
            positions_BT = (
                positions_from_segments(segment_ids_BT)
                if segment_ids_BT is not None
                else jnp.broadcast_to(jnp.arange(input_ids_BT.shape[1]), input_ids_BT.shape)
            )
        step = cache.step(positions_BT, valid_BT) if cache is not None else None
        x_BTD = sharding.constrain(self.embed_tokens(input_ids_BT), ACTIVATION_AXES)
        router, layer_caches = {}, {}
        for i, segment in enumerate(self.segments):
            runs = range(len(segment.runs))
            caches = [cache.layers[f"{i}/{j}"] for j in runs] if cache is not None else None
            x_BTD, run_stats, caches = segment(x_BTD, positions_BT, segment_ids_BT, caches, step)
            router.update({f"{i}/{j}": stats for j, stats in enumerate(run_stats) if stats is not None})
            if caches is not None:
                layer_caches.update({f"{i}/{j}": c for j, c in zip(runs, caches)})
        hidden_BTD = self.final_norm(x_BTD)
        if cache is not None:
            cache = cache.replace(layers=layer_caches).advance(step, positions_BT)
            return ModelOutput(logits=self.logits(hidden_BTD) if logits else None, mtp_logits=None,
                               hidden=hidden_BTD, router=router, cache=cache)
        mtp_hidden_KBTD = None
        if self.mtp is not None:
            mtp_hidden_KBTD = self.mtp_hidden(hidden_BTD, input_ids_BT, positions_BT, segment_ids_BT)
        if logits:
            return ModelOutput(logits=self.logits(hidden_BTD),
                               mtp_logits=None if mtp_hidden_KBTD is None else self.logits(mtp_hidden_KBTD),
                               hidden=hidden_BTD, router=router)
        return ModelOutput(logits=None, mtp_logits=None, hidden=hidden_BTD, router=router, mtp_hidden=mtp_hidden_KBTD,
                           lm_head_DV=self.lm_head[...].astype(hidden_BTD.dtype))

    def moe_runs(self):
        """{"segment/run": MoE module} for every stacked run of MoE layers (keys as in ModelOutput.router)."""
        return {f"{i}/{j}": run.mlp for i, segment in enumerate(self.segments) for j, run in enumerate(segment.runs)
                if isinstance(run.mlp, MoE)}

    def mtp_hidden(self, hidden_BTD, input_ids_BT, positions_BT, segment_ids_BT=None):
        """[K, B, T, D]: the heads are not chained, so they all run at once on the main hidden state."""
        ids_KBT = jnp.stack([shift_tokens(input_ids_BT, i + 1) for i in range(self.config.num_mtp_heads)])
        return self.mtp_heads(hidden_BTD, ids_KBT, positions_BT, segment_ids_BT)[0]

    def mtp_heads(self, hidden_BTD, ids_KBT, positions_BT, segment_ids_BT=None, *, cache: KVCache | None = None,
                  valid_BT=None, head: int | None = None):
        """(hidden [K, B, T, D], cache): head k reads (h_j, ids_KBT[k, :, j]) at position j.

        `head=k` runs that head alone on ids [B, T] (drafting is sequential). With `cache`, the
        heads attend over and write their own SWA rings (`cache.mtp`); a single head leaves the
        rings' slot positions for the caller to advance once all heads wrote the same positions.
        """
        graphdef, state = nnx.split(self.mtp)
        step = cache.mtp_step(positions_BT, valid_BT) if cache is not None else None

        def run(head_state, ids_BT, head_cache):
            return nnx.merge(graphdef, head_state)(
                hidden_BTD, self.embed_tokens(ids_BT), positions_BT, segment_ids_BT, head_cache, step)

        mtp_cache = cache.mtp if cache is not None else None
        if head is None:
            out, mtp_cache = jax.vmap(run)(state, ids_KBT, mtp_cache)
        else:
            pick = lambda tree: jax.tree.map(lambda x: x[head], tree)  # noqa: E731
            out, head_cache = run(pick(state), ids_KBT, pick(mtp_cache))
            if cache is not None:
                mtp_cache = jax.tree.map(lambda all_, one: all_.at[head].set(one), mtp_cache, head_cache)
        if cache is not None:
            cache = cache.replace(mtp=mtp_cache)
            if head is None:
                cache = cache.advance(step, positions_BT, mtp=True)
        return out, cache


def abstract_model(cfg: ModelConfig) -> MiMoV2Flash:
    """The model with ShapeDtypeStructs for arrays: shapes, dtypes and sharding names, nothing allocated."""
    return nnx.eval_shape(lambda: MiMoV2Flash(cfg, rngs=nnx.Rngs(0)))
