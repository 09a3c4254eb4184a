"""Retries: only idempotent calls are repeated, with backoff, and lost answers of Create/Delete
are resolved. A scripted servicer fails chosen calls with chosen status codes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch

from louver_client import AsyncLouverClient, LouverClient, LouverError, RetryPolicy
from louver_proto import codec, pb, pb_grpc
from tests.client.conftest import GEOMETRY, random_kv

L, HQ, HKV, D, DV = GEOMETRY
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)


class ScriptedServicer(pb_grpc.LouverServicer):
    """Answers like a minimal server; ``fail[method]`` lists status codes to fail the next
    calls with; ``lose[method]`` counts calls whose effect happens but whose answer is lost
    (UNAVAILABLE after the work)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, list[grpc.StatusCode]] = {}
        self.lose: Counter[str] = Counter()
        self.sessions: dict[str, pb.ModelGeometry] = {}
        self.append_streams: list[int] = []

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        plan = self.fail.get(method)
        if plan:
            context.abort(plan.pop(0), f"scripted failure of {method}")

    def _lost(self, method: str, context: grpc.ServicerContext) -> None:
        if self.lose[method] > 0:
            self.lose[method] -= 1
            context.abort(UNAVAILABLE, f"connection lost after {method}")

    def _info(self, sid: str) -> pb.SessionInfo:
        return pb.SessionInfo(session_id=sid, geometry=self.sessions[sid],
                              layer_tokens=[0] * self.sessions[sid].num_layers)

    def CreateSession(self, request: Any, context: Any) -> Any:
        self._enter("CreateSession", context)
        sid = request.session_id or f"gen{len(self.sessions)}"
        if sid in self.sessions:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "exists")
        self.sessions[sid] = request.geometry
        self._lost("CreateSession", context)
        return pb.CreateSessionResponse(session=self._info(sid))

    def GetSession(self, request: Any, context: Any) -> Any:
        self._enter("GetSession", context)
        if request.session_id not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, "missing")
        return pb.GetSessionResponse(session=self._info(request.session_id))

    def DeleteSession(self, request: Any, context: Any) -> Any:
        self._enter("DeleteSession", context)
        if self.sessions.pop(request.session_id, None) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "missing")
        self._lost("DeleteSession", context)
        return pb.DeleteSessionResponse(freed_bytes=123)

    def Append(self, request_iterator: Iterator[Any], context: Any) -> Any:
        chunks = sum(1 for _ in request_iterator)
        self.append_streams.append(chunks)
        self._enter("Append", context)
        return pb.AppendResponse(layer_tokens=[0] * L, chunks_applied=chunks)

    def Attend(self, request: Any, context: Any) -> Any:
        self._enter("Attend", context)
        results = []
        for _ in request.items:
            stats = pb.AttendStats(tau=[0.0] * HQ, num_candidates=[1] * HQ,
                                   num_attended=[1] * HQ, dropped_mass_bound=[0.0] * HQ,
                                   num_keys=1)
            results.append(pb.AttendResult(output=codec.tensor_to_proto(torch.zeros(HQ, DV)),
                                           lse=codec.tensor_to_proto(torch.zeros(HQ)),
                                           stats=stats))
        return pb.AttendResponse(results=results)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedServicer, str]]:
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_LouverServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_idempotent_call_is_retried(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=FAST) as c:
        c.create_session(L, HQ, HKV, D, DV, session_id="s")
        servicer.fail["GetSession"] = [UNAVAILABLE, UNAVAILABLE]
        assert c.get_session("s").session_id == "s"
    assert servicer.calls["GetSession"] == 3


def test_retries_give_up(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=RetryPolicy(max_attempts=2, initial_backoff_s=0.001)) as c:
        servicer.fail["GetSession"] = [UNAVAILABLE] * 5
        with pytest.raises(LouverError) as exc:
            c.get_session("s")
    assert exc.value.code is UNAVAILABLE and servicer.calls["GetSession"] == 2


def test_other_codes_are_not_retried(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=FAST) as c:
        servicer.fail["GetSession"] = [grpc.StatusCode.RESOURCE_EXHAUSTED]
        with pytest.raises(LouverError) as exc:
            c.get_session("s")
    assert exc.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls["GetSession"] == 1


def test_attend_with_new_kv_is_not_retried(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=FAST) as c:
        s = c.create_session(L, HQ, HKV, D, DV, session_id="s")
        servicer.fail["Attend"] = [UNAVAILABLE]
        with pytest.raises(LouverError) as exc:
            s.attend(0, torch.randn(HQ, D), *random_kv(1, dtype=torch.float16))
        assert exc.value.code is UNAVAILABLE
        assert servicer.calls["Attend"] == 1
        # without new K/V attention is a read: retried
        servicer.fail["Attend"] = [UNAVAILABLE]
        assert s.attend(0, torch.randn(HQ, D)).output.shape == (HQ, DV)
        assert servicer.calls["Attend"] == 3


def test_create_with_client_id_survives_a_lost_answer(
        scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=FAST) as c:
        servicer.lose["CreateSession"] = 1
        s = c.create_session(L, HQ, HKV, D, DV, session_id="mine")
        assert s.session_id == "mine"
        assert servicer.calls["CreateSession"] == 2 and servicer.calls["GetSession"] == 1
        # without a client-chosen id a retry could create a second session: not retried
        servicer.fail["CreateSession"] = [UNAVAILABLE]
        with pytest.raises(LouverError) as exc:
            c.create_session(L, HQ, HKV, D, DV)
        assert exc.value.code is UNAVAILABLE and servicer.calls["CreateSession"] == 3
        # an existing session of another geometry is a real conflict
        servicer.lose["CreateSession"] = 0
        servicer.fail["CreateSession"] = [UNAVAILABLE]
        with pytest.raises(LouverError) as exc:
            c.create_session(L + 1, HQ, HKV, D, DV, session_id="mine")
        assert exc.value.code is grpc.StatusCode.ALREADY_EXISTS


def test_delete_survives_a_lost_answer(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=FAST) as c:
        c.create_session(L, HQ, HKV, D, DV, session_id="gone")
        servicer.lose["DeleteSession"] = 1
        assert c.delete_session("gone") == 0  # the retry finds it deleted
        assert servicer.calls["DeleteSession"] == 2


def test_append_stream_is_replayed(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted
    with LouverClient(target, retries=FAST) as c:
        s = c.create_session(L, HQ, HKV, D, DV, session_id="s")
        servicer.fail["Append"] = [UNAVAILABLE]
        r = s.prefill(0, *random_kv(25), chunk_tokens=10)
        assert r.chunks_applied == 3
        assert servicer.append_streams == [3, 3]  # the whole stream was sent again
        # the streaming appender replays its chunks too
        servicer.fail["Append"] = [UNAVAILABLE]
        with s.appender(chunk_tokens=4) as ap:
            ap.add(0, *random_kv(10))
            ap.add(1, *random_kv(4))
        assert servicer.append_streams[2:] == [4, 4]


def test_async_client_retries(scripted: tuple[ScriptedServicer, str]) -> None:
    servicer, target = scripted

    async def main() -> None:
        async with AsyncLouverClient(target, retries=FAST) as c:
            await c.create_session(L, HQ, HKV, D, DV, session_id="s")
            servicer.fail["GetSession"] = [UNAVAILABLE, UNAVAILABLE]
            assert (await c.get_session("s")).session_id == "s"
            s = await c.session("s")
            servicer.fail["Append"] = [UNAVAILABLE]
            async with s.appender(chunk_tokens=4) as ap:
                await ap.add(0, *random_kv(10))
            assert ap.result is not None and ap.result.chunks_applied == 3
            servicer.lose["DeleteSession"] = 1
            assert await c.delete_session("s") == 0

    asyncio.run(main())
    assert servicer.calls["GetSession"] == 4 and servicer.calls["DeleteSession"] == 2
    assert servicer.append_streams == [3, 3]


def test_backoff_schedule() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.3, jitter=0.0)
    err = LouverError(UNAVAILABLE, "x")
    assert [policy.next_delay(err, a, True, None) for a in (1, 2, 3, 4, 5)] == [
        0.1, 0.2, 0.3, 0.3, None]
    assert policy.next_delay(err, 1, False, None) is None
    assert policy.next_delay(err, 1, True, 0.05) is None  # would pass the deadline
    assert RetryPolicy.of(0).max_attempts == 1
