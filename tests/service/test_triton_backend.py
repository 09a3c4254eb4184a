"""A server whose QUANT sessions run the Triton decode step (``index_backend=triton``): one
captured step per (layer, policy), reused across decode steps and re-captured as the index
grows, answering like a torch-backend server over the same K/V. Without CUDA the kernels run
under Triton's interpreter (tests/conftest.py), so the shapes stay small."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from louver_kernels import IndexKind
from louver_proto import codec, pb
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
    prefill_requests,
    query,
)

RELATIVE = pb.ThresholdPolicy(relative=pb.RelativePolicy(eps=1e-3))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CUDA: real graph replays


def test_captured_steps_answer_like_the_torch_backend(
        make_server: Callable[..., ServerThread]) -> None:
    servers = {"triton": make_server(index_backend="triton", device=DEVICE),
               "torch": make_server(device=DEVICE)}
    index = pb.IndexParams(buffer_size=32)
    data = [kv(96) for _ in range(NUM_LAYERS)]
    sids = {}
    for name, srv in servers.items():
        sids[name] = create(srv.stub, index=index)
        srv.stub.Append(iter(prefill_requests(sids[name], data)))
    layers = servers["triton"].server.store.get(sids["triton"]).layers
    assert all(layer.index is not None and layer.index.uses_triton for layer in layers)
    assert not any(layer.index is not None and layer.index.uses_triton
                   for layer in servers["torch"].server.store.get(sids["torch"]).layers)
    keys, values = data[0]
    first_steps: list[object] = []
    for t in range(3):                       # 97, 98, 99 tokens: past the capacity of 96
        q, new = query(), kv(1)
        keys, values = torch.cat([keys, new[0]], 1), torch.cat([values, new[1]], 1)
        results = {}
        for name, srv in servers.items():
            resp = srv.stub.Attend(pb.AttendRequest(items=[
                item(sids[name], 0, q, new, RELATIVE, start=96 + t),
                item(sids[name], 0, q, policy=DENSE)]))
            results[name] = resp.results
        for got, want in zip(results["triton"], results["torch"], strict=True):
            torch.testing.assert_close(output(got), output(want), atol=1e-3, rtol=1e-3)
            diff = (torch.tensor(list(got.stats.num_attended))
                    - torch.tensor(list(want.stats.num_attended))).abs()
            assert int(diff.max()) <= 1          # keys within float32 rounding of tau
        torch.testing.assert_close(output(results["triton"][1]),
                                   dense_reference(q, keys, values)[0], atol=1e-3, rtol=1e-3)
        steps = list(layers[0]._steps.values())
        assert len(steps) == 2 and not layers[1]._steps
        if t == 0:
            first_steps = steps
        assert [id(s) for s in steps] == [id(s) for s in first_steps]   # reused, not rebuilt
    index0 = layers[0].index
    assert index0 is not None
    assert layers[0].index_bytes >= index0.index_bytes + sum(
        s.scratch_bytes for s in layers[0]._steps.values())


def test_backend_setting_applies_to_quant_sessions_only() -> None:
    """The server's backend reaches the QUANT sessions; a session that asks for BALLS runs on
    torch."""
    s = Settings(index_backend="triton")
    assert s.index_config().backend == "triton"
    quant = codec.index_config_from_proto(pb.IndexParams(kind=pb.INDEX_KIND_QUANT),
                                          s.index_config())
    balls = codec.index_config_from_proto(pb.IndexParams(kind=pb.INDEX_KIND_BALLS),
                                          s.index_config())
    assert quant.backend == "triton" and balls.kind is IndexKind.BALLS
    assert balls.backend == "auto"
    with pytest.raises(ValueError):
        Settings(index_backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError):            # the Triton backend implements QUANT only
        Settings(index_backend="triton", index_kind="balls")
