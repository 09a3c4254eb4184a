"""louver_service: the Louver gRPC server (sessions, memory budget, batching engine, RPCs).

Run it with ``louver-server`` (or ``python -m louver_service``), or in-process::

    server = await start_server(Settings(port=0, metrics_port=-1))
    ...
    await server.stop()
"""

from louver_service.server import LouverServer, start_server
from louver_service.settings import Settings

__all__ = ["LouverServer", "Settings", "start_server"]
