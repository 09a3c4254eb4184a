"""The Prometheus endpoint: names, types, and counters that move with requests."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

from louver_proto import pb, pb_grpc
from tests.service.helpers import DENSE, HQ, ServerThread, create, item, kv, prefill, query

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

EXPECTED = {
    "louver_requests": "counter",
    "louver_request_duration_seconds": "histogram",
    "louver_inflight_requests": "gauge",
    "louver_sessions": "gauge",
    "louver_kv_bytes": "gauge",
    "louver_index_bytes": "gauge",
    "louver_memory_budget_bytes": "gauge",
    "louver_memory_reserved_bytes": "gauge",
    "louver_attend_items": "counter",
    "louver_keys_scanned": "counter",
    "louver_keys_candidate": "counter",
    "louver_keys_attended": "counter",
    "louver_tokens_appended": "counter",
    "louver_sessions_evicted": "counter",
}


def scrape(srv: ServerThread) -> Samples:
    """Every sample as {(name, sorted labels): value}; checks the family names and types."""
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert families[name].type == kind, name
    samples: Samples = {}
    for family in families.values():
        if not family.name.startswith("louver_"):
            continue
        for s in family.samples:
            assert "session" not in " ".join(s.labels), s  # no session ids as labels
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move(server: ServerThread, stub: pb_grpc.LouverStub) -> None:
    before = scrape(server)
    sid = create(stub)
    prefill(stub, sid, 40)
    stub.Attend(pb.AttendRequest(items=[item(sid, 0, query(), kv(2), DENSE, start=40),
                                        item(sid, 1, query())]))
    try:
        stub.GetSession(pb.GetSessionRequest(session_id="missing"))
    except grpc.RpcError:
        pass
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("louver_requests_total", method="Attend", code="OK") == 1
    assert delta("louver_requests_total", method="Append", code="OK") == 1
    assert delta("louver_requests_total", method="CreateSession", code="OK") == 1
    assert delta("louver_requests_total", method="GetSession", code="NOT_FOUND") == 1
    assert delta("louver_request_duration_seconds_count", method="Attend") == 1
    assert delta("louver_request_duration_seconds_sum", method="Attend") > 0
    assert delta("louver_attend_items_total") == 2
    assert delta("louver_keys_scanned_total") == HQ * (42 + 40)
    assert delta("louver_keys_attended_total") >= HQ * 42  # the dense item attends every key
    assert delta("louver_keys_scanned_total") >= delta("louver_keys_candidate_total") \
        >= delta("louver_keys_attended_total") > 0
    assert delta("louver_tokens_appended_total") == 2 * 40 + 2
    assert value(after, "louver_sessions") >= 1
    assert value(after, "louver_kv_bytes") > value(before, "louver_kv_bytes")
    assert value(after, "louver_memory_budget_bytes") == server.server.store.budget_bytes
    assert value(after, "louver_inflight_requests") == 0


def test_servers_have_separate_registries(make_server: Callable[..., ServerThread]) -> None:
    a, b = make_server(), make_server()
    create(a.stub)
    assert value(scrape(a), "louver_sessions") == 1
    assert value(scrape(b), "louver_sessions") == 0
