"""A server whose QUANT sessions run the Triton decode step (``index_backend=triton``): one
captured step per (layer, policy; one for every Fixed threshold), reused across decode steps
and re-captured as the index grows, answering like a torch-backend server over the same K/V.
Without CUDA the kernels run under Triton's interpreter (tests/conftest.py), so the shapes stay
small."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from louver_kernels import IndexConfig, IndexKind, Relative
from louver_kernels import reference as ref
from louver_proto import pb
from louver_service import wire
from louver_service.settings import Settings
from louver_service.warmup import WarmupShape, warm_up
from tests.service.helpers import (
    DENSE,
    NUM_LAYERS,
    ServerThread,
    create,
    dense_reference,
    geometry,
    item,
    kv,
    output,
    prefill_requests,
    query,
)

RELATIVE = pb.ThresholdPolicy(relative=pb.RelativePolicy(eps=1e-3))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CUDA: real graph replays
PREFILL, NEW = 250, 4   # the third step passes the index's capacity of 256 keys


def test_captured_steps_answer_like_the_torch_backend(
        make_server: Callable[..., ServerThread]) -> None:
    servers = {"triton": make_server(index_backend="triton", dense_fallback=False,
                                     device=DEVICE),
               "torch": make_server(index_backend="torch", device=DEVICE)}
    index = pb.IndexParams(buffer_size=32)
    data = [kv(PREFILL) for _ in range(NUM_LAYERS)]
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
    caps = []
    for t in range(3):
        q, new = query() * 6, kv(NEW)   # sharp attention: Relative(1e-3) drops most keys
        keys, values = torch.cat([keys, new[0]], 1), torch.cat([values, new[1]], 1)
        # a new Fixed threshold per step (each head's median score): the same captured step
        taus = ref.scores(q.float(), keys.float()).median(dim=1).values
        fixed = pb.ThresholdPolicy(fixed=pb.FixedPolicy(tau=taus.tolist()))
        results = {}
        for name, srv in servers.items():
            resp = srv.stub.Attend(pb.AttendRequest(items=[
                item(sids[name], 0, q, new, RELATIVE, start=PREFILL + NEW * t),
                item(sids[name], 0, q, policy=DENSE), item(sids[name], 0, q, policy=fixed)]))
            results[name] = resp.results
        for got, want in zip(results["triton"], results["torch"], strict=True):
            torch.testing.assert_close(output(got), output(want), atol=1e-3, rtol=1e-3)
            diff = (torch.tensor(list(got.stats.num_attended))
                    - torch.tensor(list(want.stats.num_attended))).abs()
            assert int(diff.max()) <= 1          # keys within float32 rounding of tau
        sparse = torch.tensor(list(results["triton"][0].stats.num_attended))
        assert int(sparse.max()) < keys.shape[1] // 2, sparse
        torch.testing.assert_close(output(results["triton"][1]),
                                   dense_reference(q, keys, values)[0], atol=1e-3, rtol=1e-3)
        steps = list(layers[0]._steps.values())
        assert len(steps) == 3 and not layers[1]._steps
        if t == 0:
            first_steps = steps
        assert [id(s) for s in steps] == [id(s) for s in first_steps]   # reused, not rebuilt
        index0 = layers[0].index
        assert index0 is not None and not any(s.stale for s in steps)
        caps.append(index0._cap)
    assert caps[0] < caps[-1]     # the storage grew and the steps were re-captured for it


def test_dense_fallback_runs_either_step(make_server: Callable[..., ServerThread]) -> None:
    """With the dense fallback (the default), a Relative item runs the layer's sparse step or
    its dense step (the second call of every timing round is the dense one): each answer is
    the one of the step that ran, every key attended in the dense case."""
    srv = make_server(index_backend="triton", device=DEVICE)
    assert srv.server.settings.dense_fallback
    sid = create(srv.stub, index=pb.IndexParams(buffer_size=32))
    data = [kv(PREFILL) for _ in range(NUM_LAYERS)]
    srv.stub.Append(iter(prefill_requests(sid, data)))
    keys, values = data[0]
    q = query() * 6
    ran = []
    for _ in range(3):
        got = srv.stub.Attend(pb.AttendRequest(items=[item(sid, 0, q, policy=RELATIVE)]))
        step = next(iter(srv.server.store.get(sid).layers[0]._steps.values()))
        attended = torch.tensor(list(got.results[0].stats.num_attended))
        if step.last_dense:
            assert bool((attended == keys.shape[1]).all())
            torch.testing.assert_close(output(got.results[0]),
                                       dense_reference(q, keys, values)[0], atol=1e-3,
                                       rtol=1e-3)
        else:
            assert int(attended.max()) < keys.shape[1] // 2
        ran.append(step.last_dense)
    assert ran[:2] == [False, True]


def test_backend_resolution_per_session() -> None:
    """The server's backend reaches the sessions its kernels can run; the others (another
    kind, a code layout or head dim the kernels lack) run on torch instead of failing."""
    default = Settings(index_backend="triton").index_config()
    assert default.backend == "triton"

    def backend(head_dim: int = 32, **index: Any) -> str:
        req = pb.CreateSessionRequest(geometry=geometry(head_dim=head_dim, value_dim=head_dim),
                                      index=pb.IndexParams(**index))
        return wire.session_spec_from_proto(req, default, Relative(1e-3)).config.backend

    assert backend() == "triton"
    assert backend(kind=pb.INDEX_KIND_BALLS) == "auto"
    assert backend(quant_bits=8) == "auto"            # the GPU code layout needs <= 7 bits
    assert backend(head_dim=48) == "auto"             # the kernels need a power of two
    torch_default = IndexConfig()
    req = pb.CreateSessionRequest(geometry=geometry(), index=pb.IndexParams())
    assert wire.session_spec_from_proto(req, torch_default, Relative(1e-3)).config.backend \
        == "auto"
    with pytest.raises(ValueError):
        Settings(index_backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError):            # the Triton backend implements QUANT only
        Settings(index_backend="triton", index_kind="balls")
    assert IndexKind.QUANT is default.kind


def test_kernel_pdl_setting_turns_programmatic_launch_off(
        make_server: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch) -> None:
    """kernel_pdl=false (LOUVER_KERNEL_PDL) turns programmatic dependent launch off for the
    process, and the captured steps still answer like the torch backend."""
    from louver_kernels.triton import _launch

    monkeypatch.setattr(_launch, "USE_PDL", True)   # restored after the test
    monkeypatch.setenv("LOUVER_KERNEL_PDL", "false")
    assert not Settings().kernel_pdl
    servers = {"triton": make_server(index_backend="triton", dense_fallback=False,
                                     kernel_pdl=False, device=DEVICE),
               "torch": make_server(index_backend="torch", device=DEVICE)}
    assert not _launch.USE_PDL
    assert _launch.pdl_launch(torch.device(DEVICE)) == {}
    data = [kv(PREFILL) for _ in range(NUM_LAYERS)]
    q = query() * 6
    answers = []
    for srv in servers.values():
        sid = create(srv.stub, index=pb.IndexParams(buffer_size=32))
        srv.stub.Append(iter(prefill_requests(sid, data)))
        got = srv.stub.Attend(pb.AttendRequest(items=[item(sid, 0, q, policy=RELATIVE)]))
        answers.append(got.results[0])
    diff = (torch.tensor(list(answers[0].stats.num_attended))
            - torch.tensor(list(answers[1].stats.num_attended))).abs()
    assert int(diff.max()) <= 1          # keys within float32 rounding of tau
    torch.testing.assert_close(output(answers[0]), output(answers[1]), atol=1e-3, rtol=1e-3)


def test_warm_up_runs_a_session_path_before_the_server_listens(
        make_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture) -> None:
    """warmup_shapes: before it listens, the server runs a throwaway layer of each shape
    through a build, captured decode steps with the dense fallback and a decode-time flush, and
    keeps nothing of it; on a GPU a session of that shape (queries in its dtype) then compiles
    no kernel."""
    from tests.kernels.test_index_triton import compiled_variants

    shape = WarmupShape.parse("6/2/32:bfloat16")
    config = Settings(index_backend="triton", index_buffer_size=16).index_config()
    report = warm_up(shape, torch.device(DEVICE), config, Relative(1e-3), fallback=True)
    assert report.kernels and report.flushes == 2 and report.seconds > 0
    caplog.set_level(logging.INFO, logger="louver_service.warmup")
    srv = make_server(index_backend="triton", device=DEVICE, index_buffer_size=16,
                      default_policy="relative:1e-3", warmup_shapes=" 6/2/32:bfloat16 ")
    assert "warmed up 6/2/32:bfloat16" in caplog.text and "GPU kernels" in caplog.text
    store = srv.server.store
    assert store.num_sessions == 0 and store.reserved_bytes == 0
    warm = compiled_variants()
    dims = {"num_q_heads": 6, "num_kv_heads": 2, "head_dim": 32, "value_dim": 32}
    sid = srv.stub.CreateSession(pb.CreateSessionRequest(
        geometry=geometry(torch.bfloat16, **dims))).session.session_id
    k, v = (torch.randn(2, 70, 32).to(torch.bfloat16) for _ in range(2))
    srv.stub.Append(iter(prefill_requests(sid, [(k, v)] * NUM_LAYERS)))
    for tokens in (16, 1, 1):          # a full buffer first: flushed after that step
        q = (torch.randn(6, 32) * 4).to(torch.bfloat16)
        new = (torch.randn(2, tokens, 32).to(torch.bfloat16),
               torch.randn(2, tokens, 32).to(torch.bfloat16))
        srv.stub.Attend(pb.AttendRequest(items=[item(sid, 0, q, new=new)]))
    index = store.get(sid).layers[0].index
    assert index is not None and index.uses_triton and index.num_flushes == 2
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        assert warm and compiled_variants() == warm
