"""LocalSession: the session interface running louver_kernels in-process (no server, no wire).

Semantics follow the service: chunks of one Append stream (``prefill``, ``prefill_layers``,
``append``, an ``appender``) accumulate per layer and each touched layer's index is built (or
extended) when the stream ends; attention appends new keys at the layer's end first; errors are
LouverError with the status code the server uses for the same mistake.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import torch

from louver_client.errors import (
    LouverError,
    failed_precondition,
    invalid_argument,
    not_found,
    translate_errors,
)
from louver_client.session import (
    AppendBook,
    Appender,
    Chunk,
    Decoder,
    PreparedItem,
    Session,
    chunk_tokens_for,
)
from louver_client.types import AppendResult, AttendItem, AttendOutput, Geometry, SessionInfo
from louver_kernels.config import IndexConfig
from louver_kernels.index import LouverIndex
from louver_kernels.threshold import Policy, Relative

__all__ = ["DEFAULT_POLICY", "LocalSession"]

#: The policy a LocalSession uses when neither the call nor the session names one (the
#: server's default too).
DEFAULT_POLICY: Policy = Relative(1e-3)
# LocalSession has no message limit; chunks are still planned as a client would send them so
# that chunk counts (applied / skipped) match a remote session's.
_NO_LIMIT = 1 << 40
# The kernels reject queries with larger entries (float32 scores must stay finite).
_MAX_Q_ABS = 2.0 ** 48


@dataclass
class _Layer:
    """One layer's state: the index over materialized keys plus chunks pending indexing."""

    index: LouverIndex | None = None
    pending_k: list[torch.Tensor] = field(default_factory=list)
    pending_v: list[torch.Tensor] = field(default_factory=list)
    pending_tokens: int = 0

    @property
    def num_keys(self) -> int:
        return (self.index.num_keys if self.index is not None else 0) + self.pending_tokens

    def stored(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys [Hkv, hi-lo, D] and values of positions [lo, hi) (hi <= num_keys)."""
        parts_k: list[torch.Tensor] = []
        parts_v: list[torch.Tensor] = []
        n_idx = self.index.num_keys if self.index is not None else 0
        if lo < n_idx and self.index is not None:
            k, v = self.index.keys_range(lo, min(hi, n_idx))
            parts_k.append(k)
            parts_v.append(v)
        pos = n_idx
        for k, v in zip(self.pending_k, self.pending_v, strict=True):
            t = k.shape[1]
            a, b = max(lo, pos), min(hi, pos + t)
            if a < b:
                parts_k.append(k[:, a - pos: b - pos])
                parts_v.append(v[:, a - pos: b - pos])
            pos += t
        return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)


class LocalSession(Session):
    """A session whose KV cache and indexes live in this process (louver_kernels).

    Args:
        num_layers, num_q_heads, num_kv_heads, head_dim: the model geometry (Hq a multiple
            of Hkv).
        value_dim: Dv (None: head_dim).
        dtype: K/V storage dtype (float16, bfloat16 or float32).
        index: index parameters (None: IndexConfig() defaults).
        default_policy: policy used when a call names none (None: DEFAULT_POLICY).
        session_id: a name for the session (None: a random one).
        device: where K/V and the indexes live (the kernels follow the tensors' device).

    Thread-safe: calls are serialized by a lock.
    """

    def __init__(self, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 value_dim: int | None = None, dtype: torch.dtype = torch.float16, *,
                 index: IndexConfig | None = None, default_policy: Policy | None = None,
                 session_id: str | None = None, device: str | torch.device = "cpu") -> None:
        self.geometry = Geometry(num_layers, num_q_heads, num_kv_heads, head_dim, value_dim,
                                 dtype)
        if index is not None and not isinstance(index, IndexConfig):
            raise invalid_argument(f"index must be an IndexConfig, got {type(index).__name__}")
        self.index_config = index or IndexConfig()
        with translate_errors():
            self.index_config.validate_dims(head_dim)
            self.device = torch.device(device)
        self.default_policy: Policy = self._check_policy(default_policy) or DEFAULT_POLICY
        self.session_id = session_id if session_id is not None else uuid.uuid4().hex
        self._layers = [_Layer() for _ in range(num_layers)]
        self._layer_tokens = [0] * num_layers
        self._lock = threading.RLock()
        self._deleted = False
        self.created_unix_s = _now()
        self.last_used_unix_s = self.created_unix_s

    # ------------------------------------------------------------------ internals

    def _live(self) -> None:
        if self._deleted:
            raise not_found(f"session {self.session_id!r} was deleted")
        self.last_used_unix_s = _now()

    def _apply_chunk(self, chunk: Chunk) -> bool:
        """Store one chunk at the layer's end (True), or recognise a repeat of stored positions
        with identical contents (False); INVALID_ARGUMENT on a gap, a partial overlap or
        differing contents (the server's rules)."""
        state = self._layers[chunk.layer]
        n = state.num_keys
        t = chunk.keys.shape[1]
        where = f"layer {chunk.layer}: chunk [{chunk.start}, {chunk.start + t})"
        if chunk.start > n:
            raise invalid_argument(f"{where} leaves a gap: the layer holds {n} tokens")
        if chunk.start < n:
            if chunk.start + t > n:
                raise invalid_argument(f"{where} partially overlaps the {n} stored tokens")
            k_old, v_old = state.stored(chunk.start, chunk.start + t)
            if not (torch.equal(k_old.cpu(), chunk.keys.cpu())
                    and torch.equal(v_old.cpu(), chunk.values.cpu())):
                raise invalid_argument(f"{where} differs from the stored tokens")
            return False
        if t == 0:
            return True
        k = chunk.keys.to(self.device)
        v = chunk.values.to(self.device)
        if not (bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())):
            raise invalid_argument(f"{where}: keys/values contain NaN or Inf (in the storage "
                                   f"dtype {self.dtype})")
        state.pending_k.append(k)
        state.pending_v.append(v)
        state.pending_tokens += t
        self._layer_tokens[chunk.layer] = state.num_keys
        return True

    def _materialize(self, layer: int) -> LouverIndex | None:
        """Build or extend ``layer``'s index with its pending chunks."""
        state = self._layers[layer]
        if state.pending_tokens:
            k = torch.cat(state.pending_k, dim=1)
            v = torch.cat(state.pending_v, dim=1)
            with translate_errors():
                if state.index is None:
                    state.index = LouverIndex.build(k, v, config=self.index_config)
                else:
                    state.index.append(k, v)
            state.pending_k.clear()
            state.pending_v.clear()
            state.pending_tokens = 0
        return state.index

    def _run_chunks(self, chunks: Sequence[Chunk]) -> AppendResult:
        applied = skipped = 0
        touched: set[int] = set()
        try:
            for chunk in chunks:
                if self._apply_chunk(chunk):
                    applied += 1
                    touched.add(chunk.layer)
                else:
                    skipped += 1
        finally:
            for layer in sorted(touched):  # the stream ended: index what was stored
                self._materialize(layer)
        return AppendResult(tuple(self._layer_tokens), applied, skipped)

    # ------------------------------------------------------------------ Session API

    def _append_items(self, items: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                      chunk_tokens: int | None) -> AppendResult:
        per_chunk = chunk_tokens_for(self.geometry, _NO_LIMIT, chunk_tokens)
        with self._lock:
            self._live()
            return self._run_chunks(self._plan_chunks(items, per_chunk))

    def appender(self, chunk_tokens: int | None = None) -> Appender:
        """An Appender storing chunks as they are added; indexes are built on finish."""
        return _LocalAppender(self, chunk_tokens_for(self.geometry, _NO_LIMIT, chunk_tokens))

    def _attend_items(self, items: list[AttendItem]) -> list[AttendOutput]:
        return _attend_local(items, self)

    def _attend_prepared(self, item: PreparedItem) -> AttendOutput:
        """Attend one validated item of this session (caller holds the lock)."""
        self._live()
        state = self._layers[item.layer]
        t = item.new_keys.shape[1] if item.new_keys is not None else 0
        n = state.num_keys
        if item.start is not None and item.start != n:
            raise invalid_argument(f"layer {item.layer}: new keys start at {item.start} but the "
                                   f"layer holds {n} tokens")
        if n + t == 0:
            raise failed_precondition(f"layer {item.layer} holds no keys yet")
        q = item.q.to(self.device)
        if not bool(torch.isfinite(q).all()) or float(q.abs().max()) > _MAX_Q_ABS:
            raise invalid_argument("q contains NaN, Inf or entries too large for float32 scores")
        policy = item.policy or self.default_policy
        index = self._materialize(item.layer)
        if item.new_keys is not None and item.new_values is not None:
            k = item.new_keys.to(self.device)
            v = item.new_values.to(self.device)
            with translate_errors():  # the kernels change nothing when validation fails
                if index is None:
                    index = LouverIndex.build(k, v, config=self.index_config)
                    state.index = index
                else:
                    index.append(k, v)
            self._layer_tokens[item.layer] = state.num_keys
        assert index is not None
        with translate_errors():
            return index.attend(q, policy)

    def search(self, layer: int, q: torch.Tensor,
               tau: torch.Tensor | float | Sequence[float]) -> list[torch.Tensor]:
        self._check_layer(layer)
        q = self._normalize_q(q)
        taus = self._normalize_tau(tau)
        with self._lock:
            self._live()
            index = self._materialize(layer)
            if index is None:
                return [torch.empty(0, dtype=torch.int64) for _ in range(self.num_q_heads)]
            with translate_errors():
                result = index.search(q.to(self.device), taus.to(self.device))
                return [result.candidates(h) for h in range(self.num_q_heads)]

    def decoder(self) -> Decoder:
        """A Decoder calling the kernels directly (no stream)."""
        return _LocalDecoder(self)

    def info(self) -> SessionInfo:
        with self._lock:
            self._live()
            kv = index_bytes = 0
            for state in self._layers:
                if state.index is not None:
                    kv += state.index.kv_bytes
                    index_bytes += state.index.index_bytes
                kv += state.pending_tokens * self.geometry.token_bytes()
            return SessionInfo(self.session_id, self.geometry, self.index_config,
                               self.default_policy, tuple(self._layer_tokens), kv, index_bytes,
                               self.created_unix_s, self.last_used_unix_s)

    def delete(self) -> int:
        with self._lock:
            if self._deleted:
                return 0
            freed = self.info()
            self._layers = [_Layer() for _ in range(self.num_layers)]
            self._deleted = True
            return freed.kv_bytes + freed.index_bytes

    def index(self, layer: int) -> LouverIndex | None:
        """The kernels' index of ``layer`` (building it from pending chunks); None if empty."""
        self._check_layer(layer)
        with self._lock:
            self._live()
            return self._materialize(layer)


def _now() -> float:
    return time.time()


def _attend_local(items: Sequence[AttendItem], default: LocalSession | None
                  ) -> list[AttendOutput]:
    """Attend a batch of items over LocalSessions: every item is validated before any runs."""
    prepared: list[PreparedItem] = []
    for it in items:
        target = it.session if it.session is not None else default
        if not isinstance(target, LocalSession):
            raise invalid_argument("a LocalSession batch item must name a LocalSession object, "
                                   f"got {type(target).__name__}")
        prepared.append(target._prepare(it))
    sessions = {id(p.session): p.session for p in prepared}
    for s in sessions.values():
        assert isinstance(s, LocalSession)
        s._lock.acquire()
    try:
        out = []
        for p in prepared:
            assert isinstance(p.session, LocalSession)
            out.append(p.session._attend_prepared(p))
        return out
    finally:
        for s in sessions.values():
            assert isinstance(s, LocalSession)
            s._lock.release()


class _LocalDecoder(Decoder):
    def __init__(self, session: LocalSession) -> None:
        super().__init__(session)
        self._closed = False

    def _step(self, items: list[AttendItem]) -> list[AttendOutput]:
        if self._closed:
            raise LouverError(grpc.StatusCode.CANCELLED, "decoder is closed")
        return _attend_local(items, None)

    def close(self) -> None:
        self._closed = True


class _LocalAppender(Appender):
    """Stores each added chunk at once; touched layers are indexed when it finishes."""

    def __init__(self, session: LocalSession, chunk_tokens: int) -> None:
        self._session = session
        self._book = AppendBook(session, chunk_tokens)
        self._applied = self._skipped = 0
        self._touched: set[int] = set()
        self._done = False

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
            start: int | None = None) -> None:
        s = self._session
        if self._done:
            raise invalid_argument("appender already finished")
        with s._lock:
            s._live()
            for chunk in self._book.plan(layer, keys, values, start):
                if s._apply_chunk(chunk):
                    self._applied += 1
                    self._touched.add(layer)
                else:
                    self._skipped += 1
            self._book.chunks.clear()  # stored: nothing to replay

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        s = self._session
        with s._lock:
            for layer in sorted(self._touched):
                s._materialize(layer)

    def finish(self) -> AppendResult:
        self._end()
        self.result = AppendResult(tuple(self._session._layer_tokens), self._applied,
                                   self._skipped)
        return self.result

    def abort(self) -> None:
        self._end()
