"""GPU benchmark of the QUANT candidate filter (kernels/triton/quant_filter.py). CUDA only.

For N in {32k, 128k, 1M} indexed keys and (Hq, Hkv, D) in {(9, 3, 64), (32, 8, 128)}, bits 7,
coarse 4, group 16, segments of 256 keys, thresholds tuned so that ~5 % and ~20 % of the keys
are group candidates, it reports per configuration:

  time_us         median of triton.testing.do_bench (warm-up first, outputs preallocated)
  scanned_bytes   bytes the two stages need: coarse field + residual norms of every key, plus
                  the low field of the coarse survivors (+ per-segment ranges)
  record_bytes    every code byte + residual norm of every key (what DRAM moves at most: the
                  coarse and low fields of a key share its record, reference.pack_codes)
  bw_*            bytes / time, and as a fraction of a measured device-to-device copy
                  (read + write counted)
  sdpa_us         dense decode attention for the same shapes (torch SDPA, fp16, GQA): the
                  baseline the sparse step must beat

Keys: Gaussian with log-normal channel scales, a shared mean and a few outlier channels; queries
Gaussian. Prints a table and writes JSON to --out. Runs in about a minute on one H200.

    python -m benchmarks.bench_filter_gpu --out filter_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.testing

from benchmarks.gpu_common import copy_bandwidth
from louver_kernels import IndexConfig, IndexKind, LouverIndex
from louver_kernels import reference as ref
from louver_kernels.triton.quant_filter import quant_filter

BITS, COARSE, GROUP, SEGMENT = 6, 4, 16, 256
SHAPES = ((9, 3, 64), (32, 8, 128))
SIZES = (32 * 1024, 128 * 1024, 1024 * 1024)
FRACTIONS = (0.05, 0.20)


def make_index(hkv: int, n: int, d: int, gen: torch.Generator, device: torch.device
               ) -> LouverIndex:
    """A QUANT index over n synthetic keys per KV head (fp16)."""
    scale = torch.exp(0.5 * torch.randn(hkv, 1, d, generator=gen))
    mean = torch.randn(hkv, 1, d, generator=gen)
    keys = (torch.randn(hkv, n, d, generator=gen) * scale + mean)
    keys[..., :2] *= 8.0                                   # outlier channels
    keys = keys.to(torch.float16).to(device)
    values = torch.zeros(hkv, n, 8, dtype=torch.float16, device=device)
    cfg = IndexConfig(kind=IndexKind.QUANT, quant_bits=BITS, quant_coarse_bits=COARSE,
                      quant_group=GROUP, buffer_size=SEGMENT, backend="triton")
    return LouverIndex.build(keys, values, cfg)


def chunked_bounds(index: LouverIndex, q: torch.Tensor, top: int | None,
                   chunk: int = 1 << 16) -> torch.Tensor:
    """reference.quant_bound + slack over all indexed keys, in chunks of whole segments."""
    n = index.num_indexed
    out = torch.empty(q.shape[0], n, device=q.device)
    slack = ref.quant_slack(q, index._kmax, index._rmax, index._lmax,
                            index.head_dim // GROUP)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        codes = ref.unpack_codes(index._codes[:, start:end], BITS, COARSE).to(torch.uint8)
        s0, s1 = start // SEGMENT, end // SEGMENT
        out[:, start:end] = ref.quant_bound(q, codes, index._err[:, start:end],
                                            index._lo[:, s0:s1], index._step[:, s0:s1], BITS,
                                            top) + slack[:, None]
    return out


def tau_for_fraction(full: torch.Tensor, g: int, frac: float) -> tuple[torch.Tensor, float]:
    """Per-head tau (a quantile of the head's full bounds) such that about ``frac`` of the keys
    are group candidates (any head of the group reaches its tau). Returns (tau, fraction)."""
    hq, n = full.shape
    srt = torch.sort(full, dim=1, descending=True).values

    def taus(x: float) -> torch.Tensor:
        k = min(max(int(x * n), 1), n) - 1
        return srt[:, k].contiguous()

    def union(t: torch.Tensor) -> float:
        cand = (full >= t[:, None]).reshape(hq // g, g, n).any(dim=1)
        return float(cand.float().mean())

    lo_x, hi_x = 0.0, frac
    for _ in range(30):
        mid = (lo_x + hi_x) / 2
        if union(taus(mid)) > frac:
            hi_x = mid
        else:
            lo_x = mid
    t = taus(lo_x)
    return t, union(t)


def bench_one(hq: int, hkv: int, d: int, n: int, bw_copy: float, gen: torch.Generator,
              device: torch.device) -> list[dict[str, Any]]:
    g = hq // hkv
    index = make_index(hkv, n, d, gen, device)
    q = torch.randn(hq, d, generator=gen).to(torch.float16).to(device)
    slack = ref.quant_slack(q, index._kmax, index._rmax, index._lmax, d // GROUP)
    full = chunked_bounds(index, q, None)
    coarse = chunked_bounds(index, q, COARSE)
    codes = index._codes
    cap = codes.shape[1]
    cand_pos = torch.empty(hkv, cap, dtype=torch.int32, device=device)
    cand_count = torch.empty(hkv, dtype=torch.int32, device=device)
    pruned = torch.empty(hq, dtype=torch.float32, device=device)

    # dense decode attention baseline (fp16 SDPA with GQA over the same number of keys)
    kk = torch.randn(1, hkv, n, d, device=device, dtype=torch.float16)
    vv = torch.randn(1, hkv, n, d, device=device, dtype=torch.float16)
    qq = q.reshape(1, hq, 1, d)
    sdpa_ms = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True),
        return_mode="median")

    rows = []
    for frac in FRACTIONS:
        tau, got_frac = tau_for_fraction(full, g, frac)
        surv = (coarse >= tau[:, None]).reshape(hkv, g, n).any(dim=1)
        n_surv = int(surv.sum())

        def run(p: torch.Tensor = codes, t: torch.Tensor = tau) -> None:
            quant_filter(q, p, index._err, index._lo, index._step, slack, t,
                         num_indexed=n, bits=BITS, coarse_bits=COARSE, group=GROUP,
                         scale=index.scale, segment_size=SEGMENT, cand_pos=cand_pos,
                         cand_count=cand_count, pruned_lse=pruned)

        run()
        torch.cuda.synchronize()
        # tau sits on a key's bound: keys within rounding of it may go either way
        want = (full >= tau[:, None]).reshape(hkv, g, n).any(dim=1).sum(dim=1)
        count_diff = int((cand_count.long() - want).abs().max())
        triton.testing.do_bench(run, warmup=100, rep=100)   # clocks up, caches warm
        ms = triton.testing.do_bench(run, return_mode="median")
        nb, ng = d // 8, d // GROUP        # bytes per code bit of a key, residual groups
        ranges = hkv * triton.cdiv(n, SEGMENT) * 2 * d * 4
        scanned = hkv * n * (COARSE * nb + 2 * ng) + n_surv * (BITS - COARSE) * nb + ranges
        record = hkv * n * (BITS * nb + 2 * ng) + ranges
        rows.append({
            "Hq": hq, "Hkv": hkv, "D": d, "N": n, "target_fraction": frac,
            "candidate_fraction": got_frac, "coarse_survivor_fraction": n_surv / (hkv * n),
            "count_diff_vs_reference": count_diff,
            "time_us": ms * 1e3, "sdpa_us": sdpa_ms * 1e3,
            "scanned_bytes": scanned, "record_bytes": record,
            "bw_scanned_TBps": scanned / (ms * 1e-3) / 1e12,
            "bw_record_TBps": record / (ms * 1e-3) / 1e12,
            "bw_record_of_copy": record / (ms * 1e-3) / bw_copy,
"bw_scanned_of_copy": scanned / (ms * 1e-3) / bw_copy,
            "keys_per_s": hkv * n / (ms * 1e-3),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_filter_gpu.json", help="JSON output path")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                        help="comma-separated key counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_filter_gpu needs a CUDA device")
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    bw = copy_bandwidth(device)
    props = torch.cuda.get_device_properties(device)
    hw = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
          "triton": triton.__version__, "copy_TBps": bw / 1e12}
    print(f"# {hw['gpu']} ({hw['sms']} SMs), torch {hw['torch']}, triton {hw['triton']}; "
          f"device copy {bw / 1e12:.2f} TB/s (read + write)")
    rows: list[dict[str, Any]] = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for hq, hkv, d in SHAPES:
        for n in sizes:
            rows.extend(bench_one(hq, hkv, d, n, bw, gen, device))
            torch.cuda.empty_cache()
    head = (f"{'Hq/Hkv/D':>10} {'N':>8} {'cand':>6} {'surv':>6} {'us':>8} "
            f"{'sdpa_us':>8} {'rec TB/s':>8} {'%copy':>6} {'scan TB/s':>9} {'Gkey/s':>7} "
            f"{'dcnt':>4}")
    print(head)
    for r in rows:
        print(f"{r['Hq']:>3}/{r['Hkv']}/{r['D']:<4} {r['N']:>8} {r['candidate_fraction']:>6.3f} "
              f"{r['coarse_survivor_fraction']:>6.3f} {r['time_us']:>8.1f} "
              f"{r['sdpa_us']:>8.1f} {r['bw_record_TBps']:>8.2f} "
              f"{100 * r['bw_record_of_copy']:>5.0f}% {r['bw_scanned_TBps']:>9.2f} "
              f"{r['keys_per_s'] / 1e9:>7.1f} {r['count_diff_vs_reference']:>4}")
    with open(args.out, "w") as f:
        json.dump({"hardware": hw, "config": {"bits": BITS, "coarse_bits": COARSE,
                                              "group": GROUP, "segment": SEGMENT},
                   "rows": rows, "wall_s": time.time() - t0}, f, indent=2)
    print(f"# wrote {args.out} in {time.time() - t0:.0f} s")
    if not all(math.isfinite(r["time_us"]) for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
