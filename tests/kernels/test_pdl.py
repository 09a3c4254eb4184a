"""Programmatic dependent launch (PDL): a kernel launched with it may start before the kernel
before it on the stream has finished, so it must wait (``_device.await_prior``) before touching
global memory. Checked here: every kernel of the step starts with that wait (the filter: unless
its ``early`` start is asked for, which waits before it reads what the kernel before it writes),
and the waits hold on a GPU that has PDL."""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
import triton
import triton.language as tl

from louver_kernels.triton import _launch
from louver_kernels.triton._device import await_prior
from louver_kernels.triton.attention import _sparse_attention_kernel
from louver_kernels.triton.decode import _prologue_kernel
from louver_kernels.triton.dense_attention import _dense_attention_kernel, _dense_merge_kernel
from louver_kernels.triton.quant_filter import _quant_filter_kernel, quant_filter
from tests.kernels.keygen import gen_seed
from tests.kernels.test_triton_quant_filter import (
    Case,
    _as_mask,
    _lists,
    _lists_unpoisoned,
    _tau_in_gap,
)

CUDA = torch.cuda.is_available()
PDL_GPU = CUDA and torch.cuda.get_device_capability() >= (9, 0)

STEP_KERNELS = [_prologue_kernel, _quant_filter_kernel, _sparse_attention_kernel,
                _dense_attention_kernel, _dense_merge_kernel]


def _is_call(stmt: ast.stmt, name: str, args: list[str]) -> bool:
    """Whether ``stmt`` is the expression statement ``name(*args)`` (args: names)."""
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == name
            and [a.id for a in stmt.value.args if isinstance(a, ast.Name)] == args
            and len(stmt.value.args) == len(args))


@pytest.mark.parametrize("kernel", STEP_KERNELS, ids=lambda k: k.fn.__name__)
def test_every_step_kernel_awaits_before_anything_else(kernel: object) -> None:
    """The first statement after the docstring is ``await_prior(PDL)``, PDL a constexpr
    parameter: nothing reads or writes memory before the wait. The filter's may instead be
    ``if EARLY: gdc_launch_dependents() else: await_prior(PDL)`` (EARLY a constexpr): its
    early start, whose wait test_filter_early_start_waits_for_tau_and_slack checks."""
    fn = kernel.fn   # type: ignore[attr-defined]
    tree = ast.parse(inspect.getsource(fn))
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    body = func.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]                                  # the docstring
    first = body[0]
    constexprs = ["PDL"]
    if isinstance(first, ast.If) and kernel is _quant_filter_kernel:
        assert isinstance(first.test, ast.Name) and first.test.id == "EARLY", fn.__name__
        assert len(first.body) == 1 and _is_call(first.body[0], "gdc_launch_dependents", [])
        assert len(first.orelse) == 1, fn.__name__
        first = first.orelse[0]
        constexprs.append("EARLY")
    assert _is_call(first, "await_prior", ["PDL"]), fn.__name__
    annotations = {a.arg: a.annotation for a in func.args.args}
    for name in constexprs:
        annotation = annotations.get(name)
        assert annotation is not None and "constexpr" in ast.unparse(annotation), fn.__name__


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _slow_writer(x_ptr, wait_ns):
    """Lets its successor launch at once, then spins for wait_ns before writing x = 1."""
    await_prior(True)
    t = _now()
    t_end = t + wait_ns
    while t < t_end:
        t = _now()
    tl.store(x_ptr, 1)


@triton.jit
def _slow_copy(src_ptr, dst_ptr, n, wait_ns, BLOCK: tl.constexpr):
    """Lets its successor launch at once, then spins for wait_ns before copying n floats."""
    await_prior(True)
    t = _now()
    t_end = t + wait_ns
    while t < t_end:
        t = _now()
    offs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _reader(x_ptr, y_ptr, PDL: tl.constexpr):
    await_prior(PDL)
    tl.store(y_ptr, tl.load(x_ptr))


@pytest.mark.skipif(not PDL_GPU, reason="programmatic dependent launch needs an sm_90+ GPU")
def test_await_prior_waits_for_the_kernel_before() -> None:
    """A reader launched with PDL right after a writer that lets it start at once and writes
    only after 200 us reads the written value, in eager launches and in a CUDA graph."""
    x = torch.zeros(1, dtype=torch.int32, device="cuda")
    y = torch.full((1,), -1, dtype=torch.int32, device="cuda")
    opts = _launch.pdl_launch(x.device)
    assert opts == {"launch_pdl": True}

    def pair() -> None:
        x.zero_()
        _slow_writer[(1,)](x, 200_000)
        _reader[(1,)](x, y, PDL=True, **opts)

    for _ in range(3):
        y.fill_(-1)
        pair()
        torch.cuda.synchronize()
        assert int(y.item()) == 1
    graph = _launch.capture_graph(x.device, pair, warmups=1)
    for _ in range(3):
        y.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert int(y.item()) == 1


@pytest.mark.skipif(not PDL_GPU, reason="programmatic dependent launch needs an sm_90+ GPU")
def test_filter_early_start_waits_for_tau_and_slack() -> None:
    """quant_filter(early=True) launched right after a kernel that lets it start at once and
    writes tau and slack only after 200 us (the place of the step's prologue) finds the
    candidates and pruned_lse of the written values, not of what was there before (tau = +inf,
    slack = -inf: no candidate), in eager launches and in a CUDA graph."""
    gen, seed = gen_seed()
    case = Case(kind="clustered", hkv=2, g=3, n=8192, d=64, bits=6, coarse=4, group=16,
                seg=256, dtype=torch.float16, gen=gen)
    msg = f"seed={seed}"
    tau = _tau_in_gap(case.full, 0.9).to("cuda")
    cp0, cc0, pl0 = case.run(tau)      # also makes this stream's counters (no launch later)
    want = _as_mask(_lists(cp0, cc0, case.n, msg), case.n)
    src = torch.stack([tau, case.slack])                 # what the slow kernel writes
    buf = torch.empty_like(src)                          # rows: tau, slack (each contiguous)
    # outputs made beforehand: nothing may launch between the two kernels
    cand_pos = torch.empty(case.hkv, case.records.shape[1], dtype=torch.int32, device="cuda")
    cand_count = torch.empty(case.hkv, dtype=torch.int32, device="cuda")
    pruned = torch.empty(case.hq, device="cuda")

    def pair() -> None:
        buf[0].fill_(math.inf)
        buf[1].fill_(-math.inf)
        _slow_copy[(1,)](src, buf, src.numel(), 200_000,
                         BLOCK=triton.next_power_of_2(src.numel()))
        quant_filter(case.q, case.records, case.err, case.lo, case.step, buf[1], buf[0],
                     num_indexed=case.n, bits=case.bits, coarse_bits=case.coarse,
                     group=case.group, scale=case.index.scale, segment_size=case.seg,
                     cand_pos=cand_pos, cand_count=cand_count, pruned_lse=pruned, early=True)

    def check() -> None:
        torch.cuda.synchronize()
        assert torch.equal(cand_count, cc0), msg
        got = _as_mask(_lists_unpoisoned(cand_pos, cand_count, case.n), case.n)
        assert torch.equal(got, want), msg
        assert torch.allclose(pruned, pl0, rtol=1e-5, atol=1e-5), msg

    for _ in range(3):
        pair()
        check()
    graph = _launch.capture_graph(buf.device, pair, warmups=1)
    for _ in range(3):
        cand_count.fill_(-1)
        graph.replay()
        check()
