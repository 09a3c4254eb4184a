"""Device-side helpers (@triton.jit functions) shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["load_scalar"]


@triton.jit
def load_scalar(ptr, value, ON_DEVICE: tl.constexpr):
    """An int32 scalar argument: read from a 1-element device tensor when ON_DEVICE (what a
    CUDA graph replays with fresh values), else the launch's scalar ``value``."""
    if ON_DEVICE:
        return tl.load(ptr).to(tl.int32)
    else:
        return value
