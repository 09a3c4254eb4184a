"""Sessions (one sequence's KV cache for every layer) and the store that owns them.

The store admits sessions against a per-device memory budget, charges every append before it is
applied (nothing is half-applied), returns the bytes on delete, and evicts idle sessions.

Accounting. A session's *need* is the sum over its layers of
``LouverIndex.estimate_bytes(..., layer_tokens)`` (K/V plus index records, at the capacity the
index allocates). Its *reservation* is max(need at create time for ``expected_tokens`` tokens per
layer, every need it has grown to, the bytes it actually holds). The reservations of all sessions
never exceed the budget; a create or append that would push them past it fails with
RESOURCE_EXHAUSTED and changes nothing.

Concurrency. Everything here runs on the server's event loop except the index work that the
engine hands to a worker thread while it holds the session's lock. Each session has an asyncio
lock: RPCs on one session serialize, other sessions proceed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from louver_kernels import Dense, Fixed, IndexConfig, LouverIndex, Policy, Relative
from louver_kernels.index import AttendOutput
from louver_proto import codec
from louver_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from louver_service.metrics import Metrics

if TYPE_CHECKING:   # triton is an optional dependency (the gpu extra)
    from louver_kernels.triton.decode import CapturedStep

logger = logging.getLogger(__name__)

SESSION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096


@dataclass(frozen=True)
class Geometry:
    """Shape of the model whose KV cache a session holds (validated on construction).

    Keys of one layer are [num_kv_heads, T, head_dim], values [num_kv_heads, T, value_dim],
    queries [num_q_heads, head_dim]; K/V are stored in ``dtype``.
    """

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        problem = codec.geometry_problem(
            {name: getattr(self, name) for name in codec.GEOMETRY_SIZES}, self.dtype,
            {"num_layers": MAX_LAYERS, "num_q_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS,
             "head_dim": MAX_HEAD_DIM, "value_dim": MAX_HEAD_DIM})
        if problem:
            raise InvalidArgument(problem)


@dataclass(frozen=True)
class SessionSpec:
    """What a CreateSession asks for, decoded and resolved against server defaults."""

    geometry: Geometry
    config: IndexConfig
    policy: Policy
    session_id: str = ""            # empty: generated
    expected_tokens: int = 0        # per layer; 0: judged on use


MAX_CAPTURED_STEPS = 4  # per layer: the policies a session's clients alternate between


def _step_key(policy: Policy, q: torch.Tensor) -> tuple[object, ...] | None:
    """What a captured step is specialized on; None for the policies it does not run."""
    if isinstance(policy, Relative):
        return ("relative", policy.eps, q.shape[0], q.dtype)
    if isinstance(policy, Dense):
        return ("dense", q.shape[0], q.dtype)
    if isinstance(policy, Fixed):          # one step for every threshold: set per call
        return ("fixed", q.shape[0], q.dtype)
    return None


class LayerState:
    """One layer of a session: prefill chunks not yet indexed, and the layer's index.

    Positions [0, index.num_keys) are in the index; the pending chunks follow in order. Pending
    chunks are indexed by :meth:`flush` (at the end of an Append stream, or before the layer is
    searched or attended).
    """

    def __init__(self) -> None:
        self.index: LouverIndex | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # ([Hkv,T,D], [Hkv,T,Dv])
        self._pending_tokens = 0
        self._pending_bytes = 0
        # captured decode steps of a Triton index, most recently used last
        self._steps: OrderedDict[tuple[object, ...], CapturedStep] = OrderedDict()

    @property
    def indexed_tokens(self) -> int:
        """Tokens held by the index (its recent buffer included)."""
        return self.index.num_keys if self.index is not None else 0

    @property
    def length(self) -> int:
        """Tokens stored in this layer (indexed + pending)."""
        return self.indexed_tokens + self._pending_tokens

    @property
    def kv_bytes(self) -> int:
        """Bytes of K/V held (the index's allocation plus pending chunks)."""
        held = self.index.kv_bytes if self.index is not None else 0
        return held + self._pending_bytes

    @property
    def index_bytes(self) -> int:
        """Bytes of index records held, plus the buffers of the captured decode steps."""
        held = self.index.index_bytes if self.index is not None else 0
        return held + sum(step.scratch_bytes for step in self._steps.values())

    def attend(self, q: torch.Tensor, policy: Policy, fallback: bool = False) -> AttendOutput:
        """The decode step for q [Hq, D] (q already validated), on the host or the index's
        device: a host query is copied to the device once (straight into a captured step's
        input, no device copy besides).

        A Triton index runs Relative, Dense and Fixed steps through a CapturedStep kept per
        (policy, Hq, q dtype; one for every Fixed threshold, set per call): on a GPU one graph
        replay instead of three kernel launches and their host-side checks. The step
        re-captures itself when the index grows; at most MAX_CAPTURED_STEPS are kept per layer
        (least recently used dropped). ``fallback``: a Relative step also runs the layer's
        dense step where that measures faster (CapturedStep's dense fallback). Other policies
        and the torch backend take the index's own attend.
        """
        index = self.index
        if index is None:
            raise FailedPrecondition("the layer holds no keys")
        key = _step_key(policy, q)
        if not index.uses_triton or key is None:
            return index.attend(q, policy, validate=False)
        step = self._steps.pop(key, None)
        if step is None:
            from louver_kernels.triton.decode import CapturedStep

            step = CapturedStep(index, policy, q.shape[0], q_dtype=q.dtype,
                                fallback=fallback and isinstance(policy, Relative))
        self._steps[key] = step
        while len(self._steps) > MAX_CAPTURED_STEPS:
            self._steps.popitem(last=False)
        return step(q, policy if isinstance(policy, Fixed) else None)

    def stored(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys [Hkv, end-start, D] and values [Hkv, end-start, Dv] of positions
        [start, end), with 0 <= start <= end <= length."""
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        split = self.indexed_tokens
        if self.index is not None and start < split:
            parts.append(self.index.keys_range(start, min(end, split)))
        offset = split
        for k, v in self._pending:
            lo, hi = max(start, offset), min(end, offset + k.shape[1])
            if lo < hi:
                parts.append((k[:, lo - offset: hi - offset], v[:, lo - offset: hi - offset]))
            offset += k.shape[1]
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1))

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Queue keys [Hkv, T, D] and values [Hkv, T, Dv] (on the session device) at the end."""
        if keys.shape[1] == 0:
            return
        self._pending.append((keys, values))
        self._pending_tokens += keys.shape[1]
        self._pending_bytes += keys.nbytes + values.nbytes

    def flush(self, config: IndexConfig) -> None:
        """Index every pending chunk: build the index if the layer has none, else append.

        Runs torch work (possibly long: a prefill build); callers may run it in a thread while
        holding the session's lock. The chunks' values were checked while decoding the request;
        the index checks shapes before it changes anything, so on an error the layer is as it
        was (its chunks still pending).
        """
        if not self._pending:
            return
        if len(self._pending) == 1:
            keys, values = self._pending[0]
        else:
            keys = torch.cat([k for k, _ in self._pending], dim=1)
            values = torch.cat([v for _, v in self._pending], dim=1)
        self._index(keys, values, config)
        self._pending.clear()
        self._pending_tokens = 0
        self._pending_bytes = 0

    def extend(self, keys: torch.Tensor, values: torch.Tensor, config: IndexConfig) -> None:
        """Flush, then index keys [Hkv, T, D] and values [Hkv, T, Dv] right away (decode-time
        appends). Either the keys are stored or, on an error, the layer is unchanged by them."""
        self.flush(config)
        self._index(keys, values, config)

    def _index(self, keys: torch.Tensor, values: torch.Tensor, config: IndexConfig) -> None:
        if self.index is None:
            self.index = LouverIndex.build(keys, values, config=config)
        else:
            # values were checked while decoding the request: no second check, no host sync
            self.index.append(keys, values, validate=False)

    @property
    def has_pending(self) -> bool:
        """Whether chunks wait to be indexed."""
        return bool(self._pending)


class Session:
    """The KV cache of one sequence for every layer of one model.

    Attributes:
        id: the session id. geometry / config / policy: as resolved at create time.
        device: where the K/V and index tensors live.
        layers: per-layer state (length ``geometry.num_layers``).
        lock: serializes the RPCs that touch this session.
        reserved_bytes: bytes charged against the store's budget.
    """

    def __init__(self, session_id: str, spec: SessionSpec, device: torch.device) -> None:
        self.id = session_id
        self.geometry = spec.geometry
        self.config = spec.config
        self.policy = spec.policy
        self.device = device
        self.created_unix_s = time.time()
        self.last_used_unix_s = self.created_unix_s
        self._last_used_monotonic = time.monotonic()
        self.layers = [LayerState() for _ in range(spec.geometry.num_layers)]
        self.lock = asyncio.Lock()
        self.closed = False
        self.reserved_bytes = 0
        self.kv_bytes = 0
        self.index_bytes = 0
        n = spec.geometry.num_layers
        self._layer_bytes = [(0, 0)] * n          # (kv, index) bytes as last accounted
        self._layer_need = [(-1, 0)] * n          # (tokens, estimate_bytes(tokens)) cache

    def touch(self) -> None:
        """Record a use (idle eviction counts from the last one)."""
        self.last_used_unix_s = time.time()
        self._last_used_monotonic = time.monotonic()

    def idle_s(self, now_monotonic: float) -> float:
        """Seconds since the last use."""
        return now_monotonic - self._last_used_monotonic

    def layer(self, index: int, field: str = "layer") -> LayerState:
        """The state of layer ``index``; InvalidArgument when out of range."""
        if not 0 <= index < len(self.layers):
            raise InvalidArgument(f"{field}: layer {index} out of range [0, {len(self.layers)})")
        return self.layers[index]

    @property
    def layer_tokens(self) -> list[int]:
        """Tokens stored per layer."""
        return [layer.length for layer in self.layers]

    def estimate_bytes(self, tokens: int) -> int:
        """Bytes one layer of this session needs to hold ``tokens`` tokens."""
        g = self.geometry
        return LouverIndex.estimate_bytes(g.num_kv_heads, g.head_dim, g.value_dim, g.dtype,
                                          tokens, self.config)

    def need_bytes(self, extra_tokens: Mapping[int, int] | None = None) -> int:
        """Bytes needed once ``extra_tokens[layer]`` more tokens are stored in each layer."""
        extra = extra_tokens or {}
        total = 0
        for i, layer in enumerate(self.layers):
            tokens = layer.length + extra.get(i, 0)
            cached_tokens, nbytes = self._layer_need[i]
            if cached_tokens != tokens:
                nbytes = self.estimate_bytes(tokens)
                self._layer_need[i] = (tokens, nbytes)
            total += nbytes
        return total

    def refresh_bytes(self, layers: Iterable[int] | None = None) -> tuple[int, int]:
        """Re-read the bytes held by the given layers (all when None) into kv_bytes and
        index_bytes; returns their change (kv, index)."""
        d_kv = d_index = 0
        for i in range(len(self.layers)) if layers is None else layers:
            layer = self.layers[i]
            kv, index = layer.kv_bytes, layer.index_bytes
            old_kv, old_index = self._layer_bytes[i]
            self._layer_bytes[i] = (kv, index)
            d_kv += kv - old_kv
            d_index += index - old_index
        self.kv_bytes += d_kv
        self.index_bytes += d_index
        return d_kv, d_index


@dataclass
class _Totals:
    """Running totals over every session (plain ints: read by the metrics thread)."""

    reserved_bytes: int = 0
    kv_bytes: int = 0
    index_bytes: int = 0
    sessions: int = 0


class SessionStore:
    """Owns every session on one device: admission, accounting, lookup, deletion, eviction.

    Args:
        device: where sessions' tensors live.
        budget_bytes: bytes of reservations all sessions together may hold.
        max_sessions: sessions held at once.
        session_ttl_s: idle seconds before eviction (0: never).
        metrics: where evictions are counted.
    """

    def __init__(self, device: torch.device, budget_bytes: int, max_sessions: int,
                 session_ttl_s: float, metrics: Metrics) -> None:
        self.device = device
        self.budget_bytes = budget_bytes
        self.max_sessions = max_sessions
        self.session_ttl_s = session_ttl_s
        self._metrics = metrics
        self._t = _Totals()
        self._by_id: dict[str, Session] = {}

    # ------------------------------------------------------------------ totals

    @property
    def reserved_bytes(self) -> int:
        """Bytes charged against the budget by all sessions."""
        return self._t.reserved_bytes

    @property
    def kv_bytes(self) -> int:
        """Bytes of K/V held by all sessions."""
        return self._t.kv_bytes

    @property
    def index_bytes(self) -> int:
        """Bytes of index records held by all sessions."""
        return self._t.index_bytes

    @property
    def num_sessions(self) -> int:
        """Sessions held."""
        return self._t.sessions

    @property
    def available_bytes(self) -> int:
        """Budget not yet charged."""
        return max(0, self.budget_bytes - self._t.reserved_bytes)

    # ------------------------------------------------------------------ lifecycle

    def create(self, spec: SessionSpec) -> Session:
        """Admit a new session, reserving the bytes of ``spec.expected_tokens`` per layer.

        Raises AlreadyExists (id taken), InvalidArgument (bad id) or ResourceExhausted (budget
        or max_sessions).
        """
        session_id = spec.session_id or uuid.uuid4().hex
        if not SESSION_ID_RE.fullmatch(session_id):
            raise InvalidArgument(f"session_id {session_id[:140]!r} must match "
                                  f"{SESSION_ID_RE.pattern}")
        if session_id in self._by_id:
            raise AlreadyExists(f"session {session_id!r} already exists")
        if self._t.sessions >= self.max_sessions:
            raise ResourceExhausted(f"the server holds max_sessions={self.max_sessions} sessions")
        session = Session(session_id, spec, self.device)
        need = session.geometry.num_layers * session.estimate_bytes(spec.expected_tokens)
        self._check_budget(need, f"creating session {session_id!r}")
        session.reserved_bytes = need
        self._t.reserved_bytes += need
        self._by_id[session_id] = session
        self._t.sessions += 1
        logger.debug("created session %s (%d bytes reserved)", session_id, need)
        return session

    def get(self, session_id: str) -> Session:
        """The session with this id; NotFound otherwise."""
        session = self._by_id.get(session_id)
        if session is None:
            raise NotFound(f"session {session_id[:140]!r} not found")
        return session

    def list(self) -> list[Session]:
        """Every session, in creation order."""
        return list(self._by_id.values())

    async def delete(self, session_id: str) -> int:
        """Delete a session once its in-flight RPC (if any) ends; returns the bytes freed."""
        session = self.get(session_id)
        async with session.lock:
            if session.closed:
                raise NotFound(f"session {session_id[:140]!r} not found")
            return self._remove(session)

    def _remove(self, session: Session) -> int:
        """Drop a session that no RPC holds and return its reservation to the budget."""
        session.closed = True
        del self._by_id[session.id]
        self._t.sessions -= 1
        self._t.reserved_bytes -= session.reserved_bytes
        self._t.kv_bytes -= session.kv_bytes
        self._t.index_bytes -= session.index_bytes
        freed = session.reserved_bytes
        session.layers = []
        return freed

    def evict_idle(self) -> int:
        """Delete sessions idle for more than session_ttl_s that no RPC holds; returns how many.
        Runs on the event loop without awaiting, so no RPC can start on them meanwhile."""
        if self.session_ttl_s <= 0:
            return 0
        now = time.monotonic()
        idle = [s for s in self._by_id.values()
                if s.idle_s(now) > self.session_ttl_s and not s.lock.locked()]
        for session in idle:
            self._remove(session)
            logger.info("evicted idle session %s", session.id)
        self._metrics.sessions_evicted.inc(len(idle))
        return len(idle)

    async def run_evictor(self, interval_s: float) -> None:
        """Evict idle sessions every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.evict_idle()
            except Exception:  # never let the sweeper die
                logger.exception("idle eviction failed")

    # ------------------------------------------------------------------ holding and charging

    @asynccontextmanager
    async def hold(self, sessions: Iterable[Session]) -> AsyncIterator[None]:
        """Lock every given session (in a global order, so concurrent holders cannot deadlock),
        check none was deleted meanwhile, and mark them used on exit."""
        ordered = sorted({id(s): s for s in sessions}.values(), key=lambda s: s.id)
        async with AsyncExitStack() as stack:
            for session in ordered:
                await stack.enter_async_context(session.lock)
                if session.closed:
                    raise NotFound(f"session {session.id!r} not found (deleted)")
            try:
                yield
            finally:
                for session in ordered:
                    session.touch()

    def charge(self, growth: Mapping[Session, Mapping[int, int]]) -> None:
        """Reserve the bytes for storing ``growth[session][layer]`` more tokens, for several
        sessions at once: either every reservation is made or none (ResourceExhausted)."""
        extra = {s: max(0, s.need_bytes(layers) - s.reserved_bytes) for s, layers in
                 growth.items()}
        total = sum(extra.values())
        if total == 0:
            return
        self._check_budget(total, "appending tokens")
        for session, nbytes in extra.items():
            session.reserved_bytes += nbytes
        self._t.reserved_bytes += total

    def reconcile(self, session: Session, layers: Iterable[int] | None = None) -> None:
        """Account the bytes a session's layers hold after a mutation (only ``layers`` when
        given). A reservation below what is actually held grows to it (the budget is then
        exceeded by at most the estimate's error, and later admissions see it)."""
        if session.closed:
            return
        d_kv, d_index = session.refresh_bytes(layers)
        self._t.kv_bytes += d_kv
        self._t.index_bytes += d_index
        held = session.kv_bytes + session.index_bytes
        if held > session.reserved_bytes:
            self._t.reserved_bytes += held - session.reserved_bytes
            session.reserved_bytes = held

    def _check_budget(self, requested: int, what: str) -> None:
        available = self.budget_bytes - self._t.reserved_bytes
        if requested > available:
            raise ResourceExhausted(f"memory budget exceeded {what}",
                                    requested_bytes=requested,
                                    available_bytes=max(0, available),
                                    budget_bytes=self.budget_bytes)
