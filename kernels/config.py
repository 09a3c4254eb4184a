"""Index configuration for :class:`louver_kernels.LouverIndex`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum


class IndexKind(str, Enum):
    """Which sound bound the index keeps over its keys.

    BALLS: the original algorithm: per subspace, clusters of keys with a center and a radius.
    QUANT: per-channel quantized keys with per-key, per-group residual norms.
    """

    BALLS = "balls"
    QUANT = "quant"


@dataclass(frozen=True)
class IndexConfig:
    """Parameters of one layer's index. Every field has a default; all are validated.

    Attributes:
        kind: the bound kept over the keys (see :class:`IndexKind`).
        num_subspaces: BALLS: number of contiguous slices of the head dim (divides D).
        cluster_size: BALLS: target number of keys per cluster (>= 1).
        buffer_size: recent tokens attended exactly before being indexed (>= 1).
        quant_bits: QUANT: bits per channel code (2..8; the Triton backend: <= 7).
        quant_coarse_bits: QUANT: top bits of each code read by the kernels' first pass
            (1..quant_bits; the Triton backend: 1, 2 or 4, with quant_bits - quant_coarse_bits
            in {0, 1, 2, 4}); keys whose coarse bound reaches tau have their low bits read.
        quant_group: QUANT: channels per residual-norm group (divides D).
        sink_tokens: first positions whose exact score feeds the threshold's m_lo.
        probe_recent: the most recent positions whose exact score also feeds m_lo (the buffer
            and the end of the index; DESIGN measured the first 4 and last 256 keys to hold the
            true maximum in most (head, step) cases).
        softmax_scale: attention scale; None means 1/sqrt(D).
        backend: "torch" (the plain-torch implementation, on any device) or "triton" (the
            Triton kernels for a QUANT index's Fixed/Relative/Dense steps, on CUDA tensors, or
            on CPU tensors under Triton's interpreter, TRITON_INTERPRET=1). "auto" follows the
            keys' device: "triton" on a CUDA GPU of compute capability >= 9.0 (where the
            kernels are tested) for a configuration and head dim they implement
            (``triton_supports``), else "torch" (see ``LouverIndex.uses_triton``).
    """

    kind: IndexKind = IndexKind.QUANT
    num_subspaces: int = 4
    cluster_size: int = 4
    buffer_size: int = 256
    quant_bits: int = 6
    quant_coarse_bits: int | None = None
    quant_group: int = 16
    sink_tokens: int = 4
    probe_recent: int = 256
    softmax_scale: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.kind, IndexKind):
            try:
                object.__setattr__(self, "kind", IndexKind(self.kind))
            except ValueError as exc:
                raise ValueError(f"unknown index kind {self.kind!r}; expected one of "
                                 f"{[k.value for k in IndexKind]}") from exc
        for name in ("num_subspaces", "cluster_size", "buffer_size", "quant_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("sink_tokens", "probe_recent"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"IndexConfig.{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.quant_bits, int) and 2 <= self.quant_bits <= 8):
            raise ValueError(f"IndexConfig.quant_bits must be in 2..8, got {self.quant_bits!r}")
        if self.quant_coarse_bits is None:
            object.__setattr__(self, "quant_coarse_bits", min(4, self.quant_bits))
        if not (isinstance(self.quant_coarse_bits, int)
                and 1 <= self.quant_coarse_bits <= self.quant_bits):
            raise ValueError(f"IndexConfig.quant_coarse_bits must be in 1..quant_bits, got "
                             f"{self.quant_coarse_bits!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"IndexConfig.backend must be auto, torch or triton, got "
                             f"{self.backend!r}")
        if self.backend == "triton":
            if self.kind is not IndexKind.QUANT:
                raise ValueError("the Triton backend implements the QUANT index kind only")
            from louver_kernels.reference import code_fields

            code_fields(self.quant_bits, self.quant_coarse_bits)   # the GPU code layout
        if self.softmax_scale is not None and not (
            math.isfinite(self.softmax_scale) and self.softmax_scale > 0
        ):
            raise ValueError(f"IndexConfig.softmax_scale must be finite and > 0, got "
                             f"{self.softmax_scale!r}")

    def validate_dims(self, head_dim: int) -> None:
        """Raise ValueError if this config cannot index keys of dimension ``head_dim``."""
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        if self.kind is IndexKind.BALLS and head_dim % self.num_subspaces:
            raise ValueError(f"num_subspaces={self.num_subspaces} must divide head_dim={head_dim}")
        if self.kind is IndexKind.QUANT and (head_dim % self.quant_group or head_dim % 8):
            raise ValueError(f"quant_group={self.quant_group} and 8 must divide "
                             f"head_dim={head_dim}")
        if self.kind is IndexKind.QUANT and head_dim > 512:
            raise ValueError(f"QUANT indexes head dims up to 512 (the slack's proof), got "
                             f"{head_dim}")
        if self.backend == "triton" and (head_dim < 32 or head_dim & (head_dim - 1)):
            raise ValueError(f"the Triton backend needs a power-of-two head dim in [32, 512], "
                             f"got {head_dim}")

    def triton_supports(self, head_dim: int) -> bool:
        """Whether the Triton kernels implement this configuration for keys of dimension
        ``head_dim`` (QUANT, their code layouts, a power-of-two head dim in [32, 512])."""
        if self.kind is not IndexKind.QUANT:
            return False
        try:
            replace(self, backend="triton").validate_dims(head_dim)
        except ValueError:
            return False
        return True

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale used for keys of dimension ``head_dim``."""
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim)
