"""Graceful shutdown of the real process: SIGTERM while a Decode stream is open."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from louver_proto import pb, pb_grpc
from tests.service.helpers import ServerThread, create, item, kv, prefill, query, status_of

LINE = re.compile(r"louver-server listening on ([\d.]+):(\d+) metrics on (\S+) device (\S+)")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_drains_open_stream() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "louver_service", "--port", "0", "--metrics-port", "-1",
         "--device", "cpu", "--drain-timeout-s", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "LOUVER_LOG_LEVEL": "INFO"})
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        match = None
        while match is None and time.monotonic() < deadline:
            try:
                match = LINE.search(lines.get(timeout=1))
            except queue.Empty:
                assert proc.poll() is None, "".join(log)
        assert match is not None, "".join(log)
        assert match.group(3) == "off" and match.group(4) == "cpu"
        channel = grpc.insecure_channel(f"127.0.0.1:{match.group(2)}")
        stub = pb_grpc.LouverStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING

        sid = create(stub)
        prefill(stub, sid, 16)
        requests: queue.Queue[pb.DecodeRequest | None] = queue.Queue()
        responses = stub.Decode(iter(requests.get, None))

        def step(step_id: int) -> pb.DecodeResponse:
            requests.put(pb.DecodeRequest(step_id=step_id, step=pb.AttendRequest(items=[
                item(sid, 0, query(), kv(1), start=16 + step_id)])))
            return next(responses)

        assert step(0).step_id == 0
        proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
            time.sleep(0.05)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        err = status_of(stub.GetSession, pb.GetSessionRequest(session_id=sid))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        err = status_of(create, stub)
        assert err.code() == grpc.StatusCode.UNAVAILABLE

        # the open stream goes on and finishes normally
        result = step(1)
        assert result.step_id == 1 and result.step.results[0].stats.num_keys == 18
        requests.put(None)
        assert list(responses) == []
        assert proc.wait(timeout=30) == 0, "".join(log)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drain_timeout_cancels_streams_left_open() -> None:
    srv = ServerThread(metrics_port=-1)
    try:
        sid = create(srv.stub)
        prefill(srv.stub, sid, 4)
        requests: queue.Queue[pb.DecodeRequest | None] = queue.Queue()
        responses = srv.stub.Decode(iter(requests.get, None))
        requests.put(pb.DecodeRequest(step_id=1, step=pb.AttendRequest(
            items=[item(sid, 0, query())])))
        assert next(responses).step_id == 1
        started = time.monotonic()
        srv.run(srv.server.stop(drain_timeout_s=0.5))  # the client never closes its stream
        assert 0.4 < time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        requests.put(None)
    finally:
        srv.close()
