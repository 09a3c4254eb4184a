"""Louver's decode step on a GPU against torch SDPA (dense, GQA), on real SmolLM2 keys.

Shapes: 9/3/64 (SmolLM2, the captured layer) and a Llama-3-8B-like 32/8/128 built from pairs of
the real heads (llama_like). Per context N: build the QUANT index on the GPU (Triton backend),
then for several decode queries time one layer-step (threshold + candidate filter + sparse
attention + certificate) three ways: eager with validation of q, eager without (the service
validates q when decoding the request), and replayed from a CUDA graph (CapturedStep, reading q
from its input buffer, where the service's host-to-device copy writes it; the ratio reported is
this one; also timed with q copied in from elsewhere on the device), and replayed with the dense
fallback (``auto``: the step and the index's dense step are timed on the first calls, then the
faster runs; ``D`` in the table where the dense step won); median after warm-up, CUDA events via
triton.testing.do_bench; against SDPA over all N keys in the same run (every backend that
accepts the shapes, GQA flag or packed query rows, each replayed from a CUDA graph; the fastest
is the baseline). Also: the candidate fraction, a zero-false-negative check of every measured
query (every key whose fp32 score reaches tau is attended), the step's time cut after each
launch, the step time against the candidate fraction (Fixed thresholds at score quantiles of the
real keys), build throughput (the median of BUILD_REPEATS builds after a first one, which
includes compilation and is reported apart), the cost of a flush (host, GPU, and what the decode
stream pays for it: it runs on a side stream after the next step), the dense path's bandwidth
against a device-to-device copy, and the original paper's index (subspace balls, plain-torch
backend) over the same keys at eps 1e-3. Writes JSON and a latency plot (PNG beside it).

Keys beyond one capture are the capture repeated (said so in the JSON).

    python -m benchmarks.capture --tokens 65536 --layers 20 --docs 8 --chunk 2048 \
        --out data/captures/smollm2_64k_l20.pt                        # CPU, ~6 min
    python -m benchmarks.bench_gpu --capture real_l20_64k.pt \
        --make-capture data/captures/smollm2_64k_l20.pt               # one layer, 48 MiB
    python -m benchmarks.bench_gpu --capture real_l20_64k.pt --out bench_gpu.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.gpu_common import copy_bandwidth, repeated_kv, write_result
from louver_kernels import Dense, Fixed, IndexConfig, IndexKind, LouverIndex, Relative
from louver_kernels import reference as ref
from louver_kernels.triton import _launch, set_programmatic_launch
from louver_kernels.triton.decode import CapturedStep


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _replay_us(index: LouverIndex, policy: Relative | Dense, q: torch.Tensor, stages: int = 3,
               tuning: dict[str, dict[str, int]] | None = None, copy_q: bool = True) -> float:
    """Median us of a captured step; ``copy_q``: q is copied into the step's input per call
    (else it is written there once and the step reads it in place)."""
    import triton.testing

    step = CapturedStep(index, policy, q.shape[0], q_dtype=q.dtype, stages=stages,
                        tuning=tuning)
    if not copy_q:
        step.q.copy_(q)
        q = step.q
    return 1e3 * triton.testing.do_bench(lambda: step(q), warmup=10, rep=40,
                                         return_mode="median")


def sdpa_best(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor) -> dict[str, float]:
    """Median us of torch SDPA per backend that accepts the shapes, called two ways: with
    enable_gqa (q [B, Hq, 1, D]) and with the G query heads of a KV head packed as G query rows
    ([B, Hkv, G, D], no mask: the same attention, one read of K/V per KV head, as
    FlashAttention's GQA packing does). Each call is recorded in a CUDA graph and timed by
    replays, like Louver's CapturedStep (no host launch overhead). The baseline is the fastest
    entry."""
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hkv = k4.shape[1]
    packed = q4.reshape(q4.shape[0], hkv, -1, q4.shape[-1])
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION):
        for how, query, gqa in (("gqa", q4, True), ("packed", packed, False)):
            def run(backend: SDPBackend = backend, query: torch.Tensor = query,
                    gqa: bool = gqa) -> None:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(query, k4, v4, enable_gqa=gqa)
            try:
                run()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
            except Exception:  # noqa: BLE001 - a backend that rejects the shapes or capture
                continue
            out[f"{backend.name.lower()}_{how}"] = 1e3 * triton.testing.do_bench(
                graph.replay, warmup=10, rep=40, return_mode="median")
    if not out:
        raise RuntimeError("no SDPA backend accepted the shapes")
    return out


def stage_times(index: LouverIndex, policy: Relative, q: torch.Tensor) -> dict[str, float]:
    """GPU time of the captured step cut after each launch (graph replays, median): the copy
    of q alone, + prologue, + filter, + attention; differences give each kernel's share."""
    names = ["copy_q", "prologue", "filter", "attention"]
    return {f"upto_{name}": _replay_us(index, policy, q, stages)
            for stages, name in enumerate(names)}


def split_sweep(index: LouverIndex, policy: Relative, q: torch.Tensor) -> dict[str, float]:
    """Step time against num_splits of the filter (programs per KV head) and of the
    attention (its grid has Hkv * num_splits programs, shared by the heads)."""
    out = {}
    for n in (16, 32, 64, 128, 256):
        out[f"filter_splits{n}"] = _replay_us(index, policy, q, 2, {"filter": {"num_splits": n}})
        out[f"attention_splits{n}"] = _replay_us(index, policy, q, 3,
                                                 {"attention": {"num_splits": n}})
    return out


FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)
BUILD_REPEATS = 20   # builds timed per context after the first (median reported)


def fraction_sweep(index: LouverIndex, keys: torch.Tensor, q: torch.Tensor
                   ) -> dict[str, dict[str, float]]:
    """Step time against the candidate fraction, on the real keys: Fixed thresholds at each
    head's (1 - f) quantile of its exact scores for f in FRACTIONS (one captured step per
    stage count, new thresholds per call). Per f: the candidate fraction reached (the group
    union, so above f), the whole step and the step cut after the filter (median us)."""
    import triton.testing

    s = ref.scores(q, keys)
    ranked = torch.sort(s, dim=1, descending=True).values
    n = s.shape[1]
    first = Fixed(ranked[:, 0].tolist())
    steps = {stages: CapturedStep(index, first, q.shape[0], q_dtype=q.dtype, stages=stages)
             for stages in (2, 3)}
    out = {}
    for f in FRACTIONS:
        policy = Fixed(ranked[:, min(int(f * n), n - 1)].tolist())
        row = {}
        for stages, step in steps.items():
            res = step(q, policy)
            if stages == 3:
                row["cand_frac"] = float(res.num_candidates.float().mean()) / n
            row["step_us" if stages == 3 else "upto_filter_us"] = 1e3 * triton.testing.do_bench(
                lambda step=step: step(q), warmup=10, rep=40, return_mode="median")
        out[f"{f:g}"] = row
    return out


def _missed(s: torch.Tensor, tau: torch.Tensor, num_indexed: int, attended: torch.Tensor
            ) -> int:
    """False negatives of one step: keys the guarantee requires (exact score s >= tau, or in
    the buffer beyond num_indexed) minus the keys attended, summed over heads (the attended
    count can exceed the required one only by keys tied with tau in fp32)."""
    need = s >= tau[:, None]
    need[:, num_indexed:] = True
    return int((need.sum(dim=1) - attended).clamp_min(0).sum())


def balls_row(keys: torch.Tensor, values: torch.Tensor, qs: torch.Tensor, dev: torch.device
              ) -> dict[str, Any]:
    """The original paper's index (subspace balls, its default 4 subspaces and clusters of 4)
    over the same keys: eager ``attend`` at relative eps 1e-3 (plain-torch backend on the GPU:
    it has no Triton step), its candidate fraction and its own false-negative check."""
    import triton.testing

    n_ctx = keys.shape[1]
    _sync(dev)
    t0 = time.perf_counter()
    balls = LouverIndex.build(keys, values, IndexConfig(kind=IndexKind.BALLS))
    _sync(dev)
    build_s = time.perf_counter() - t0
    times, fracs, false_neg = [], [], 0
    policy = Relative(1e-3)
    for j in range(qs.shape[1]):
        q = qs[:, j].to(dev)
        out = balls.attend(q, policy)
        false_neg += _missed(ref.scores(q, keys), out.tau, balls.num_indexed, out.num_attended)
        fracs.append(float(out.num_candidates.float().mean()) / n_ctx)
        times.append(triton.testing.do_bench(
            lambda q=q: balls.attend(q, policy, validate=False), warmup=5, rep=40,
            return_mode="median"))
    return {"balls_build_s": build_s, "balls_eps0.001_us": statistics.median(times) * 1e3,
            "balls_cand_frac_eps0.001": statistics.mean(fracs),
            "balls_false_negatives": false_neg}


def run_context(k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor, n_ctx: int,
                eps_list: list[float], config: IndexConfig, dev: torch.device,
                sweep: bool = False) -> dict[str, Any]:
    """One context length: build, time the step per eps and SDPA, check every query."""
    import triton.testing

    keys, values = repeated_kv(k, v, n_ctx, dev)
    # build: the first one (compilation at the first context, allocation), then the median
    # of BUILD_REPEATS more (host + GPU, synchronized before and after each)
    builds = []
    for _ in range(1 + BUILD_REPEATS):
        _sync(dev)
        t0 = time.perf_counter()
        index = LouverIndex.build(keys, values, config)
        _sync(dev)
        builds.append(time.perf_counter() - t0)
    build_s = statistics.median(builds[1:])
    row: dict[str, Any] = {"context": n_ctx, "build_first_s": builds[0], "build_s": build_s,
                           "build_keys_per_s": n_ctx * keys.shape[0] / build_s}
    d = qs.shape[2]
    sdpa_ms: list[float] = []
    sdpa_backends: dict[str, list[float]] = {}
    louver: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    fast: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    graph: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    graph_copy: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    auto: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    auto_dense: dict[str, list[bool]] = {f"{e:g}": [] for e in eps_list}
    steps = {f"{e:g}": CapturedStep(index, Relative(e), qs.shape[0], q_dtype=qs.dtype,
                                    graph=dev.type == "cuda") for e in eps_list}
    # the same steps with the dense fallback: they time both variants on their first calls
    autos = {f"{e:g}": CapturedStep(index, Relative(e), qs.shape[0], q_dtype=qs.dtype,
                                    graph=dev.type == "cuda", fallback=True) for e in eps_list}
    fracs: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    false_neg = 0
    for j in range(qs.shape[1]):
        q = qs[:, j].to(dev)
        q4 = q[None, :, None, :]
        k4, v4 = keys[None], values[None]
        best = sdpa_best(q4, k4, v4)
        sdpa_ms.append(min(best.values()) * 1e-3)
        for name, us in best.items():
            sdpa_backends.setdefault(name, []).append(us)
        s = ref.scores(q, keys)
        for eps in eps_list:
            policy = Relative(eps)
            out = index.attend(q, policy)
            false_neg += _missed(s, out.tau, index.num_indexed, out.num_attended)
            fracs[f"{eps:g}"].append(float(out.num_candidates.float().mean()) / n_ctx)
            louver[f"{eps:g}"].append(triton.testing.do_bench(
                lambda q=q, policy=policy: index.attend(q, policy), warmup=10, rep=40,
                return_mode="median"))
            fast[f"{eps:g}"].append(triton.testing.do_bench(
                lambda q=q, policy=policy: index.attend(q, policy, validate=False), warmup=10,
                rep=40, return_mode="median"))
            # the captured steps read q from their input buffer (step.q), where the caller
            # writes it (the service: the request's host-to-device copy); graph_copy: called
            # with q elsewhere on the device, which adds a device copy to the step
            step = steps[f"{eps:g}"]
            graph_copy[f"{eps:g}"].append(triton.testing.do_bench(
                lambda q=q, step=step: step(q), warmup=10, rep=40, return_mode="median"))
            step.q.copy_(q)
            replay = step(step.q)
            false_neg += _missed(s, out.tau, index.num_indexed, replay.num_attended)
            graph[f"{eps:g}"].append(triton.testing.do_bench(
                lambda step=step: step(step.q), warmup=10, rep=40, return_mode="median"))
            step = autos[f"{eps:g}"]
            step.q.copy_(q)
            # first query: a timing round (both steps), then the faster one; later queries
            # continue the step's call count
            for _ in range(3):
                replay = step(step.q)
                _sync(dev)
                false_neg += _missed(s, out.tau, index.num_indexed, replay.num_attended)
            auto[f"{eps:g}"].append(triton.testing.do_bench(
                lambda step=step: step(step.q), warmup=10, rep=40, return_mode="median"))
            auto_dense[f"{eps:g}"].append(step.last_dense)
    row["sdpa_us"] = statistics.median(sdpa_ms) * 1e3
    row["sdpa_backend_us"] = {k: statistics.median(v) for k, v in sdpa_backends.items()}
    for key in louver:
        t = statistics.median(louver[key]) * 1e3
        row[f"louver_eps{key}_us"] = t
        row[f"ratio_eps{key}"] = t / row["sdpa_us"]
        row[f"cand_frac_eps{key}"] = statistics.mean(fracs[key])
        row[f"louver_noval_eps{key}_us"] = statistics.median(fast[key]) * 1e3
        row[f"louver_graph_eps{key}_us"] = statistics.median(graph[key]) * 1e3
        row[f"louver_graph_copy_eps{key}_us"] = statistics.median(graph_copy[key]) * 1e3
        row[f"ratio_graph_eps{key}"] = row[f"louver_graph_eps{key}_us"] / row["sdpa_us"]
        row[f"louver_auto_eps{key}_us"] = statistics.median(auto[key]) * 1e3
        row[f"ratio_auto_eps{key}"] = row[f"louver_auto_eps{key}_us"] / row["sdpa_us"]
        row[f"auto_dense_share_eps{key}"] = statistics.mean(auto_dense[key])
    row["false_negatives"] = false_neg
    row.update(balls_row(keys, values, qs, dev))
    row["stages_us"] = stage_times(index, Relative(1e-3), qs[:, 0].to(dev))
    if sweep:
        row["sweep_us"] = split_sweep(index, Relative(1e-3), qs[:, 0].to(dev))
    row["fraction_sweep"] = fraction_sweep(index, keys, qs[:, 0].to(dev))
    q = qs[:, 0].to(dev)
    # the step with every key attended, q in place
    dense_ms = _replay_us(index, Dense(), q, copy_q=False) * 1e-3
    item = keys.element_size()
    row["dense_us"] = dense_ms * 1e3
    row["dense_bytes_per_s"] = keys.shape[0] * n_ctx * (d + values.shape[2]) * item / (
        dense_ms * 1e-3)
    row.update(flush_times(index, keys, values, q, dev))
    return row


def flush_times(index: LouverIndex, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor,
                dev: torch.device, reps: int = 5, others: int = 8) -> dict[str, float]:
    """Cost of a decode-time flush, median over ``reps`` (after one round that is not counted:
    it records the flush's CUDA graph, and may grow the storage). A flush runs after the step
    that follows the append filling the buffer, on a side stream (LouverIndex._after_step).

    - append_host_us: host time of a one-key append (validate=False, as the service appends).
    - flush_host_us: host time of the step call that launches a flush minus that of one that
      does not.
    - flush_gpu_us: GPU time of the flush alone (its CUDA graph on the decode stream, events).
    - flush_visible_us: what decoding pays for it: CUDA-event time on the decode stream of the
      step that launches it followed by ``others`` steps of another layer (an index over the
      same keys), minus the same sequence without a flush (0: hidden; the flush still takes
      SMs from the steps it overlaps)."""
    seg = index.config.buffer_size
    hq = q.shape[0]
    other = LouverIndex.build(keys, values, index.config)
    step = CapturedStep(index, Relative(1e-3), hq, q_dtype=q.dtype)
    other_step = CapturedStep(other, Relative(1e-3), hq, q_dtype=q.dtype)
    one_k, one_v = keys[:, :1], values[:, :1]

    def fill_to(b: int) -> None:
        step(q)                                # publishes an earlier flush
        need = b - index.num_buffered
        if need > 0:
            index.append(keys[:, :need], values[:, :need], validate=False)
        step(q)
        _sync(dev)

    def timed_append() -> float:
        t0 = time.perf_counter()
        index.append(one_k, one_v, validate=False)
        return (time.perf_counter() - t0) * 1e6

    def timed_sequence() -> tuple[float, float]:
        """(host us of the step call, decode-stream us of the step and the other steps)"""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step(q)
        host = (time.perf_counter() - t0) * 1e6
        for _ in range(others):
            other_step(q)
        end.record()
        _sync(dev)
        return host, start.elapsed_time(end) * 1e3

    plain, host_a, host_b, seq_a, seq_b, gpu = [], [], [], [], [], []
    for rep in range(reps + 1):
        fill_to(seg - 2)
        plain_us = timed_append()                    # seg - 1 buffered: no flush due
        hb, tb = timed_sequence()
        _sync(dev)
        timed_append()                               # seg buffered: a flush is due
        ha, ta = timed_sequence()                    # the step, then the flush on the side
        fill_to(seg - 1)
        index.append(one_k, one_v, validate=False)   # due again: the flush alone, timed
        index._flush_due = False
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        index._index_pending(captured=True)
        end.record()
        _sync(dev)
        if rep == 0:
            continue
        plain.append(plain_us)
        host_a.append(ha)
        host_b.append(hb)
        seq_a.append(ta)
        seq_b.append(tb)
        gpu.append(start.elapsed_time(end) * 1e3)
    return {"append_host_us": statistics.median(plain),
            "flush_host_us": statistics.median(host_a) - statistics.median(host_b),
            "flush_gpu_us": statistics.median(gpu),
            "flush_visible_us": statistics.median(seq_a) - statistics.median(seq_b),
            "flush_sequence_us": statistics.median(seq_b)}


def make_capture(source: str, layer: int, queries: int, out: str) -> None:
    """Cut the keys, values and last ``queries`` queries of one layer out of a capture made by
    benchmarks.capture (the GPU run needs no model): {"k", "v", "q", "meta"}, float16."""
    from benchmarks.capture import load_capture

    cap = load_capture(source)
    states = cap["layers"][layer]
    meta = cap["meta"]
    small = {"k": states["k"].contiguous(), "v": states["v"].contiguous(),
             "q": states["q"][:, -queries:].contiguous(),
             "meta": {"source": f"{meta['model']} layer {layer}, {meta['tokens']} tokens of "
                                f"{meta.get('text_source', 'real text')} in {meta.get('docs', 1)} "
                                f"document(s); the last {queries} queries", "layer": layer}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(small, out)
    print(f"wrote {out}: {Path(out).stat().st_size / 2**20:.1f} MiB")


# (KV head pairs, time shifts) of the Llama-3-8B-like shape built from SmolLM2's 3 KV heads
_LLAMA_PAIRS = [(0, 1), (1, 2), (2, 0), (0, 2), (1, 0), (2, 1), (0, 0), (1, 1)]


def llama_like(cap: dict[str, Any]) -> dict[str, Any]:
    """Hq=32, Hkv=8, D=128 from the real 9/3/64 capture: KV head j concatenates the channels of
    two SmolLM2 KV heads (a, b) = _LLAMA_PAIRS[j] with the positions of b rotated by j * 8191
    (so that no two heads are equal); query head 4 j + i concatenates query heads of a and b
    (the channel halves of q.k are real scores of real heads). Values likewise."""
    k, v, q = cap["k"], cap["v"], cap["q"]
    n = k.shape[1]
    ks, vs, qs = [], [], []
    for j, (a, b) in enumerate(_LLAMA_PAIRS):
        shift = (j * 8191) % n
        ks.append(torch.cat([k[a], k[b].roll(shift, dims=0)], dim=-1))
        vs.append(torch.cat([v[a], v[b].roll(shift, dims=0)], dim=-1))
        for i in range(4):
            qs.append(torch.cat([q[3 * a + i % 3], q[3 * b + (i + 1) % 3]], dim=-1))
    meta = dict(cap["meta"])
    meta["source"] = (meta["source"] + "; Llama-like 32/8/128 made of pairs of these heads "
                      "(channels concatenated, second head's positions rotated)")
    return {"k": torch.stack(ks), "v": torch.stack(vs), "q": torch.stack(qs), "meta": meta}


SHAPES = {"smollm2": ("Hq=9 Hkv=3 D=64 (SmolLM2)", lambda cap: cap),
          "llama": ("Hq=32 Hkv=8 D=128 (Llama-3-8B-like)", llama_like)}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Latency against context: SDPA and Louver (graph replay) per shape and eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        rows = res["rows"]
        ctx = [r["context"] for r in rows]
        ax.plot(ctx, [r["sdpa_us"] for r in rows], "k-o", label="torch SDPA (dense)")
        for key in sorted(k for k in rows[0] if k.startswith("louver_graph_eps")):
            eps = key.removeprefix("louver_graph_eps").removesuffix("_us")
            ax.plot(ctx, [r[key] for r in rows], "-o", label=f"Louver relative eps={eps}")
            ax.plot(ctx, [r[f"louver_auto_eps{eps}_us"] for r in rows], ":^",
                    label=f"Louver relative eps={eps}, dense fallback")
        if "balls_eps0.001_us" in rows[0]:
            ax.plot(ctx, [r["balls_eps0.001_us"] for r in rows], "--s",
                    label="subspace balls (paper's index, torch), eps=1e-3")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (keys)")
        ax.set_ylabel("latency per layer-step (us)")
        ax.set_title(f"{res['shape']}, {res['gpu']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True,
                        help="the one-layer file (see --make-capture)")
    parser.add_argument("--make-capture", metavar="FULL_CAPTURE",
                        help="write --capture from a benchmarks.capture file and exit")
    parser.add_argument("--layer", type=int, default=20, help="with --make-capture")
    parser.add_argument("--shapes", default="smollm2,llama", help=f"of {sorted(SHAPES)}")
    parser.add_argument("--contexts", default="4096,8192,32768,131072")
    parser.add_argument("--eps", default="1e-2,1e-3")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/bench_gpu.json")
    parser.add_argument("--coarse-bits", type=int, default=None,
                        help="IndexConfig.quant_coarse_bits (default: the config's)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the step against the split counts of both kernels")
    parser.add_argument("--no-pdl", action="store_true",
                        help="launch the step's kernels without programmatic dependent launch "
                             "(the comparison; the default uses it where the GPU has it)")
    args = parser.parse_args()
    set_programmatic_launch(not args.no_pdl)
    if args.make_capture:
        make_capture(args.make_capture, args.layer, 64, args.capture)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    real = torch.load(args.capture, weights_only=True)
    config = IndexConfig(backend="triton", quant_coarse_bits=args.coarse_bits)
    eps_list = [float(e) for e in args.eps.split(",")]
    copy_bps = copy_bandwidth(torch.device("cuda"))
    results = []
    for shape in args.shapes.split(","):
        label, make = SHAPES[shape]
        cap = make(real)
        qs = cap["q"][:, -args.queries:]
        print(label)
        print(f"{'N':>7} {'sdpa us':>8} " + " ".join(
            f"{'eps' + str(e):>10} {'graph':>7} {'x':>5} {'cand':>6} {'auto':>7}"
            for e in eps_list)
            + f" {'FN':>3} {'dense us':>8} {'build Mk/s':>10} {'flush us':>8} {'visible':>7}"
            + f" {'balls us':>9} {'cand':>6} {'FN':>3}")
        rows = []
        for n_ctx in [int(x) for x in args.contexts.split(",")]:
            row = run_context(cap["k"], cap["v"], qs, n_ctx, eps_list, config,
                              torch.device("cuda"), args.sweep)
            row["dense_fraction_of_copy"] = row["dense_bytes_per_s"] / copy_bps
            rows.append(row)
            cols = " ".join(f"{row[f'louver_eps{e:g}_us']:10.1f} "
                            f"{row[f'louver_graph_eps{e:g}_us']:7.1f} "
                            f"{row[f'ratio_graph_eps{e:g}']:5.2f} "
                            f"{row[f'cand_frac_eps{e:g}']:6.3f} "
                            f"{row[f'louver_auto_eps{e:g}_us']:6.1f}"
                            f"{'D' if row[f'auto_dense_share_eps{e:g}'] > 0.5 else ' '}"
                            for e in eps_list)
            print(f"{n_ctx:7d} {row['sdpa_us']:8.1f} {cols} {row['false_negatives']:3d} "
                  f"{row['dense_us']:8.1f} {row['build_keys_per_s'] / 1e6:10.2f} "
                  f"{row['flush_gpu_us']:8.0f} {row['flush_visible_us']:7.1f} "
                  f"{row['balls_eps0.001_us']:9.1f} "
                  f"{row['balls_cand_frac_eps0.001']:6.3f} {row['balls_false_negatives']:3d}",
                  flush=True)
            for key in ("stages_us", "sweep_us"):
                if key in row:
                    print(f"   {key}:", " ".join(f"{k}={v:.1f}" for k, v in row[key].items()))
            print("   fraction_sweep (f: cand, filter us, step us):", " ".join(
                f"{f}: {r['cand_frac']:.3f} {r['upto_filter_us']:.1f} {r['step_us']:.1f}"
                for f, r in row["fraction_sweep"].items()))
        results.append({"shape": label, "gpu": torch.cuda.get_device_name(),
                        "keys": cap["meta"]["source"] + "; contexts beyond it repeat it",
                        "rows": rows})
    write_result(args.out, "bench_gpu", {
        "copy_bytes_per_s": copy_bps, "config": str(config),
        "programmatic_dependent_launch": bool(_launch.pdl_launch(torch.device("cuda"))),
        "timing": "median of triton.testing.do_bench (CUDA events) after warm-up; "
                  "sdpa = CUDA graph replay of the fastest backend; louver_graph = "
                  "CapturedStep replay reading q from its input buffer (step.q, where "
                  "the service's host-to-device copy of the request writes it); "
                  "louver_graph_copy = the same called with q elsewhere on the device "
                  "(one device copy more); louver_auto = louver_graph with "
                  "the dense fallback (auto_dense_share: how many measured queries ended "
                  "on the dense step); louver = eager index.attend "
                  "(host launch overhead included); balls = eager attend of a "
                  "subspace-ball index (plain-torch backend) over the same keys",
        "shapes": results})
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps({"copy_TBps": copy_bps / 1e12}))


if __name__ == "__main__":
    main()
