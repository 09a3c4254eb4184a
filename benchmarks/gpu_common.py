"""Measurements shared by the GPU benchmarks."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def record_graph(fn: Callable[[], object], calls: int = 1, warmups: int = 2
                 ) -> torch.cuda.CUDAGraph:
    """fn() called ``warmups`` times on a side stream (they compile kernels, allocate, create
    per-stream state), then ``calls`` times recorded in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def repeated_kv(k: torch.Tensor, v: torch.Tensor, n: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [Hkv, n, *] on ``device`` from a capture's k, v [Hkv, T, *]: the first n
    positions of the capture repeated along the sequence (contexts beyond the capture)."""
    reps = -(-n // k.shape[1])
    return (torch.cat([k] * reps, dim=1)[:, :n].to(device),
            torch.cat([v] * reps, dim=1)[:, :n].to(device))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes/s, read + write counted (1 GiB buffers, median
    of triton.testing.do_bench): the ceiling the benchmarks state memory-bound kernels against."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def write_result(path: str | Path, name: str, fields: dict[str, Any]) -> None:
    """Write a GPU benchmark's JSON to ``path`` (parent folders made): its name, the device and
    the torch / Triton versions, then ``fields``; prints where it went."""
    import triton

    out = {"benchmark": name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, **fields}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def capture_args(doc: str | None, name: str, contexts: str) -> argparse.Namespace:
    """The command line of a GPU benchmark over bench_gpu's one-layer capture: --capture,
    --contexts (default ``contexts``), --out (default benchmarks/results/NAME.json); exits
    unless a CUDA device is present."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True, help="bench_gpu's one-layer capture")
    parser.add_argument("--contexts", default=contexts)
    parser.add_argument("--out", default=f"benchmarks/results/{name}.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{name} needs a CUDA device")
    return args
