"""What a CUDA-graph replay costs before any work: the latency floor of a decode step (CUDA only).

A decode step of the Triton backend is a CUDA graph of a few launches (the copy of q, the
prologue, the filter, the sparse attention). This measures, on the current GPU, the median
time of one graph replay (triton.testing.do_bench: events around each replay, the L2 flushed
in between) of

    empty_xK          K empty kernels in a row (one program per SM; K = 1..4)
    q_copy            torch's copy of a float16 [32, 128] tensor (the step's q copy)
    barrier_pP_rR     ONE kernel of P programs (4 warps each, all resident) that passes R
                      grid-wide barriers (an arrival counter and a generation word, GPU-scope
                      atomics): what fusing dependent phases into one launch costs instead

so that the step's measured time can be split into launch floor and the kernels' own latency
chains. ``benchmarks/results/bench_launch_floor.json`` is a run on an H200.

    python -m benchmarks.bench_launch_floor --out launch_floor.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing

from benchmarks.gpu_common import record_graph


@triton.jit
def _empty(x_ptr):
    if tl.program_id(0) == 0:
        tl.store(x_ptr, 1.0)


@triton.jit
def _grid_barrier(bar_ptr, x_ptr, ROUNDS: tl.constexpr):
    """ROUNDS grid-wide barriers. bar_ptr[0]: arrivals (left at zero), bar_ptr[1]: generation
    (the last arrival of a round resets the arrivals and bumps it; the others spin on it)."""
    n = tl.num_programs(0)
    for _r in tl.static_range(ROUNDS):
        gen0 = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        t = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
        if t == n - 1:
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
        else:
            g = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
            while g == gen0:
                g = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
    if tl.program_id(0) == 0:
        tl.store(x_ptr, 1.0)


def _replay_us(graph: torch.cuda.CUDAGraph) -> float:
    triton.testing.do_bench(graph.replay, warmup=50, rep=50)
    return 1e3 * float(triton.testing.do_bench(graph.replay, rep=200, return_mode="median"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_launch_floor needs a CUDA device")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    x = torch.zeros(1, device=dev)
    bar = torch.zeros(2, dtype=torch.int32, device=dev)
    us: dict[str, float] = {}
    def empties(k: int) -> Callable[[], None]:
        def fn() -> None:
            for _ in range(k):
                _empty[(sms,)](x)
        return fn

    def barrier(p: int, rounds: int) -> Callable[[], None]:
        def fn() -> None:
            _grid_barrier[(p,)](bar, x, ROUNDS=rounds, num_warps=4)
        return fn

    for k in (1, 2, 3, 4):
        us[f"empty_x{k}"] = _replay_us(record_graph(empties(k)))
    qa = torch.randn(32, 128, device=dev, dtype=torch.float16)
    qb = torch.empty_like(qa)
    us["q_copy"] = _replay_us(record_graph(lambda: qb.copy_(qa)))
    for p in (sms, 2 * sms, 4 * sms):          # 4 warps each: all resident at once
        for rounds in (1, 2):
            us[f"barrier_p{p}_r{rounds}"] = _replay_us(record_graph(barrier(p, rounds)))
    for name, value in us.items():
        print(f"{name:24s} {value:7.2f} us")
    hw = {"device": props.name, "sms": sms, "torch": torch.__version__,
          "triton": triton.__version__}
    with open(args.out, "w") as f:
        json.dump({"hardware": hw, "us": us}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
