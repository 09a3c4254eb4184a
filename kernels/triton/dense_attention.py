"""Decode-time dense attention over every stored key (split-K, tensor cores).

Two launches compute, for every query head h of one decode step (KV head h // G),

    out[h] = softmax(scale * q_h . K[:end]) @ V[:end]       float32 [Hq, Dv]
    lse[h] = logsumexp(scale * q_h . K[:end])                float32 [Hq]
    num_attended[h] = end

the step a Dense policy runs, and the one the decode step falls back to when most keys are
candidates anyway. It attends keys ``[0, end)`` with no threshold, so (unlike the sparse
attention) its scores need not be the float32 dot products the index's bounds are proven
against: they come from tensor cores, and the kernel is a streaming read of K and V.
``kernels/reference.py::masked_attention`` with every key attended is the ground truth.

Precision. Scores: q . k on tensor cores with float32 accumulation; float16 / bfloat16 keys
take q in their dtype (a q of another dtype is split as q_hi + q_lo, two products, so it keeps
~8-11 more bits: a float16 q against bfloat16 keys exactly), float32 keys use IEEE float32
products. P @ V: a weight p in [0, 1] rounded to float16 / bfloat16 would carry a relative
error of 2^-11 / 2^-8 into the output (what FlashAttention does); here each head has two rows
of the tile, the first multiplies V by hi(p) = round(p) and the second by lo(p) =
round(p - hi(p)), and the two are summed at the end, so p keeps about twice the bits for the
same MMA instruction (the rows are padding otherwise: G < 16 heads fill an MMA of 16 rows).
The softmax's (m, l) stay float32.

Work decomposition (flash-decoding): program (KV head kh, split) reads blocks of BLOCK_N keys
of a contiguous range of ``[0, end)`` for the G query heads of kh (GQA: each K and V row is
read once); the splits per head come from the launch (sized by the largest end the launch may
see: ``end`` may be a device tensor, which makes the launch capturable in a CUDA graph), and at
most one per MIN_BLOCKS blocks of the actual end takes part. Each writes its partial (m, l,
acc) to a workspace; a second launch merges them and writes the outputs (a merge in the
last-arriving program of each KV head, as in the sparse attention, was serial: on an H200 it
cost ~10 us of a 9/3/64 step at 128k keys with 176 splits per head). The merge runs up to
_MERGE_PROGRAMS programs per query head, each over a chunk of acc's columns (at least 8), so
that one load of a program covers 4096 / columns partials: the launcher's default split
counts on 132 SMs take one round of dependent loads for Hkv >= 3 (352 partials per head for
9/3/64, 132 for 32/8/128) instead of up to six. On an H200 (float16, graph replay, one
program per query head before): 9/3/64 at 8k / 32k / 128k keys 8.5 / 15.9 / 35.4 -> 7.5 /
11.5 / 30.9 us, 32/8/128 at 8k / 128k 15.3 / 143.1 -> 14.5 / 141.0 us.
The loop is software-pipelined by Triton (``tl.range(num_stages)``: asynchronous copies of the
next blocks while one is computed). Launch parameters measured on an H200 (float16, 32k and
128k keys, 9/3/64 and 32/8/128; ``benchmarks/bench_attention_gpu.py --dense-sweep``): one warp
per program and 16-key blocks were fastest (with more warps the tile's row reductions and the
P operand cross warps through shared memory at every block).
"""

from __future__ import annotations

import math
from typing import no_type_check

import torch
import triton
import triton.language as tl

from louver_kernels.triton._device import await_prior, load_scalar, query_error
from louver_kernels.triton._launch import (
    attention_outputs,
    check_attention_inputs,
    check_bound,
    check_int,
    check_out,
    interpreted,
    next_pow2,
    num_sms,
    pdl_launch,
)
from louver_kernels.triton._splitk import store_outputs

__all__ = ["dense_attention"]


@triton.jit
def _dot(a, b, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with float32 accumulation; DOT_F32 takes the product of the operands' values in
    float32 (the interpreter's tl.dot mishandles bfloat16: the same products, exactly)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _scores(q, k, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """q @ k^T [M, BLOCK_N] with float32 accumulation. The P split needs a head's two rows to
    get bitwise-equal scores (hi(p) from one row and lo(p) from the other add up to p only
    when both rows hold the same p): true of the tensor cores, which run one instruction
    sequence for every element; the interpreter's matmul (BLAS) rounds rows differently by
    their place in its tiles, so there the products are summed row by row instead."""
    if DOT_F32:
        return tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    else:
        return tl.dot(q, tl.trans(k), input_precision=PREC)


@triton.jit
def _dense_block(q_hi, q_lo, k_base, v_base, start, end, m_i, l_i, acc, C, lo_row,
                 offs_n, offs_d, offs_dv, stride_kn, stride_vn,
                 Q_SPLIT: tl.constexpr, P_SPLIT: tl.constexpr, PREC: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """One block of BLOCK_N keys from ``start``: the online-softmax update of (m, l, acc)."""
    offs = start + offs_n
    ok = offs < end
    pos = offs.to(tl.int64)
    k = tl.load(k_base + pos[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None],
                other=0.0)
    s = _scores(q_hi, k, PREC, DOT_F32)                                     # [M, BLOCK_N]
    if Q_SPLIT:
        s += _scores(q_lo, k, PREC, DOT_F32)
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_use) * C)
    p = tl.exp2((s - m_use[:, None]) * C)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + pos[:, None] * stride_vn + offs_dv[None, :], mask=ok[:, None],
                other=0.0)
    if P_SPLIT:
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        pv = tl.where(lo_row[:, None], p_lo, p_hi)
    else:
        pv = p.to(v.dtype)
    acc = acc * alpha[:, None] + _dot(pv, v, PREC, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _split_plan(end_ptr, end, cap, n_split, BLOCK_N: tl.constexpr, MIN_BLOCKS: tl.constexpr,
                END_ON_DEVICE: tl.constexpr):
    """(end clamped to [0, cap], splits taking part, blocks per split): at most one split per
    MIN_BLOCKS blocks, at most n_split, at least one; each of them gets at least one block."""
    n = tl.minimum(tl.maximum(load_scalar(end_ptr, end, END_ON_DEVICE), 0), cap)
    n_blocks = tl.cdiv(n, BLOCK_N)
    active = tl.minimum(tl.maximum(tl.cdiv(n_blocks, MIN_BLOCKS), 1), n_split)
    per_split = tl.maximum(tl.cdiv(n_blocks, active), 1)
    active = tl.maximum(tl.cdiv(n_blocks, per_split), 1)
    return n, active, per_split


@triton.jit(do_not_specialize=["end"])
@no_type_check
def _dense_attention_kernel(
    q_ptr, k_ptr, v_ptr, end_ptr, ws_ptr,
    scale, end, cap,
    stride_qh, stride_kh, stride_kn, stride_vh, stride_vn,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_BLOCKS: tl.constexpr, END_ON_DEVICE: tl.constexpr,
    Q_SPLIT: tl.constexpr, P_SPLIT: tl.constexpr, PREC: tl.constexpr, NUM_STAGES: tl.constexpr,
    PIPELINE: tl.constexpr, PDL: tl.constexpr,
):
    await_prior(PDL)
    kh = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    LOG2E: tl.constexpr = 1.4426950408889634
    C = scale * LOG2E
    n, active, per_split = _split_plan(end_ptr, end, cap, n_split, BLOCK_N, MIN_BLOCKS,
                                       END_ON_DEVICE)
    if split >= active:
        return
    lo = split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, n)

    # rows of the [M, *] tiles: head r % HALF; with P_SPLIT rows >= HALF carry lo(p)
    offs_m = tl.arange(0, M)
    head = offs_m % HALF
    row_ok = head < G
    lo_row = offs_m >= HALF
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + (kh * G + head)[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    q_hi = q.to(k_ptr.dtype.element_ty)
    q_lo = (q - q_hi.to(tl.float32)).to(k_ptr.dtype.element_ty)
    k_base = k_ptr + kh.to(tl.int64) * stride_kh
    v_base = v_ptr + kh.to(tl.int64) * stride_vh

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, DV], tl.float32)
    if PIPELINE:
        for it in tl.range(0, tl.cdiv(hi - lo, BLOCK_N), num_stages=NUM_STAGES):
            m_i, l_i, acc = _dense_block(q_hi, q_lo, k_base, v_base, lo + it * BLOCK_N, hi,
                                         m_i, l_i, acc, C, lo_row, offs_n, offs_d, offs_dv,
                                         stride_kn, stride_vn, Q_SPLIT, P_SPLIT, PREC, False)
    else:
        # Triton's interpreter: no tl.range over device-derived bounds, float32 products
        start = lo
        while start < hi:
            m_i, l_i, acc = _dense_block(q_hi, q_lo, k_base, v_base, start, hi, m_i, l_i, acc,
                                         C, lo_row, offs_n, offs_d, offs_dv, stride_kn,
                                         stride_vn, Q_SPLIT, P_SPLIT, PREC, True)
            start += BLOCK_N

    # this split's partial, head-major (what the merge reads): m, l, acc relative to m; head
    # h's rows h and h + HALF (the lo(p) half) summed
    if P_SPLIT:
        acc_h = tl.sum(tl.reshape(acc, [2, HALF, DV]), axis=0)
    else:
        acc_h = acc                                                     # M == HALF
    m_h = tl.max(tl.reshape(m_i, [M // HALF, HALF]), axis=0)
    l_h = tl.max(tl.reshape(l_i, [M // HALF, HALF]), axis=0)
    offs_h = tl.arange(0, HALF)
    h_ok = offs_h < G
    slot = (kh * G + offs_h) * n_split + split                          # [HALF]
    n_slots = tl.num_programs(0) * G * n_split
    tl.store(ws_ptr + slot, m_h, mask=h_ok)
    tl.store(ws_ptr + n_slots + slot, l_h, mask=h_ok)
    tl.store(ws_ptr + 2 * n_slots + slot[:, None] * DV + offs_dv[None, :], acc_h,
             mask=h_ok[:, None])


@triton.jit(do_not_specialize=["end", "n_split", "n_slots"])
@no_type_check
def _dense_merge_kernel(
    ws_ptr, end_ptr, out_ptr, lse_ptr, natt_ptr,
    q_ptr, tau_ptr, dropped_ptr, ncand_ptr, bad_ptr,
    scale, end, cap, n_split, n_slots, max_abs, stride_qh,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_BLOCKS: tl.constexpr, END_ON_DEVICE: tl.constexpr,
    CHUNK: tl.constexpr, COLS: tl.constexpr, STEP: tl.constexpr, PDL: tl.constexpr,
):
    """Program (h, c): query head h's partials merged over the COLS columns [c COLS, (c + 1)
    COLS) of acc (online max over CHUNK slots at a time) and written to out; every column
    program of h computes the same m and l in the same order, so each writes the same lse and
    count (the column 0 program also the step's outputs). STEP: also the decode step's (see
    dense_attention)."""
    await_prior(PDL)
    h = tl.program_id(0)
    col0 = tl.program_id(1) * COLS
    LOG2E: tl.constexpr = 1.4426950408889634
    C = scale * LOG2E
    n, active, _per = _split_plan(end_ptr, end, cap, n_split, BLOCK_N, MIN_BLOCKS,
                                  END_ON_DEVICE)
    offs_s = tl.arange(0, CHUNK)
    offs_c = col0 + tl.arange(0, COLS)
    m_tot = tl.full([1], float("-inf"), tl.float32)
    l_tot = tl.zeros([1], tl.float32)
    o_tot = tl.zeros([1, COLS], tl.float32)
    base = h * n_split
    s0 = 0
    while s0 < active:
        sl = s0 + offs_s
        ok = sl < active
        m_s = tl.load(ws_ptr + base + sl, mask=ok, other=float("-inf"))[None, :]
        l_s = tl.load(ws_ptr + n_slots + base + sl, mask=ok, other=0.0)[None, :]
        a_s = tl.load(ws_ptr + 2 * n_slots + (base + sl)[:, None] * DV + offs_c[None, :],
                      mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_tot, tl.max(m_s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_tot - m_use) * C)
        w = tl.exp2((m_s - m_use[:, None]) * C)                           # [1, CHUNK]
        l_tot = l_tot * alpha + tl.sum(l_s * w, axis=1)
        o_tot = o_tot * alpha[:, None] + tl.sum(tl.reshape(w, [CHUNK, 1]) * a_s, axis=0)[None, :]
        m_tot = m_new
        s0 += CHUNK
    qh = h + tl.arange(0, 1)
    store_outputs(out_ptr, lse_ptr, natt_ptr, qh, qh >= 0, m_tot, l_tot, o_tot,
                  tl.zeros([1], tl.int32) + n, scale, DV, col0, COLS)
    if STEP:
        if col0 == 0:
            tl.store(tau_ptr + qh, tl.full([1], float("-inf"), tl.float32))
            tl.store(dropped_ptr + qh, tl.zeros([1], tl.float32))
            tl.store(ncand_ptr + qh, tl.zeros([1], tl.int64) + n)
            if h % G == 0:   # one program per KV head checks its query heads
                tl.store(bad_ptr + h // G,
                         query_error(q_ptr, h // G, stride_qh, max_abs, G, G_P, D))


_INTERPRETED = interpreted(_dense_attention_kernel)   # no tl.range pipelining there
_MAX_SPLITS = 65535   # grid dimension 1 (CUDA's limit)
# merge programs per query head (column chunks of acc, at least 8 columns each)
_MERGE_PROGRAMS = 8


def _config(d: int, dv: int, elt: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_stages, num_warps) by head dim and element size (see the module docstring)."""
    return 16, (2 if max(d, dv) * elt >= 256 else 3), 1


def dense_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    scale: float,
    end: int | torch.Tensor,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_attended: torch.Tensor | None = None,
    num_splits: int | None = None,
    min_blocks: int = 4,
    grid_per_sm: int = 8,
    block_n: int | None = None,
    num_stages: int | None = None,
    num_warps: int | None = None,
    p_split: bool = True,
    step_outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    max_query_abs: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of every query head over keys [0, end) of its KV head, for one decode step.

    Args:
        q: [Hq, D] float16 / bfloat16 / float32, last dim contiguous.
        keys: [Hkv, cap, D] storage, float16 / bfloat16 / float32, last dim contiguous; only
            positions < end are read. Hq must be a multiple of Hkv.
        values: [Hkv, cap_v, Dv] storage, same dtype as keys.
        scale: softmax scale applied to raw scores, > 0.
        end: keys attended: [0, end), 0 <= end <= min(cap, cap_v); a Python int or a 1-element
            int32/int64 tensor on q's device (read by the kernel, clamped to [0, cap]: use this
            to capture one CUDA graph for every decode step).
        out, lse, num_attended: optional preallocated outputs: float32 [Hq, Dv], float32 [Hq],
            int32 or int64 [Hq], contiguous, on q's device. Every element is written.
        num_splits: programs per KV head (default: grid_per_sm programs per SM, at most one per
            min_blocks blocks of the largest end); at most one per min_blocks blocks of the
            actual end takes part.
        block_n, num_stages, num_warps: tile rows, pipeline depth, warps (defaults by head dim).
        p_split: carry each softmax weight as hi + lo in the 16-bit P @ V (see the module
            docstring); False rounds it once, like FlashAttention.
        step_outputs: (tau float32 [Hq], dropped float32 [Hq], num_candidates int64 [Hq],
            q_error int32 [Hkv]), contiguous, on q's device: the rest of a Dense decode step's
            outputs, written by the merge launch (the step needs no other launch): tau = -inf,
            dropped = 0, num_candidates = end, q_error[kh] = 1 if an entry of KV head kh's
            query heads is NaN, +-Inf or above max_query_abs in magnitude, else 0. Against
            float16 keys a q of another dtype is rounded to float16 for the tensor cores, so
            there max_query_abs is at most 65504 (the float16 maximum): a larger entry would
            overflow and is reported instead. Without step_outputs that is the caller's to
            ensure.

    Returns:
        (out float32 [Hq, Dv], lse float32 [Hq], num_attended [Hq] = end). With end = 0 every
        head gets out = 0 and lse = -inf.

    Raises:
        ValueError: on any shape, dtype, device, layout or range problem of the arguments.
    """
    hq, d, hkv, cap, dv = check_attention_inputs(q, keys, values, scale)
    if keys.dtype != values.dtype:
        raise ValueError(f"keys and values must have one dtype, got {keys.dtype} and "
                         f"{values.dtype}")
    device = q.device
    dev_id = q.get_device()
    e, e_t = check_bound("end", end, device)
    if e_t is None and not 0 <= e <= cap:
        raise ValueError(f"end={e} must be in [0, {cap}] (the storage)")
    for name, v in (("min_blocks", min_blocks), ("grid_per_sm", grid_per_sm)):
        check_int(name, v, 1, 1 << 20)
    if num_splits is not None:
        check_int("num_splits", num_splits, 1, _MAX_SPLITS)
    if not isinstance(p_split, bool):
        raise ValueError(f"p_split must be a bool, got {p_split!r}")
    bn, stages, warps = _config(d, dv, keys.element_size())
    block_n = bn if block_n is None else block_n
    if check_int("block_n", block_n, 16, 256) & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    num_stages = check_int("num_stages", stages if num_stages is None else num_stages, 1, 8)
    num_warps = check_int("num_warps", warps if num_warps is None else num_warps, 1, 16)
    out, lse, num_attended = attention_outputs(out, lse, num_attended, hq, dv, device)
    if step_outputs is not None:
        if not isinstance(step_outputs, tuple) or len(step_outputs) != 4:
            raise ValueError("step_outputs must be (tau, dropped, num_candidates, q_error)")
        for name, t, shape, dtype in zip(
                ("tau", "dropped", "num_candidates", "q_error"), step_outputs,
                ((hq,), (hq,), (hq,), (hkv,)),
                (torch.float32, torch.float32, torch.int64, torch.int32), strict=True):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"step_outputs' {name} must be a tensor")
            check_out(name, t, shape, (dtype,), dev_id)

    g = hq // hkv
    sixteen = keys.element_size() == 2
    p_split = p_split and sixteen
    half = max(8, next_pow2(g)) if p_split else max(16, next_pow2(g))
    rows = 2 * half if p_split else half
    blocks_max = max(1, -(-(cap if e_t is not None else e) // block_n))
    if num_splits is None:
        num_splits = max(1, min(-(-grid_per_sm * num_sms(device) // hkv),
                                -(-blocks_max // min_blocks), _MAX_SPLITS))
    n_slots = hq * num_splits
    if n_slots * (dv + 2) >= 2**31:   # the kernels index the workspace with int32
        raise ValueError(f"num_splits={num_splits} is too large for Hq={hq}, Dv={dv}")
    workspace = torch.empty(n_slots * (dv + 2), dtype=torch.float32, device=device)
    end_arg = e_t if e_t is not None else q
    pdl = pdl_launch(device)   # the merge's; the split pass launches as usual (_launch.pdl_launch)
    _dense_attention_kernel[(hkv, num_splits)](
        q, keys, values, end_arg, workspace,
        float(scale), e, cap,
        q.stride(0), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        G=g, D=d, DV=dv, M=rows, HALF=half, BLOCK_N=block_n, MIN_BLOCKS=min_blocks,
        END_ON_DEVICE=e_t is not None, Q_SPLIT=sixteen and q.dtype != keys.dtype,
        P_SPLIT=p_split, PREC="ieee" if not sixteen else "tf32", NUM_STAGES=num_stages,
        PIPELINE=not _INTERPRETED, PDL=bool(pdl), num_warps=num_warps, num_stages=num_stages,
    )
    tau, dropped, ncand, bad = step_outputs if step_outputs is not None else (out,) * 4
    # the largest finite value at most: the check is |q| <= max_query_abs, which Inf must fail
    max_query_abs = min(max_query_abs, float(torch.finfo(torch.float32).max))
    if keys.dtype == torch.float16 and q.dtype != torch.float16:
        max_query_abs = min(max_query_abs, float(torch.finfo(torch.float16).max))
    cols = max(8, dv // _MERGE_PROGRAMS)
    _dense_merge_kernel[(hq, dv // cols)](
        workspace, end_arg, out, lse, num_attended,
        q, tau, dropped, ncand, bad,
        float(scale), e, cap, num_splits, n_slots, float(max_query_abs), q.stride(0),
        G=g, G_P=next_pow2(g), D=d, DV=dv, BLOCK_N=block_n, MIN_BLOCKS=min_blocks,
        END_ON_DEVICE=e_t is not None, CHUNK=4096 // cols, COLS=cols,
        STEP=step_outputs is not None, PDL=bool(pdl), num_warps=4, **pdl,
    )
    return out, lse, num_attended
