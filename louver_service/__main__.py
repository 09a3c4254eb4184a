"""``louver-server`` / ``python -m louver_service``: parse the CLI, start, serve until SIGTERM
or SIGINT, drain, exit 0. A second signal cuts the drain short.

Once serving, the process prints one line on stdout (flushed), for launchers to parse::

    louver-server listening on HOST:PORT metrics on HOST:MPORT device DEVICE

with the bound ports (``metrics on off`` when metrics are disabled). Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import torch

from louver_service.server import LouverServer, start_server
from louver_service.settings import Settings, settings_from_args

__all__ = ["main", "serve", "start_server", "LouverServer"]

logger = logging.getLogger("louver_service")


async def serve(settings: Settings) -> None:
    """Run a server until SIGTERM/SIGINT, then drain it (drain_timeout_s; 0 after a second
    signal)."""
    server = await start_server(settings)
    # the start-up line launchers parse: on stdout, flushed, whatever the log level
    print(server.address_line(), flush=True)
    loop = asyncio.get_running_loop()
    signals = asyncio.Queue[int]()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    received = await signals.get()
    logger.info("received %s: draining", signal.Signals(received).name)
    stopping = asyncio.ensure_future(server.stop())
    second = asyncio.ensure_future(signals.get())
    done, _ = await asyncio.wait({stopping, second}, return_when=asyncio.FIRST_COMPLETED)
    if second in done:
        logger.warning("second signal: stopping without waiting for in-flight RPCs")
        server.servicer.cut_drain()
    else:
        second.cancel()
    await stopping


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    settings = settings_from_args(argv)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # This process only serves attention: subnormal softmax weights (far below any weight that
    # matters) slowed the CPU path about 6x in the accuracy benchmark; flush them to zero.
    torch.set_flush_denormal(True)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
