"""Device-side helpers (@triton.jit functions) shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["await_prior", "load_scalar", "query_error"]


@triton.jit
def await_prior(PDL: tl.constexpr):
    """The first statement of a kernel that takes part in programmatic dependent launch (PDL:
    _launch.pdl_launch's flag): let the kernel after it on the stream launch once every
    program of this one got here (if that one was launched with _launch.pdl_launch's options;
    its programs wait likewise), then, if this one was launched with them, wait until the
    kernel before it has completed and its writes are visible (a no-op otherwise). Nothing
    before this may touch global memory. No-op when PDL is False."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def load_scalar(ptr, value, ON_DEVICE: tl.constexpr):
    """An int32 scalar argument: read from a 1-element device tensor when ON_DEVICE (what a
    CUDA graph replays with fresh values), else the launch's scalar ``value``. An int64 value
    outside [-1, 2^31 - 1] saturates there (it does not wrap): the callers clamp the result to
    their valid range."""
    if ON_DEVICE:
        return tl.minimum(tl.maximum(tl.load(ptr), -1), 2147483647).to(tl.int32)
    else:
        return value


@triton.jit
def query_error(q_ptr, kh, stride_qh, max_abs, G: tl.constexpr, G_P: tl.constexpr,
                D: tl.constexpr):
    """1 if an entry of the G query heads of KV head kh (rows kh * G + g of q) is NaN, +-Inf or
    above max_abs in magnitude, else 0 (int32; NaN fails the comparison, so it counts)."""
    offs_g = tl.arange(0, G_P)
    offs_d = tl.arange(0, D)
    qg = tl.load(q_ptr + (kh * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                 mask=(offs_g < G)[:, None], other=0.0).to(tl.float32)
    return tl.max(tl.max(tl.where(tl.abs(qg) <= max_abs, 0, 1), axis=1), axis=0)
