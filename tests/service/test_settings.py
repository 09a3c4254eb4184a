"""Settings from the environment and the command line, and idle eviction."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pydantic
import pytest
import torch

from louver_kernels import IndexKind, Relative, TopK
from louver_proto import codec, pb
from louver_service.settings import Settings, settings_from_args
from tests.service.helpers import ServerThread, create, query, status_of


def test_cli_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOUVER_PORT", "1234")
    monkeypatch.setenv("LOUVER_MAX_SESSIONS", "7")
    monkeypatch.setenv("LOUVER_AUTH_TOKENS", "tok-1,tok-2")
    s = settings_from_args(["--port", "0", "--device", "cpu", "--metrics-port", "9400",
                            "--index-kind", "quant", "--index-quant-bits", "4",
                            "--default-policy", "topk:8"])
    assert (s.port, s.max_sessions, s.metrics_port) == (0, 7, 9400)
    assert s.auth_tokens == ("tok-1", "tok-2") and "tok-1" not in repr(s)
    assert s.resolve_device() == torch.device("cpu")
    config = s.index_config()
    assert config.kind is IndexKind.QUANT and config.quant_bits == 4
    assert s.policy() == TopK(8)
    assert Settings().policy() == Relative(1e-4)
    with pytest.raises(pydantic.ValidationError):
        Settings(port=70000)
    with pytest.raises(pydantic.ValidationError):
        settings_from_args(["--default-policy", "relative:1.5"])
    with pytest.raises(pydantic.ValidationError):
        settings_from_args(["--index-num-subspaces", "0"])
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        s.port = 5  # type: ignore[misc]


def test_warmup_shapes() -> None:
    s = settings_from_args(["--warmup-shapes", "9/3/64:bfloat16, 4/2/32"])
    assert [str(w) for w in s.warmups()] == ["9/3/64:bfloat16", "4/2/32:float16"]
    assert Settings().warmups() == []
    for bad in ("9/3", "9/4/64", "9/3/64:int8", "a/b/c", "0/1/64", "9/3/64/1"):
        with pytest.raises(pydantic.ValidationError, match="warm-up"):
            Settings(warmup_shapes=bad)  # type: ignore[arg-type]


def test_cpu_budget_default() -> None:
    s = Settings(device="cpu")
    assert s.resolve_memory_budget(torch.device("cpu")) == 4 << 30
    assert Settings(memory_budget_bytes=123).resolve_memory_budget(torch.device("cpu")) == 123


def test_idle_sessions_are_evicted(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(session_ttl_s=0.3, eviction_interval_s=0.05, metrics_port=-1)
    idle, busy = create(srv.stub), create(srv.stub)
    deadline = time.monotonic() + 10
    q = codec.tensor_to_proto(query())
    while True:
        # a Search counts as use (GetSession and ListSessions do not)
        srv.stub.Search(pb.SearchRequest(session_id=busy, layer=0, q=q, tau=[0.0]))
        ids = [s.session_id for s in srv.stub.ListSessions(pb.ListSessionsRequest()).sessions]
        if idle not in ids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ids == [busy]
    err = status_of(srv.stub.GetSession, pb.GetSessionRequest(session_id=idle))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    store = srv.server.store
    assert srv.server.metrics.sessions_evicted._value.get() == 1
    assert store.num_sessions == 1
    assert store.reserved_bytes == store.get(busy).reserved_bytes
