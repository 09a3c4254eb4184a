"""Plain data types of the SDK: session geometry, session info, results and batch items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from louver_client.errors import invalid_argument
from louver_kernels.config import IndexConfig
from louver_kernels.index import AttendOutput
from louver_kernels.threshold import Policy
from louver_proto import codec

if TYPE_CHECKING:
    from louver_client.session import SessionLike

__all__ = ["AppendResult", "AttendItem", "AttendOutput", "Geometry", "SessionInfo",
           "STORAGE_DTYPES"]

#: dtypes a session may store its K/V in.
STORAGE_DTYPES: tuple[torch.dtype, ...] = codec.FLOAT_DTYPES


@dataclass(frozen=True)
class Geometry:
    """Geometry of the model whose KV cache a session holds.

    Attributes:
        num_layers: layers (> 0).
        num_q_heads: query heads Hq (a multiple of num_kv_heads).
        num_kv_heads: key/value heads Hkv (> 0).
        head_dim: query/key dimension D (> 0).
        value_dim: value dimension Dv; None means head_dim (resolved on construction).
        dtype: storage dtype of K/V: torch.float16, torch.bfloat16 or torch.float32.

    Raises LouverError(INVALID_ARGUMENT) when a field is out of range.
    """

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int | None = None
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.value_dim is None or self.value_dim == 0:
            object.__setattr__(self, "value_dim", self.head_dim)
        problem = codec.geometry_problem(
            {name: getattr(self, name) for name in codec.GEOMETRY_SIZES}, self.dtype)
        if problem:
            raise invalid_argument(problem)

    @property
    def dv(self) -> int:
        """The resolved value dimension Dv."""
        assert self.value_dim is not None  # resolved in __post_init__
        return self.value_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA: query head h reads KV head h // group_size)."""
        return self.num_q_heads // self.num_kv_heads

    def token_bytes(self) -> int:
        """Bytes of K and V of one token of one layer in the storage dtype."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return self.num_kv_heads * (self.head_dim + self.dv) * item


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of a session's state.

    Attributes:
        session_id: the session's id.
        geometry: its model geometry.
        index: index parameters as resolved (defaults filled in).
        default_policy: the policy used when a call names none (None: the server default).
        layer_tokens: tokens stored per layer (len == geometry.num_layers).
        kv_bytes: bytes of K/V held.
        index_bytes: bytes of index structures held.
        created_unix_s: creation time (seconds since the epoch).
        last_used_unix_s: time of the last call that used it.
    """

    session_id: str
    geometry: Geometry
    index: IndexConfig
    default_policy: Policy | None
    layer_tokens: tuple[int, ...]
    kv_bytes: int
    index_bytes: int
    created_unix_s: float
    last_used_unix_s: float


@dataclass(frozen=True)
class AppendResult:
    """Outcome of one Append stream (a prefill or an append).

    Attributes:
        layer_tokens: tokens stored per layer after the stream.
        chunks_applied: chunks that added keys.
        chunks_skipped: chunks that repeated stored positions with identical contents.
    """

    layer_tokens: tuple[int, ...]
    chunks_applied: int
    chunks_skipped: int


@dataclass
class AttendItem:
    """One layer-step of one session, for batched calls (``attend_batch``, ``Decoder.step``).

    Attributes:
        session: the session (an object of the same client or transport), or a session id
            (remote only; the server then validates dtypes and shapes). None: the session a
            decoder was opened on.
        layer: the layer index.
        q: [Hq, D] float query of one token (float16, bfloat16 or float32).
        new_keys: optional [Hkv, T, D] keys appended at the layer's end before attending.
        new_values: optional [Hkv, T, Dv]; present iff new_keys is.
        policy: threshold policy; None: the session default.
        start: optional position the new keys start at; must equal the layer's length. None:
            the SDK fills in the length it tracks (a stale length fails with INVALID_ARGUMENT
            instead of appending twice).
    """

    session: SessionLike | str | None
    layer: int
    q: torch.Tensor
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None
    policy: Policy | None = None
    start: int | None = None
