"""The decode step on a CUDA GPU by backend: the plain-torch backend against the Triton kernels,
over the same real keys (the two backends ``IndexConfig(backend="auto")`` chooses between).

Per shape (bench_gpu's SHAPES) and context, policy Relative(1e-3), the capture's last query:

    torch_us         LouverIndex.attend of a torch-backend index (eager, host work included)
    triton_us        LouverIndex.attend of a Triton-backend index (eager: three launches and
                     the host's check of q)
    captured_us      the server's path: a CapturedStep replay with the dense fallback
    attended_diff    max over heads of |num_attended(torch) - num_attended(triton)| (keys
                     within float32 rounding of tau may go either way)
    max_out_diff     max |output(torch) - output(triton)|

Each time is the median of REPS calls after WARMUP, each call synchronized (host and GPU).
Contexts beyond the capture repeat it, as in bench_gpu.

    python -m benchmarks.bench_backends --capture real_l20_64k.pt --out bench_backends.json
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.bench_gpu import SHAPES
from benchmarks.gpu_common import capture_args, repeated_kv, write_result
from louver_kernels import IndexConfig, LouverIndex, Relative
from louver_kernels.triton.decode import CapturedStep

WARMUP, REPS = 3, 15


def median_us(fn: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def row(label: str, cap: dict[str, Any], n: int, dev: torch.device) -> dict[str, Any]:
    keys, values = repeated_kv(cap["k"], cap["v"], n, dev)
    q = cap["q"][:, -1].to(dev)
    policy = Relative(1e-3)
    by_torch = LouverIndex.build(keys, values, IndexConfig(backend="torch"))
    by_triton = LouverIndex.build(keys, values, IndexConfig(backend="triton"))
    want, got = by_torch.attend(q, policy), by_triton.attend(q, policy)
    step = CapturedStep(by_triton, policy, q.shape[0], q_dtype=q.dtype, fallback=True)
    return {"shape": label, "context": n,
            "torch_us": median_us(lambda: by_torch.attend(q, policy)),
            "triton_us": median_us(lambda: by_triton.attend(q, policy)),
            "captured_us": median_us(lambda: step(q)),
            "attended_diff": int((want.num_attended - got.num_attended).abs().max()),
            "max_out_diff": float((want.output - got.output).abs().max())}


def main() -> None:
    args = capture_args(__doc__, "bench_backends", "4096,32768,131072")
    dev = torch.device("cuda")
    real = torch.load(args.capture, weights_only=True)
    rows = []
    for label, make in SHAPES.values():
        cap = make(real)
        for n in (int(x) for x in args.contexts.split(",")):
            rows.append(row(label, cap, n, dev))
            print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, "bench_backends", {
        "policy": "Relative(1e-3)", "timing": f"median of {REPS} synchronized calls after {WARMUP}",
        "rows": rows})


if __name__ == "__main__":
    main()
