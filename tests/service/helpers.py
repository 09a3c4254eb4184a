"""Shared helpers of the service tests: an in-process server on a background event loop, and
small builders for requests. Shapes are small (2 layers, Hq=4, Hkv=2, D=Dv=32)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import torch

from louver_kernels import reference as ref
from louver_proto import codec, pb, pb_grpc
from louver_service import LouverServer, Settings, start_server

NUM_LAYERS, HQ, HKV, D, DV = 2, 4, 2, 32, 32


class ServerThread:
    """A Louver server running on its own event loop in a daemon thread.

    Args: settings overrides (port 0, metrics on a free port and device cpu by default).
    """

    def __init__(self, **overrides: Any) -> None:
        values: dict[str, Any] = {"port": 0, "metrics_port": 0, "device": "cpu",
                                  "eviction_interval_s": 3600.0}
        values.update(overrides)
        self.settings = Settings(**values)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: LouverServer = self.run(start_server(self.settings))
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", 512 << 20)])
        self.stub = pb_grpc.LouverStub(self.channel)

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.run(self.server.stop(drain_timeout_s=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def new_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def geometry(dtype: torch.dtype = torch.float16, **overrides: int) -> pb.ModelGeometry:
    values = {"num_layers": NUM_LAYERS, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D,
              "value_dim": DV}
    values.update(overrides)
    return pb.ModelGeometry(dtype=codec.dtype_to_proto(dtype), **values)


def create(stub: pb_grpc.LouverStub, session_id: str | None = None,
           dtype: torch.dtype = torch.float16, **fields: Any) -> str:
    """Create a session and return its id."""
    req = pb.CreateSessionRequest(geometry=geometry(dtype), session_id=session_id or new_id(),
                                  **fields)
    return stub.CreateSession(req).session.session_id


def kv(tokens: int, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys [Hkv, T, D] and values [Hkv, T, Dv]."""
    return torch.randn(HKV, tokens, D).to(dtype), torch.randn(HKV, tokens, DV).to(dtype)


def chunk(session_id: str, layer: int, start: int, keys: torch.Tensor,
          values: torch.Tensor) -> pb.AppendRequest:
    return pb.AppendRequest(session_id=session_id, layer=layer, start=start,
                            keys=codec.tensor_to_proto(keys),
                            values=codec.tensor_to_proto(values))


def prefill_requests(session_id: str, data: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     chunk_tokens: int = 64) -> list[pb.AppendRequest]:
    """Append requests covering every layer's K/V in chunks of ``chunk_tokens``."""
    reqs = []
    for layer, (k, v) in enumerate(data):
        for s in range(0, k.shape[1], chunk_tokens):
            e = s + chunk_tokens
            reqs.append(chunk(session_id, layer, s, k[:, s:e], v[:, s:e]))
    return reqs


def prefill(stub: pb_grpc.LouverStub, session_id: str, tokens: int,
            dtype: torch.dtype = torch.float16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Append ``tokens`` random tokens to every layer; returns the K/V per layer."""
    data = [kv(tokens, dtype) for _ in range(NUM_LAYERS)]
    stub.Append(iter(prefill_requests(session_id, data)))
    return data


def query(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(HQ, D).to(dtype)


def item(session_id: str, layer: int, q: torch.Tensor,
         new: tuple[torch.Tensor, torch.Tensor] | None = None,
         policy: pb.ThresholdPolicy | None = None, start: int | None = None) -> pb.AttendItem:
    msg = pb.AttendItem(session_id=session_id, layer=layer, q=codec.tensor_to_proto(q))
    if new is not None:
        msg.new_keys.CopyFrom(codec.tensor_to_proto(new[0]))
        msg.new_values.CopyFrom(codec.tensor_to_proto(new[1]))
    if policy is not None:
        msg.policy.CopyFrom(policy)
    if start is not None:
        msg.start = start
    return msg


DENSE = pb.ThresholdPolicy(dense=pb.DensePolicy())


def output(result: pb.AttendResult) -> torch.Tensor:
    return codec.tensor_from_proto(result.output, "output")


def dense_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention (float32): output [Hq, Dv], lse [Hq]."""
    attend = torch.ones(q.shape[0], keys.shape[1], dtype=torch.bool)
    return ref.masked_attention(q, keys, values, attend, 1.0 / D ** 0.5)


def status_of(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """Call and return the RpcError it raises (fails the test if it succeeds)."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but an error was expected")

