"""The gRPC server: a thin servicer over the engine and store, health, reflection, metrics,
authentication and graceful shutdown.

Every Louver RPC goes through :func:`_rpc`, which refuses new calls while draining
(UNAVAILABLE), checks the bearer token, maps any exception to a status through
:func:`louver_service.errors.to_status`, and records metrics. The health and reflection
services are not authenticated (load balancers and probes call them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from louver_proto import SERVICE_NAME, pb, pb_grpc
from louver_service import wire
from louver_service.engine import AppendChunk, Engine
from louver_service.errors import Unauthenticated, Unavailable, to_status
from louver_service.metrics import Metrics, MetricsEndpoint, serve_metrics
from louver_service.sessions import SessionStore
from louver_service.settings import Settings
from louver_service.warmup import warm_up

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class _Call:
    """One RPC's book-keeping, as an async context manager around its body: counts it in
    flight, and on exit records its status and duration and ends the call with the status any
    exception maps to (it never swallows an exception)."""

    def __init__(self, servicer: LouverServicer, method: str,
                 context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()

    async def __aenter__(self) -> _Call:
        self.servicer._begin()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        status = to_status(exc, self.method) if isinstance(exc, Exception) else None
        if status is not None:
            self.code = status.code
        elif exc is not None:  # cancelled, or the client went away
            self.code = grpc.StatusCode.CANCELLED
        self.servicer._end(self)
        if status is not None:
            await self.context.abort(status.code, status.message, status.trailing_metadata)


def _rpc(fn: F) -> F:
    """Wrap a servicer method (unary or streaming response) in a :class:`_Call` after admission
    (drain, auth). Errors end the call with their status; the server never crashes."""
    method = fn.__name__

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def streaming(self: LouverServicer, request: Any,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Call(self, method, context):
                self._admit(context)
                async for response in fn(self, request, context):
                    yield response

        return streaming  # type: ignore[return-value]

    @functools.wraps(fn)
    async def unary(self: LouverServicer, request: Any, context: grpc.aio.ServicerContext
                    ) -> Any:
        async with _Call(self, method, context):
            self._admit(context)
            return await fn(self, request, context)

    return unary  # type: ignore[return-value]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class LouverServicer(pb_grpc.LouverServicer):
    """The Louver service: decode, call the engine or store, encode."""

    def __init__(self, settings: Settings, store: SessionStore, engine: Engine,
                 metrics: Metrics) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.default_config = settings.index_config()
        self.default_policy = settings.policy()
        self._tokens = tuple(t.encode() for t in settings.auth_tokens)
        self.draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut = asyncio.Event()

    # ------------------------------------------------------------------ call book-keeping

    def _begin(self) -> None:
        self._inflight += 1
        self._idle.clear()
        self.metrics.inflight.inc()

    def _end(self, call: _Call) -> None:
        self.metrics.requests.labels(call.method, call.code.name).inc()
        self.metrics.request_duration.labels(call.method).observe(
            time.perf_counter() - call.start)
        self.metrics.inflight.dec()
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            raise Unavailable("server is shutting down")
        if not self._tokens:
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(token.strip().encode(), t) for t in self._tokens):
            raise Unauthenticated("missing or invalid bearer token")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no RPC is in flight; False if ``timeout`` seconds passed first or
        :meth:`cut_drain` was called."""
        idle = asyncio.ensure_future(self._idle.wait())
        cut = asyncio.ensure_future(self._cut.wait())
        await asyncio.wait({idle, cut}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (idle, cut):
            waiter.cancel()
        return self._inflight == 0

    def cut_drain(self) -> None:
        """End a running :meth:`wait_idle` now."""
        self._cut.set()

    # ------------------------------------------------------------------ RPCs

    @_rpc
    async def CreateSession(self, request: pb.CreateSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.CreateSessionResponse:
        spec = wire.session_spec_from_proto(request, self.default_config, self.default_policy)
        return pb.CreateSessionResponse(session=wire.session_info(self.store.create(spec)))

    @_rpc
    async def GetSession(self, request: pb.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(
            session=wire.session_info(self.store.get(request.session_id)))

    @_rpc
    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        return pb.ListSessionsResponse(
            sessions=[wire.session_info(s) for s in self.store.list()])

    @_rpc
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        return pb.DeleteSessionResponse(freed_bytes=await self.store.delete(request.session_id))

    @_rpc
    async def Append(self, request_iterator: AsyncIterator[pb.AppendRequest],
                     context: grpc.aio.ServicerContext) -> pb.AppendResponse:
        return wire.append_response(await self.engine.append(self._chunks(request_iterator)))

    async def _chunks(self, requests: AsyncIterator[pb.AppendRequest]
                      ) -> AsyncIterator[AppendChunk]:
        index = 0
        async for request in requests:
            yield wire.append_chunk_from_proto(request, self.store, index)
            index += 1

    @_rpc
    async def Search(self, request: pb.SearchRequest,
                     context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        job = wire.search_job_from_proto(request, self.store)
        return wire.search_response(await self.engine.search(job))

    @_rpc
    async def Attend(self, request: pb.AttendRequest,
                     context: grpc.aio.ServicerContext) -> pb.AttendResponse:
        return await self._attend(request, context)

    @_rpc
    async def Decode(self, request_iterator: AsyncIterator[pb.DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeResponse]:
        async for request in request_iterator:
            step = await self._attend(request.step, context)
            yield pb.DecodeResponse(step=step, step_id=request.step_id)

    async def _attend(self, request: pb.AttendRequest, context: grpc.aio.ServicerContext
                      ) -> pb.AttendResponse:
        jobs = wire.attend_jobs_from_proto(request, self.store)
        return wire.attend_response(await self.engine.attend(jobs, _deadline(context)))


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class LouverServer:
    """A running server (build with :func:`start_server`).

    Attributes:
        settings: its configuration. device: where sessions live.
        port: the bound gRPC port. metrics_port: the bound metrics port (-1: disabled).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device: torch.device = settings.resolve_device()
        if not settings.kernel_pdl:   # on by default in the kernels
            from louver_kernels.triton import set_programmatic_launch

            set_programmatic_launch(False)
        self.metrics = Metrics()
        self.store = SessionStore(self.device, settings.resolve_memory_budget(self.device),
                                  settings.max_sessions, settings.session_ttl_s, self.metrics)
        self.metrics.bind_store(self.store)
        self.engine = Engine(self.store, self.metrics, settings.inline_max_keys,
                             settings.compute_threads, settings.dense_fallback)
        self.servicer = LouverServicer(settings, self.store, self.engine, self.metrics)
        self.health = health.aio.HealthServicer()
        limit = settings.max_message_bytes
        self.grpc = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                             ("grpc.max_receive_message_length", limit),
                                             ("grpc.so_reuseport", 0)])
        pb_grpc.add_LouverServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.grpc)
        self.port = 0
        self.metrics_port = -1
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._evictor: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Warm up (``warmup_shapes``), bind, start serving, mark healthy, start the metrics
        endpoint and the evictor."""
        s = self.settings
        for shape in s.warmups():
            await asyncio.to_thread(warm_up, shape, self.device, s.index_config(), s.policy(),
                                    s.dense_fallback)
        self.port = self.grpc.add_insecure_port(_host_port(s.host, s.port))
        if self.port == 0:
            raise RuntimeError(f"cannot bind {_host_port(s.host, s.port)}")
        await self.grpc.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if s.metrics_port >= 0:
            self._metrics_endpoint = serve_metrics(self.metrics.registry, s.metrics_host,
                                                   s.metrics_port)
            self.metrics_port = self._metrics_endpoint.port
        self._evictor = asyncio.create_task(self.store.run_evictor(s.eviction_interval_s))

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Drain and stop (idempotent): health NOT_SERVING, new RPCs UNAVAILABLE, in-flight
        RPCs and streams get ``drain_timeout_s`` (default: the setting) to finish, then the
        server stops and cancels what is left."""
        if self._stopping is None:
            timeout = self.settings.drain_timeout_s if drain_timeout_s is None \
                else drain_timeout_s
            self._stopping = asyncio.create_task(self._drain_and_stop(timeout))
        await asyncio.shield(self._stopping)

    async def _drain_and_stop(self, timeout: float) -> None:
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        logger.info("draining: waiting up to %.1f s for in-flight RPCs", timeout)
        if not await self.servicer.wait_idle(timeout):
            logger.warning("drain timeout: cancelling the RPCs still in flight")
        await self.grpc.stop(grace=0)
        if self._evictor is not None:
            self._evictor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._evictor
        await asyncio.to_thread(self.engine.close)
        if self._metrics_endpoint is not None:
            await asyncio.to_thread(self._metrics_endpoint.stop)
        self._stopped.set()
        logger.info("louver-server stopped")

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has completed."""
        await self._stopped.wait()

    def address_line(self) -> str:
        """The start-up line launchers parse."""
        s = self.settings
        metrics = (_host_port(s.metrics_host, self.metrics_port) if self.metrics_port >= 0
                   else "off")
        return (f"louver-server listening on {_host_port(s.host, self.port)} metrics on "
                f"{metrics} device {self.device}")


async def start_server(settings: Settings) -> LouverServer:
    """Build and start a server in the running event loop; ``await server.stop()`` ends it."""
    server = LouverServer(settings)
    await server.start()
    return server
