"""FLOP accounting, shared by training (`flops_per_second` in metrics.jsonl), the pod plan and the
speed benchmark: a walk of a traced program's matmuls (`jaxpr_flops`), and the model's flops per
token by hand (`hand_flops_per_token`).
"""

from __future__ import annotations

import math

from jax.extend.core import jaxprs_in_params

from mimo_jax.blocked_gmm import useful_flops
from mimo_jax.config import GLOBAL
from mimo_jax.params import count_params


def jaxpr_flops(jaxpr) -> dict[str, float]:
    """Global matmul and Pallas-kernel flops of a traced program, loop trip counts included.

    XLA's cost_analysis counts a while loop's body once, so for the scanned layer stack it sees one
    layer per scan; this walk multiplies scan bodies by their length. Inside shard_map the shapes
    are per device, so the body counts once per device of its mesh. Elementwise work is left out
    (it is a few percent of a transformer's flops); a Pallas kernel counts by its own cost estimate.
    """
    totals = {"matmul": 0.0, "pallas": 0.0}

    def grouped_flops(eqn):  # the tiled grouped-matmul loops count their dropless work
        shapes = lambda xs: [tuple(getattr(x.aval, "shape", ())) for x in xs]  # noqa: E731
        return useful_flops(eqn.params.get("name", ""), shapes(eqn.invars), shapes(eqn.outvars))

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                k = math.prod(lhs[d] for d in contract)
                totals["matmul"] += times * 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
            elif name == "pallas_call":
                cost = eqn.params.get("cost_estimate")
                totals["pallas"] += times * (cost.flops if cost is not None else 0.0)
            elif name == "ragged_dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                totals["matmul"] += times * 2.0 * math.prod(eqn.outvars[0].aval.shape) * lhs[-1]
            elif name in ("pjit", "jit") and grouped_flops(eqn) is not None:
                totals["matmul"] += times * grouped_flops(eqn)
            elif name == "scan":
                walk(eqn.params["jaxpr"].jaxpr, times * eqn.params["length"])
            elif name == "cond":  # the costliest branch
                branch_totals = []
                for branch in eqn.params["branches"]:
                    before = dict(totals)
                    walk(branch.jaxpr, times)
                    branch_totals.append({k: totals[k] - before[k] for k in totals})
                    totals.update(before)
                best = max(branch_totals, key=lambda t: sum(t.values()))
                for k in totals:
                    totals[k] += best[k]
            elif name == "shard_map":
                walk(eqn.params["jaxpr"], times * eqn.params["mesh"].size)
            else:
                for sub in jaxprs_in_params(eqn.params):
                    walk(sub, times)

    walk(getattr(jaxpr, "jaxpr", jaxpr), 1)
    totals["total"] = totals["matmul"] + totals["pallas"]
    return totals


def hand_flops_per_token(cfg, seq_len: int, mode: str, query_len: int | None = None) -> dict[str, float]:
    """Model flops per token: 6 x params a token touches (2 x for a forward) plus attention.

    Attention per layer and token, forward: 2*H*(d_qk + d_v)*context (QK^T and PV). The context is
    the sequence length for global layers (PaLM's convention: no causal discount, so 12*L*H*Q*T when
    d_qk = d_v = Q) and the window for SWA layers. "causal" gives the work a causal kernel does:
    (T+1)/2 keys on average for global layers over a whole sequence.

    - train: `seq_len` tokens per sequence; the MTP heads (an SWA block each, plus the shared
      lm_head) are counted too.
    - prefill: the last chunk of `query_len` tokens (default: the whole prompt) of a `seq_len`
      prompt; its queries see seq_len - (query_len - 1)/2 global keys on average (causal-exact).
      Logits are needed at the last position only, so the lm_head is left out.
    - decode: `query_len` tokens (1, or num_draft + 1 when verifying drafts) at the end of a
      `seq_len` context; every token needs its logits, so the lm_head counts.
    """
    counts = count_params(cfg)
    lm_head = cfg.hidden_size * cfg.vocab_size
    h, dqk, dv, t = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim, seq_len
    queries = t if mode == "train" or query_len is None else query_len
    swa_context = min(t, cfg.sliding_window + 1)  # the window plus the query itself
    per_context = 2 * h * (dqk + dv)  # forward flops per (query, key) pair, all heads
    global_layers = cfg.layer_types.count(GLOBAL)
    swa_layers = cfg.num_layers - global_layers
    palm_context = global_layers * t + swa_layers * swa_context
    # Queries at positions t - queries .. t - 1 see (position + 1) global keys: t - (queries - 1)/2 on average.
    causal_context = global_layers * (t - (queries - 1) / 2) + swa_layers * swa_context
    factor = 1
    if mode == "train":
        mtp_heads = cfg.num_mtp_heads
        weights = counts["active"] + counts["mtp"] + mtp_heads * lm_head
        palm_context += mtp_heads * swa_context
        causal_context += mtp_heads * swa_context
        factor = 3  # forward + backward (2x forward)
    elif mode == "prefill":
        weights = counts["active"] - lm_head
    elif mode == "decode":
        weights = counts["active"]
    else:
        raise ValueError(f"unknown mode {mode!r} (train, prefill or decode)")
    return {
        "weights": float(weights),
        "weight_flops": factor * 2.0 * weights,
        "attention_flops": factor * per_context * palm_context,
        "attention_flops_causal": factor * per_context * causal_context,
        "total": factor * (2.0 * weights + per_context * palm_context),
        "total_causal": factor * (2.0 * weights + per_context * causal_context),
        "active_params": float(counts["active"]),
        "mtp_params": float(counts["mtp"]),
    }
