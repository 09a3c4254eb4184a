"""Louver's decode step on a GPU against torch SDPA (dense, GQA), on real SmolLM2 keys.

Per context N: build the QUANT index on the GPU (Triton backend), then for several decode
queries time one layer-step (threshold + candidate filter + sparse attention + certificate)
three ways: eager with validation of q, eager without (the service validates q when decoding
the request), and replayed from a CUDA graph (CapturedStep); median after warm-up, CUDA events
via triton.testing.do_bench; against SDPA over all N keys in the same run. Also: the candidate
fraction, a zero-false-negative check of every measured query (every key whose fp32 score
reaches tau is attended), build throughput, the cost of a flush, and the dense path's bandwidth
against a device-to-device copy.

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

from louver_kernels import Dense, IndexConfig, LouverIndex, Relative
from louver_kernels import reference as ref
from louver_kernels.triton.decode import CapturedStep


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def stage_times(index: LouverIndex, policy: Relative, q: torch.Tensor) -> dict[str, float]:
    """GPU time of the captured step cut after each launch (graph replays, median): the copy
    of q alone, + prologue, + filter, + attention; differences give each kernel's share."""
    import triton.testing

    names = ["copy_q", "prologue", "filter", "attention"]
    out: dict[str, float] = {}
    for stages, name in enumerate(names):
        step = CapturedStep(index, policy, q.shape[0], q_dtype=q.dtype, stages=stages)
        out[f"upto_{name}"] = 1e3 * triton.testing.do_bench(
            lambda step=step: step(q), warmup=10, rep=40, return_mode="median")
    return out


def run_context(k: torch.Tensor, v: torch.Tensor, qs: torch.Tensor, n_ctx: int,
                eps_list: list[float], config: IndexConfig, dev: torch.device
                ) -> dict[str, Any]:
    """One context length: build, time the step per eps and SDPA, check every query."""
    import triton.testing

    reps = -(-n_ctx // k.shape[1])
    keys = torch.cat([k] * reps, dim=1)[:, :n_ctx].to(dev)
    values = torch.cat([v] * reps, dim=1)[:, :n_ctx].to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    index = LouverIndex.build(keys, values, config)
    _sync(dev)
    build_s = time.perf_counter() - t0
    row: dict[str, Any] = {"context": n_ctx, "build_s": build_s,
                           "build_keys_per_s": n_ctx * keys.shape[0] / build_s}
    d = qs.shape[2]
    sdpa_ms: list[float] = []
    louver: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    fast: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    graph: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    steps = {f"{e:g}": CapturedStep(index, Relative(e), qs.shape[0], q_dtype=qs.dtype,
                                    graph=dev.type == "cuda") for e in eps_list}
    fracs: dict[str, list[float]] = {f"{e:g}": [] for e in eps_list}
    false_neg = 0
    for j in range(qs.shape[1]):
        q = qs[:, j].to(dev)
        q4 = q[None, :, None, :]
        k4, v4 = keys[None], values[None]
        sdpa_ms.append(triton.testing.do_bench(
            lambda q4=q4, k4=k4, v4=v4: F.scaled_dot_product_attention(
                q4, k4, v4, enable_gqa=True), warmup=10, rep=40, return_mode="median"))
        s = ref.scores(q, keys)
        for eps in eps_list:
            policy = Relative(eps)
            out = index.attend(q, policy)
            need = s >= out.tau[:, None]
            need[:, index.num_indexed:] = True
            # the attended count can exceed need only by keys tied with tau in fp32
            false_neg += int((need.sum(dim=1) - out.num_attended).clamp_min(0).sum())
            fracs[f"{eps:g}"].append(float(out.num_candidates.float().mean()) / n_ctx)
            louver[f"{eps:g}"].append(triton.testing.do_bench(
                lambda q=q, policy=policy: index.attend(q, policy), warmup=10, rep=40,
                return_mode="median"))
            fast[f"{eps:g}"].append(triton.testing.do_bench(
                lambda q=q, policy=policy: index.attend(q, policy, validate=False), warmup=10,
                rep=40, return_mode="median"))
            step = steps[f"{eps:g}"]
            replay = step(q)
            false_neg += int((need.sum(dim=1) - replay.num_attended).clamp_min(0).sum())
            graph[f"{eps:g}"].append(triton.testing.do_bench(
                lambda q=q, step=step: step(q), warmup=10, rep=40, return_mode="median"))
    row["sdpa_us"] = statistics.median(sdpa_ms) * 1e3
    for key in louver:
        t = statistics.median(louver[key]) * 1e3
        row[f"louver_eps{key}_us"] = t
        row[f"ratio_eps{key}"] = t / row["sdpa_us"]
        row[f"cand_frac_eps{key}"] = statistics.mean(fracs[key])
        row[f"louver_noval_eps{key}_us"] = statistics.median(fast[key]) * 1e3
        row[f"louver_graph_eps{key}_us"] = statistics.median(graph[key]) * 1e3
        row[f"ratio_graph_eps{key}"] = row[f"louver_graph_eps{key}_us"] / row["sdpa_us"]
    row["false_negatives"] = false_neg
    row["stages_us"] = stage_times(index, Relative(1e-3), qs[:, 0].to(dev))
    q = qs[:, 0].to(dev)
    dense_ms = triton.testing.do_bench(lambda: index.attend(q, Dense()), warmup=10, rep=40,
                                       return_mode="median")
    item = keys.element_size()
    row["dense_us"] = dense_ms * 1e3
    row["dense_bytes_per_s"] = keys.shape[0] * n_ctx * (d + values.shape[2]) * item / (
        dense_ms * 1e-3)
    # flush: fill the buffer to one key short, then time the append that flushes it
    seg = config.buffer_size
    index.append(keys[:, : seg - 1], values[:, : seg - 1])
    _sync(dev)
    t0 = time.perf_counter()
    index.append(keys[:, :1], values[:, :1])
    _sync(dev)
    row["flush_us"] = (time.perf_counter() - t0) * 1e6
    return row


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True,
                        help="the one-layer file (see --make-capture)")
    parser.add_argument("--make-capture", metavar="FULL_CAPTURE",
                        help="write --capture from a benchmarks.capture file and exit")
    parser.add_argument("--layer", type=int, default=20, help="with --make-capture")
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--eps", default="1e-2,1e-3")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/bench_gpu.json")
    args = parser.parse_args()
    if args.make_capture:
        make_capture(args.make_capture, args.layer, 64, args.capture)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device")
    cap = torch.load(args.capture, weights_only=True)
    qs = cap["q"][:, -args.queries:]
    config = IndexConfig(backend="triton")
    eps_list = [float(e) for e in args.eps.split(",")]
    rows = []
    print(f"{'N':>7} {'sdpa us':>8} " + " ".join(f"{'eps' + str(e):>10} {'graph':>7} {'x':>5} "
                                                   f"{'cand':>6}" for e in eps_list)
          + f" {'FN':>3} "
          f"{'dense us':>8} {'build Mk/s':>10} {'flush us':>8}")
    for n_ctx in [int(x) for x in args.contexts.split(",")]:
        row = run_context(cap["k"], cap["v"], qs, n_ctx, eps_list, config,
                          torch.device("cuda"))
        rows.append(row)
        cols = " ".join(f"{row[f'louver_eps{e:g}_us']:10.1f} "
                        f"{row[f'louver_graph_eps{e:g}_us']:7.1f} "
                        f"{row[f'ratio_graph_eps{e:g}']:5.2f} "
                        f"{row[f'cand_frac_eps{e:g}']:6.3f}" for e in eps_list)
        print(f"{n_ctx:7d} {row['sdpa_us']:8.1f} {cols} {row['false_negatives']:3d} "
              f"{row['dense_us']:8.1f} {row['build_keys_per_s'] / 1e6:10.2f} "
              f"{row['flush_us']:8.0f}", flush=True)
        print("   stages (cumulative us):", " ".join(f"{k}={v:.1f}"
                                                     for k, v in row["stages_us"].items()))
    copy_bps = copy_bandwidth(torch.device("cuda"))
    for row in rows:
        row["dense_fraction_of_copy"] = row["dense_bytes_per_s"] / copy_bps
    out = {"benchmark": "bench_gpu", "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "shape": "Hq=9 Hkv=3 D=64 (SmolLM2)",
           "keys": cap["meta"]["source"] + "; contexts beyond it repeat the capture",
           "copy_bytes_per_s": copy_bps, "config": str(config), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"copy_TBps": copy_bps / 1e12}), f"wrote {args.out}")


if __name__ == "__main__":
    main()
