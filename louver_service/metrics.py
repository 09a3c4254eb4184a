"""Prometheus metrics of one server, in its own CollectorRegistry (several servers can run in
one process), and the HTTP endpoint that exposes them.

Names follow Prometheus conventions: ``louver_`` prefix, base units (seconds, bytes), ``_total``
on counters, no session ids as labels. Ratios are left to the query: e.g. the candidate fraction
is ``rate(louver_keys_candidate_total) / rate(louver_keys_scanned_total)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# request latencies from sub-millisecond decode steps to long prefill streams
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class StoreTotals(Protocol):
    """What the gauges read from the session store."""

    @property
    def num_sessions(self) -> int: ...
    @property
    def kv_bytes(self) -> int: ...
    @property
    def index_bytes(self) -> int: ...
    @property
    def reserved_bytes(self) -> int: ...
    @property
    def budget_bytes(self) -> int: ...


class Metrics:
    """Every metric the service publishes.

    Counters of keys are per query head: one Attend item over N keys with Hq query heads scans
    Hq * N keys and reports sum_h num_candidates[h] candidates and sum_h num_attended[h]
    attended keys.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("louver_requests_total", "RPCs completed, by method and status",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("louver_request_duration_seconds",
                                          "RPC wall time, by method", ["method"],
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("louver_inflight_requests", "RPCs in progress", registry=r)
        self.sessions = Gauge("louver_sessions", "sessions held", registry=r)
        self.kv_bytes = Gauge("louver_kv_bytes", "bytes of K/V held by all sessions", registry=r)
        self.index_bytes = Gauge("louver_index_bytes", "bytes of index records held",
                                 registry=r)
        self.reserved_bytes = Gauge("louver_memory_reserved_bytes",
                                    "bytes charged against the memory budget", registry=r)
        self.budget_bytes = Gauge("louver_memory_budget_bytes",
                                  "memory budget for K/V and index bytes", registry=r)
        self.attend_items = Counter("louver_attend_items_total",
                                    "layer-steps attended (Attend items and Decode step items)",
                                    registry=r)
        self.keys_scanned = Counter("louver_keys_scanned_total",
                                    "keys in the attended layers, times query heads", registry=r)
        self.keys_candidate = Counter("louver_keys_candidate_total",
                                      "keys whose bound reached tau (buffer included), summed "
                                      "over query heads", registry=r)
        self.keys_attended = Counter("louver_keys_attended_total",
                                     "keys in the softmax, summed over query heads", registry=r)
        self.tokens_appended = Counter("louver_tokens_appended_total",
                                       "tokens stored, summed over layers (retries excluded)",
                                       registry=r)
        self.sessions_evicted = Counter("louver_sessions_evicted_total",
                                        "sessions deleted for being idle", registry=r)

    def bind_store(self, store: StoreTotals) -> None:
        """Make the gauges read the store's totals at scrape time."""
        self.sessions.set_function(lambda: store.num_sessions)
        self.kv_bytes.set_function(lambda: store.kv_bytes)
        self.index_bytes.set_function(lambda: store.index_bytes)
        self.reserved_bytes.set_function(lambda: store.reserved_bytes)
        self.budget_bytes.set_function(lambda: store.budget_bytes)


@dataclass
class MetricsEndpoint:
    """A running HTTP endpoint serving one registry."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` over HTTP on host:port (0: a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)
