"""Generation: chunked prefill, cached decoding, and speculative decoding with the MTP heads (the
sampler itself is `mimo_jax.sampling`; its names are importable from here too).

Everything runs the model's one `__call__` (the same path training uses) with a `KVCache`.

Decode state. Row b holds `length[b]` verified tokens in `tokens[b]` (the prompt, then output); the
main model has processed positions 0 .. length - 2, and the last verified token (the one just
sampled) is the next input. Positions past `length` are scratch, where drafts are written.

Speculative round (spec section 4.4), with p = length - 2 and D drafts:
1. Draft: head k at position j reads (h_j, x_{j+k+1}) and predicts x_{j+k+2}; heads run in turn at
   position p, so head 0 reads the last verified token and head k the draft of head k - 1. Each head
   first (re)writes its SWA cache over positions p - 2D + 1 .. p: entries there may have read
   drafts in the last round, or not exist yet (the last round may have accepted D + 1 tokens).
2. Verify: the main model runs [x_{p+1}, d_1 .. d_D] at positions p + 1 .. p + D + 1 in one step.
3. Accept the longest agreeing prefix, then one more token from the main model: greedy rows by
   exact match; sampling rows by the lossless rule for a deterministic draft (accept d with
   probability p(d), else sample p with d removed), so the output distribution is the main
   model's. Rejected positions need no cache rollback (see kv_cache.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax import kv_cache
from mimo_jax.kv_cache import DEFAULT_PREFILL_CHUNK, KVCache
from mimo_jax.sampling import (
    SamplingParams,
    processed_probs,
    reported_logprobs,
    sample_tokens,
    speculative_accept,
    split_keys,
)


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array  # [B, S + D + 1] int32; verified up to length, scratch after
    logprobs: jax.Array  # [B, S + D + 1] fp32: log-probability each emitted token was sampled with
    length: jax.Array  # [B] verified tokens
    limit: jax.Array  # [B] prompt length + max_new_tokens
    done: jax.Array  # [B] bool: stopped or at the limit (free engine slots are done too)
    stopped: jax.Array  # [B] bool: emitted a stop token
    cache: KVCache
    hidden: jax.Array | None  # [B, 3D, Dmodel] main final hidden states, slot = position % 3D (speculative)
    rng: jax.Array  # [B] PRNG keys
    temperature: jax.Array  # [B]
    top_k: jax.Array  # [B]
    top_p: jax.Array  # [B]
    stop_ids: jax.Array  # [B, M], -1 = none
    steps: jax.Array  # [B] main-model decode steps while the row was active
    emitted: jax.Array  # [B] tokens those steps emitted
    count_hist: jax.Array  # [B, D + 2] steps by tokens accepted + 1 (before a stop or the limit cut them)


@dataclasses.dataclass
class GenerateResult:
    tokens: np.ndarray  # [B, prompt + generated], padded after a stop / the row's end
    lengths: np.ndarray  # [B] prompt + generated tokens per row
    logprobs: np.ndarray  # [B, like tokens]: log-prob of each generated token under the sampling
    #                       distribution (after temperature / top-k / top-p; 0 for greedy, prompt, padding)
    acceptance_length: float | None  # mean tokens emitted per main-model step (speculative only)
    count_hist: np.ndarray | None  # [D + 2]: main-model steps by tokens produced (speculative only)


# ---------------------------------------------------------------------------------------------
# Steps (pure functions of the model and the state; jitted below)


def _token_logprobs(probs_BNV, tokens_BN):
    return jnp.log(jnp.take_along_axis(probs_BNV, tokens_BN[..., None], axis=-1)[..., 0])


def _emit(state: DecodeState, proposed_BN, count_B, logprobs_BN) -> DecodeState:
    """Append the first `count` of `proposed` to each active row, cut at a stop token or the limit."""
    n = proposed_BN.shape[1]
    idx = jnp.arange(n)
    stop_BN = jnp.any(proposed_BN[..., None] == state.stop_ids[:, None, :], axis=-1) & (idx < count_B[:, None])
    first_stop_B = jnp.where(jnp.any(stop_BN, axis=1), jnp.argmax(stop_BN, axis=1), n)
    take_B = jnp.minimum(jnp.minimum(count_B, first_stop_B + 1), state.limit - state.length)
    take_B = jnp.where(state.done, 0, take_B)
    rows = jnp.arange(proposed_BN.shape[0])[:, None]
    write_BN = jnp.where(idx < take_B[:, None], state.length[:, None] + idx, state.tokens.shape[1])
    tokens = state.tokens.at[rows, write_BN].set(proposed_BN, mode="drop")
    logprobs = state.logprobs.at[rows, write_BN].set(logprobs_BN, mode="drop")
    length = state.length + take_B
    stopped = state.stopped | (~state.done & (first_stop_B < take_B))
    active_B = (~state.done).astype(jnp.int32)
    return state.replace(tokens=tokens, logprobs=logprobs, length=length, stopped=stopped, done=state.done | stopped | (length >= state.limit),
                         steps=state.steps + active_B, emitted=state.emitted + take_B,
                         count_hist=state.count_hist.at[rows[:, 0], count_B].add(active_B))


def _take(tokens_BS, positions_BT):
    return jnp.take_along_axis(tokens_BS, jnp.clip(positions_BT, 0, tokens_BS.shape[1] - 1), axis=1)


def _write_hidden(hidden_BHD, positions_BT, valid_BT, new_BTD):
    slots = kv_cache.ring_slots(positions_BT, valid_BT, hidden_BHD.shape[1])
    return kv_cache.write_rows(hidden_BHD, slots, new_BTD)


def prefill(model, state: DecodeState, prompt_BP, prompt_len_B, chunk: int) -> DecodeState:
    """Run the prompts (right-padded to a multiple of `chunk`) through the caches chunk by chunk,
    then sample each row's first token. With MTP rings, the heads prefill their caches too."""
    b, p = prompt_BP.shape
    cache, hidden = state.cache, state.hidden
    last_BD = jnp.zeros((b, model.config.hidden_size), model.config.dtype)
    for start in range(0, p, chunk):
        positions_BT = jnp.broadcast_to(jnp.arange(start, start + chunk, dtype=jnp.int32), (b, chunk))
        valid_BT = positions_BT < prompt_len_B[:, None]
        out = model(prompt_BP[:, start:start + chunk], positions_BT=positions_BT, cache=cache, valid_BT=valid_BT,
                    logits=False)
        cache = out.cache
        at_last_BT = positions_BT == (prompt_len_B - 1)[:, None]
        last_BD = jnp.where(jnp.any(at_last_BT, 1)[:, None], jnp.sum(jnp.where(at_last_BT[..., None], out.hidden, 0), 1),
                            last_BD)
        if cache.mtp is not None:
            hidden = _write_hidden(hidden, positions_BT, valid_BT, out.hidden)
            # Head k reads token j + k + 1; those not yet known are rewritten by the first draft round.
            ids_KBT = jnp.stack([_take(prompt_BP, positions_BT + k + 1) for k in range(model.config.num_mtp_heads)])
            _, cache = model.mtp_heads(out.hidden, ids_KBT, positions_BT, cache=cache, valid_BT=valid_BT)
    rng, key = split_keys(state.rng)
    probs = processed_probs(model.logits(last_BD[:, None])[:, 0], state.temperature, state.top_k, state.top_p)
    width = min(p, state.tokens.shape[1])  # the last chunk's padding may run past the buffer
    state = state.replace(cache=cache, hidden=hidden, rng=rng, length=prompt_len_B.astype(jnp.int32),
                          tokens=state.tokens.at[:, :width].set(prompt_BP[:, :width]))
    token_B1 = sample_tokens(key, probs)[:, None]
    state = _emit(state, token_B1, jnp.ones((b,), jnp.int32), _token_logprobs(probs[:, None], token_B1))
    return state.replace(steps=jnp.zeros_like(state.steps), emitted=jnp.zeros_like(state.emitted),
                         count_hist=jnp.zeros_like(state.count_hist))


def decode_step(model, state: DecodeState) -> DecodeState:
    """One token per row from the main model."""
    positions_B1 = (state.length - 1)[:, None]
    out = model(_take(state.tokens, positions_B1), positions_BT=positions_B1, cache=state.cache)
    rng, key = split_keys(state.rng)
    probs = processed_probs(out.logits[:, 0], state.temperature, state.top_k, state.top_p)
    state = state.replace(cache=out.cache, rng=rng)
    token_B1 = sample_tokens(key, probs)[:, None]
    return _emit(state, token_B1, jnp.ones_like(state.length), _token_logprobs(probs[:, None], token_B1))


def draft(model, state: DecodeState, num_draft: int) -> DecodeState:
    """Write `num_draft` MTP drafts after each row's verified tokens (scratch positions), updating
    the heads' caches. Every head first rewrites positions p - 2D + 1 .. p (module docstring)."""
    d = num_draft
    p_B = state.length - 2
    positions_BT = p_B[:, None] + jnp.arange(-2 * d + 1, 1)
    valid_BT = positions_BT >= 0
    h_BTD = jnp.take_along_axis(state.hidden, (positions_BT % state.hidden.shape[1])[..., None], axis=1)
    cache, tokens = state.cache, state.tokens
    rows = jnp.arange(tokens.shape[0])
    mtp_step = cache.mtp_step(positions_BT, valid_BT)
    for k in range(d):
        out_BTD, cache = model.mtp_heads(h_BTD, _take(tokens, positions_BT + k + 1), positions_BT, cache=cache,
                                         valid_BT=valid_BT, head=k)
        draft_B = jnp.argmax(model.logits(out_BTD[:, -1:])[:, 0], axis=-1).astype(jnp.int32)
        tokens = tokens.at[rows, state.length + k].set(draft_B, mode="drop")
    return state.replace(tokens=tokens, cache=cache.advance(mtp_step, positions_BT, mtp=True))


def speculative_step(model, state: DecodeState, num_draft: int) -> DecodeState:
    """Draft `num_draft` tokens with the MTP heads, verify them in one main-model step, accept."""
    state = draft(model, state, num_draft)
    # Verify the last verified token and the drafts.
    verify_BN = state.length[:, None] - 1 + jnp.arange(num_draft + 1)
    out = model(_take(state.tokens, verify_BN), positions_BT=verify_BN, cache=state.cache)
    hidden = _write_hidden(state.hidden, verify_BN, jnp.ones_like(verify_BN, bool), out.hidden)
    probs_BNV = jax.vmap(processed_probs, in_axes=(1, None, None, None), out_axes=1)(
        out.logits, state.temperature, state.top_k, state.top_p)
    rng, key = split_keys(state.rng)
    proposed_BN, count_B = speculative_accept(probs_BNV, _take(state.tokens, verify_BN[:, 1:]), key)
    state = state.replace(cache=out.cache, hidden=hidden, rng=rng)
    # Speculation is lossless: token i was emitted with the main model's probability at position i.
    return _emit(state, proposed_BN, count_B, _token_logprobs(probs_BNV, proposed_BN))


# ---------------------------------------------------------------------------------------------
# Jitted entry points: the model travels as (graphdef, state) so one compile serves every call.


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("state",))
def _prefill_jit(graphdef, params, state, prompt_BP, prompt_len_B, *, chunk):
    return prefill(nnx.merge(graphdef, params), state, prompt_BP, prompt_len_B, chunk)


def _step(model, state, num_draft):
    return speculative_step(model, state, num_draft) if num_draft else decode_step(model, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_draft"), donate_argnames=("state",))
def _run_jit(graphdef, params, state, *, num_draft):
    model = nnx.merge(graphdef, params)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), lambda s: _step(model, s, num_draft), state)


def new_state(model, batch: int, max_seq_len: int, *, num_draft: int = 0, max_stop_ids: int = 1) -> DecodeState:
    """An empty decode state: every row done (a free slot) until a prompt is prefilled into it."""
    cfg = model.config
    speculative = num_draft > 0
    if speculative:
        cfg.check_num_draft(num_draft)
    def zeros():  # separate buffers: the state is donated, and XLA refuses one buffer donated twice
        return jnp.zeros((batch,), jnp.int32)

    return DecodeState(
        tokens=jnp.zeros((batch, max_seq_len + num_draft + 1), jnp.int32), length=zeros(), limit=zeros(),
        logprobs=jnp.zeros((batch, max_seq_len + num_draft + 1), jnp.float32),
        done=jnp.ones((batch,), bool), stopped=jnp.zeros((batch,), bool),
        cache=kv_cache.init_cache(cfg, batch, max_seq_len, num_draft=num_draft, mtp=speculative),
        hidden=jnp.zeros((batch, 3 * num_draft, cfg.hidden_size), cfg.dtype) if speculative else None,
        rng=jax.vmap(jax.random.key)(zeros()), temperature=jnp.zeros((batch,), jnp.float32), top_k=zeros(),
        top_p=jnp.ones((batch,), jnp.float32), stop_ids=jnp.full((batch, max_stop_ids), -1, jnp.int32),
        steps=zeros(), emitted=zeros(), count_hist=jnp.zeros((batch, num_draft + 2), jnp.int32),
    )


def _check_speculative(model, speculative: bool, num_draft: int) -> int:
    return model.config.check_num_draft(num_draft) if speculative else 0


def _padded_prompts(prompt_ids, chunk: int, pad_id: int):
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in prompt_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(r) for r in rows)
    width = -(-longest // chunk) * chunk
    out = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def _chunk_size(prompt_len: int, chunk: int) -> int:
    """The prefill chunk: the prompt rounded up to a power of two, at most `chunk` (few compiles)."""
    return min(chunk, 1 << max(4, (prompt_len - 1).bit_length()))


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_token_ids: Sequence[int] = (), speculative: bool = False,
             num_draft: int = 3, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> GenerateResult:
    """Generate up to `max_new_tokens` per prompt (a [B, P] array or a list of token lists).

    `speculative=True` drafts `num_draft` tokens per step with the MTP heads and verifies them with
    the main model: greedy output is identical to plain greedy decoding, and sampled output has the
    main model's distribution. Row b samples with the key `fold_in(key(seed), b)`.
    """
    SamplingParams(temperature, top_k, top_p, seed)  # validates
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    num_draft = _check_speculative(model, speculative, num_draft)
    pad_id = model.config.pad_token_id or 0
    chunk = _chunk_size(max(len(np.asarray(r).reshape(-1)) for r in prompt_ids), prefill_chunk)
    prompt_BP, prompt_len_B = _padded_prompts(prompt_ids, chunk, pad_id)
    if max_new_tokens == 0:
        tokens = prompt_BP[:, : prompt_len_B.max()]
        return GenerateResult(tokens, prompt_len_B, np.zeros(tokens.shape, np.float32), None, None)
    b = prompt_BP.shape[0]
    max_seq_len = int(prompt_BP.shape[1] + max_new_tokens)
    stops = np.asarray(list(stop_token_ids) or [-1], np.int32)
    state = new_state(model, b, max_seq_len, num_draft=num_draft, max_stop_ids=len(stops)).replace(
        limit=jnp.asarray(prompt_len_B + max_new_tokens), done=jnp.zeros((b,), bool),
        rng=jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(b)),
        temperature=jnp.full((b,), temperature, jnp.float32), top_k=jnp.full((b,), top_k, jnp.int32),
        top_p=jnp.full((b,), top_p, jnp.float32), stop_ids=jnp.broadcast_to(jnp.asarray(stops), (b, len(stops))),
    )
    graphdef, params = nnx.split(model)
    state = _prefill_jit(graphdef, params, state, jnp.asarray(prompt_BP), jnp.asarray(prompt_len_B), chunk=chunk)
    state = _run_jit(graphdef, params, state, num_draft=num_draft)
    return _result(state, pad_id, num_draft)


def _result(state: DecodeState, pad_id: int, num_draft: int) -> GenerateResult:
    lengths = np.asarray(state.length)
    tokens = np.asarray(state.tokens)[:, : lengths.max()]
    inside = np.arange(tokens.shape[1]) < lengths[:, None]
    tokens = np.where(inside, tokens, pad_id)
    logprobs = np.where(inside, np.asarray(state.logprobs)[:, : tokens.shape[1]], 0.0)
    if not num_draft:
        return GenerateResult(tokens, lengths, logprobs, None, None)
    steps, emitted = np.asarray(state.steps), np.asarray(state.emitted)
    return GenerateResult(tokens, lengths, logprobs, float(emitted.sum() / max(steps.sum(), 1)),
                          np.asarray(state.count_hist).sum(0))


# ---------------------------------------------------------------------------------------------
# Continuous batching over fixed slots (what serve.py drives)


MAX_TOP_LOGPROBS = 20  # alternatives `SlotEngine.score` reports per position (OpenAI's chat maximum)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_jit(graphdef, params, ids_1L, num_prompt, temperature, top_k, top_p):
    """Per position i >= 1: the log-prob of token i and the top alternatives, under the raw
    distribution for prompt tokens (i < num_prompt) and the request's sampling distribution after."""
    logits_LV = nnx.merge(graphdef, params)(ids_1L).logits[0, :-1]
    n = logits_LV.shape[0]
    sampled_L = jnp.arange(1, n + 1) >= num_prompt
    logprobs_LV = reported_logprobs(logits_LV, jnp.where(sampled_L, temperature, 0.0),
                                    jnp.where(sampled_L, top_k, 0), jnp.where(sampled_L, top_p, 1.0))
    chosen_L = jnp.take_along_axis(logprobs_LV, ids_1L[0, 1:, None], axis=-1)[:, 0]
    top_logprobs_LK, top_ids_LK = jax.lax.top_k(logprobs_LV, min(MAX_TOP_LOGPROBS, logprobs_LV.shape[-1]))
    return chosen_L, top_ids_LK, top_logprobs_LK


@dataclasses.dataclass
class TokenScores:
    """`SlotEngine.score`'s result for tokens [t_0, ..., t_n): entry i - 1 is about token t_i."""

    logprobs: np.ndarray  # [n - 1] float32
    top_ids: np.ndarray  # [n - 1, MAX_TOP_LOGPROBS] int32, most likely first
    top_logprobs: np.ndarray  # [n - 1, MAX_TOP_LOGPROBS] float32 (-inf: cut by top-k / top-p)


@dataclasses.dataclass
class SlotUpdate:
    new_tokens: list[int]  # emitted since the last update (the first one after insert has the prefill's token)
    finished: bool  # stop token or max_new_tokens reached; the slot stays taken until release()
    finish_reason: str | None  # "stop" | "length" | None


@functools.partial(jax.jit, donate_argnames=("state",))
def _set_row(state: DecodeState, row: DecodeState, slot):
    """Copy a one-row state into row `slot` (cache leaves carry their batch axis after the stack dims)."""

    def put(axis):
        return lambda big, one: jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, axis)

    cache = state.cache.replace(
        layers=jax.tree.map(put(2), state.cache.layers, row.cache.layers),
        mtp=None if state.cache.mtp is None else jax.tree.map(put(1), state.cache.mtp, row.cache.mtp),
        ring_positions=put(0)(state.cache.ring_positions, row.cache.ring_positions),
        mtp_positions=None if state.cache.mtp is None else put(0)(state.cache.mtp_positions, row.cache.mtp_positions),
    )
    fields = {f.name: jax.tree.map(put(0), getattr(state, f.name), getattr(row, f.name))
              for f in dataclasses.fields(state) if f.name != "cache"}
    return state.replace(cache=cache, **fields)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_draft"), donate_argnames=("state",))
def _engine_step_jit(graphdef, params, state, *, num_draft):
    """One step, plus what the host needs: the tokens after each row's old length."""
    start_B = state.length
    state = _step(nnx.merge(graphdef, params), state, num_draft)
    window_BN = _take(state.tokens, start_B[:, None] + jnp.arange(num_draft + 1))
    return state, window_BN, state.length, state.done, state.stopped


class SlotEngine:
    """Continuous batching over `num_slots` fixed rows: prompts are prefilled into free slots while
    the others keep decoding; every `step()` advances all of them in one jitted call.

    Not thread-safe: drive it from one thread (serve.py's scheduler does).
    """

    def __init__(self, model, *, num_slots: int = 8, max_seq_len: int | None = None, speculative: bool | None = None,
                 num_draft: int = 3, max_stop_ids: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        cfg = model.config
        self.speculative = bool(cfg.num_mtp_heads) if speculative is None else speculative
        self.num_draft = _check_speculative(model, self.speculative, min(num_draft, max(cfg.num_mtp_heads, 1)))
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 8192)
        self.max_stop_ids = max_stop_ids
        self.prefill_chunk = prefill_chunk
        self.pad_id = cfg.pad_token_id or 0
        self._model = model
        self._graphdef, self._params = nnx.split(model)
        self._state = new_state(model, num_slots, self.max_seq_len, num_draft=self.num_draft, max_stop_ids=max_stop_ids)
        self._busy: set[int] = set()
        self._finished: set[int] = set()  # busy slots whose last update said finished
        self._length = np.zeros(num_slots, np.int64)  # host copy, as of the last update
        self._pending: dict[int, SlotUpdate] = {}  # the prefill's token, reported by the next step()

    def free_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if s not in self._busy]

    def insert(self, slot: int, prompt_ids, *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_token_ids=()) -> None:
        """Prefill `prompt_ids` into a free slot; its first token comes with the next `step()`."""
        prompt = [int(t) for t in prompt_ids]
        if not 0 <= slot < self.num_slots or slot in self._busy:
            raise ValueError(f"slot {slot} is not free (free: {self.free_slots()})")
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context of {self.max_seq_len} tokens")
        vocab = self._model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        stops = list(dict.fromkeys(int(t) for t in stop_token_ids))
        if len(stops) > self.max_stop_ids:
            raise ValueError(f"at most {self.max_stop_ids} stop token ids, got {len(stops)}")
        chunk = _chunk_size(len(prompt), self.prefill_chunk)
        prompt_BP, prompt_len_B = _padded_prompts([prompt], chunk, self.pad_id)
        row = new_state(self._model, 1, self.max_seq_len, num_draft=self.num_draft, max_stop_ids=self.max_stop_ids)
        row = row.replace(
            limit=jnp.asarray([len(prompt) + max_new_tokens], jnp.int32), done=jnp.zeros((1,), bool),
            rng=jax.random.key(sampling.seed)[None], temperature=jnp.asarray([sampling.temperature], jnp.float32),
            top_k=jnp.asarray([sampling.top_k], jnp.int32), top_p=jnp.asarray([sampling.top_p], jnp.float32),
            stop_ids=jnp.asarray([stops + [-1] * (self.max_stop_ids - len(stops))], jnp.int32),
        )
        row = _prefill_jit(self._graphdef, self._params, row, jnp.asarray(prompt_BP), jnp.asarray(prompt_len_B),
                           chunk=chunk)
        first, done, stopped = int(row.tokens[0, len(prompt)]), bool(row.done[0]), bool(row.stopped[0])
        self._state = _set_row(self._state, row, jnp.int32(slot))
        self._busy.add(slot)
        self._length[slot] = len(prompt) + 1
        self._pending[slot] = SlotUpdate([first], done, ("stop" if stopped else "length") if done else None)
        if done:
            self._finished.add(slot)

    def step(self) -> dict[int, SlotUpdate]:
        """Advance every unfinished slot by one (plain or speculative) step."""
        updates = dict(self._pending)
        self._pending.clear()
        if not self._busy - self._finished:
            return updates
        self._state, window, length, done, stopped = _engine_step_jit(
            self._graphdef, self._params, self._state, num_draft=self.num_draft)
        window, length, done, stopped = (np.asarray(x) for x in (window, length, done, stopped))
        for s in sorted(self._busy - self._finished):
            pending = updates.get(s)
            tokens = (pending.new_tokens if pending else []) + window[s, : length[s] - self._length[s]].tolist()
            self._length[s] = length[s]
            if tokens or done[s]:
                updates[s] = SlotUpdate(tokens, bool(done[s]), ("stop" if stopped[s] else "length") if done[s] else None)
            if done[s]:
                self._finished.add(s)
        return updates

    def score(self, token_ids, num_prompt: int, sampling: SamplingParams = SamplingParams()) -> TokenScores:
        """The log-probabilities of a prompt and, after it, a completion sampled with `sampling`:
        the main model's own distributions (after temperature, top-k and top-p for the completion;
        raw for the prompt and for greedy sampling), from one uncached forward over all of them.
        With speculative decoding these are still the main model's: the drafts only propose.
        Lengths are padded to a power of two (at least 16), so few lengths compile."""
        ids = [int(t) for t in token_ids]
        if len(ids) < 2 or len(ids) > self.max_seq_len:
            raise ValueError(f"scoring takes 2 to {self.max_seq_len} tokens, got {len(ids)}")
        if not 1 <= num_prompt <= len(ids):
            raise ValueError(f"num_prompt must be in [1, {len(ids)}], got {num_prompt}")
        padded = min(max(16, 1 << (len(ids) - 1).bit_length()), self.max_seq_len)
        ids_1L = np.full((1, padded), self.pad_id, np.int32)
        ids_1L[0, : len(ids)] = ids
        chosen, top_ids, top_logprobs = _score_jit(
            self._graphdef, self._params, jnp.asarray(ids_1L), jnp.int32(num_prompt),
            jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
        n = len(ids) - 1
        return TokenScores(np.asarray(chosen)[:n], np.asarray(top_ids)[:n], np.asarray(top_logprobs)[:n])

    def release(self, slot: int) -> None:
        """Free a slot, finished or not (a cancelled request)."""
        if slot in self._busy:
            self._state = self._state.replace(done=self._state.done.at[slot].set(True))
            self._busy.discard(slot)
            self._finished.discard(slot)
            self._pending.pop(slot, None)
