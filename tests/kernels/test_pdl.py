"""Programmatic dependent launch (PDL): a kernel launched with it may start before the kernel
before it on the stream has finished, so it must wait (``_device.await_prior``) before touching
global memory. Checked here: every kernel of the step starts with that wait, and the wait holds
on a GPU that has PDL."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import triton
import triton.language as tl

from louver_kernels.triton import _launch
from louver_kernels.triton._device import await_prior
from louver_kernels.triton.attention import _sparse_attention_kernel
from louver_kernels.triton.decode import _prologue_kernel
from louver_kernels.triton.dense_attention import _dense_attention_kernel, _dense_merge_kernel
from louver_kernels.triton.quant_filter import _quant_filter_kernel

CUDA = torch.cuda.is_available()
PDL_GPU = CUDA and torch.cuda.get_device_capability() >= (9, 0)

STEP_KERNELS = [_prologue_kernel, _quant_filter_kernel, _sparse_attention_kernel,
                _dense_attention_kernel, _dense_merge_kernel]


@pytest.mark.parametrize("kernel", STEP_KERNELS, ids=lambda k: k.fn.__name__)
def test_every_step_kernel_awaits_before_anything_else(kernel: object) -> None:
    """The first statement after the docstring is ``await_prior(PDL)``, PDL a constexpr
    parameter: nothing reads or writes memory before the wait."""
    fn = kernel.fn   # type: ignore[attr-defined]
    tree = ast.parse(inspect.getsource(fn))
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    body = func.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]                                  # the docstring
    first = body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), fn.__name__
    call = first.value
    assert isinstance(call.func, ast.Name) and call.func.id == "await_prior", fn.__name__
    assert [a.id for a in call.args if isinstance(a, ast.Name)] == ["PDL"], fn.__name__
    annotation = {a.arg: a.annotation for a in func.args.args}.get("PDL")
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
