"""The plan report: memory per chip, flops, time estimate, MFU or tokens/s."""

from __future__ import annotations

import sys

from mimo_jax.plan.compiling import PlanResult, device_share
from mimo_jax.plan.topology import GIB, Topology


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:,.3f} MiB"


def mfu(result: PlanResult, topology: Topology, causal: bool = False, seconds: float | None = None) -> float:
    """Model flops (hand count, PaLM's convention or causal-exact) over the chips' peak in the step."""
    model_flops = result.hand["total_causal" if causal else "total"] * result.tokens
    seconds = result.step_seconds if seconds is None else seconds
    return model_flops / (topology.chips * topology.chip.peak_tflops * 1e12 * seconds)


def _report_cost(result: PlanResult, p) -> None:
    cost = result.cost
    probes = " + ".join(f"{w:+g} x {n} layers ({s:.0f} s)" for n, w, s in cost.probes)
    micro = f", x {cost.micro_batches} micro-batches" if cost.micro_batches > 1 else ""
    p(f"cost model:      probes with the layers unrolled: {probes}{micro}")
    p(f"  flops          {cost.flops:.4g} per device (XLA, every layer counted) -> compute {cost.compute_seconds:.4g} s")
    p(f"  HBM traffic    {_gib(cost.hbm_bytes)} per device -> {cost.hbm_seconds:.4g} s")
    p(f"  ICI            {_gib(sum(cost.collectives.values()))} sent per device -> {cost.ici_seconds:.4g} s:")
    for (kind, axes), wire in sorted(cost.collectives.items(), key=lambda kv: -kv[1])[:8]:
        p(f"    {kind:<20} over {'x'.join(axes) or '-':<16} {_gib(wire)}")
    for note in cost.notes:
        p(f"  note:          {note}")
    p(f"step time:       {cost.overlapped_seconds:.4g} s with compute, HBM and ICI overlapped; "
      f"{cost.serial_seconds:.4g} s with no collective hidden")


def _describe_step(result: PlanResult) -> str:
    b = result.global_batch
    if result.mode == "train":
        return f"train; batch {b} x {result.seq_len} tokens = {result.tokens:,} tokens per step"
    if result.mode == "prefill":
        first = result.seq_len - result.query_len
        return (f"prefill chunk; batch {b} x {result.query_len} tokens (positions {first:,}..{result.seq_len - 1:,}, "
                f"the last chunk of a {result.seq_len:,}-token prompt) = {result.tokens:,} tokens per step")
    if result.mode == "draft":
        return (f"drafting passes; batch {b}, {result.num_draft} MTP heads x {result.query_len} positions each, with "
                f"KV caches of {result.seq_len:,} tokens per sequence")
    kind = f"verify step ({result.num_draft} drafts + 1)" if result.num_draft else "decode step"
    return (f"{kind}; batch {b} x {result.query_len} token{'s' * (result.query_len > 1)} = {result.tokens:,} "
            f"tokens per step, with a full KV cache of {result.seq_len:,} tokens per sequence")


def report(result: PlanResult, topology: Topology, out=sys.stdout) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    chip = topology.chip
    p(f"topology:        {topology.requested} -> {topology.name}: {topology.chips} chips ({chip.generation}, "
      f"{chip.hbm_gib:g} GiB HBM, {chip.peak_tflops:g} TFLOP/s bf16 per chip), {result.devices} devices")
    p("mesh:            " + " ".join(f"{k}={v}" for k, v in result.mesh.items()))
    p(f"mode:            {_describe_step(result)}; remat={result.remat}; "
      f"moe_capacity_factor={result.capacity_factor:g}")
    p(f"compile time:    {result.compile_s:.1f} s (on this machine)")
    for note in result.notes:
        p(f"note:            {note}")
    if result.error:
        p(f"fits:            NO ({result.error})")
        state = (f"optimizer state {_gib(result.opt_bytes)}" if result.mode == "train"
                 else f"KV cache {_gib(result.cache_bytes)}")
        p(f"memory/device:   parameters {_gib(result.params_bytes)}, {state} "
          "(from the shardings; the compiler refused the program)")
        return
    share = device_share(result, topology)
    p("memory/device:   (per chip where a device is a chip; libtpu lists v4 TensorCores separately)" if share != 1
      else "memory/chip:")
    resident = " (FP8-resident: e4m3 values + block scales where the release quantises)" if result.weights == "fp8" else ""
    p(f"  parameters          {_gib(result.params_bytes)}{resident}")
    if result.mode == "train":
        p(f"  optimizer state     {_gib(result.opt_bytes)}")
    else:
        p(f"  KV cache            {_gib(result.cache_bytes)} ({result.global_batch} x {result.seq_len:,} tokens; "
          f"donated: the updated cache reuses its buffers; largest buffer {result.cache_spec})")
    p(f"  other state         {_gib(result.rest_bytes)} (router biases)")
    p(f"  arguments (XLA)     {_gib(result.argument_bytes)} (state + {'batch' if result.mode == 'train' else 'tokens'})")
    p(f"  outputs (XLA)       {_gib(result.output_bytes)}, of which aliased to donated inputs {_gib(result.alias_bytes)}")
    p(f"  temporaries (XLA)   {_gib(result.temp_bytes)}")
    p(f"  program code        {_gib(result.code_bytes)}")
    p(f"  peak total          {_gib(result.peak_bytes)} of {_gib(result.hbm_bytes)} HBM -> "
      f"{'FITS' if result.fits else 'DOES NOT FIT'} ({100 * result.peak_bytes / result.hbm_bytes:.0f}%)")
    if result.largest_buffers:
        p("largest buffers: (XLA's buffer assignment, per device: arguments, outputs, slices of the temporaries, "
          "each with the shapes that share it)")
        for size, shapes in result.largest_buffers:
            p(f"  {_gib(size):>12}  {shapes if len(shapes) < 160 else shapes[:157] + '...'}")
    xla_total = result.flops_per_device * result.devices
    traced = result.traced_flops
    p(f"flops/step:      {traced['total']:.4g} in total, counted on the traced program with every scanned layer "
      f"(matmuls {traced['matmul']:.4g} + Pallas kernels {traced['pallas']:.4g}; elementwise left out)")
    p(f"  XLA cost_analysis: {result.flops_per_device:.4g} per device (it counts per device; x {result.devices} = "
      f"{xla_total:.4g}), but a while loop's body only once: loop factor {result.loop_factor:.2f}")
    p(f"HBM traffic:     {_gib(result.bytes_accessed_per_device)} per device per step by XLA (loop bodies once); "
      f"x loop factor = {_gib(result.bytes_accessed_per_device * result.loop_factor)}")
    xla = ("missing" if result.xla_seconds is None else f"{result.xla_seconds:.4g} s"
           + (" (negative: unusable)" if result.xla_seconds <= 0 else ""))
    p(f"XLA estimate:    {xla}; roofline max(flops/peak, bytes/HBM bandwidth, HBM floor) = {result.roofline_seconds:.4g} s")
    if result.cost is not None:
        _report_cost(result, p)
    else:
        p(f"step time:       {result.step_seconds:.4g} s ({result.time_source}; neither models ICI communication "
          f"fully, so treat it as a lower bound; --cost-model compiles the cost model's probes)")
    if result.mode != "train":
        p(f"HBM floor:       {result.stream_seconds:.4g} s to read the parameters and the KV cache once per chip "
          f"(XLA's traffic above also counts copies the program makes, e.g. of scanned weights)")
    low, high = result.tokens_per_second
    if result.mode == "decode":
        per = f"{low:,.1f} tokens/s ({result.global_batch} sequences x 1 token per step)"
        if result.num_draft:
            per = (f"{low:,.1f} to {high:,.1f} tokens/s ({result.global_batch} sequences x 1 to "
                   f"{result.num_draft + 1} tokens per verify step, as many drafts as are accepted + 1)")
        floor = result.global_batch / result.stream_seconds
        floor_rate = f"{floor:,.1f}" + (f" to {floor * (result.num_draft + 1):,.1f}" if result.num_draft else "")
        p(f"throughput:      {per}; {result.step_seconds * 1e3:.3g} ms per step (at the HBM floor: {floor_rate} "
          f"tokens/s)")
    elif result.mode == "prefill":
        chunks = -(-result.seq_len // result.query_len)
        p(f"throughput:      >= {low:,.0f} prompt tokens/s (this is the costliest chunk); a {result.seq_len:,}-token "
          f"prompt takes <= {chunks} chunks x {result.step_seconds:.3g} s = {chunks * result.step_seconds:.3g} s")
    elif result.mode == "draft":
        p(f"drafting:        {result.step_seconds * 1e3:.3g} ms for the {result.num_draft} drafts of every sequence "
          f"(a speculative round is this plus the verify step)")
    hand = result.hand
    if not hand:  # the drafting passes have no hand count
        return
    p(f"model flops/token (hand): {hand['total']:.4g} = {'6' if result.mode == 'train' else '2'} x "
      f"{hand['weights'] / 1e9:.3f}B params ({hand['weight_flops']:.4g}) + attention {hand['attention_flops']:.4g} "
      f"[causal-exact attention: {hand['attention_flops_causal']:.4g}, total {hand['total_causal']:.4g}]")
    per_token = traced["total"] / result.tokens
    extra = ("remat recomputation, the attention backward's recomputed scores, block-granular masks and the fp32 "
             "router" if result.mode == "train" else
             "block-granular attention (queries padded to 16-row blocks, keys to 128-key blocks), the fp32 router, "
             "and work repeated on every device where the batch does not divide over the batch shards")
    p(f"traced flops/token: {per_token:.4g} = {per_token / hand['total']:.3f} x the hand count "
      f"({per_token / hand['total_causal']:.3f} x causal-exact; the traced count adds {extra})")
    p(f"MFU:             {100 * mfu(result, topology):.1f}% (hand model flops x tokens / (chips x peak x step time))")
    if result.cost is not None:
        p(f"  causal-exact:  {100 * mfu(result, topology, causal=True):.1f}% (attention at (T+1)/2 keys); with no "
          f"collective overlapped: {100 * mfu(result, topology, causal=True, seconds=result.cost.serial_seconds):.1f}%")
