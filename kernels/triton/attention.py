"""Decode-time sparse attention over gathered candidates plus the recent buffer (split-K).

One launch computes, for every query head h of one decode step,

    attended(h) = {n in cand(h // G) : fl32(q_h . k_n) >= tau_h} U [buffer_start, buffer_end)
    out[h]  = softmax(scale * q_h . K[attended]) @ V[attended]        float32 [Hq, Dv]
    lse[h]  = logsumexp(scale * q_h . k_n over attended)              float32 [Hq]
    num_attended[h] = |attended(h)|
    below(h)     = {n in cand(h // G) : fl32(q_h . k_n) < tau_h}   (the candidates h drops)
    below_lse[h] = logsumexp(scale * q_h . k_n over below(h))         float32 [Hq], optional

``kernels/reference.py::masked_attention`` is the ground truth (with the attend mask built from
the same rule). below_lse is the certificate's term for the candidates a head does not attend:
their exact scores are computed anyway, so the kernel accumulates them in a second online
(max, sum) per head and lane. Only valid candidates count (never buffer keys, padding beyond
cand_count or positions outside [0, buffer_start)); -inf where there is none (always when
tau_h = -inf; every valid candidate when tau_h = +inf). It is computed only when the caller
passes a below_lse tensor (constexpr BELOW): otherwise the kernel is the same as without it.
With pruned_lse / dropped / num_candidates (constexpr CERT) the last-arriving program of each
KV head also writes the decode step's certificate (see ``sparse_attention``), which saves the
decode step a launch.

Work decomposition ("flash-decoding")
-------------------------------------
For KV head ``kh`` the kernel walks a *virtual candidate list* of T = C + B entries: the C
candidate positions ``cand_pos[kh, :cand_count[kh]]``, filtered by tau, followed by the
B = buffer_end - buffer_start buffer positions, attended unconditionally. The list is cut into
blocks of BLOCK_N entries and the blocks into contiguous ranges (splits), one program per
(KV head, split). The grid is one-dimensional and
sized by the launcher for the most work (maxC, or the capacity when counts are read on the
device); every program reads all KV heads' counts and works out the same assignment: head kh gets
1 + floor((P - Hkv) * blocks_kh / sum of blocks) of the P programs, at most
ceil(blocks_kh / MIN_BLOCKS) and at least one, in head order; the rest exit at once. So the work
stays balanced across heads whatever their candidate counts (real queries are skewed: one KV
head may have ten times the candidates of another) and whatever the padding of ``cand_pos``.

A program loads each K row once for all G query heads of its group (GQA) and computes exact
float32 scores with FMAs (broadcast-multiply-sum), never tensor cores: the score must be the
float32 dot product the index's bounds are proven against. Design choices, each measured on an
H200 or read off the compiled SASS:

- Layout. K rows are loaded as [BLOCK_N, D/CK, CK] tiles: each thread owns 16-byte vectors of
  td = CK/vec threads per row and keeps all D/CK chunks in registers, so a dot product is reduced
  mostly inside the thread (log2 td shuffle levels). Each head is a separate 2-D computation in
  that layout (a tuple over heads): a 3-D [G, BLOCK_N, D] broadcast gets a layout with D over 32
  threads, and tl.dot(..., input_precision="ieee") stages K through shared memory and keeps
  G x D of q per thread; both were slower. P @ V on tensor cores (tf32x3) was tried too: the
  operand splitting and per-head row assembly cost more instructions than the FMAs it saves.
- Per-lane online softmax. Rows of a tile are spread over R row lanes and repeated NR = BLOCK_N/R
  times in registers; m, l, acc are kept per lane ([R], [R], [R, Dv]), so the loop has no
  cross-thread traffic besides the score shuffles. Lanes are merged once per program.
- Software pipeline in registers: while block i is scored, the K rows of block i+1 and the
  candidate positions of block i+2 are in flight; V rows of block i are requested right after
  its scores, only for rows some head attends (masked loads move no bytes, so V traffic
  follows the attended keys, not the candidates), and consumed at iteration i+1.

Combine. Each program writes its partial (m, l, acc, count; with BELOW also the below-tau
(m, l)) to a workspace, then takes a ticket from a per-KV-head arrival counter (atomic add,
acq_rel, GPU scope, after a CTA barrier so the whole partial is released). The program that
draws the last ticket merges the partials of its KV head (the below-tau (m, l) exactly like
(m, l)) and writes the outputs, then resets the counter to zero for the next launch. A KV head
with more than MERGE_GROUP programs (real queries are skewed: one head may get most of the
grid) merges in two levels: groups of MERGE_GROUP consecutive programs first (the last arrival
of a group, on a per-group ticket, writes a group partial), then the group partials; so the
merge on the critical path after the last arrival is two short passes instead of one long one
(on an H200, 32/8/128 at 128k keys, the one-level merge cost ~27 us of a ~58 us launch). This keeps
the operation a single launch (a Triton launch costs ~20 us of host time eagerly and a kernel
boundary ~2 us inside a CUDA graph, both large against a 10-50 us decode step) and needs no
memset: counters live in a cached per-(device, stream) buffer that is zero at creation and left
zero by every launch. Launches on one stream are ordered, so they never share a counter
concurrently; launches on different streams use different counters.

Where the time goes (H200, Nsight Compute, eager launches under the profiler, real keys at eps
1e-3): the kernel is a latency chain at very low occupancy. Its 255 registers allow two programs
(8 warps) per SM, 12.5 % occupancy; 32/8/128 at 4k keys (15 % candidates) keeps ~48 of its 256
programs busy (about 6 per KV head, MIN_BLOCKS = 4 blocks each, the default then), 4.6 active
warps per SM, 0.18 instructions issued per cycle and scheduler, DRAM at 2 %; at 128k keys (6 %)
all 264 programs work, 7.4 active warps per SM, 0.34 issued per cycle, DRAM at 12 %; 9/3/64 at
128k likewise (0.30, 7 %). A loop iteration (a 32-row block for 32/8/128) is ~950 SASS
instructions per warp, about a quarter of them the FMAs of the exact scores and of P @ V. Faster
means a shorter chain per program (fewer serial blocks where the grid has room, a cheaper merge)
and more warps to hide it (fewer registers), not more bandwidth. Fewer registers must come from
the code, not from a cap: with maxnreg = 168 or 128 (392-784 B of spills; 9/3/64's loop 728 ->
851 / 922 SASS instructions; set on the launch by hand) the best split parameters of
``bench_attention_gpu --split-sweep`` took 1.08-1.16x / 1.10-1.32x the uncapped best for 9/3/64
and 1.14-1.44x / 1.21-1.69x for 32/8/128 (H200, every case of the sweep slower).

Fusing it into the filter is not the way out as such: a prototype in which every one-warp
filter program attended its own candidates (compacted into a per-program range, 16 rows per
chunk, the buffer spread over the programs, the partials of ~264 programs per KV head merged
in two levels) gave the same attended sets and outputs (within 2e-6) on an H200, but took
1.3-1.9x the three-kernel step's time at 4k-128k keys (32/8/128 at 128k: 172 against 90 us),
except 9/3/64 at 4k (0.97x): one warp spends ~2300 SASS instructions per 16 candidates on
four heads' FMA dots and their cross-lane reductions, and ~4000 per step of a merge over
[chunk, head, Dv] partials. A fused step needs the candidates handed to fewer, wider programs.

No host synchronization, no ``.item()``, no data-dependent control flow on the host: the grid
depends only on shapes (maxC, cap) and on Python ints. ``buffer_start`` and ``buffer_end`` may
be device tensors (read in the kernel), which makes the launch capturable once
in a CUDA graph and replayable at every decode step.
"""

from __future__ import annotations

import functools
from typing import no_type_check

import torch
import triton
import triton.language as tl

from louver_kernels.triton._device import await_prior, load_scalar
from louver_kernels.triton._launch import (
    CounterPool,
    attention_outputs,
    check_attention_inputs,
    check_bound,
    check_out,
    next_pow2,
    num_sms,
    pdl_launch,
)
from louver_kernels.triton._splitk import (
    merge_partials,
    store_outputs,
    store_partial,
    workspace_ptrs,
)

__all__ = ["sparse_attention"]


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _block_rows(c_base, blk, blk_hi, offs_n, n_cand, total, b_start, BLOCK_N: tl.constexpr):
    """Positions of block ``blk`` of the virtual list: (pos int64, row valid, is candidate).

    Rows of a block at or beyond ``blk_hi`` are invalid (their loads are masked off)."""
    idx = blk * BLOCK_N + offs_n
    live = (idx < total) & (blk < blk_hi)
    is_cand = idx < n_cand
    pos = tl.load(c_base + idx, mask=is_cand & live, other=0)
    pos = tl.where(is_cand, pos, b_start + (idx - n_cand))
    # candidates outside [0, buffer_start) (a caller bug) are skipped, never read
    row_ok = live & tl.where(is_cand, (pos >= 0) & (pos < b_start), True)
    return pos.to(tl.int64), row_ok, is_cand


# Scalars that change from call to call are not specialized (no recompilation when one happens
# to be 1 or a multiple of 16); strides stay specialized (16-byte vector loads need them).
@triton.jit(do_not_specialize=["buf_start", "buf_end", "cap", "max_c"])
@no_type_check  # Triton code: tuples grow per head, which mypy cannot follow
def _sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, tau_ptr,
    cand_pos_ptr, cand_count_ptr,
    buf_start_ptr, buf_end_ptr,
    ws_ptr, counter_ptr,
    out_ptr, lse_ptr, natt_ptr, below_ptr,
    pruned_ptr, dropped_ptr, ncand_ptr,
    scale,
    buf_start, buf_end,
    cap, max_c, num_kv,
    stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_ch,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, R: tl.constexpr, CK: tl.constexpr, CV: tl.constexpr,
    G_P: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
    BUF_START_ON_DEVICE: tl.constexpr,
    BUF_END_ON_DEVICE: tl.constexpr, BELOW: tl.constexpr, CERT: tl.constexpr,
    MIN_BLOCKS: tl.constexpr, HKV_P: tl.constexpr, MERGE_GROUP: tl.constexpr,
    PDL: tl.constexpr,
):
    await_prior(PDL)
    prog = tl.program_id(0)
    # one float32 workspace: [m, l] per (slot, head), then acc [slot, head, DV], then int32
    # counts, then (BELOW only) [m, l] of the below-tau candidates per (slot, head); one slot
    # per program of the grid, then one per program again for the group partials of the
    # two-level merge
    n_prog = tl.num_programs(0)
    ws_ml_ptr, ws_acc_ptr, ws_cnt_ptr, ws_bl_ptr = workspace_ptrs(ws_ptr, 2 * n_prog, G, DV)
    LOG2E: tl.constexpr = 1.4426950408889634
    NR: tl.constexpr = BLOCK_N // R
    C = scale * LOG2E  # the running maxima m are raw scores; weights are exp2((s - m) * C)
    NCK: tl.constexpr = D // CK
    NCV: tl.constexpr = DV // CV

    # ---- every KV head's virtual candidate list, and this program's (KV head, split) ----
    # (counts clamped: never trust the inputs)
    b_start = load_scalar(buf_start_ptr, buf_start, BUF_START_ON_DEVICE)
    b_end = load_scalar(buf_end_ptr, buf_end, BUF_END_ON_DEVICE)
    b_start = tl.minimum(tl.maximum(b_start, 0), cap)
    b_end = tl.minimum(tl.maximum(b_end, b_start), cap)
    offs_h = tl.arange(0, HKV_P)
    h_ok = offs_h < num_kv
    n_cand_h = tl.load(cand_count_ptr + offs_h, mask=h_ok, other=0).to(tl.int32)
    n_cand_h = tl.minimum(tl.maximum(n_cand_h, 0), max_c)
    blocks_h = tl.where(h_ok, tl.cdiv(n_cand_h + (b_end - b_start), BLOCK_N), 0)
    # the grid (sized for the most work: the capacity when counts are read on the device) is
    # shared by the KV heads in proportion to their blocks, so that a head with many
    # candidates gets many programs: every head gets at least one split (its outputs are
    # written even when its list is empty), at most one per MIN_BLOCKS blocks; programs left
    # over exit at once, and each head's merge reads only its own splits' partials
    budget = (n_prog - num_kv).to(tl.int64)
    share = (budget * blocks_h) // tl.maximum(tl.sum(blocks_h.to(tl.int64), axis=0), 1)
    act_h = tl.where(h_ok, tl.minimum(1 + share.to(tl.int32),
                                      tl.maximum(tl.cdiv(blocks_h, MIN_BLOCKS), 1)), 0)
    end_h = tl.cumsum(act_h, axis=0)                  # this head's slots: [end - act, end)
    kh = tl.sum((end_h <= prog).to(tl.int32), axis=0)
    if kh >= num_kv:
        return
    sel = offs_h == kh
    active = tl.sum(tl.where(sel, act_h, 0), axis=0)
    slot0 = tl.sum(tl.where(sel, end_h, 0), axis=0) - active
    split = prog - slot0
    n_cand = tl.sum(tl.where(sel, n_cand_h, 0), axis=0)
    total = n_cand + (b_end - b_start)
    n_blocks = tl.sum(tl.where(sel, blocks_h, 0), axis=0)
    per_split = tl.cdiv(n_blocks, active)
    blk_lo = split * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)

    # ---- the G query heads of this KV head: one register set per head (a tuple) ----
    # K rows are viewed as [NCK, CK] chunks and loaded as [BLOCK_N, NCK, CK] tiles: each thread
    # reads 16-byte vectors of CK-wide chunks (CK // 16 bytes threads per row) and keeps all NCK
    # chunks of its rows in registers, so a dot product is mostly reduced inside the thread.
    offs_ck = tl.arange(0, CK)
    offs_nck = tl.arange(0, NCK)
    offs_cv = tl.arange(0, CV)
    offs_ncv = tl.arange(0, NCV)
    d_k = offs_nck[:, None] * CK + offs_ck[None, :]                  # [NCK, CK]
    d_v = offs_ncv[:, None] * CV + offs_cv[None, :]                  # [NCV, CV]
    qs = ()
    taus = ()
    ms = ()
    ls = ()
    cs = ()
    accs = ()
    mbs = ()   # BELOW: per-lane online (max, sum) over the candidates with s < tau
    lbs = ()
    for g in tl.static_range(G):
        qs = qs + (tl.load(q_ptr + (kh * G + g) * stride_qh + d_k).to(tl.float32),)
        taus = taus + (tl.load(tau_ptr + kh * G + g),)
        ms = ms + (tl.full([R], float("-inf"), tl.float32),)
        ls = ls + (tl.zeros([R], tl.float32),)
        cs = cs + (tl.zeros([R], tl.int32),)
        accs = accs + (tl.zeros([R, NCV, CV], tl.float32),)
        if BELOW:
            mbs = mbs + (tl.full([R], float("-inf"), tl.float32),)
            lbs = lbs + (tl.zeros([R], tl.float32),)

    k_base = k_ptr + kh.to(tl.int64) * stride_kh
    v_base = v_ptr + kh.to(tl.int64) * stride_vh
    c_base = cand_pos_ptr + kh.to(tl.int64) * stride_ch
    offs_n = tl.arange(0, BLOCK_N)

    # Rows of a [BLOCK_N, ...] tile are spread over R = (row threads per warp) x (warps) lanes and
    # repeated in registers; viewed as [BLOCK_N // R, R, ...], axis 0 lives inside each thread.
    # The softmax state is kept per lane (m, l, acc of shape [R], [R], [R, NCV, CV]), so the loop
    # body reduces over rows without any cross-thread traffic; lanes are merged once at the end.
    #
    # Software pipeline (registers only): while block i is scored, the K rows of block i+1 and
    # the candidate positions of block i+2 are in flight; the V rows of block i are requested
    # right after its scores (only rows some head attends) and consumed at iteration i+1.
    blk = blk_lo
    pos_c, ok_c, cand_c = _block_rows(c_base, blk, blk_hi, offs_n, n_cand, total, b_start,
                                      BLOCK_N)
    k_c = tl.load(k_base + pos_c[:, None, None] * stride_kn + d_k[None, :, :],
                  mask=ok_c[:, None, None], other=0.0)
    pos_n, ok_n, cand_n = _block_rows(c_base, blk + 1, blk_hi, offs_n, n_cand, total, b_start,
                                      BLOCK_N)
    v_p = tl.zeros([BLOCK_N, NCV, CV], v_ptr.dtype.element_ty)
    p_p = ()
    for _g in tl.static_range(G):
        p_p = p_p + (tl.zeros([NR, R], tl.float32),)
    while blk < blk_hi:
        k_n = tl.load(k_base + pos_n[:, None, None] * stride_kn + d_k[None, :, :],
                      mask=ok_n[:, None, None], other=0.0)
        pos_nn, ok_nn, cand_nn = _block_rows(c_base, blk + 2, blk_hi, offs_n, n_cand, total,
                                             b_start, BLOCK_N)
        # exact float32 scores of block i, the attend rule, per-lane counts
        kf = k_c.to(tl.float32)
        xs = ()
        xbs = ()
        any_att = ok_c & False
        new_cs = ()
        for g in tl.static_range(G):
            s = tl.sum(tl.sum(kf * qs[g][None, :, :], axis=2), axis=1)  # [BLOCK_N] fp32 q.k
            att = ((s >= taus[g]) | (~cand_c)) & ok_c
            any_att = any_att | att
            xs = xs + (tl.where(att, s, float("-inf")),)
            new_cs = new_cs + (cs[g] + tl.sum(tl.reshape(att.to(tl.int32), [NR, R]), axis=0),)
            if BELOW:
                # the valid candidates this head does not attend (s < tau)
                xbs = xbs + (tl.where(cand_c & ok_c & (s < taus[g]), s, float("-inf")),)
        cs = new_cs
        # V rows of block i, only for keys some head attends (masked-off rows move no bytes)
        v_c = tl.load(v_base + pos_c[:, None, None] * stride_vn + d_v[None, :, :],
                      mask=any_att[:, None, None], other=0.0)
        # block i-1's P @ V (acc and p_p share the scale of m before this block), then the
        # online-softmax update with block i
        v4 = tl.reshape(v_p.to(tl.float32), [NR, R, NCV, CV])
        new_ms = ()
        new_ls = ()
        new_accs = ()
        new_p = ()
        new_mbs = ()
        new_lbs = ()
        for g in tl.static_range(G):
            x = tl.reshape(xs[g], [NR, R])
            m_new = tl.maximum(ms[g], tl.max(x, axis=0))                    # [R]
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((ms[g] - m_use) * C)
            if BELOW:
                # the same online update over the below-tau candidates; a row is attended,
                # below tau or neither (x = xb = -inf), so one exp2 per (row, head) serves both
                xb = tl.reshape(xbs[g], [NR, R])
                mb_new = tl.maximum(mbs[g], tl.max(xb, axis=0))
                mb_use = tl.where(mb_new == float("-inf"), 0.0, mb_new)
                is_b = xb > x
                e = tl.exp2((tl.maximum(x, xb)
                             - tl.where(is_b, mb_use[None, :], m_use[None, :])) * C)
                p = tl.where(is_b, 0.0, e)                                  # 0 if not attended
                new_lbs = new_lbs + (lbs[g] * tl.exp2((mbs[g] - mb_use) * C)
                                     + tl.sum(tl.where(is_b, e, 0.0), axis=0),)
                new_mbs = new_mbs + (mb_new,)
            else:
                p = tl.exp2((x - m_use[None, :]) * C)                       # 0 if not attended
            new_ls = new_ls + (ls[g] * alpha + tl.sum(p, axis=0),)
            # alpha * (acc + p_prev @ V_prev) as FMAs: acc * alpha + (alpha * p_prev) @ V_prev
            pa = p_p[g] * alpha[None, :]
            pv = tl.sum(pa[:, :, None, None] * v4, axis=0)                  # [R, NCV, CV]
            new_accs = new_accs + (accs[g] * alpha[:, None, None] + pv,)
            new_ms = new_ms + (m_new,)
            new_p = new_p + (p,)
        ms = new_ms
        ls = new_ls
        accs = new_accs
        p_p = new_p
        if BELOW:
            mbs = new_mbs
            lbs = new_lbs
        v_p = v_c
        k_c = k_n
        pos_c = pos_n
        ok_c = ok_n
        cand_c = cand_n
        pos_n = pos_nn
        ok_n = ok_nn
        cand_n = cand_nn
        blk += 1
    # drain: the last block's P @ V
    v4 = tl.reshape(v_p.to(tl.float32), [NR, R, NCV, CV])
    new_accs = ()
    for g in tl.static_range(G):
        new_accs = new_accs + (accs[g] + tl.sum(p_p[g][:, :, None, None] * v4, axis=0),)
    accs = new_accs

    # ---- merge the lanes and publish this split's partial ----
    slot = prog
    for g in tl.static_range(G):
        m_g = tl.max(ms[g], axis=0)
        w = tl.exp2((ms[g] - tl.where(m_g == float("-inf"), 0.0, m_g)) * C)
        tl.store(ws_ml_ptr + (slot * 2) * G + g, m_g)
        tl.store(ws_ml_ptr + (slot * 2 + 1) * G + g, tl.sum(ls[g] * w, axis=0))
        tl.store(ws_cnt_ptr + slot * G + g, tl.sum(cs[g], axis=0))
        tl.store(ws_acc_ptr + (slot * G + g) * DV + d_v,
                 tl.sum(accs[g] * w[:, None, None], axis=0))
        if BELOW:
            mb_g = tl.max(mbs[g], axis=0)
            wb = tl.exp2((mbs[g] - tl.where(mb_g == float("-inf"), 0.0, mb_g)) * C)
            tl.store(ws_bl_ptr + (slot * 2) * G + g, mb_g)
            tl.store(ws_bl_ptr + (slot * 2 + 1) * G + g, tl.sum(lbs[g] * wb, axis=0))

    # Merge: every thread's stores are ordered before a ticket (CTA barrier + release at GPU
    # scope). With at most MERGE_GROUP programs the last arrival merges them; with more, the
    # last arrival of each group of MERGE_GROUP consecutive programs merges its group into a
    # group partial, and the last of those merges the group partials: two short merges on the
    # critical path instead of one long one (a head with many candidates gets many programs).
    tl.debug_barrier()
    n_grp = tl.cdiv(active, MERGE_GROUP)
    grp = split // MERGE_GROUP
    two = n_grp > 1                    # this program's merge pass is a group's
    if two:
        g_cnt = tl.minimum(MERGE_GROUP, active - grp * MERGE_GROUP)
        ticket = tl.atomic_add(counter_ptr + num_kv + slot0 + grp, 1, sem="acq_rel",
                               scope="gpu")
        go = ticket == g_cnt - 1
        if go:
            tl.atomic_xchg(counter_ptr + num_kv + slot0 + grp, 0, sem="relaxed", scope="gpu")
        src = slot0 + grp * MERGE_GROUP
        n_src = g_cnt
    else:
        ticket = tl.atomic_add(counter_ptr + kh, 1, sem="acq_rel", scope="gpu")
        go = ticket == active - 1
        src = slot0
        n_src = active
    # at most two passes through ONE call site of the merge: with two inlined copies ptxas
    # spilled in the main loop (32/8/128, every key a candidate: 40 B of stack, 836 instead of
    # 786 loop instructions; 128k keys went from 253 to 312 us on an H200)
    while go:
        m_tot, l_tot, n_tot, o_tot, mb_tot, lb_tot = merge_partials(
            ws_ml_ptr, ws_acc_ptr, ws_cnt_ptr, ws_bl_ptr, src, n_src, C, G, G_P, DV,
            SPLIT_CHUNK, BELOW)
        if two:
            store_partial(ws_ml_ptr, ws_acc_ptr, ws_cnt_ptr, ws_bl_ptr, n_prog + slot0 + grp,
                           m_tot, l_tot, n_tot, o_tot, mb_tot, lb_tot, G, G_P, DV, BELOW)
            tl.debug_barrier()
            ticket = tl.atomic_add(counter_ptr + kh, 1, sem="acq_rel", scope="gpu")
            go = ticket == n_grp - 1
            two = False
            src = n_prog + slot0
            n_src = n_grp
        else:
            go = False
            offs_gp = tl.arange(0, G_P)
            g_ok = offs_gp < G
            qh = kh * G + offs_gp
            lse_v = store_outputs(out_ptr, lse_ptr, natt_ptr, qh, g_ok, m_tot, l_tot, o_tot,
                                  n_tot, scale, DV)
            if BELOW:
                hb = lb_tot > 0.0
                below_v = tl.where(hb, mb_tot * scale + tl.log(tl.where(hb, lb_tot, 1.0)),
                                   float("-inf"))
                tl.store(below_ptr + qh, below_v, mask=g_ok)
                if CERT:
                    # the decode step's certificate, in float64 like LouverIndex._certify:
                    # skipped = logaddexp(pruned_lse, below_lse), dropped = sigmoid(skipped - lse),
                    # 0 where nothing is skipped
                    pr = tl.load(pruned_ptr + qh, mask=g_ok, other=float("-inf")).to(tl.float64)
                    bl = below_v.to(tl.float64)
                    mx = tl.maximum(pr, bl)
                    fin = mx != float("-inf")
                    mx_s = tl.where(fin, mx, 0.0)
                    sk = mx_s + tl.log(tl.where(fin, tl.exp(pr - mx_s) + tl.exp(bl - mx_s), 1.0))
                    e = tl.exp(lse_v.to(tl.float64) - tl.where(fin, sk, 0.0))
                    dr = tl.where(fin, 1.0 / (1.0 + e), 0.0)
                    tl.store(dropped_ptr + qh, dr.to(tl.float32), mask=g_ok)
                    # candidates whose exact score was computed: the group's + the buffer
                    nc = tl.zeros([G_P], tl.int64) + (n_cand + (b_end - b_start)).to(tl.int64)
                    tl.store(ncand_ptr + qh, nc, mask=g_ok)
            # leave the counter at zero for the next launch on this stream
            tl.atomic_xchg(counter_ptr + kh, 0, sem="relaxed", scope="gpu")


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_COUNTERS = CounterPool()  # per-KV-head arrival tickets


@functools.lru_cache(maxsize=256)
def _config(g: int, d: int, dv: int, k_bytes: int, v_bytes: int, num_warps: int = 4
            ) -> tuple[int, int, int, int]:
    """(BLOCK_N, R, CK, CV) for one program's tiles of num_warps warps.

    A [BLOCK_N, D/CK, CK] tile gets Triton's coalesced layout: 16-byte vectors along CK, CK/vec
    threads per row, the warp's other threads and the warps along rows, the D/CK chunks in
    registers. Threads per row (td) trade shuffles (log2 td levels per dot product, and the
    per-(key, head) softmax work replicated td times) against the registers that hold q
    (G * D / td floats per thread): the smallest td that keeps those at <= 64, at least 4.
    R = (32 / td) * num_warps row lanes; BLOCK_N = 2 R rows (>= 32 with 4 warps), i.e. >= 2 rows
    per thread.
    Measured on an H200 (float16, G = 3 / D = 64 and G = 4 / D = 128): td = 4 and 8 with these
    BLOCK_N were the fastest of td in {4, 8, 16}, BLOCK_N in {R, 2R, 4R}, 4 or 8 warps.
    """
    vk, vv = 16 // k_bytes, 16 // v_bytes
    td = 4
    while td < 32 and g * d > 64 * td:
        td *= 2
    td = max(1, min(td, d // vk))
    ck = vk * td
    cv = min(dv, vv * td)
    r = (32 // td) * num_warps
    block_n = max(2 * r, 32) if num_warps >= 4 else 2 * r
    return block_n, r, ck, cv


def sparse_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tau: torch.Tensor,
    *,
    scale: float,
    cand_pos: torch.Tensor,
    cand_count: torch.Tensor,
    buffer_start: int | torch.Tensor,
    buffer_end: int | torch.Tensor,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_attended: torch.Tensor | None = None,
    below_lse: torch.Tensor | None = None,
    pruned_lse: torch.Tensor | None = None,
    dropped: torch.Tensor | None = None,
    num_candidates: torch.Tensor | None = None,
    num_splits: int | None = None,
    min_blocks: int | None = None,
    grid_per_sm: int | None = None,
    merge_group: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thresholded attention over candidates plus the recent buffer, for one decode step.

    Query head h (KV head h // G, G = Hq // Hkv) attends key position n iff the float32 score
    q_h . k_n >= tau[h] and n is one of its KV head's candidates, or n lies in the recent buffer
    [buffer_start, buffer_end), which every head attends unconditionally.

    Args:
        q: [Hq, D] float16 / bfloat16 / float32, last dim contiguous.
        keys: [Hkv, cap, D] storage, float16 / bfloat16 / float32, last dim contiguous; only
            positions < buffer_end are read. Hq must be a multiple of Hkv.
        values: [Hkv, cap_v, Dv] storage (cap_v >= buffer_end), float dtype as keys.
        tau: float32 [Hq], raw-score thresholds (-inf: attend every candidate).
        scale: softmax scale applied to raw scores, > 0 (usually 1/sqrt(D)).
        cand_pos: int32 [Hkv, maxC], last dim contiguous. Row kh holds the union of
            the candidate positions of KV head kh's query heads, all < buffer_start (ascending
            order reads best). Entries at and beyond cand_count[kh] are never read.
        cand_count: int32 [Hkv], valid entries per row of cand_pos (clamped to
            [0, maxC] on the device).
        buffer_start, buffer_end: the recent buffer, 0 <= buffer_start <= buffer_end <= cap.
            buffer_start and buffer_end may each be a Python int or a 1-element
            int32/int64 tensor on q's device (read by the kernel, clamped to a valid range:
            use this to capture one CUDA graph for every decode step).
        out, lse, num_attended: optional preallocated outputs: float32 [Hq, Dv], float32 [Hq],
            int32 or int64 [Hq], contiguous, on q's device. Every element is written.
        below_lse: optional output, float32 [Hq], contiguous, on q's device. When given, every
            element is written with logsumexp(scale * s) over the candidates of head h's KV
            head whose float32 score s = q_h . k_n is < tau[h] (the candidates it does not
            attend; buffer keys, cand_pos entries beyond cand_count and positions outside
            [0, buffer_start) never count), -inf where there is none: the certificate's term
            for them. When None (default) the kernel skips this work.
        pruned_lse, dropped, num_candidates: the decode step's certificate, fused into the
            last-arriving program (with below_lse only; all three or none).
            pruned_lse: input float32 [Hq] (quant_filter's logsumexp over the non-candidates'
            bounds); dropped: output float32 [Hq] = sigmoid(logaddexp(pruned_lse, below_lse)
            - lse), computed in float64, 0 where both terms are -inf; num_candidates: output
            int64 [Hq] = cand_count[h // G] + buffer size. All contiguous, on q's device.
        num_splits: override of the grid size, in programs per KV head: the grid has
            Hkv * num_splits programs, shared by the KV heads in proportion to their blocks
            (default: grid_per_sm programs per SM, at most one per min_blocks blocks of the
            largest possible list per KV head).
        min_blocks: at most one taking part program per min_blocks blocks of a KV head's
            actual list (read on the device); programs left over exit at once. Default: 1
            (with the default two-warp programs, 4 per SM). Measured on an H200 inside the
            captured decode step (``bench_launch_shapes``: real keys, eps 1e-3): 9/3/64 at
            8k / 32k / 128k keys 25.3 / 29.5 / 43.7 us per step against 27.5 / 29.3 / 45.4
            with the former default (4 warps, min_blocks 2); 32/8/128 34.4 / 53.1 / 89.5
            against 38.4 / 53.4 / 89.2 (2 warps, min_blocks 4); at 4k keys (the same sweep
            in a scratch run) 25.5 against 27.3 and 31.8 against 35.6 us. Shorter chains per
            program where the lists are short; for 32/8/128 at 128k 0.3-0.8 % slower. (The
            kernel-only sweep, ``bench_attention_gpu --split-sweep`` on synthetic lists, had
            preferred 2 for 9/3/64 and 4 for 32/8/128.)
        grid_per_sm: see num_splits; default: 8 warps per SM (8 // num_warps programs). The
            kernel needs ~255 registers per thread (8 resident warps per SM); with four-warp
            programs 2 was the fastest of {2, 4, 8} x min_blocks {1, 2, 4, 8} on an H200
            (synthetic, every candidate attended, 128k keys, 3-30 % candidates: e.g. 32/8/128
            at 10 %: 52 against 71 us for 4 per SM; before the heads shared the grid, 4 per
            SM had been faster on real, skewed queries). Two-warp programs at 8 per SM
            (two waves) took 1.0-1.2x the time of 4 per SM in the decode step (9/3/64 and
            32/8/128, 4k-128k keys; see min_blocks for the set-up).
        merge_group: programs per group of the two-level merge (a KV head with more programs
            merges them in groups first); default: as many partials as one merge step loads
            (2048 num_warps / (G_P * Dv)).
        num_warps: warps per program (1, 2 or 4; a block has 2 rows per row lane, at least
            32 rows with 4 warps). Default: 2. Measured on an H200 inside the captured decode
            step (real keys, eps 1e-3, 8 warps per SM, the former min_blocks): 32/8/128 at 8k
            / 32k / 128k keys 42.7 / 62.7 / 101.8 us per step with 4 warps, 39.9 / 56.8 /
            98.7 with 2, 37.5 / 62.1 / 114.4 with 1; 9/3/64 27.6 / 31.0 / 49.3 with 4, 26.8 /
            31.9 / 46.9 with 2 (mixed), and with min_blocks 1 two warps are the faster at
            every context (see min_blocks). One warp (8 per SM, min_blocks 1) was 4-10 % slower
            than two at 8k keys and 4-21 % at 32k-128k; at 4k 1 % faster for 9/3/64, 5 %
            slower for 32/8/128. A default keyed to the capacity would compile a second kernel
            when a session's cache grows past it (a stall of a decode step; test_index_triton
            checks that nothing recompiles), so the default is one shape.

    Returns:
        (out float32 [Hq, Dv], lse float32 [Hq], num_attended [Hq]): the softmax(scale * s)
        weighted sum of V over the attended keys; logsumexp(scale * s) over them; their count.
        A head that attends nothing gets out = 0 and lse = -inf. below_lse, when given, is
        filled in place (not returned).

    Raises:
        ValueError: on any shape, dtype, device, layout or range problem of the arguments.
    """
    hq, d, hkv, cap, dv = check_attention_inputs(q, keys, values, scale)
    device = q.device
    dev_id = q.get_device()
    if not isinstance(tau, torch.Tensor):
        raise ValueError(f"tau must be a torch.Tensor, got {type(tau).__name__}")
    if tau.get_device() != dev_id:
        raise ValueError(f"tau is on {tau.device} but q is on {device}")
    if tau.dtype != torch.float32 or tuple(tau.shape) != (hq,) or not tau.is_contiguous():
        raise ValueError(f"tau must be contiguous float32 [{hq}], got {tau.dtype} "
                         f"{list(tau.shape)}")
    bs, bs_t = check_bound("buffer_start", buffer_start, device)
    be, be_t = check_bound("buffer_end", buffer_end, device)
    if bs_t is None and be_t is None and not 0 <= bs <= be:
        raise ValueError(f"need 0 <= buffer_start <= buffer_end, got {bs}, {be}")
    if bs_t is None and bs < 0:
        raise ValueError(f"buffer_start must be >= 0, got {bs}")
    if be_t is None and be > cap:
        raise ValueError(f"buffer_end={be} exceeds the storage (keys cap {keys.shape[1]}, "
                         f"values cap {values.shape[1]})")

    if not isinstance(cand_pos, torch.Tensor) or not isinstance(cand_count, torch.Tensor):
        raise ValueError("cand_pos and cand_count must be tensors")
    if cand_pos.dtype != torch.int32 or cand_pos.dim() != 2 or cand_pos.shape[0] != hkv:
        raise ValueError(f"cand_pos must be int32 [{hkv}, maxC], got {cand_pos.dtype} "
                         f"{list(cand_pos.shape)}")
    if cand_pos.shape[1] > 0 and cand_pos.stride(1) != 1:
        raise ValueError("cand_pos must be contiguous in its last dimension")
    if cand_count.dtype != torch.int32 or tuple(cand_count.shape) != (hkv,) \
            or not cand_count.is_contiguous():
        raise ValueError(f"cand_count must be contiguous int32 [{hkv}], got "
                         f"{cand_count.dtype} {list(cand_count.shape)}")
    for name, t in (("cand_pos", cand_pos), ("cand_count", cand_count)):
        if t.get_device() != dev_id:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    max_c = cand_pos.shape[1]
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    g = hq // hkv
    if min_blocks is None:
        min_blocks = 1
    if num_warps is None:
        num_warps = 2
    if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in (1, 2, 4):
        raise ValueError(f"num_warps must be 1, 2 or 4, got {num_warps!r}")
    if grid_per_sm is None:
        grid_per_sm = 8 // num_warps
    for name, v in (("min_blocks", min_blocks), ("grid_per_sm", grid_per_sm),
                    ("merge_group", 1 if merge_group is None else merge_group)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    out, lse, num_attended = attention_outputs(out, lse, num_attended, hq, dv, device)
    check_out("below_lse", below_lse, (hq,), (torch.float32,), dev_id)
    cert = pruned_lse is not None or dropped is not None or num_candidates is not None
    if cert:
        if pruned_lse is None or dropped is None or num_candidates is None:
            raise ValueError("pruned_lse, dropped and num_candidates go together")
        if below_lse is None:
            raise ValueError("the certificate needs below_lse")
        check_out("pruned_lse", pruned_lse, (hq,), (torch.float32,), dev_id)
        check_out("dropped", dropped, (hq,), (torch.float32,), dev_id)
        check_out("num_candidates", num_candidates, (hq,), (torch.int64,), dev_id)

    # ---- plan (host-known quantities only) ----
    block_n, lanes, ck, cv = _config(g, d, dv, keys.element_size(), values.element_size(),
                                     num_warps)
    if bs_t is None and be_t is None:
        buf_max = be - bs
    else:
        buf_max = cap if be_t is not None else be
    blocks_max = max(1, -(-(max_c + buf_max) // block_n))
    if num_splits is None:
        num_splits = max(1, min(-(-grid_per_sm * num_sms(device) // hkv),
                                -(-blocks_max // min_blocks)))

    below = below_lse is not None
    # two slots per program (its partial, a group partial), per-KV-head tickets + per-group
    # tickets (see the kernel's merge)
    n_prog = hkv * num_splits
    workspace = torch.empty(2 * n_prog * g * (dv + (5 if below else 3)),
                            dtype=torch.float32, device=device)
    counters = _COUNTERS.get(device, hkv + n_prog)
    g_p = next_pow2(g)
    split_chunk = max(1, 2048 * num_warps // (g_p * dv))
    pdl = pdl_launch(device)

    _sparse_attention_kernel[(n_prog,)](
        q, keys, values, tau,
        cand_pos, cand_count,
        bs_t if bs_t is not None else tau,
        be_t if be_t is not None else tau,
        workspace, counters,
        out, lse, num_attended, below_lse if below else tau,
        pruned_lse if cert else tau, dropped if cert else tau,
        num_candidates if cert else tau,
        float(scale),
        bs, be,
        cap, max_c, hkv,
        q.stride(0), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        cand_pos.stride(0),
        G=g, D=d, DV=dv, BLOCK_N=block_n, R=lanes, CK=ck, CV=cv,
        G_P=g_p, SPLIT_CHUNK=split_chunk, BUF_START_ON_DEVICE=bs_t is not None,
        BUF_END_ON_DEVICE=be_t is not None, BELOW=below, CERT=cert, MIN_BLOCKS=min_blocks,
        HKV_P=next_pow2(hkv), MERGE_GROUP=split_chunk if merge_group is None else merge_group,
        PDL=bool(pdl), num_warps=num_warps, num_stages=1, **pdl,
    )
    return out, lse, num_attended

