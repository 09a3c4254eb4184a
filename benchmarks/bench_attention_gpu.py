"""GPU benchmark of the split-K sparse attention kernel against torch SDPA (not a test).

For (Hq, Hkv, D) in {(9, 3, 64), (32, 8, 128)} and N in {4k, 32k, 128k} keys (float16, the
last 256 positions form the recent buffer):

- dense_attention (every key) against F.scaled_dot_product_attention (GQA, q as
  [1, Hq, 1, D]), the strongest plain baseline for one decode step (``--dense-sweep``: only
  a sweep of dense_attention's launch parameters);
- sparse mode at candidate fractions 2 / 5 / 10 / 20 % (random sorted positions per KV head,
  tau = -inf so every candidate is attended: the most bytes a sparse call moves).

Times are medians of triton.testing.do_bench after warm-up, two ways: "eager" (one Python call
per step, what a caller without CUDA graphs pays) and "graph" (the call captured once in a CUDA
graph and replayed: the device time a captured decode step pays). Inputs rotate among copies
whose total exceeds the L2 several times, so small N is not served from cache. Bandwidth =
bytes the kernel must move (K and V rows of the attended keys, candidate ids, outputs) over time,
next to a measured device-to-device copy (bytes read + written).

``--split-sweep``: only sparse_attention's split parameters (grid_per_sm x min_blocks) at
decode-step candidate counts, one call per CUDA-graph replay
(``benchmarks/results/bench_attention_splits.json``: a run on an H200, from which the
launcher's min_blocks default comes).

Usage: python benchmarks/bench_attention_gpu.py --out results.json [--quick | --dense-sweep |
--split-sweep]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.gpu_common import copy_bandwidth, record_graph

CONFIGS = ((9, 3, 64), (32, 8, 128))
SIZES = (4096, 32768, 131072)
FRACTIONS = (0.02, 0.05, 0.10, 0.20)
BUFFER = 256
ROTATE_BYTES = 512 * 2**20  # rotate inputs among copies totalling at least this


def _median_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _graph_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median time of one call when ``calls`` calls (rotating inputs) replay as one graph."""
    graph = record_graph(fn, calls, warmups=calls)
    graph.replay()
    torch.cuda.synchronize()
    return _median_ms(graph.replay) / calls


def _wall_ms(fn: Callable[[], Any], calls: int = 200) -> float:
    """Wall-clock time per call of back-to-back eager calls (host launch cost included)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


class Rotation:
    """Round-robin over input sets so consecutive calls touch different memory."""

    def __init__(self, sets: list[dict[str, Any]]) -> None:
        self.sets = sets
        self.i = 0

    def next(self) -> dict[str, Any]:
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def _copies(bytes_per_set: int) -> int:
    return max(1, min(16, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))


def bench_config(hq: int, hkv: int, d: int, n: int, copy_bw: float, quick: bool
                 ) -> list[dict[str, Any]]:
    from louver_kernels.triton.attention import sparse_attention
    from louver_kernels.triton.dense_attention import dense_attention

    dtype = torch.float16
    dv = d
    bs, be = n - BUFFER, n
    scale = 1.0 / math.sqrt(d)
    kv_bytes = 2 * hkv * n * (d + dv)
    copies = _copies(kv_bytes)
    gen = torch.Generator(device="cuda").manual_seed(n * 131 + d)
    sets = []
    for _ in range(copies):
        sets.append(dict(
            q=torch.randn(hq, d, device="cuda", dtype=dtype, generator=gen),
            keys=torch.randn(hkv, n, d, device="cuda", dtype=dtype, generator=gen),
            values=torch.randn(hkv, n, dv, device="cuda", dtype=dtype, generator=gen),
        ))
    tau = torch.full((hq,), -math.inf, device="cuda")
    out = torch.empty(hq, dv, device="cuda")
    lse = torch.empty(hq, device="cuda")
    cnt = torch.empty(hq, dtype=torch.int32, device="cuda")
    rows: list[dict[str, Any]] = []

    def record(mode: str, frac: float, fn: Callable[[], Any], bytes_: int,
               sdpa: Callable[[], Any] | None = None) -> None:
        eager, graph, wall = _median_ms(fn), _graph_ms(fn, copies), _wall_ms(fn)
        row = dict(hq=hq, hkv=hkv, d=d, n=n, mode=mode, cand_frac=frac, eager_us=eager * 1e3,
                   graph_us=graph * 1e3, wall_us=wall * 1e3, bytes=bytes_,
                   gbps_graph=bytes_ / (graph * 1e-3) / 1e9,
                   frac_of_copy_bw=bytes_ / (graph * 1e-3) / copy_bw)
        if sdpa is not None:
            s_eager, s_graph, s_wall = _median_ms(sdpa), _graph_ms(sdpa, copies), _wall_ms(sdpa)
            row.update(sdpa_eager_us=s_eager * 1e3, sdpa_graph_us=s_graph * 1e3,
                       sdpa_wall_us=s_wall * 1e3,
                       speedup_graph_vs_sdpa_graph=s_graph / graph,
                       speedup_wall_vs_sdpa_wall=s_wall / wall)
        rows.append(row)

    out_bytes = hq * (dv + 2) * 4 + hq * d * 2

    # ---- dense ----
    rot = Rotation(sets)

    def dense() -> None:
        s = rot.next()
        dense_attention(s["q"], s["keys"], s["values"], scale=scale, end=be, out=out, lse=lse,
                        num_attended=cnt)

    sdpa_in = [(s["q"].view(1, hq, 1, d), s["keys"].view(1, hkv, n, d),
                s["values"].view(1, hkv, n, dv)) for s in sets]
    rot_sdpa = Rotation([dict(x=x) for x in sdpa_in])

    def sdpa() -> None:
        qq, kk, vv = rot_sdpa.next()["x"]
        F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True, scale=scale)

    dense_bytes = kv_bytes + out_bytes
    record("dense", 1.0, dense, dense_bytes, sdpa)

    # ---- sparse ----
    for frac in FRACTIONS[:2] if quick else FRACTIONS:
        c = max(1, int(frac * bs))
        for s in sets:
            pos = torch.stack([torch.sort(torch.randperm(bs, device="cuda")[:c]).values
                               for _ in range(hkv)]).to(torch.int32)
            s["cand_pos"] = pos
            s["cand_count"] = torch.full((hkv,), c, dtype=torch.int32, device="cuda")
        def sparse(rot: Rotation = Rotation(sets)) -> None:  # noqa: B008
            s = rot.next()
            sparse_attention(s["q"], s["keys"], s["values"], tau, scale=scale,
                             cand_pos=s["cand_pos"], cand_count=s["cand_count"],
                             buffer_start=bs, buffer_end=be, out=out, lse=lse,
                             num_attended=cnt)

        sp_bytes = 2 * hkv * (c + BUFFER) * (d + dv) + 4 * hkv * c + out_bytes
        record("sparse", frac, sparse, sp_bytes)
    del sets, sdpa_in
    torch.cuda.empty_cache()
    return rows


SWEEP = dict(block_n=(16, 32), num_stages=(2, 3, 4), num_warps=(1, 2))
SWEEP_GRID = (4, 8, 12, 16, 24, 32)


def sweep_dense(hq: int, hkv: int, d: int, n: int, copy_bw: float) -> list[dict[str, Any]]:
    """dense_attention's launch parameters at one shape (graph replay, float16): every
    (block_n, num_stages, num_warps) at grid_per_sm 8, then grid_per_sm and p_split at the
    fastest; SDPA in the same run."""
    import itertools

    from louver_kernels.triton.dense_attention import dense_attention

    scale = 1.0 / math.sqrt(d)
    kv_bytes = 2 * hkv * n * 2 * d
    copies = _copies(kv_bytes)
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    sets = [dict(q=torch.randn(hq, d, device="cuda", dtype=torch.float16, generator=gen),
                 keys=torch.randn(hkv, n, d, device="cuda", dtype=torch.float16, generator=gen),
                 values=torch.randn(hkv, n, d, device="cuda", dtype=torch.float16,
                                    generator=gen)) for _ in range(copies)]
    out = torch.empty(hq, d, device="cuda")
    lse = torch.empty(hq, device="cuda")
    cnt = torch.empty(hq, dtype=torch.int32, device="cuda")
    rot_sdpa = Rotation([dict(x=(s["q"].view(1, hq, 1, d), s["keys"].view(1, hkv, n, d),
                                 s["values"].view(1, hkv, n, d))) for s in sets])

    def sdpa() -> None:
        qq, kk, vv = rot_sdpa.next()["x"]
        F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True, scale=scale)

    sdpa_us = _graph_ms(sdpa, copies) * 1e3
    rows: list[dict[str, Any]] = []

    def run(**kw: Any) -> float:
        rot = Rotation(sets)

        def fn() -> None:
            s = rot.next()
            dense_attention(s["q"], s["keys"], s["values"], scale=scale, end=n, out=out,
                            lse=lse, num_attended=cnt, **kw)
        us = _graph_ms(fn, copies) * 1e3
        rows.append(dict(hq=hq, hkv=hkv, d=d, n=n, **kw, graph_us=us, sdpa_graph_us=sdpa_us,
                         frac_of_copy_bw=(kv_bytes / (us * 1e-6)) / copy_bw))
        print(f"{hq}/{hkv}/{d} n={n} {kw} {us:.1f} us (sdpa {sdpa_us:.1f}), "
              f"{100 * rows[-1]['frac_of_copy_bw']:.0f} % of copy", flush=True)
        return us

    best = min(itertools.product(*SWEEP.values()),
               key=lambda c: run(**dict(zip(SWEEP, c, strict=True)), grid_per_sm=8))
    cfg = dict(zip(SWEEP, best, strict=True))
    for gps in SWEEP_GRID:
        run(**cfg, grid_per_sm=gps)
    run(**cfg, grid_per_sm=8, p_split=False)
    sets.clear()
    torch.cuda.empty_cache()
    return rows


SPLIT_SIZES = (4096, 32768, 131072)
SPLIT_FRACTIONS = (0.02, 0.06)
SPLIT_GRID = dict(grid_per_sm=(2, 3, 4), min_blocks=(1, 2, 4, 8))


def sweep_splits(hq: int, hkv: int, d: int, n: int, frac: float, gen: torch.Generator
                 ) -> list[dict[str, Any]]:
    """sparse_attention's split parameters at decode-step candidate counts: per KV head about
    ``frac`` of the n - 256 indexed positions (0.5-1.5x, random: real heads are skewed) plus a
    256-key buffer, tau = -inf, the certificate fused as the decode step runs it. One call
    captured in a CUDA graph; median of do_bench over its replays (L2 flushed in between: the
    latency of one step, not the throughput of many)."""
    import triton.testing

    from louver_kernels.triton._launch import capture_graph
    from louver_kernels.triton.attention import sparse_attention

    dev = torch.device("cuda")
    k = torch.randn(hkv, n, d, generator=gen).half().to(dev)
    v = torch.randn(hkv, n, d, generator=gen).half().to(dev)
    q = torch.randn(hq, d, generator=gen).half().to(dev)
    bs = n - BUFFER
    counts = [max(1, int(bs * frac * (0.5 + torch.rand(1, generator=gen).item())))
              for _ in range(hkv)]
    cp = torch.zeros(hkv, bs, dtype=torch.int32)
    for h, c in enumerate(counts):
        cp[h, :c] = torch.sort(torch.randperm(bs, generator=gen)[:c]).values.int()
    cp = cp.to(dev)
    cc = torch.tensor(counts, dtype=torch.int32, device=dev)
    tau = torch.full((hq,), float("-inf"), device=dev)
    bst = torch.tensor([bs], dtype=torch.int32, device=dev)
    bet = torch.tensor([n], dtype=torch.int32, device=dev)

    def time_us(**kw: Any) -> tuple[float, torch.Tensor]:
        o = torch.empty(hq, d, device=dev)
        outs = dict(lse=torch.empty(hq, device=dev),
                    num_attended=torch.empty(hq, dtype=torch.int64, device=dev),
                    below_lse=torch.empty(hq, device=dev),
                    pruned_lse=torch.full((hq,), -30.0, device=dev),
                    dropped=torch.empty(hq, device=dev),
                    num_candidates=torch.empty(hq, dtype=torch.int64, device=dev))

        def run() -> None:
            sparse_attention(q, k, v, tau, scale=d ** -0.5, cand_pos=cp, cand_count=cc,
                             buffer_start=bst, buffer_end=bet, out=o, **outs, **kw)

        graph = capture_graph(dev, run, 2)
        triton.testing.do_bench(graph.replay, warmup=30, rep=30)
        return 1e3 * float(triton.testing.do_bench(graph.replay, return_mode="median")), o

    base_us, base_out = time_us()
    rows: list[dict[str, Any]] = []
    print(f"{hq}/{hkv}/{d} N={n} frac={frac} default {base_us:.1f} us", flush=True)
    for gps in SPLIT_GRID["grid_per_sm"]:
        for mb in SPLIT_GRID["min_blocks"]:
            us, out = time_us(grid_per_sm=gps, min_blocks=mb)
            err = float((out - base_out).abs().max())
            print(f"   grid_per_sm={gps} min_blocks={mb} {us:.1f} us x{us / base_us:.2f} "
                  f"max |out - default| {err:.1e}", flush=True)
            rows.append(dict(hq=hq, hkv=hkv, d=d, n=n, frac=frac, grid_per_sm=gps,
                             min_blocks=mb, us=us, default_us=base_us, max_out_diff=err))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--quick", action="store_true", help="fewer fractions (smoke run)")
    parser.add_argument("--dense-sweep", action="store_true",
                        help="only sweep dense_attention's launch parameters at 32k and 128k")
    parser.add_argument("--split-sweep", action="store_true",
                        help="only sweep sparse_attention's split parameters at decode-step "
                             "candidate counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth(torch.device("cuda"))
    hw = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
              triton=triton.__version__, python=platform.python_version(),
              copy_bw_gbps=copy_bw / 1e9)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}; device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows: list[dict[str, Any]] = []
    if args.split_sweep:
        gen = torch.Generator().manual_seed(0)
        for hq, hkv, d in CONFIGS[::-1]:
            for n in SPLIT_SIZES:
                for frac in SPLIT_FRACTIONS:
                    rows.extend(sweep_splits(hq, hkv, d, n, frac, gen))
                    torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(dict(hardware=hw, dtype="float16", buffer=BUFFER, sweep=rows,
                           seconds=time.time() - t0), f, indent=1)
        return 0
    if args.dense_sweep:
        for hq, hkv, d in CONFIGS:
            for n in SIZES[1:]:
                rows.extend(sweep_dense(hq, hkv, d, n, copy_bw))
        with open(args.out, "w") as f:
            json.dump(dict(hardware=hw, dtype="float16", sweep=rows,
                           seconds=time.time() - t0), f, indent=1)
        return 0
    for hq, hkv, d in CONFIGS:
        for n in SIZES:
            rows.extend(bench_config(hq, hkv, d, n, copy_bw, args.quick))
    # sparse rows also against SDPA over all N keys (what sparsity buys end to end)
    dense_sdpa = {(r["hq"], r["n"]): r for r in rows if r["mode"] == "dense"}
    for r in rows:
        base = dense_sdpa[(r["hq"], r["n"])]
        r["x_sdpa_graph"] = base["sdpa_graph_us"] / r["graph_us"]
        r["x_sdpa_wall"] = base["sdpa_wall_us"] / r["wall_us"]
    print("# times in us: eager = do_bench median (device-bound), wall = back-to-back eager "
          "calls, graph = CUDA graph replay; x sdpa = SDPA (dense, all N keys) time / ours")
    head = (f"{'Hq/Hkv/D':>10} {'N':>7} {'mode':>6} {'cand%':>6} {'eager':>7} {'wall':>7} "
            f"{'graph':>7} {'GB/s':>6} {'%copy':>6} {'sdpa eag':>8} {'sdpa wall':>9} "
            f"{'sdpa grf':>8} {'x sdpa grf':>10} {'x sdpa wall':>11}")
    print(head)
    for r in rows:
        cfg = f"{r['hq']}/{r['hkv']}/{r['d']}"
        base = dense_sdpa[(r["hq"], r["n"])]
        sd = (f"{base['sdpa_eager_us']:8.1f} {base['sdpa_wall_us']:9.1f} "
              f"{base['sdpa_graph_us']:8.1f}") if r["mode"] == "dense" else " " * 27
        print(f"{cfg:>10} {r['n']:>7} {r['mode']:>6} {100 * r['cand_frac']:6.0f} "
              f"{r['eager_us']:7.1f} {r['wall_us']:7.1f} {r['graph_us']:7.1f} "
              f"{r['gbps_graph']:6.0f} {100 * r['frac_of_copy_bw']:6.1f} {sd} "
              f"{r['x_sdpa_graph']:10.2f} {r['x_sdpa_wall']:11.2f}")
    with open(args.out, "w") as f:
        json.dump(dict(hardware=hw, buffer=BUFFER, dtype="float16", rows=rows,
                       seconds=time.time() - t0), f, indent=1)
    print(f"# wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
