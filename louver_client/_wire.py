"""Request building and response decoding shared by the sync and async clients.

Every tensor crosses through ``louver_proto.codec``; this module only assembles messages and
turns responses into SDK types. Nothing here performs I/O.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from louver_client.errors import LouverError, invalid_argument
from louver_client.session import Chunk, PreparedItem
from louver_client.types import AppendResult, AttendOutput, Geometry, SessionInfo
from louver_kernels.config import IndexConfig
from louver_kernels.threshold import Policy
from louver_proto import codec, pb

__all__ = ["RetryPolicy", "channel_options"]

_F32 = (torch.float32,)


# ---------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and jitter, for idempotent calls only.

    Attributes:
        max_attempts: attempts in all (1: no retry).
        initial_backoff_s: wait before the first retry.
        max_backoff_s: cap of one wait.
        multiplier: growth of the wait per attempt.
        jitter: +- fraction of random jitter on each wait.
        retryable: status codes worth retrying (the server was unavailable or draining).
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    @classmethod
    def of(cls, retries: int | RetryPolicy) -> RetryPolicy:
        """A policy from ``retries`` (an int: that many retries with default backoff)."""
        if isinstance(retries, RetryPolicy):
            return retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0 or a RetryPolicy, got {retries!r}")
        return cls(max_attempts=retries + 1)

    def next_delay(self, error: LouverError, attempt: int, idempotent: bool,
                   remaining_s: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        Args:
            error: the failure of attempt ``attempt`` (1-based).
            idempotent: whether the call may be repeated safely.
            remaining_s: time left before the call's overall deadline (None: no deadline).
        """
        if not idempotent or error.code not in self.retryable or attempt >= self.max_attempts:
            return None
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        delay = base * (1.0 + self.jitter * (2.0 * random.random() - 1.0))
        if remaining_s is not None and delay >= remaining_s:
            return None
        return max(0.0, delay)


def channel_options(max_message_bytes: int, keepalive_s: float | None,
                    extra: Sequence[tuple[str, object]] = ()) -> list[tuple[str, object]]:
    """gRPC channel options: message-size limits both ways, keepalive, then ``extra``."""
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # the SDK retries idempotent calls itself (gRPC's own retries buffer whole streams)
        ("grpc.enable_retries", 0),
    ]
    if keepalive_s is not None:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
    return options + list(extra)


# ---------------------------------------------------------------------------------- sessions


def index_config_to_proto(config: IndexConfig) -> pb.IndexParams:
    """Encode an IndexConfig; fields the wire cannot carry must keep their defaults
    (INVALID_ARGUMENT otherwise, rather than silently using the server's values)."""
    if not isinstance(config, IndexConfig):
        raise invalid_argument(f"index must be an IndexConfig, got {type(config).__name__}")
    msg = codec.index_config_to_proto(config)
    carried = codec.index_config_from_proto(msg, IndexConfig())
    lost = [f.name for f in dataclasses.fields(IndexConfig)
            if getattr(carried, f.name) != getattr(config, f.name)]
    if lost:
        raise invalid_argument(f"IndexConfig fields {lost} cannot be set on a remote session "
                               "(the server uses its own values)")
    return msg


def geometry_to_proto(g: Geometry) -> pb.ModelGeometry:
    """Encode a Geometry."""
    return pb.ModelGeometry(num_layers=g.num_layers, num_q_heads=g.num_q_heads,
                            num_kv_heads=g.num_kv_heads, head_dim=g.head_dim, value_dim=g.dv,
                            dtype=codec.dtype_to_proto(g.dtype))


def geometry_from_proto(m: pb.ModelGeometry) -> Geometry:
    """Decode a ModelGeometry."""
    return Geometry(m.num_layers, m.num_q_heads, m.num_kv_heads, m.head_dim,
                    m.value_dim or None, codec.dtype_from_proto(m.dtype, "geometry.dtype"))


def session_info_from_proto(m: pb.SessionInfo) -> SessionInfo:
    """Decode a SessionInfo message."""
    default_policy: Policy | None = codec.policy_from_proto(m.default_policy,
                                                            "session.default_policy")
    return SessionInfo(
        session_id=m.session_id,
        geometry=geometry_from_proto(m.geometry),
        index=codec.index_config_from_proto(m.index, IndexConfig(), "session.index"),
        default_policy=default_policy,
        layer_tokens=tuple(int(n) for n in m.layer_tokens),
        kv_bytes=int(m.kv_bytes),
        index_bytes=int(m.index_bytes),
        created_unix_s=float(m.created_unix_s),
        last_used_unix_s=float(m.last_used_unix_s),
    )


def create_request(geometry: Geometry, index: IndexConfig | None, default_policy: Policy | None,
                   session_id: str | None, expected_tokens: int) -> pb.CreateSessionRequest:
    """Build a CreateSessionRequest."""
    if isinstance(expected_tokens, bool) or not isinstance(expected_tokens, int) or (
            expected_tokens < 0):
        raise invalid_argument(f"expected_tokens must be an int >= 0, got {expected_tokens!r}")
    if session_id is not None and not isinstance(session_id, str):
        raise invalid_argument(f"session_id must be a str, got {type(session_id).__name__}")
    req = pb.CreateSessionRequest(geometry=geometry_to_proto(geometry),
                                  session_id=session_id or "", expected_tokens=expected_tokens)
    if index is not None:
        req.index.CopyFrom(index_config_to_proto(index))
    if default_policy is not None:
        req.default_policy.CopyFrom(codec.policy_to_proto(default_policy))
    return req


# ---------------------------------------------------------------------------------- data


def append_requests(session_id: str, chunks: Sequence[Chunk]) -> Iterator[pb.AppendRequest]:
    """AppendRequests for the chunks, encoded lazily (one chunk's bytes in memory at a time)."""
    for c in chunks:
        yield append_request(session_id, c)


def append_request(session_id: str, c: Chunk) -> pb.AppendRequest:
    """One AppendRequest for a chunk."""
    return pb.AppendRequest(session_id=session_id, layer=c.layer, start=c.start,
                            keys=codec.tensor_to_proto(c.keys),
                            values=codec.tensor_to_proto(c.values))


def append_result_from_proto(m: pb.AppendResponse) -> AppendResult:
    """Decode an AppendResponse."""
    return AppendResult(tuple(int(n) for n in m.layer_tokens), int(m.chunks_applied),
                        int(m.chunks_skipped))


def attend_request(items: Sequence[PreparedItem]) -> pb.AttendRequest:
    """An AttendRequest for validated items."""
    out = pb.AttendRequest()
    for it in items:
        msg = out.items.add(session_id=it.session_id, layer=it.layer)
        msg.q.CopyFrom(codec.tensor_to_proto(it.q))
        if it.new_keys is not None and it.new_values is not None:
            msg.new_keys.CopyFrom(codec.tensor_to_proto(it.new_keys))
            msg.new_values.CopyFrom(codec.tensor_to_proto(it.new_values))
        if it.policy is not None:
            msg.policy.CopyFrom(codec.policy_to_proto(it.policy))
        if it.start is not None:
            msg.start = it.start
    return out


def attend_outputs(items: Sequence[PreparedItem], m: pb.AttendResponse) -> list[AttendOutput]:
    """Decode an AttendResponse for ``items`` and update the item sessions' tracked lengths.

    Returns one AttendOutput per item: output float32 [Hq, Dv], lse/tau/dropped_mass_bound
    float32 [Hq], num_candidates/num_attended int64 [Hq] (CPU tensors).
    """
    if len(m.results) != len(items):
        raise LouverError(grpc.StatusCode.INTERNAL, f"server answered {len(m.results)} results "
                                                    f"for {len(items)} items")
    outs = []
    for it, r in zip(items, m.results, strict=True):
        hq = it.q.shape[0]
        try:
            output = codec.tensor_from_proto(r.output, "output", dtypes=_F32, shape=(hq, None),
                                             finite=False)
            lse = codec.tensor_from_proto(r.lse, "lse", dtypes=_F32, shape=(hq,), finite=False)
        except ValueError as exc:
            raise LouverError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}") from None
        s = r.stats
        if not (len(s.tau) == len(s.num_candidates) == len(s.num_attended)
                == len(s.dropped_mass_bound) == hq):
            raise LouverError(grpc.StatusCode.INTERNAL, "malformed response: stats of length "
                                                        f"!= Hq={hq}")
        outs.append(AttendOutput(
            output=output,
            lse=lse,
            tau=torch.tensor(list(s.tau), dtype=torch.float32),
            num_candidates=torch.tensor(list(s.num_candidates), dtype=torch.int64),
            num_attended=torch.tensor(list(s.num_attended), dtype=torch.int64),
            dropped_mass_bound=torch.tensor(list(s.dropped_mass_bound), dtype=torch.float32),
        ))
        if it.session is not None and s.num_keys:
            it.session._note_tokens(it.layer, int(s.num_keys))
    return outs


def search_request(session_id: str, layer: int, q: torch.Tensor,
                   tau: torch.Tensor) -> pb.SearchRequest:
    """A SearchRequest; q [Hq, D] float, tau float32 [Hq]."""
    return pb.SearchRequest(session_id=session_id, layer=layer, q=codec.tensor_to_proto(q),
                            tau=[float(x) for x in tau.tolist()])


def search_candidates(m: pb.SearchResponse, num_q_heads: int) -> list[torch.Tensor]:
    """Decode a SearchResponse into Hq int64 tensors of positions."""
    try:
        positions = codec.tensor_from_proto(m.positions, "positions", dtypes=(torch.int64,),
                                            shape=(None,))
    except ValueError as exc:
        raise LouverError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}") from None
    offsets = [int(o) for o in m.offsets]
    if len(offsets) != num_q_heads + 1 or offsets[0] != 0 or offsets[-1] != positions.numel() \
            or any(a > b for a, b in zip(offsets, offsets[1:], strict=False)):
        raise LouverError(grpc.StatusCode.INTERNAL, f"malformed response: offsets {offsets[:4]}"
                                                    f"... for {positions.numel()} positions")
    return [positions[offsets[h]: offsets[h + 1]].clone() for h in range(num_q_heads)]


def remaining(deadline: float | None, now: float) -> float | None:
    """Seconds left before ``deadline`` (monotonic clock); None: no deadline.

    Raises LouverError(DEADLINE_EXCEEDED) when it has passed.
    """
    if deadline is None:
        return None
    left = deadline - now
    if left <= 0:
        raise LouverError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call")
    return left
