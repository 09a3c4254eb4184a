"""Launch shapes of the decode step's filter and sparse attention, inside the captured step
(CUDA only): what the launchers' defaults were chosen by.

Per shape (bench_gpu's SHAPES) and context, Relative(1e-3), the capture's last QUERIES queries,
each variant passes its launch parameters to one kernel through ``CapturedStep(tuning=...)``
and is timed as a graph replay (median of triton.testing.do_bench, q in place):

    filter      prologue + filter (``stages=2``), per variant of the filter's launch:
                default (the launcher's choice), one-warp programs of 32-key (the
                launcher's D = 128 shape) or 64-key blocks (its D = 64 shape) at 16 per SM,
                two-warp programs of 64-key blocks at 8 per SM, four-warp programs of 128-key
                blocks at about one wave (its shape for other D)
    attention   the whole step, per variant of the sparse attention's launch: default
                (two-warp programs, 4 per SM, min_blocks 1), 1 / 2 / 4 warps per program at
                8 warps per SM, two-warp programs with min_blocks 2 or 4 (4: the former
                default of 32/8/128), four-warp programs with min_blocks 2 (the former
                default of 9/3/64), two-warp programs at 8 per SM

Variants run in alternating order over two rounds. Each variant's attended counts must equal
the default's and its outputs lie within 1e-5 of them (``same`` in the JSON).

    python -m benchmarks.bench_launch_shapes --capture real_l20_64k.pt --out launch_shapes.json
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import torch
import triton
import triton.testing

from benchmarks.bench_gpu import SHAPES
from benchmarks.gpu_common import capture_args, repeated_kv, write_result
from louver_kernels import IndexConfig, LouverIndex, Relative
from louver_kernels.triton._launch import num_sms
from louver_kernels.triton.decode import CapturedStep
from louver_kernels.triton.quant_filter import split_count

QUERIES = 6
ROUNDS = 2


def filter_variants(hkv: int, n: int, sms: int) -> dict[str, dict[str, int]]:
    """Launch parameters of the filter: name -> quant_filter keyword arguments."""
    def splits(per_sm: int, block_n: int, max_blocks: int | None = None) -> int:
        return split_count(-(-n // block_n), hkv, per_sm, sms, max_blocks)

    return {"default": {},
            "w1_bn32_16sm": {"num_warps": 1, "block_n": 32, "num_splits": splits(16, 32)},
            "w1_bn64_16sm": {"num_warps": 1, "block_n": 64, "num_splits": splits(16, 64)},
            "w2_bn64_8sm": {"num_warps": 2, "block_n": 64, "num_splits": splits(8, 64)},
            "w4_bn128_4sm": {"num_warps": 4, "block_n": 128, "num_splits": splits(4, 128, 8)}}


ATTENTION_VARIANTS: dict[str, dict[str, int]] = {
    "default": {}, "w1": {"num_warps": 1, "grid_per_sm": 8},
    "w2": {"num_warps": 2, "grid_per_sm": 4}, "w4": {"num_warps": 4, "grid_per_sm": 2},
    "w2_mb2": {"num_warps": 2, "grid_per_sm": 4, "min_blocks": 2},
    "w2_mb4": {"num_warps": 2, "grid_per_sm": 4, "min_blocks": 4},
    "w4_mb2": {"num_warps": 4, "grid_per_sm": 2, "min_blocks": 2},
    "w2_8sm": {"num_warps": 2, "grid_per_sm": 8}}


def _replay_us(step: CapturedStep) -> float:
    return 1e3 * triton.testing.do_bench(lambda: step(step.q), warmup=10, rep=30,
                                         return_mode="median")


def sweep(index: LouverIndex, qs: torch.Tensor, kernel: str,
          variants: dict[str, dict[str, int]], stages: int) -> dict[str, Any]:
    """Median us per variant over the queries and rounds, and whether each variant's results
    equal the default's."""
    dev = index.device
    times: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    same: dict[str, bool] = {}
    for rnd in range(ROUNDS):
        order = list(variants.items())
        for name, tune in (order if rnd % 2 == 0 else order[::-1]):
            step = CapturedStep(index, Relative(1e-3), qs.shape[0], q_dtype=qs.dtype,
                                stages=stages, tuning={kernel: tune})
            for j in range(qs.shape[1]):
                step.q.copy_(qs[:, j].to(dev))
                if rnd == 0 and stages == 3:
                    res = step(step.q)
                    got = (res.output.float().cpu().clone(), res.num_attended.cpu().clone())
                    if name == "default":
                        first[j] = got
                    else:
                        want = first[j]
                        same[name] = (same.get(name, True) and torch.equal(want[1], got[1])
                                      and float((want[0] - got[0]).abs().max()) < 1e-5)
                times[name].append(_replay_us(step))
    out: dict[str, Any] = {name: statistics.median(t) for name, t in times.items()}
    if stages == 3:
        out["same"] = same
    return out


def main() -> None:
    args = capture_args(__doc__, "bench_launch_shapes", "8192,32768,131072")
    real = torch.load(args.capture, weights_only=True)
    dev = torch.device("cuda")
    sms = num_sms(dev)
    rows = []
    for shape in ("smollm2", "llama"):
        label, make = SHAPES[shape]
        cap = make(real)
        qs = cap["q"][:, -QUERIES:]
        hkv = cap["k"].shape[0]
        for n in (int(c) for c in args.contexts.split(",")):
            keys, values = repeated_kv(cap["k"], cap["v"], n, dev)
            index = LouverIndex.build(keys, values, IndexConfig(backend="triton"))
            row = {"shape": label, "context": n,
                   "filter_us": sweep(index, qs, "filter", filter_variants(hkv, n, sms), 2),
                   "step_us": sweep(index, qs, "attention", ATTENTION_VARIANTS, 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del index, keys, values
            torch.cuda.empty_cache()
    write_result(args.out, "bench_launch_shapes", {
        "timing": "median of triton.testing.do_bench over the queries and rounds; filter_us: "
                  "CapturedStep(stages=2) (prologue + filter); step_us: the whole captured step",
        "rows": rows})


if __name__ == "__main__":
    main()
