"""What the first decode steps of a session cost in a new process on a GPU: the kernels compiled
from nothing (an empty Triton cache) against the same process started again with Triton's disk
cache filled by the first (what a server restarted with a kept ``TRITON_CACHE_DIR`` pays).

Per shape (9/3/64 and 32/8/128, float16, random keys: compilation depends on shapes, not on
values) a child process, with a cache directory of its own:

    build_ms          LouverIndex.build of N keys (Triton backend; compiles the encoder)
    capture_ms        CapturedStep(Relative(1e-3), fallback=True): the server's step (compiles
                      the prologue, filter and sparse attention; two eager runs and a capture)
    call_ms           its calls 1..CALLS, each synchronized: call 2 also builds and captures the
                      dense step of the fallback (compiling the dense kernels), the rest replay
    steady_us         the median of later calls (the graph replays)

The child runs twice on one cache directory (cold, then warm), for each shape in turn.

    python -m benchmarks.bench_cold_start --out bench_cold_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SHAPES = {"9/3/64": (9, 3, 64), "32/8/128": (32, 8, 128)}
CALLS = 4


def _timed(fn: Any) -> tuple[Any, float]:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def child(shape: str, n: int) -> dict[str, Any]:
    """One process: the first build and steps of one shape (see the module docstring)."""
    import torch

    from louver_kernels import IndexConfig, LouverIndex, Relative
    from louver_kernels.triton.decode import CapturedStep

    hq, hkv, d = SHAPES[shape]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(hkv, n, d, device=dev, generator=gen).half()
    values = torch.randn(hkv, n, d, device=dev, generator=gen).half()
    q = torch.randn(hq, d, device=dev, generator=gen).half()
    torch.cuda.synchronize()
    index, build_ms = _timed(lambda: LouverIndex.build(keys, values,
                                                       IndexConfig(backend="triton")))
    step, capture_ms = _timed(lambda: CapturedStep(index, Relative(1e-3), hq, fallback=True))
    call_ms = [_timed(lambda: step(q))[1] for _ in range(CALLS)]
    steady = [_timed(lambda: step(q))[1] for _ in range(20)]
    return {"shape": shape, "context": n, "build_ms": build_ms, "capture_ms": capture_ms,
            "call_ms": call_ms, "steady_us": statistics.median(steady) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--out", default="benchmarks/results/bench_cold_start.json")
    parser.add_argument("--child", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.context)))
        return
    import torch

    from benchmarks.gpu_common import write_result

    if not torch.cuda.is_available():
        raise SystemExit("bench_cold_start needs a CUDA device")
    rows = []
    for shape in SHAPES:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TRITON_CACHE_DIR": cache}
            for run in ("cold", "warm"):
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_cold_start", "--child", shape,
                     "--context", str(args.context)],
                    env=env, check=True, capture_output=True, text=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(cache=run, process_s=time.perf_counter() - t0)
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_result(args.out, "bench_cold_start",
                 {"policy": "Relative(1e-3)", "dtype": "float16", "rows": rows})


if __name__ == "__main__":
    main()
