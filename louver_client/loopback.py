"""A Louver server on loopback for demos and tests: in a background thread of this process, or
as a child process (``python -m louver_service --port 0``).

Both return a :class:`LoopbackServer` with ``target`` ("127.0.0.1:PORT") and ``stop()``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

__all__ = ["LoopbackServer", "start_in_thread", "start_subprocess"]

_LISTENING = re.compile(r"louver-server listening on (\S+):(\d+)")


class LoopbackServer:
    """A running loopback server. ``stop()`` drains it (idempotent); a context manager."""

    def __init__(self, host: str, port: int, description: str) -> None:
        self.host = host
        self.port = port
        self.description = description

    @property
    def target(self) -> str:
        """The "host:port" address clients connect to."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop the server (idempotent)."""

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, {self.description})"


class _ThreadServer(LoopbackServer):
    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 server: Any) -> None:
        super().__init__("127.0.0.1", int(server.port), server.address_line())
        self._loop = loop
        self._thread = thread
        self.server = server
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(0.0), self._loop)
        try:
            fut.result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


def start_in_thread(**settings: Any) -> LoopbackServer:
    """Start ``louver_service`` in a daemon thread with its own event loop.

    ``settings`` override ``louver_service.Settings`` fields; defaults here: host 127.0.0.1,
    port 0 (a free port), metrics off.
    """
    from louver_service import Settings, start_server

    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1}
    values.update(settings)
    config = Settings(**values)
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["server"] = loop.run_until_complete(start_server(config))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            started["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name="louver-server", daemon=True)
    thread.start()
    ready.wait()
    if "error" in started:
        raise RuntimeError(f"louver server failed to start: {started['error']}") \
            from started["error"]
    return _ThreadServer(loop, thread, started["server"])


class _ProcessServer(LoopbackServer):
    def __init__(self, proc: subprocess.Popen[str], host: str, port: int, line: str) -> None:
        super().__init__(host, port, line)
        self.process = proc
        self._drain = threading.Thread(target=self._pump, name="louver-server-log",
                                       daemon=True)
        self._drain.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for _ in self.process.stdout:  # keep the pipe from filling up
            pass

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_subprocess(args: Sequence[str] = (), timeout_s: float = 120.0) -> LoopbackServer:
    """Start ``python -m louver_service --host 127.0.0.1 --port 0 --metrics-port -1 *args`` and
    wait for its "louver-server listening on HOST:PORT" line."""
    cmd = [sys.executable, "-m", "louver_service", "--host", "127.0.0.1", "--port", "0",
           "--metrics-port", "-1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ), bufsize=1)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        match = _LISTENING.search(line)
        if match:
            host = match.group(1).strip("[]")
            return _ProcessServer(proc, host, int(match.group(2)), line.strip())
    proc.kill()
    proc.wait()
    tail = "\n".join(lines[-20:])
    raise RuntimeError(f"louver-server did not report its address; output:\n{tail}")
