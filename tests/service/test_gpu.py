"""The service on a CUDA device (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from louver_proto import pb
from louver_service.settings import Settings
from tests.service.helpers import (
    DENSE,
    NUM_LAYERS,
    ServerThread,
    create,
    dense_reference,
    item,
    kv,
    output,
    prefill,
    query,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_device_and_budget() -> None:
    s = Settings()
    device = s.resolve_device()
    assert device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory
    assert s.resolve_memory_budget(device) == int(total * s.memory_fraction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_session_on_cuda(dtype: torch.dtype) -> None:
    srv = ServerThread(device="cuda", metrics_port=-1)
    try:
        sid = create(srv.stub, dtype=dtype)
        data = prefill(srv.stub, sid, 700, dtype)
        session = srv.server.store.get(sid)
        assert all(layer.index is not None and layer.index.device.type == "cuda"
                   for layer in session.layers)
        q = query()
        new = kv(1, dtype)
        resp = srv.stub.Attend(pb.AttendRequest(items=[
            item(sid, layer, q, new, DENSE, start=700) for layer in range(NUM_LAYERS)]))
        for layer, result in enumerate(resp.results):
            keys = torch.cat([data[layer][0], new[0]], 1)
            values = torch.cat([data[layer][1], new[1]], 1)
            torch.testing.assert_close(output(result), dense_reference(q, keys, values)[0],
                                       atol=1e-3, rtol=1e-3)
        default = srv.stub.Attend(pb.AttendRequest(items=[item(sid, 0, q)])).results[0]
        assert all(0 < a <= 701 for a in default.stats.num_attended)
    finally:
        srv.close()
