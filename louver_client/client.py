"""gRPC clients: :class:`LouverClient` (blocking) and :class:`AsyncLouverClient` (grpc.aio).

Both share request building, response decoding and the retry policy (``_ClientCore`` and
``louver_client._wire``); each only adds its transport loop. Retries with exponential backoff
cover idempotent calls only: GetSession, ListSessions, DeleteSession, CreateSession with a
client-chosen id, Append (idempotent by protocol: repeated chunks with identical contents are
skipped), Search and Attend without new K/V. Attend with new K/V and Decode streams are never
repeated.

    with LouverClient("localhost:50051") as client:
        session = client.create_session(30, 9, 3, 64, dtype=torch.float16)
        session.prefill_layers([(k, v) for k, v in kv])      # [Hkv, T, D] / [Hkv, T, Dv]
        with session.decoder() as dec:
            out = dec.step(layer, q, k_new, v_new)            # q [Hq, D] -> out.output [Hq, Dv]
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

import grpc
import grpc.aio
import torch

from louver_client import _wire
from louver_client._wire import RetryPolicy
from louver_client.errors import LouverError, error_from_exception, invalid_argument
from louver_client.session import (
    AppendBook,
    Appender,
    Chunk,
    Decoder,
    KVPerLayer,
    PreparedItem,
    Session,
    SessionCore,
    chunk_tokens_for,
    items_from_step_args,
)
from louver_client.types import AppendResult, AttendItem, AttendOutput, Geometry, SessionInfo
from louver_kernels.config import IndexConfig
from louver_kernels.threshold import Policy
from louver_proto import pb, pb_grpc

__all__ = ["AsyncAppender", "AsyncDecoder", "AsyncLouverClient", "AsyncRemoteSession",
           "LouverClient", "RemoteSession", "RetryPolicy"]

_T = TypeVar("_T")
_MiB = 1 << 20
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class _Done(Generic[_T]):
    """A call's result obtained without (further) RPCs."""

    value: _T


@dataclass
class _Call(Generic[_T]):
    """One RPC as data, run by the sync or the async transport loop.

    Attributes:
        method: the stub attribute (e.g. "GetSession").
        request: the request message, or (client streaming) a zero-argument callable that
            returns a fresh request iterator for each attempt.
        decode: response -> result.
        idempotent: whether the call may be retried.
        timeout: overall deadline in seconds (None: none), shared by all attempts.
        recover: called when a *retried* attempt fails: returns a result, a follow-up call or
            None (raise). It resolves the ambiguity of a first attempt that succeeded although
            its answer was lost (ALREADY_EXISTS after Create, NOT_FOUND after Delete).
    """

    method: str
    request: Any
    decode: Callable[[Any], _T]
    idempotent: bool
    timeout: float | None
    recover: Callable[[LouverError], _Call[_T] | _Done[_T] | None] | None = None

    def make_request(self) -> Any:
        return self.request() if callable(self.request) else self.request


def _decode_guard(decode: Callable[[Any], _T], response: Any) -> _T:
    try:
        return decode(response)
    except LouverError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed response is the server's fault
        raise LouverError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}") from exc


class _ClientCore:
    """Configuration, request building and response decoding shared by both clients."""

    def __init__(self, target: str, *, timeout: float | None = 30.0,
                 stream_timeout: float | None = 600.0, max_message_bytes: int = 64 * _MiB,
                 retries: int | RetryPolicy = 3, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 keepalive_s: float | None = 300.0, wait_for_ready: bool = False,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        if not isinstance(target, str) or not target:
            raise invalid_argument("target must be a non-empty 'host:port' string")
        for name, value in (("timeout", timeout), ("stream_timeout", stream_timeout),
                            ("keepalive_s", keepalive_s)):
            if value is not None and not value > 0:
                raise invalid_argument(f"{name} must be > 0 or None, got {value!r}")
        if not isinstance(max_message_bytes, int) or max_message_bytes < 64 << 10:
            raise invalid_argument(f"max_message_bytes must be an int >= 65536, got "
                                   f"{max_message_bytes!r}")
        try:
            self.retry_policy = RetryPolicy.of(retries)
        except ValueError as exc:
            raise invalid_argument(str(exc)) from None
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_message_bytes = max_message_bytes
        self.wait_for_ready = wait_for_ready
        self._credentials = credentials
        self._options = _wire.channel_options(max_message_bytes, keepalive_s, options)
        md: list[tuple[str, str]] = [("x-louver-client", "python")]
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(md)
        self._init_transport()

    def _init_transport(self) -> None:
        """Create the channel (subclasses)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # ------------------------------------------------------------------ retry decisions

    def _replayable(self, err: LouverError) -> bool:
        """Whether a failed Append stream may be sent again (idempotent by protocol)."""
        return err.code in self.retry_policy.retryable and self.retry_policy.max_attempts > 1

    def _after_failure(self, call: _Call[_T], err: LouverError, attempt: int,
                       deadline: float | None) -> _Done[_T] | _Call[_T] | float:
        """What follows failed attempt number ``attempt``: a recovered result, a follow-up
        call, or the seconds to wait before the next attempt. Raises ``err`` when the call is
        not retried (the retry policy's decision)."""
        if attempt > 1 and call.recover is not None:
            follow = call.recover(err)
            if follow is not None:
                return follow
        left = None if deadline is None else deadline - time.monotonic()
        delay = self.retry_policy.next_delay(err, attempt, call.idempotent, left)
        if delay is None:
            raise err
        return delay

    # ------------------------------------------------------------------ call builders

    def _create_call(self, geometry: Geometry, index: IndexConfig | None,
                     default_policy: Policy | None, session_id: str | None,
                     expected_tokens: int) -> _Call[SessionInfo]:
        req = _wire.create_request(geometry, index, default_policy, session_id, expected_tokens)

        def recover(err: LouverError) -> _Call[SessionInfo] | None:
            # a lost answer: the first attempt created it. Accept it if it is ours.
            if err.code is not grpc.StatusCode.ALREADY_EXISTS or not session_id:
                return None

            def same(resp: pb.GetSessionResponse) -> SessionInfo:
                info = _wire.session_info_from_proto(resp.session)
                if info.geometry != geometry:
                    raise err
                return info

            return _Call("GetSession", pb.GetSessionRequest(session_id=session_id), same,
                         True, self.timeout)

        return _Call("CreateSession", req,
                     lambda r: _wire.session_info_from_proto(r.session),
                     idempotent=bool(session_id), timeout=self.timeout, recover=recover)

    def _get_call(self, session_id: str) -> _Call[SessionInfo]:
        return _Call("GetSession", pb.GetSessionRequest(session_id=_sid(session_id)),
                     lambda r: _wire.session_info_from_proto(r.session), True, self.timeout)

    def _list_call(self) -> _Call[list[SessionInfo]]:
        return _Call("ListSessions", pb.ListSessionsRequest(),
                     lambda r: [_wire.session_info_from_proto(s) for s in r.sessions], True,
                     self.timeout)

    def _delete_call(self, session_id: str) -> _Call[int]:
        def recover(err: LouverError) -> _Done[int] | None:
            return _Done(0) if err.code is grpc.StatusCode.NOT_FOUND else None

        return _Call("DeleteSession", pb.DeleteSessionRequest(session_id=_sid(session_id)),
                     lambda r: int(r.freed_bytes), True, self.timeout, recover)

    def _append_items_call(self, session: SessionCore,
                           items: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                           chunk_tokens: int | None) -> _Call[AppendResult]:
        """One Append stream for normalized items, chunked under the message limit; the
        session's tracked lengths are updated from the answer."""
        per = chunk_tokens_for(session.geometry, self.max_message_bytes, chunk_tokens)
        call = self._append_call(session.session_id, session._plan_chunks(items, per))
        decode = call.decode

        def noted(response: pb.AppendResponse) -> AppendResult:
            result = decode(response)
            session._note_layer_tokens(result.layer_tokens)
            return result

        call.decode = noted
        return call

    def _append_call(self, session_id: str, chunks: Sequence[Chunk]) -> _Call[AppendResult]:
        return _Call("Append", lambda: _wire.append_requests(session_id, chunks),
                     _wire.append_result_from_proto, True, self.stream_timeout)

    def _attend_call(self, items: Sequence[PreparedItem]) -> _Call[list[AttendOutput]]:
        writes = any(it.new_keys is not None for it in items)
        return _Call("Attend", _wire.attend_request(items),
                     lambda r: _wire.attend_outputs(items, r), not writes, self.timeout)

    def _search_call(self, session: SessionCore, layer: int, q: torch.Tensor,
                     tau: torch.Tensor | float | Sequence[float]) -> _Call[list[torch.Tensor]]:
        layer = session._check_layer(layer)
        q = session._normalize_q(q)
        taus = session._normalize_tau(tau)
        hq = session.num_q_heads
        return _Call("Search", _wire.search_request(session.session_id, layer, q, taus),
                     lambda r: _wire.search_candidates(r, hq), True, self.timeout)

    @staticmethod
    def _decode_request(items: Sequence[PreparedItem], step_id: int) -> pb.DecodeRequest:
        """One message of a Decode stream."""
        return pb.DecodeRequest(step=_wire.attend_request(items), step_id=step_id)

    @staticmethod
    def _decode_outputs(items: Sequence[PreparedItem], step_id: int,
                        response: pb.DecodeResponse) -> list[AttendOutput]:
        """Check that a Decode answer is the one awaited and decode it."""
        if response.step_id != step_id:
            raise LouverError(grpc.StatusCode.INTERNAL, f"decode response for step "
                                                        f"{response.step_id}, expected {step_id}")
        return _decode_guard(lambda r: _wire.attend_outputs(items, r), response.step)

    def _prepare_items(self, items: Sequence[AttendItem]) -> list[PreparedItem]:
        """Validate batch items: sessions of this client by object, or ids (checked by the
        server)."""
        prepared = []
        for it in items:
            if not isinstance(it, AttendItem):
                raise invalid_argument(f"expected AttendItem, got {type(it).__name__}")
            s = it.session
            if isinstance(s, (RemoteSession, AsyncRemoteSession)):
                if s._client is not self:
                    raise invalid_argument(f"session {s.session_id!r} belongs to another client")
                prepared.append(s._prepare(it))
            elif isinstance(s, str):
                prepared.append(_prepare_by_id(s, it))
            else:
                raise invalid_argument("AttendItem.session must be a session of this client or "
                                       f"a session id, got {type(s).__name__}")
        return prepared


def _sid(session_id: str) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise invalid_argument("session_id must be a non-empty string")
    return session_id


def _prepare_by_id(session_id: str, it: AttendItem) -> PreparedItem:
    """Light validation of an item naming its session by id (the server checks the rest)."""
    _sid(session_id)
    if isinstance(it.layer, bool) or not isinstance(it.layer, int) or it.layer < 0:
        raise invalid_argument(f"layer must be an int >= 0, got {it.layer!r}")
    tensors: list[tuple[str, object]] = [("q", it.q)]
    if (it.new_keys is None) != (it.new_values is None):
        raise invalid_argument("new_keys and new_values must be given together")
    if it.new_keys is not None:
        tensors += [("new_keys", it.new_keys), ("new_values", it.new_values)]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise invalid_argument(f"{name} must be a float16/bfloat16/float32 tensor")
    if it.q.dim() != 2:
        raise invalid_argument(f"q must be [Hq, D], got shape {list(it.q.shape)}")
    if it.start is not None and (not isinstance(it.start, int) or it.start < 0):
        raise invalid_argument(f"start must be an int >= 0, got {it.start!r}")
    return PreparedItem(session_id, None, it.layer, it.q.detach(),
                        None if it.new_keys is None else it.new_keys.detach(),
                        None if it.new_values is None else it.new_values.detach(),
                        it.policy, it.start)


def _geometry(num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              value_dim: int | None, dtype: torch.dtype) -> Geometry:
    return Geometry(num_layers, num_q_heads, num_kv_heads, head_dim, value_dim, dtype)


# ======================================================================================== sync


class LouverClient(_ClientCore):
    """Blocking client of a Louver server.

    Args:
        target: "host:port" of the server.
        timeout: deadline in seconds of each unary call, retries included (None: none).
        stream_timeout: deadline of each Append stream (None: none). Decode streams have none
            unless given to :meth:`decoder`.
        max_message_bytes: largest message sent or received; Append chunks are sized under it.
        retries: retries of idempotent calls on UNAVAILABLE (an int) or a RetryPolicy.
        token: bearer token sent as ``authorization: Bearer <token>`` on every call.
        credentials: channel credentials for TLS (None: plaintext).
        keepalive_s: HTTP/2 keepalive ping interval while calls are active (None: off). The
            default, 300 s, is the shortest a gRPC server accepts without configuration.
        wait_for_ready: queue calls while the channel connects instead of failing fast.
        options: extra gRPC channel options.

    Use as a context manager to close the channel.
    """

    def _init_transport(self) -> None:
        if self._credentials is not None:
            self._channel = grpc.secure_channel(self.target, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(self.target, self._options)
        self._stub = pb_grpc.LouverStub(self._channel)

    # ------------------------------------------------------------------ transport

    def _invoke(self, call: _Call[Any], timeout: float | None) -> Any:
        fn = getattr(self._stub, call.method)
        return fn(call.make_request(), timeout=timeout, metadata=self._metadata,
                  wait_for_ready=self.wait_for_ready)

    def _run(self, call: _Call[_T]) -> _T:
        deadline = None if call.timeout is None else time.monotonic() + call.timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                left = _wire.remaining(deadline, time.monotonic())
                try:
                    response = self._invoke(call, left)
                except Exception as exc:  # noqa: BLE001 - converted below
                    raise error_from_exception(exc) from exc
                return _decode_guard(call.decode, response)
            except LouverError as err:
                after = self._after_failure(call, err, attempt, deadline)
            if isinstance(after, _Done):
                return after.value
            if isinstance(after, _Call):
                return self._run(after)
            time.sleep(after)

    # ------------------------------------------------------------------ API

    def create_session(self, num_layers: int, num_q_heads: int, num_kv_heads: int,
                       head_dim: int, value_dim: int | None = None,
                       dtype: torch.dtype = torch.float16, *, index: IndexConfig | None = None,
                       default_policy: Policy | None = None, session_id: str | None = None,
                       expected_tokens: int = 0) -> RemoteSession:
        """Create a session on the server.

        Args:
            num_layers, num_q_heads, num_kv_heads, head_dim, value_dim (None: head_dim), dtype:
                the model geometry and the K/V storage dtype.
            index: index parameters (None: server defaults; only wire fields may differ from
                IndexConfig's defaults).
            default_policy: policy used when a call names none (None: server default).
            session_id: a client-chosen id ([A-Za-z0-9._-]{1,128}); makes the call retryable.
            expected_tokens: expected prefill + decode tokens, for admission control.
        Raises:
            LouverError: ALREADY_EXISTS, RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...
        """
        geometry = _geometry(num_layers, num_q_heads, num_kv_heads, head_dim, value_dim, dtype)
        info = self._run(self._create_call(geometry, index, default_policy, session_id,
                                           expected_tokens))
        return RemoteSession(self, info)

    def get_session(self, session_id: str) -> SessionInfo:
        """The state of a session (NOT_FOUND if it does not exist)."""
        return self._run(self._get_call(session_id))

    def session(self, session_id: str) -> RemoteSession:
        """A RemoteSession handle for an existing session (one GetSession call)."""
        return RemoteSession(self, self.get_session(session_id))

    def list_sessions(self) -> list[SessionInfo]:
        """Every session the server holds."""
        return self._run(self._list_call())

    def delete_session(self, session_id: str) -> int:
        """Delete a session; returns the bytes freed (NOT_FOUND if it does not exist)."""
        return self._run(self._delete_call(session_id))

    def attend_batch(self, items: Sequence[AttendItem]) -> list[AttendOutput]:
        """One Attend call for many layer-steps (usually one per session).

        Returns one AttendOutput per item, in order. An error in any item fails the whole call
        (LouverError) and leaves every session as it was before that item. Retried only if no
        item carries new K/V.
        """
        prepared = self._prepare_items(items)
        if not prepared:
            return []
        return self._run(self._attend_call(prepared))

    def decoder(self, session: RemoteSession | None = None, *,
                timeout: float | None = None) -> Decoder:
        """Open a bidirectional Decode stream (``session``: the default for ``step(layer,
        q, ...)``; ``timeout``: deadline of the whole stream)."""
        return _RemoteDecoder(self, session, timeout)

    def close(self) -> None:
        """Close the channel (idempotent)."""
        self._channel.close()

    def __enter__(self) -> LouverClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RemoteSession(Session):
    """A session held by a Louver server (see :class:`~louver_client.session.Session`).

    Created by :meth:`LouverClient.create_session` or :meth:`LouverClient.session`. Layer
    lengths are tracked from responses to fill in positions; ``info()`` refreshes them.
    """

    def __init__(self, client: LouverClient, info: SessionInfo) -> None:
        self._client = client
        self.session_id = info.session_id
        self.geometry = info.geometry
        self.index_config = info.index
        self.default_policy = info.default_policy
        self._layer_tokens = list(info.layer_tokens) or [0] * info.geometry.num_layers
        self._deleted = False

    @property
    def client(self) -> LouverClient:
        """The client this session talks through."""
        return self._client

    def _append_items(self, items: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                      chunk_tokens: int | None) -> AppendResult:
        return self._client._run(self._client._append_items_call(self, items, chunk_tokens))

    def appender(self, chunk_tokens: int | None = None) -> Appender:
        """An Appender with one Append stream open; chunks are sent while the caller computes
        the next layer (backpressure: a few chunks in flight)."""
        per = chunk_tokens_for(self.geometry, self._client.max_message_bytes, chunk_tokens)
        return _RemoteAppender(self, per)

    def _attend_items(self, items: list[AttendItem]) -> list[AttendOutput]:
        return self._client.attend_batch(items)

    def search(self, layer: int, q: torch.Tensor,
               tau: torch.Tensor | float | Sequence[float]) -> list[torch.Tensor]:
        return self._client._run(self._client._search_call(self, layer, q, tau))

    def decoder(self, *, timeout: float | None = None) -> Decoder:
        return self._client.decoder(self, timeout=timeout)

    def info(self) -> SessionInfo:
        info = self._client.get_session(self.session_id)
        self._note_layer_tokens(info.layer_tokens)
        return info

    def delete(self) -> int:
        if self._deleted:
            return 0
        freed = self._client.delete_session(self.session_id)
        self._deleted = True
        return freed


_CLOSE = object()


class _RemoteDecoder(Decoder):
    """Sync wrapper over the Decode stream: a request queue feeds gRPC's sender thread; each
    step waits for its response."""

    def __init__(self, client: LouverClient, default: RemoteSession | None,
                 timeout: float | None) -> None:
        super().__init__(default)
        self._client = client
        self._requests: queue.Queue[Any] = queue.Queue()
        self._responses = client._stub.Decode(iter(self._requests.get, _CLOSE), timeout=timeout,
                                              metadata=client._metadata)
        self._next_id = 0
        self._error: LouverError | None = None
        self._closed = False
        self._lock = threading.Lock()
        # a forgotten decoder must not leave gRPC's sender thread waiting forever
        self._finalizer = weakref.finalize(self, self._requests.put, _CLOSE)

    def _step(self, items: list[AttendItem]) -> list[AttendOutput]:
        prepared = self._client._prepare_items(items)
        with self._lock:
            if self._closed:
                raise LouverError(grpc.StatusCode.CANCELLED, "decoder is closed")
            if self._error is not None:
                raise self._error
            step_id = self._next_id
            self._next_id += 1
            self._requests.put(self._client._decode_request(prepared, step_id))
            try:
                response = next(self._responses)
            except StopIteration:
                self._error = LouverError(grpc.StatusCode.UNAVAILABLE,
                                          "the server ended the decode stream")
                raise self._error from None
            except grpc.RpcError as exc:
                self._error = LouverError.from_rpc_error(exc)
                raise self._error from exc
        return self._client._decode_outputs(prepared, step_id, response)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()  # half-close the request stream
            try:
                for _ in self._responses:  # drain: the server ends the stream in turn
                    pass
            except grpc.RpcError:
                pass


class _RemoteAppender(Appender):
    """One Append stream fed from a bounded queue; chunks are kept (as references) so that the
    stream can be replayed if the server was unavailable."""

    _MAX_IN_FLIGHT = 4

    def __init__(self, session: RemoteSession, chunk_tokens: int) -> None:
        self._session = session
        self._client = session._client
        self._book = AppendBook(session, chunk_tokens)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self._MAX_IN_FLIGHT)
        requests = iter(self._queue.get, _CLOSE)
        self._future = self._client._stub.Append.future(
            requests, timeout=self._client.stream_timeout, metadata=self._client._metadata)
        self._done = False

    def _put(self, item: Any) -> bool:
        """Queue an item unless the stream already ended; False if it did."""
        while not self._future.done():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
            start: int | None = None) -> None:
        if self._done:
            raise invalid_argument("appender already finished")
        for chunk in self._book.plan(layer, keys, values, start):
            # once the stream has ended early, chunks are only kept: finish() replays them
            self._put(_wire.append_request(self._session.session_id, chunk))

    def _close_requests(self) -> None:
        """End the request stream: wait for room while the call runs, else drop in the
        sentinel without blocking (gRPC's sender thread may be waiting on the queue)."""
        if not self._put(_CLOSE):
            try:
                self._queue.put_nowait(_CLOSE)
            except queue.Full:
                pass

    def finish(self) -> AppendResult:
        if self._done:
            if self.result is None:
                raise invalid_argument("appender was aborted")
            return self.result
        self._done = True
        self._close_requests()
        try:
            response = self._future.result()
            result = _decode_guard(_wire.append_result_from_proto, response)
        except grpc.RpcError as exc:
            err = LouverError.from_rpc_error(exc)
            if not self._client._replayable(err):
                raise err from exc
            # replay everything: chunks the server already stored are skipped
            result = self._client._run(self._client._append_call(self._session.session_id,
                                                                  self._book.chunks))
        self._session._note_layer_tokens(result.layer_tokens)
        self._book.chunks.clear()
        self.result = result
        return result

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._future.cancel()
        self._close_requests()
        self._book.chunks.clear()


# ======================================================================================= async


class AsyncLouverClient(_ClientCore):
    """grpc.aio client with the same surface as :class:`LouverClient` (methods are coroutines).

    Takes the same arguments. The channel is created on first use, in the running event loop;
    use ``async with`` (or ``await close()``) to close it.
    """

    def _init_transport(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stub_obj: Any = None

    @property
    def _stub(self) -> Any:
        if self._stub_obj is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials,
                                                        self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, self._options)
            self._stub_obj = pb_grpc.LouverStub(self._channel)
        return self._stub_obj

    async def _run(self, call: _Call[_T]) -> _T:
        deadline = None if call.timeout is None else time.monotonic() + call.timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                left = _wire.remaining(deadline, time.monotonic())
                try:
                    fn = getattr(self._stub, call.method)
                    response = await fn(call.make_request(), timeout=left,
                                        metadata=self._metadata,
                                        wait_for_ready=self.wait_for_ready)
                except Exception as exc:  # noqa: BLE001 - converted below
                    raise error_from_exception(exc) from exc
                return _decode_guard(call.decode, response)
            except LouverError as err:
                after = self._after_failure(call, err, attempt, deadline)
            if isinstance(after, _Done):
                return after.value
            if isinstance(after, _Call):
                return await self._run(after)
            await asyncio.sleep(after)

    async def create_session(self, num_layers: int, num_q_heads: int, num_kv_heads: int,
                             head_dim: int, value_dim: int | None = None,
                             dtype: torch.dtype = torch.float16, *,
                             index: IndexConfig | None = None,
                             default_policy: Policy | None = None,
                             session_id: str | None = None,
                             expected_tokens: int = 0) -> AsyncRemoteSession:
        """See :meth:`LouverClient.create_session`."""
        geometry = _geometry(num_layers, num_q_heads, num_kv_heads, head_dim, value_dim, dtype)
        info = await self._run(self._create_call(geometry, index, default_policy, session_id,
                                                 expected_tokens))
        return AsyncRemoteSession(self, info)

    async def get_session(self, session_id: str) -> SessionInfo:
        """See :meth:`LouverClient.get_session`."""
        return await self._run(self._get_call(session_id))

    async def session(self, session_id: str) -> AsyncRemoteSession:
        """See :meth:`LouverClient.session`."""
        return AsyncRemoteSession(self, await self.get_session(session_id))

    async def list_sessions(self) -> list[SessionInfo]:
        """See :meth:`LouverClient.list_sessions`."""
        return await self._run(self._list_call())

    async def delete_session(self, session_id: str) -> int:
        """See :meth:`LouverClient.delete_session`."""
        return await self._run(self._delete_call(session_id))

    async def attend_batch(self, items: Sequence[AttendItem]) -> list[AttendOutput]:
        """See :meth:`LouverClient.attend_batch`."""
        prepared = self._prepare_items(items)
        if not prepared:
            return []
        return await self._run(self._attend_call(prepared))

    def decoder(self, session: AsyncRemoteSession | None = None, *,
                timeout: float | None = None) -> AsyncDecoder:
        """An :class:`AsyncDecoder` over one Decode stream (use ``async with``)."""
        return AsyncDecoder(self, session, timeout)

    async def close(self) -> None:
        """Close the channel (idempotent)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub_obj = None

    async def __aenter__(self) -> AsyncLouverClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncRemoteSession(SessionCore):
    """The async twin of :class:`RemoteSession`: the same methods, as coroutines (see
    :class:`~louver_client.session.Session` for shapes and semantics)."""

    def __init__(self, client: AsyncLouverClient, info: SessionInfo) -> None:
        self._client = client
        self.session_id = info.session_id
        self.geometry = info.geometry
        self.index_config = info.index
        self.default_policy = info.default_policy
        self._layer_tokens = list(info.layer_tokens) or [0] * info.geometry.num_layers
        self._deleted = False

    async def _append_items(self, items: list[tuple[int, int, torch.Tensor, torch.Tensor]],
                            chunk_tokens: int | None) -> AppendResult:
        return await self._client._run(self._client._append_items_call(self, items,
                                                                       chunk_tokens))

    async def prefill(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                      start: int = 0, chunk_tokens: int | None = None) -> AppendResult:
        """See :meth:`Session.prefill`."""
        return await self._append_items([self._kv_item(layer, keys, values, start, 0)],
                                        chunk_tokens)

    async def prefill_layers(self, kv_per_layer: KVPerLayer, start: int = 0,
                             chunk_tokens: int | None = None) -> AppendResult:
        """See :meth:`Session.prefill_layers`."""
        items = self._layer_items(kv_per_layer, self._check_start(start) or 0)
        return await self._append_items(items, chunk_tokens)

    async def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                     start: int | None = None) -> AppendResult:
        """See :meth:`Session.append`."""
        return await self._append_items([self._kv_item(layer, keys, values, start)], None)

    async def attend(self, layer: int, q: torch.Tensor, new_keys: torch.Tensor | None = None,
                     new_values: torch.Tensor | None = None, policy: Policy | None = None
                     ) -> AttendOutput:
        """See :meth:`Session.attend`."""
        item = AttendItem(self, layer, q, new_keys, new_values, policy)
        return (await self._client.attend_batch([item]))[0]

    async def search(self, layer: int, q: torch.Tensor,
                     tau: torch.Tensor | float | Sequence[float]) -> list[torch.Tensor]:
        """See :meth:`Session.search`."""
        return await self._client._run(self._client._search_call(self, layer, q, tau))

    def appender(self, chunk_tokens: int | None = None) -> AsyncAppender:
        """An :class:`AsyncAppender` (one Append stream; see :class:`Appender`)."""
        per = chunk_tokens_for(self.geometry, self._client.max_message_bytes, chunk_tokens)
        return AsyncAppender(self, per)

    def decoder(self, *, timeout: float | None = None) -> AsyncDecoder:
        """An :class:`AsyncDecoder` whose default session is this one."""
        return self._client.decoder(self, timeout=timeout)

    async def info(self) -> SessionInfo:
        """See :meth:`Session.info`."""
        info = await self._client.get_session(self.session_id)
        self._note_layer_tokens(info.layer_tokens)
        return info

    async def delete(self) -> int:
        """See :meth:`Session.delete`."""
        if self._deleted:
            return 0
        freed = await self._client.delete_session(self.session_id)
        self._deleted = True
        return freed

    async def __aenter__(self) -> AsyncRemoteSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.delete()
        except LouverError as err:
            if exc_type is None and err.code is not grpc.StatusCode.NOT_FOUND:
                raise


class AsyncDecoder:
    """The Decode stream, natively async: ``await step(layer, q, ...)`` or
    ``await step(items)`` (see :meth:`Decoder.step`)."""

    def __init__(self, client: AsyncLouverClient, default: AsyncRemoteSession | None,
                 timeout: float | None) -> None:
        self._client = client
        self._default = default
        self._timeout = timeout
        self._call: Any = None
        self._next_id = 0
        self._error: LouverError | None = None
        self._closed = False
        self._lock = asyncio.Lock()

    @overload
    async def step(self, layer: int, q: torch.Tensor, new_keys: torch.Tensor | None = ...,
                   new_values: torch.Tensor | None = ..., policy: Policy | None = ...
                   ) -> AttendOutput: ...

    @overload
    async def step(self, layer: Sequence[AttendItem]) -> list[AttendOutput]: ...

    async def step(self, layer: int | Sequence[AttendItem], q: torch.Tensor | None = None,
                   new_keys: torch.Tensor | None = None, new_values: torch.Tensor | None = None,
                   policy: Policy | None = None) -> AttendOutput | list[AttendOutput]:
        """One batched layer-step over the stream (see :meth:`Decoder.step`)."""
        items, single = items_from_step_args(self._default, layer, q, new_keys, new_values,
                                             policy)
        if not items:
            return []
        prepared = self._client._prepare_items(items)
        async with self._lock:
            if self._closed:
                raise LouverError(grpc.StatusCode.CANCELLED, "decoder is closed")
            if self._error is not None:
                raise self._error
            if self._call is None:
                self._call = self._client._stub.Decode(timeout=self._timeout,
                                                       metadata=self._client._metadata)
            step_id = self._next_id
            self._next_id += 1
            try:
                await self._call.write(self._client._decode_request(prepared, step_id))
                response = await self._call.read()
            except grpc.RpcError as exc:
                self._error = LouverError.from_rpc_error(exc)
                raise self._error from exc
            except asyncio.InvalidStateError as exc:
                self._error = await self._stream_error()
                raise self._error from exc
            if response is grpc.aio.EOF:
                self._error = await self._stream_error()
                raise self._error
        outs = self._client._decode_outputs(prepared, step_id, response)
        return outs[0] if single else outs

    async def _stream_error(self) -> LouverError:
        code = await self._call.code()
        details = await self._call.details()
        if code is grpc.StatusCode.OK:
            return LouverError(grpc.StatusCode.UNAVAILABLE, "the server ended the decode stream")
        return LouverError(code, details or code.name)

    async def close(self) -> None:
        """Half-close the stream and wait for the server to end it (idempotent)."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._call is None:
                return
            try:
                await self._call.done_writing()
                while await self._call.read() is not grpc.aio.EOF:
                    pass
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass

    async def __aenter__(self) -> AsyncDecoder:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class AsyncAppender:
    """The async twin of :class:`~louver_client.session.Appender`: ``async with
    session.appender() as ap: await ap.add(layer, keys, values)``. Chunks are kept (as
    references) so that the stream can be replayed if the server was unavailable."""

    def __init__(self, session: AsyncRemoteSession, chunk_tokens: int) -> None:
        self._session = session
        self._client = session._client
        self._book = AppendBook(session, chunk_tokens)
        self._call: Any = None
        self._broken = False
        self._done = False
        self.result: AppendResult | None = None

    async def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                  start: int | None = None) -> None:
        """See :meth:`Appender.add`."""
        if self._done:
            raise invalid_argument("appender already finished")
        for chunk in self._book.plan(layer, keys, values, start):
            if self._broken:
                continue  # the stream ended early: finish() learns why and replays
            if self._call is None:
                self._call = self._client._stub.Append(timeout=self._client.stream_timeout,
                                                       metadata=self._client._metadata)
            try:
                await self._call.write(_wire.append_request(self._session.session_id, chunk))
            except (grpc.RpcError, asyncio.InvalidStateError):
                self._broken = True

    async def finish(self) -> AppendResult:
        """See :meth:`Appender.finish`."""
        if self._done:
            if self.result is None:
                raise invalid_argument("appender was aborted")
            return self.result
        self._done = True
        if self._call is None:
            result = AppendResult(tuple(self._session._layer_tokens), 0, 0)
        else:
            try:
                if not self._broken:
                    await self._call.done_writing()
                result = _decode_guard(_wire.append_result_from_proto, await self._call)
            except grpc.RpcError as exc:
                err = LouverError.from_rpc_error(exc)
                if not self._client._replayable(err):
                    raise err from exc
                result = await self._client._run(
                    self._client._append_call(self._session.session_id, self._book.chunks))
        self._session._note_layer_tokens(result.layer_tokens)
        self._book.chunks.clear()
        self.result = result
        return result

    async def abort(self) -> None:
        """See :meth:`Appender.abort`."""
        if self._done:
            return
        self._done = True
        if self._call is not None:
            self._call.cancel()
        self._book.chunks.clear()

    async def __aenter__(self) -> AsyncAppender:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is None:
            await self.finish()
        else:
            await self.abort()
