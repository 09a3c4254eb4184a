"""A real Prometheus server scrapes the service and answers a query about it.

Needs the ``prometheus`` binary (Debian package ``prometheus``; CI installs it). Outside CI a
machine without it skips this test; under CI its absence is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from louver_proto import pb
from tests.service.helpers import DENSE, ServerThread, create, item, prefill, query

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None and os.environ.get("CI"):
    raise RuntimeError("CI needs the prometheus binary (apt-get install prometheus)")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_service(server: ServerThread, tmp_path: Path) -> None:
    sid = create(server.stub)
    prefill(server.stub, sid, 64)
    for _ in range(3):
        server.stub.Attend(pb.AttendRequest(items=[item(sid, 0, query(), policy=DENSE)]))
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: louver\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.server.metrics_port}']\n")
    proc = subprocess.Popen(
        [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'db'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        result: list[dict] = []
        while time.monotonic() < deadline:
            try:
                result = _query(port, 'sum(louver_requests_total{method="Attend"})')
                up = _query(port, 'up{job="louver"}')
            except OSError:
                time.sleep(0.5)
                continue
            if result and up and up[0]["value"][1] == "1":
                break
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", "Prometheus never scraped the service"
        assert result and float(result[0]["value"][1]) >= 3
        sessions = _query(port, "louver_sessions")
        assert sessions and float(sessions[0]["value"][1]) >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
