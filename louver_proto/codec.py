"""The one place where tensors, policies and index parameters cross between torch and the wire.

Both the server and the SDK use these functions; nothing else builds or reads ``pb.Tensor``.
Decoding validates everything it can see in the message (dtype, shape, byte length, finiteness)
and raises :class:`CodecError` (a ValueError) naming the offending field.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import torch

from louver_kernels.config import IndexConfig, IndexKind
from louver_kernels.threshold import Dense, Fixed, Mass, Policy, Relative, TopK
from louver_proto import pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("louver_proto.codec assumes a little-endian host")


class CodecError(ValueError):
    """A message field cannot be decoded into a valid value."""


_TO_PB: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
}
_FROM_PB: dict[int, torch.dtype] = {int(v): k for k, v in _TO_PB.items()}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GEOMETRY_SIZES = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "value_dim")


def geometry_problem(sizes: Mapping[str, object], dtype: torch.dtype,
                     limits: Mapping[str, int] | None = None) -> str | None:
    """Why a model geometry is invalid, as a message naming the field, or None: every size of
    GEOMETRY_SIZES an integer >= 1 (and <= its limit, when limits are given), num_q_heads a
    multiple of num_kv_heads, the K/V dtype one of FLOAT_DTYPES. The one rule set of the SDK
    and the server (each raises its own error type with the message)."""
    for name in GEOMETRY_SIZES:
        value = sizes[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"geometry.{name} must be an integer >= 1, got {value!r}"
        if limits is not None and value > limits[name]:
            return f"geometry.{name} must be in [1, {limits[name]}], got {value}"
    q, kv = sizes["num_q_heads"], sizes["num_kv_heads"]
    assert isinstance(q, int) and isinstance(kv, int)  # checked above
    if q % kv:
        return f"geometry.num_q_heads={q} must be a multiple of num_kv_heads={kv}"
    if dtype not in FLOAT_DTYPES:
        return f"geometry.dtype must be float16, bfloat16 or float32, got {dtype}"
    return None


def dtype_to_proto(dtype: torch.dtype) -> pb.DType:
    """The wire enum of a torch dtype; CodecError for unsupported dtypes."""
    try:
        return _TO_PB[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} is not supported on the wire") from None


def dtype_from_proto(value: pb.DType | int, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a wire enum value; CodecError if unspecified or unknown."""
    try:
        return _FROM_PB[int(value)]
    except KeyError:
        raise CodecError(f"{field}: unsupported or unspecified dtype enum {value}") from None


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encode a tensor (any device) as raw little-endian row-major bytes."""
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=dtype_to_proto(t.dtype), shape=list(t.shape), data=data)


def tensor_from_proto(
    msg: pb.Tensor,
    field: str,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
    max_elements: int | None = None,
) -> torch.Tensor:
    """Decode a tensor message into a CPU tensor, validating it.

    Args:
        msg: the message.
        field: the field's name, used in error messages.
        dtypes: accepted dtypes (None: any wire dtype).
        shape: expected shape; None entries match any size (None: any shape).
        finite: reject NaN and Inf in floating tensors.
        max_elements: reject tensors with more elements.
    """
    dtype = dtype_from_proto(msg.dtype, f"{field}.dtype")
    if dtypes is not None and dtype not in dtypes:
        raise CodecError(f"{field}: dtype {dtype} not accepted here; expected one of "
                         f"{[str(d) for d in dtypes]}")
    dims = list(msg.shape)
    if any(d < 0 for d in dims):
        raise CodecError(f"{field}: negative dimension in shape {dims}")
    if shape is not None:
        if len(dims) != len(shape) or any(
                e is not None and e != d for e, d in zip(shape, dims, strict=True)):
            want = ["*" if e is None else e for e in shape]
            raise CodecError(f"{field}: shape {dims} does not match expected {want}")
    numel = math.prod(dims)
    if max_elements is not None and numel > max_elements:
        raise CodecError(f"{field}: {numel} elements exceed the limit {max_elements}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise CodecError(f"{field}: {len(msg.data)} bytes do not match shape {dims} of {dtype} "
                         f"({numel * itemsize} bytes expected)")
    if numel == 0:
        return torch.empty(dims, dtype=dtype)
    t = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(dims)
    if finite and dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
        raise CodecError(f"{field}: contains NaN or Inf")
    return t


def policy_to_proto(policy: Policy) -> pb.ThresholdPolicy:
    """Encode a threshold policy."""
    if isinstance(policy, Fixed):
        taus = torch.as_tensor(policy.tau, dtype=torch.float32).reshape(-1).tolist()
        return pb.ThresholdPolicy(fixed=pb.FixedPolicy(tau=taus))
    if isinstance(policy, Relative):
        return pb.ThresholdPolicy(relative=pb.RelativePolicy(eps=policy.eps))
    if isinstance(policy, TopK):
        return pb.ThresholdPolicy(topk=pb.TopKPolicy(k=policy.k))
    if isinstance(policy, Mass):
        return pb.ThresholdPolicy(mass=pb.MassPolicy(delta=policy.delta))
    if isinstance(policy, Dense):
        return pb.ThresholdPolicy(dense=pb.DensePolicy())
    raise CodecError(f"unknown policy {policy!r}")


def policy_from_proto(msg: pb.ThresholdPolicy, field: str = "policy") -> Policy | None:
    """Decode a policy; None when unset. CodecError when its parameters are out of range."""
    which = msg.WhichOneof("policy")
    try:
        if which is None:
            return None
        if which == "fixed":
            return Fixed(tuple(msg.fixed.tau))
        if which == "relative":
            return Relative(msg.relative.eps)
        if which == "topk":
            return TopK(int(msg.topk.k))
        if which == "mass":
            return Mass(msg.mass.delta)
        if which == "dense":
            return Dense()
    except ValueError as exc:
        raise CodecError(f"{field}: {exc}") from None
    raise CodecError(f"{field}: unknown policy {which!r}")  # pragma: no cover


_KIND_TO_PB: dict[IndexKind, pb.IndexKind] = {IndexKind.BALLS: pb.INDEX_KIND_BALLS,
                                              IndexKind.QUANT: pb.INDEX_KIND_QUANT}
_KIND_FROM_PB: dict[int, IndexKind] = {int(v): k for k, v in _KIND_TO_PB.items()}


def index_config_to_proto(config: IndexConfig) -> pb.IndexParams:
    """Encode the wire-visible part of an IndexConfig."""
    return pb.IndexParams(kind=_KIND_TO_PB[config.kind], num_subspaces=config.num_subspaces,
                          cluster_size=config.cluster_size, buffer_size=config.buffer_size,
                          quant_bits=config.quant_bits, quant_group=config.quant_group,
                          quant_coarse_bits=config.quant_coarse_bits)


def index_config_from_proto(msg: pb.IndexParams, default: IndexConfig,
                            field: str = "index") -> IndexConfig:
    """Resolve wire index parameters against ``default`` (zero fields take the default)."""
    if msg.kind not in (pb.INDEX_KIND_UNSPECIFIED, *_KIND_FROM_PB):
        raise CodecError(f"{field}.kind: unknown index kind {msg.kind}")
    values = {
        "kind": _KIND_FROM_PB.get(msg.kind, default.kind),
        "num_subspaces": msg.num_subspaces or default.num_subspaces,
        "cluster_size": msg.cluster_size or default.cluster_size,
        "buffer_size": msg.buffer_size or default.buffer_size,
        "quant_bits": msg.quant_bits or default.quant_bits,
        "quant_group": msg.quant_group or default.quant_group,
        "quant_coarse_bits": msg.quant_coarse_bits or None,
        "sink_tokens": default.sink_tokens,
        "probe_recent": default.probe_recent,
        "softmax_scale": default.softmax_scale,
    }
    try:
        return IndexConfig(**values)
    except ValueError as exc:
        raise CodecError(f"{field}: {exc}") from None
