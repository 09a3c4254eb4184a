"""Warm-up before the server listens (``Settings.warmup_shapes``): a throwaway layer of each
named model shape goes through what a session's first steps do, so that the GPU kernels are
compiled (or loaded from Triton's disk cache) before the first request instead of during it (on
an H200 a new shape's first build and steps take ~9 s with an empty cache,
``benchmarks/bench_cold_start.py``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from louver_kernels import IndexConfig, Policy, Relative
from louver_service.sessions import LayerState

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class WarmupShape:
    """A model shape to warm up: query heads, KV heads, head dim (keys and values), dtype."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def parse(cls, text: str) -> WarmupShape:
        """``HQ/HKV/D`` or ``HQ/HKV/D:DTYPE`` (float16, the default, bfloat16 or float32).
        Raises ValueError on anything else, or heads that do not group (HQ % HKV)."""
        dims, _, dtype = text.strip().partition(":")
        parts = dims.split("/")
        try:
            hq, hkv, d = (int(p) for p in parts) if len(parts) == 3 else (0, 0, 0)
        except ValueError:
            hq = hkv = d = 0
        if min(hq, hkv, d) < 1 or hq % hkv:
            raise ValueError(f"invalid warm-up shape {text!r}: expected HQ/HKV/D[:DTYPE] with "
                             "positive sizes and HQ a multiple of HKV, e.g. 9/3/64:bfloat16")
        name = dtype.strip().lower() or "float16"
        if name not in DTYPES:
            raise ValueError(f"invalid warm-up dtype {dtype!r} in {text!r}: expected one of "
                             f"{', '.join(DTYPES)}")
        return cls(hq, hkv, d, DTYPES[name])

    def __str__(self) -> str:
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        return f"{self.num_q_heads}/{self.num_kv_heads}/{self.head_dim}:{name}"


@dataclass(frozen=True)
class WarmupReport:
    """What one warm-up ran: its seconds, whether the layer ran the GPU kernels, and the
    flushes of its index (two: the build's and the decode-time one)."""

    shape: WarmupShape
    seconds: float
    kernels: bool
    flushes: int


def warm_up(shape: WarmupShape, device: torch.device, config: IndexConfig, policy: Policy,
            fallback: bool) -> WarmupReport:
    """Run one throwaway layer of ``shape`` on ``device`` like a session's first steps with the
    server's index config, default policy and dense-fallback setting: a prefill build of two
    buffers of keys, a buffer of decode-time keys, then three decode steps of ``policy`` (the
    captured step; with the fallback the dense step's first timed call; the side-stream flush of
    the full buffer after the first). Random keys: what compiles depends on shapes, not on
    values. Synchronizes the device at the end; frees everything it made."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = shape.num_q_heads, shape.num_kv_heads, shape.head_dim

    def kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randn(hkv, tokens, d, generator=gen)
        v = torch.randn(hkv, tokens, d, generator=gen)
        return k.to(device, shape.dtype), v.to(device, shape.dtype)

    layer = LayerState()
    layer.extend(*kv(2 * config.buffer_size), config)           # the build
    layer.extend(*kv(config.buffer_size), config)               # a full buffer: flushed later
    q = torch.randn(hq, d, generator=gen).to(shape.dtype)       # a request's q: on the host
    for _ in range(3):
        layer.attend(q, policy, fallback=fallback and isinstance(policy, Relative))
    assert layer.index is not None
    kernels, flushes = layer.index.uses_triton, layer.index.num_flushes
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del layer
    seconds = time.perf_counter() - t0
    logger.info("warmed up %s on %s in %.2f s (%s)", shape, device, seconds,
                "GPU kernels" if kernels else "torch backend")
    return WarmupReport(shape, seconds, kernels, flushes)
