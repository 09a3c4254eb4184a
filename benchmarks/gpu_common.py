"""Measurements shared by the GPU benchmarks."""

from __future__ import annotations

import torch


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes/s, read + write counted (1 GiB buffers, median
    of triton.testing.do_bench): the ceiling the benchmarks state memory-bound kernels against."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100,
                                 return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)
