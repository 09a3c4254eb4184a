"""The session interface shared by remote sessions (gRPC) and the in-process LocalSession.

A session holds the KV cache of one sequence for every layer of one model. Shapes, per layer:

    keys    [Hkv, T, D]    values [Hkv, T, Dv]    (converted to the session's storage dtype)
    q       [Hq, D]        one query token; float16, bfloat16 or float32 (kept as given)

Positions are absolute (prefill first, then decode-time appends). Every method raises
:class:`~louver_client.errors.LouverError` with the server's status code on failure; inputs
are validated against the geometry before anything is sent or stored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeAlias, overload

import grpc
import torch

from louver_client.errors import LouverError, invalid_argument, translate_errors
from louver_client.types import AppendResult, AttendItem, AttendOutput, Geometry, SessionInfo
from louver_kernels.threshold import Dense, Fixed, Mass, Policy, Relative, TopK

__all__ = ["AppendBook", "Appender", "Chunk", "Decoder", "DEFAULT_CHUNK_BYTES", "KVPerLayer",
           "PreparedItem", "Session", "SessionCore", "SessionLike", "chunk_tokens_for",
           "items_from_step_args"]

#: Target size of one Append chunk on the wire (keys + values), well under every usual
#: message limit (gRPC's default receive limit is 4 MiB).
DEFAULT_CHUNK_BYTES = 2 << 20
#: Bytes reserved in a message for everything but the tensor payload.
MESSAGE_OVERHEAD_BYTES = 16 << 10

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_POLICY_TYPES = (Fixed, Relative, TopK, Mass, Dense)

#: K/V of several layers: a sequence indexed by layer, or a mapping layer -> (keys, values).
KVPerLayer: TypeAlias = (Sequence[tuple[torch.Tensor, torch.Tensor]]
                         | Mapping[int, tuple[torch.Tensor, torch.Tensor]])


def chunk_tokens_for(geometry: Geometry, max_message_bytes: int,
                     chunk_tokens: int | None = None) -> int:
    """Tokens per Append chunk so that one chunk message stays under the message limit.

    Args:
        geometry: the session geometry (storage dtype and head sizes).
        max_message_bytes: the largest message the transport carries.
        chunk_tokens: requested tokens per chunk (None: about DEFAULT_CHUNK_BYTES per chunk).
    Returns:
        tokens per chunk (>= 1), never more than the message limit allows.
    Raises:
        LouverError(INVALID_ARGUMENT) if chunk_tokens < 1, RESOURCE_EXHAUSTED if even one token
        does not fit in a message.
    """
    per_token = geometry.token_bytes()
    room = max_message_bytes - MESSAGE_OVERHEAD_BYTES
    fit = room // per_token if room > 0 else 0
    if fit < 1:
        raise LouverError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"one token of K/V ({per_token} bytes) does not fit in a message of "
                          f"{max_message_bytes} bytes")
    if chunk_tokens is None:
        return max(1, min(fit, DEFAULT_CHUNK_BYTES // per_token))
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise invalid_argument(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    return min(chunk_tokens, fit)


@dataclass(frozen=True)
class Chunk:
    """One Append chunk: keys [Hkv, T, D] and values [Hkv, T, Dv] of ``layer`` at positions
    [start, start + T), already in the storage dtype."""

    layer: int
    start: int
    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class PreparedItem:
    """An AttendItem after validation: tensors checked and K/V in the storage dtype."""

    session_id: str
    session: SessionCore | None
    layer: int
    q: torch.Tensor
    new_keys: torch.Tensor | None
    new_values: torch.Tensor | None
    policy: Policy | None
    start: int | None


class SessionCore:
    """Geometry, tracked layer lengths and input validation shared by every session kind.

    Subclasses set ``session_id``, ``geometry`` and ``_layer_tokens`` (a list of per-layer
    token counts as last known: exact for LocalSession, tracked from responses for remote
    sessions).
    """

    session_id: str
    geometry: Geometry
    _layer_tokens: list[int]

    # ------------------------------------------------------------------ geometry

    @property
    def num_layers(self) -> int:
        """Layers of the model."""
        return self.geometry.num_layers

    @property
    def num_q_heads(self) -> int:
        """Query heads Hq."""
        return self.geometry.num_q_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads Hkv."""
        return self.geometry.num_kv_heads

    @property
    def head_dim(self) -> int:
        """Query/key dimension D."""
        return self.geometry.head_dim

    @property
    def value_dim(self) -> int:
        """Value dimension Dv."""
        return self.geometry.dv

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of K/V."""
        return self.geometry.dtype

    def layer_tokens(self, layer: int) -> int:
        """Tokens stored in ``layer`` as last known by this object (no call is made)."""
        return self._layer_tokens[self._check_layer(layer)]

    # ------------------------------------------------------------------ validation

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise invalid_argument(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.num_layers:
            raise invalid_argument(f"layer {layer} out of range [0, {self.num_layers})")
        return layer

    def _check_float(self, name: str, t: object) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise invalid_argument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise invalid_argument(f"{name}: dtype {t.dtype} not supported; expected float16, "
                                   "bfloat16 or float32")
        return t

    def _normalize_kv(self, keys: torch.Tensor, values: torch.Tensor,
                      prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Check keys [Hkv, T, D] / values [Hkv, T, Dv]; return them in the storage dtype."""
        k = self._check_float(f"{prefix}keys", keys)
        v = self._check_float(f"{prefix}values", values)
        hkv, d, dv = self.num_kv_heads, self.head_dim, self.value_dim
        if k.dim() != 3 or k.shape[0] != hkv or k.shape[2] != d:
            raise invalid_argument(f"{prefix}keys: shape {list(k.shape)} does not match "
                                   f"[Hkv={hkv}, T, D={d}]")
        if v.dim() != 3 or v.shape[0] != hkv or v.shape[2] != dv or v.shape[1] != k.shape[1]:
            raise invalid_argument(f"{prefix}values: shape {list(v.shape)} does not match "
                                   f"[Hkv={hkv}, T={k.shape[1]}, Dv={dv}]")
        return k.detach().to(self.dtype), v.detach().to(self.dtype)

    def _normalize_q(self, q: torch.Tensor) -> torch.Tensor:
        """Check q [Hq, D] (float); returned detached, dtype kept."""
        q = self._check_float("q", q)
        if q.dim() != 2 or tuple(q.shape) != (self.num_q_heads, self.head_dim):
            raise invalid_argument(f"q: shape {list(q.shape)} does not match "
                                   f"[Hq={self.num_q_heads}, D={self.head_dim}]")
        return q.detach()

    def _normalize_tau(self, tau: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
        """tau as float32 [Hq] on the CPU (one value is broadcast)."""
        try:
            t = torch.as_tensor(tau, dtype=torch.float32).detach().reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise invalid_argument(f"tau: {exc}") from None
        if t.numel() == 1:
            t = t.expand(self.num_q_heads).clone()
        if t.numel() != self.num_q_heads:
            raise invalid_argument(f"tau has {t.numel()} values; expected 1 or "
                                   f"Hq={self.num_q_heads}")
        if bool(torch.isnan(t).any()):
            raise invalid_argument("tau contains NaN")
        return t

    def _check_policy(self, policy: Policy | None) -> Policy | None:
        if policy is None:
            return None
        if not isinstance(policy, _POLICY_TYPES):
            raise invalid_argument(f"policy must be Fixed, Relative, TopK, Mass or Dense, got "
                                   f"{type(policy).__name__}")
        if isinstance(policy, Fixed):
            with translate_errors():
                policy.taus(self.num_q_heads)
        return policy

    def _check_start(self, start: int | None, name: str = "start") -> int | None:
        if start is None:
            return None
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise invalid_argument(f"{name} must be an integer >= 0, got {start!r}")
        return start

    def _kv_item(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                 start: int | None, default_start: int | None = None
                 ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """A validated (layer, start, keys, values) item; ``start`` None means
        ``default_start``, itself None meaning the layer's tracked length."""
        self._check_layer(layer)
        start_ = self._check_start(start)
        k, v = self._normalize_kv(keys, values)
        if start_ is None:
            start_ = self._layer_tokens[layer] if default_start is None else default_start
        return layer, start_, k, v

    # ------------------------------------------------------------------ planning

    def _plan_chunks(self, items: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]],
                     chunk_tokens: int) -> list[Chunk]:
        """Split (layer, start, keys, values) items into chunks of at most chunk_tokens tokens
        (views; nothing is copied). Inputs must already be normalized."""
        chunks: list[Chunk] = []
        for layer, start, k, v in items:
            t = k.shape[1]
            for lo in range(0, t, chunk_tokens):
                hi = min(t, lo + chunk_tokens)
                chunks.append(Chunk(layer, start + lo, k[:, lo:hi], v[:, lo:hi]))
        return chunks

    def _layer_items(self, kv_per_layer: KVPerLayer, start: int
                     ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        if isinstance(kv_per_layer, Mapping):
            pairs = sorted(kv_per_layer.items())
        elif isinstance(kv_per_layer, Sequence):
            pairs = list(enumerate(kv_per_layer))
        else:
            raise invalid_argument("kv_per_layer must be a sequence or a mapping of "
                                   "(keys, values) per layer")
        items = []
        for layer, pair in pairs:
            self._check_layer(layer)
            try:
                keys, values = pair
            except (TypeError, ValueError):
                raise invalid_argument(f"kv_per_layer[{layer}] must be a (keys, values) "
                                       "pair") from None
            k, v = self._normalize_kv(keys, values, f"layer {layer} ")
            items.append((layer, start, k, v))
        return items

    def _prepare(self, item: AttendItem) -> PreparedItem:
        """Validate an AttendItem addressed to this session."""
        layer = self._check_layer(item.layer)
        q = self._normalize_q(item.q)
        if (item.new_keys is None) != (item.new_values is None):
            raise invalid_argument("new_keys and new_values must be given together")
        k = v = None
        if item.new_keys is not None and item.new_values is not None:
            k, v = self._normalize_kv(item.new_keys, item.new_values, "new_")
        start = self._check_start(item.start)
        if k is not None and start is None:
            start = self._layer_tokens[layer]
        return PreparedItem(self.session_id, self, layer, q, k, v,
                            self._check_policy(item.policy), start if k is not None else None)

    def _note_tokens(self, layer: int, num_keys: int) -> None:
        self._layer_tokens[layer] = num_keys

    def _note_layer_tokens(self, layer_tokens: Sequence[int]) -> None:
        if len(layer_tokens) == len(self._layer_tokens):
            self._layer_tokens[:] = [int(n) for n in layer_tokens]


#: Anything an AttendItem may name as its session.
SessionLike: TypeAlias = SessionCore


class AppendBook:
    """What an appender queued: its chunks (kept for a replay) and the next position of each
    layer it touched."""

    def __init__(self, session: SessionCore, chunk_tokens: int) -> None:
        self.session = session
        self.chunk_tokens = chunk_tokens
        self.chunks: list[Chunk] = []
        self._next: dict[int, int] = {}

    def plan(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
             start: int | None) -> list[Chunk]:
        """Validate and chunk keys [Hkv, T, D] / values [Hkv, T, Dv] of ``layer`` at ``start``
        (None: after what the layer holds plus what this book already queued for it)."""
        item = self.session._kv_item(layer, keys, values, start, self._next.get(layer))
        self._next[layer] = item[1] + item[2].shape[1]
        chunks = self.session._plan_chunks([item], self.chunk_tokens)
        self.chunks.extend(chunks)
        return chunks


class Appender(ABC):
    """Streams K/V of any layers into a session as they become available (one Append stream).

    Use as a context manager; the stream is finished (and each touched layer indexed) on a
    clean exit and abandoned on an exception. ``result`` holds the AppendResult afterwards.
    """

    result: AppendResult | None = None

    @abstractmethod
    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
            start: int | None = None) -> None:
        """Queue keys [Hkv, T, D] / values [Hkv, T, Dv] of ``layer`` at ``start`` (None: right
        after what the layer holds plus what this appender already queued for it)."""

    @abstractmethod
    def finish(self) -> AppendResult:
        """End the stream, wait for the session to store and index everything."""

    @abstractmethod
    def abort(self) -> None:
        """Abandon the stream (chunks already applied stay applied)."""

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def items_from_step_args(default: SessionCore | None, layer: int | Sequence[AttendItem],
                         q: torch.Tensor | None, new_keys: torch.Tensor | None,
                         new_values: torch.Tensor | None, policy: Policy | None
                         ) -> tuple[list[AttendItem], bool]:
    """Normalize the two call forms of a decoder step into (items, single)."""
    if isinstance(layer, int) and not isinstance(layer, bool):
        if default is None:
            raise invalid_argument("this decoder serves several sessions: pass AttendItems")
        if q is None:
            raise invalid_argument("q is required")
        return [AttendItem(default, layer, q, new_keys, new_values, policy)], True
    if q is not None or new_keys is not None or new_values is not None or policy is not None:
        raise invalid_argument("pass either (layer, q, ...) or a sequence of AttendItems")
    if isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence):
        raise invalid_argument(f"expected a layer index or a sequence of AttendItems, got "
                               f"{type(layer).__name__}")
    items = []
    for it in layer:
        if not isinstance(it, AttendItem):
            raise invalid_argument(f"expected AttendItem, got {type(it).__name__}")
        if it.session is None:
            if default is None:
                raise invalid_argument("AttendItem.session is required on this decoder")
            it = AttendItem(default, it.layer, it.q, it.new_keys, it.new_values, it.policy,
                            it.start)
        items.append(it)
    return items, False


class Decoder(ABC):
    """A decode loop's connection: one batched layer-step per :meth:`step`, answered in order.

    Remote sessions keep one bidirectional Decode stream open; LocalSession calls the kernels
    directly. Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, default: SessionCore | None) -> None:
        self._default = default

    @overload
    def step(self, layer: int, q: torch.Tensor, new_keys: torch.Tensor | None = ...,
             new_values: torch.Tensor | None = ..., policy: Policy | None = ...
             ) -> AttendOutput: ...

    @overload
    def step(self, layer: Sequence[AttendItem]) -> list[AttendOutput]: ...

    def step(self, layer: int | Sequence[AttendItem], q: torch.Tensor | None = None,
             new_keys: torch.Tensor | None = None, new_values: torch.Tensor | None = None,
             policy: Policy | None = None) -> AttendOutput | list[AttendOutput]:
        """One layer-step.

        Either ``step(layer, q, new_keys=None, new_values=None, policy=None)`` for the session
        the decoder was opened on, returning one AttendOutput, or ``step(items)`` with a
        sequence of AttendItem (several sessions in one message), returning one AttendOutput
        per item, in order. Shapes: q [Hq, D]; new_keys [Hkv, T, D]; new_values [Hkv, T, Dv];
        outputs: output float32 [Hq, Dv], lse/tau/dropped_mass_bound float32 [Hq],
        num_candidates/num_attended int64 [Hq].
        """
        items, single = items_from_step_args(self._default, layer, q, new_keys, new_values,
                                             policy)
        if not items:
            return []
        outs = self._step(items)
        return outs[0] if single else outs

    @abstractmethod
    def _step(self, items: list[AttendItem]) -> list[AttendOutput]:
        """Run one batched layer-step."""

    @abstractmethod
    def close(self) -> None:
        """End the stream (idempotent)."""

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Session(SessionCore, ABC):
    """A KV-cache session: the interface of RemoteSession and LocalSession.

    Use as a context manager to delete the session on exit.
    """

    # ------------------------------------------------------------------ writing K/V

    def prefill(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int = 0,
                chunk_tokens: int | None = None) -> AppendResult:
        """Store keys [Hkv, T, D] / values [Hkv, T, Dv] of one layer at [start, start + T).

        Sent in chunks of ``chunk_tokens`` tokens (None: sized under the message limit) over
        one Append stream; the layer's index is built when the stream ends. Repeating stored
        positions with identical contents is accepted (and skipped), so a prefill can be
        retried; a gap or different contents fail with INVALID_ARGUMENT.
        """
        return self._append_items([self._kv_item(layer, keys, values, start, 0)], chunk_tokens)

    def prefill_layers(self, kv_per_layer: KVPerLayer, start: int = 0,
                       chunk_tokens: int | None = None) -> AppendResult:
        """Store K/V of several layers in one Append stream.

        Args:
            kv_per_layer: a sequence of (keys [Hkv, T, D], values [Hkv, T, Dv]) indexed by
                layer, or a mapping layer -> (keys, values); T may differ between layers.
            start: position of the first token of every layer.
            chunk_tokens: tokens per chunk (None: sized under the message limit).
        """
        start_ = self._check_start(start) or 0
        return self._append_items(self._layer_items(kv_per_layer, start_), chunk_tokens)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               start: int | None = None) -> AppendResult:
        """Append keys [Hkv, T, D] / values [Hkv, T, Dv] at the layer's end (``start``: the
        expected current length; None: the length this object tracks)."""
        return self._append_items([self._kv_item(layer, keys, values, start)], None)

    @abstractmethod
    def _append_items(self, items: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                      chunk_tokens: int | None) -> AppendResult:
        """Store normalized (layer, start, keys, values) items in one Append stream."""

    @abstractmethod
    def appender(self, chunk_tokens: int | None = None) -> Appender:
        """An :class:`Appender` streaming K/V of any layers into this session."""

    # ------------------------------------------------------------------ attention

    def attend(self, layer: int, q: torch.Tensor, new_keys: torch.Tensor | None = None,
               new_values: torch.Tensor | None = None, policy: Policy | None = None
               ) -> AttendOutput:
        """Sparse attention of one query token over ``layer``.

        Args:
            layer: the layer index.
            q: [Hq, D] float query.
            new_keys: optional [Hkv, T, D] keys appended at the layer's end first (the token's
                own key during decoding); new_values [Hkv, T, Dv] with it.
            policy: threshold policy (None: the session default).
        Returns:
            AttendOutput: output float32 [Hq, Dv], lse float32 [Hq], tau float32 [Hq],
            num_candidates int64 [Hq], num_attended int64 [Hq], dropped_mass_bound float32 [Hq].
        Raises:
            LouverError: INVALID_ARGUMENT for bad inputs, FAILED_PRECONDITION if the layer holds
            no keys (and none are given).
        """
        item = AttendItem(self, layer, q, new_keys, new_values, policy)
        return self._attend_items([item])[0]

    @abstractmethod
    def _attend_items(self, items: list[AttendItem]) -> list[AttendOutput]:
        """Attend a batch of items (one call)."""

    @abstractmethod
    def search(self, layer: int, q: torch.Tensor,
               tau: torch.Tensor | float | Sequence[float]) -> list[torch.Tensor]:
        """Candidate positions per query head.

        Args:
            layer: the layer index; q: [Hq, D] float; tau: float32 [Hq] raw-score thresholds
                (or one value for every head).
        Returns:
            Hq int64 tensors of sorted absolute positions, each a superset of
            {n : q_h . k_n >= tau_h} (the recent buffer included).
        """

    @abstractmethod
    def decoder(self) -> Decoder:
        """A :class:`Decoder` for this session's decode loop."""

    # ------------------------------------------------------------------ lifecycle

    @abstractmethod
    def info(self) -> SessionInfo:
        """The session's current state (also refreshes the tracked layer lengths)."""

    @abstractmethod
    def delete(self) -> int:
        """Delete the session; returns the bytes freed. Deleting twice is a no-op (0)."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.delete()
        except LouverError as err:
            if exc_type is None and err.code is not grpc.StatusCode.NOT_FOUND:
                raise

    def __repr__(self) -> str:
        g = self.geometry
        return (f"{type(self).__name__}({self.session_id!r}, layers={g.num_layers}, "
                f"heads={g.num_q_heads}/{g.num_kv_heads}, dim={g.head_dim}/{g.dv}, "
                f"dtype={g.dtype})")
