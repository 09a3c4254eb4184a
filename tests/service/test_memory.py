"""Memory budget: admission, appends past the budget, bounded memory, deletion frees bytes."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from louver_kernels import IndexConfig, LouverIndex
from louver_proto import pb
from tests.service.helpers import (
    DV,
    HKV,
    NUM_LAYERS,
    D,
    ServerThread,
    chunk,
    create,
    item,
    kv,
    prefill,
    query,
    status_of,
)


def session_bytes(tokens: int) -> int:
    """Bytes a float16 test session with ``tokens`` tokens per layer reserves."""
    per_layer = LouverIndex.estimate_bytes(HKV, D, DV, torch.float16, tokens, IndexConfig())
    return NUM_LAYERS * per_layer


def gauges(srv: ServerThread) -> dict[str, float]:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if f.type == "gauge"}


def assert_details(err: grpc.RpcError, budget: int) -> dict[str, int]:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    meta = {k: v for k, v in (err.trailing_metadata() or ())}
    details = {k: int(meta[f"louver-{k}-bytes"]) for k in ("requested", "available", "budget")}
    assert details["budget"] == budget
    assert details["requested"] > details["available"]
    assert f"budget_bytes={budget}" in err.details()
    return details


@pytest.fixture
def small(make_server: Callable[..., ServerThread]) -> ServerThread:
    """A server whose budget holds two sessions of up to 256 tokens plus a quarter of one."""
    return make_server(memory_budget_bytes=2 * session_bytes(256) + session_bytes(256) // 4)


def test_admission(small: ServerThread) -> None:
    stub, budget = small.stub, small.server.store.budget_bytes
    a = create(stub, expected_tokens=200)
    create(stub, expected_tokens=256)
    err = status_of(create, stub, expected_tokens=100)
    details = assert_details(err, budget)
    assert details["requested"] == session_bytes(100)
    assert details["available"] == budget - 2 * session_bytes(256)
    # deleting returns the bytes: the same request now fits
    freed = stub.DeleteSession(pb.DeleteSessionRequest(session_id=a)).freed_bytes
    assert freed == session_bytes(200)
    create(stub, expected_tokens=100)
    # a session that could never fit
    err = status_of(create, stub, expected_tokens=1 << 20)
    assert_details(err, budget)


def test_append_past_budget(small: ServerThread) -> None:
    stub, budget = small.stub, small.server.store.budget_bytes
    a, b = create(stub), create(stub)
    prefill(stub, a, 256)  # fits the reservation made at create
    more = kv(10)
    err = status_of(stub.Append, iter([chunk(a, 0, 256, *more)]))
    details = assert_details(err, budget)
    assert details["requested"] == session_bytes(512) // NUM_LAYERS - session_bytes(256) // 2
    info = stub.GetSession(pb.GetSessionRequest(session_id=a)).session
    assert list(info.layer_tokens) == [256, 256]  # nothing applied

    # Attend items with new keys are charged the same way, and fail whole
    err = status_of(stub.Attend, pb.AttendRequest(items=[item(a, 1, query(), more)]))
    assert_details(err, budget)
    info = stub.GetSession(pb.GetSessionRequest(session_id=a)).session
    assert list(info.layer_tokens) == [256, 256]

    # memory stays bounded
    g = gauges(small)
    assert g["louver_memory_reserved_bytes"] <= g["louver_memory_budget_bytes"] == budget
    assert g["louver_sessions"] == 2

    stub.DeleteSession(pb.DeleteSessionRequest(session_id=b))
    resp = stub.Append(iter([chunk(a, 0, 256, *more)]))
    assert list(resp.layer_tokens) == [266, 256]


def test_gauges_follow_sessions(small: ServerThread) -> None:
    stub = small.stub
    empty = gauges(small)
    assert empty["louver_kv_bytes"] == empty["louver_index_bytes"] == 0
    a = create(stub)
    prefill(stub, a, 100)
    info = stub.GetSession(pb.GetSessionRequest(session_id=a)).session
    g = gauges(small)
    assert g["louver_kv_bytes"] == info.kv_bytes > 0
    assert g["louver_index_bytes"] == info.index_bytes > 0
    assert g["louver_memory_reserved_bytes"] >= info.kv_bytes + info.index_bytes
    listed = stub.ListSessions(pb.ListSessionsRequest()).sessions
    assert sum(s.kv_bytes for s in listed) == g["louver_kv_bytes"]
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=a))
    g = gauges(small)
    assert g["louver_kv_bytes"] == g["louver_index_bytes"] == 0
    assert g["louver_memory_reserved_bytes"] == 0 and g["louver_sessions"] == 0


def test_max_sessions(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(max_sessions=2, metrics_port=-1)
    create(srv.stub)
    create(srv.stub)
    err = status_of(create, srv.stub)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
