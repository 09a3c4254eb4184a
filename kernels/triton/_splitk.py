"""The split-K combine shared by the attention kernels (@triton.jit helpers).

A program of a split-K attention launch writes its partial (m, l, count, acc; optionally the
below-tau (m, l)) to a slot of a float32 workspace laid out as

    [m, l] per (slot, head)  |  acc [slot, head, DV]  |  int32 count [slot, head]  |  [m, l] below

with m the running maximum of raw scores and l, acc relative to exp2((s - m) * C); the last
program to arrive merges the slots of its KV head. ``workspace_ptrs`` gives the four sections.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["merge_partials", "store_partial", "store_outputs", "workspace_ptrs"]


@triton.jit
def workspace_ptrs(ws_ptr, n_slots, G: tl.constexpr, DV: tl.constexpr):
    """(ml, acc, count int32, below ml) sections of a workspace of ``n_slots`` slots."""
    ws_acc_ptr = ws_ptr + n_slots * (2 * G)
    ws_cnt_ptr = (ws_acc_ptr + n_slots * (G * DV)).to(tl.pointer_type(tl.int32), bitcast=True)
    ws_bl_ptr = ws_acc_ptr + n_slots * (G * DV + G)
    return ws_ptr, ws_acc_ptr, ws_cnt_ptr, ws_bl_ptr


@triton.jit
def merge_partials(ws_ml_ptr, ws_acc_ptr, ws_cnt_ptr, ws_bl_ptr, first, count, C,
                    G: tl.constexpr, G_P: tl.constexpr, DV: tl.constexpr,
                    SPLIT_CHUNK: tl.constexpr, BELOW: tl.constexpr):
    """The partials in slots [first, first + count), merged for all G heads at once (one pass,
    online max, SPLIT_CHUNK slots per load; read from L2: .cg): (m, l, count, acc, below m,
    below l), acc and l relative to m (as a partial)."""
    offs_s = tl.arange(0, SPLIT_CHUNK)
    offs_gp = tl.arange(0, G_P)
    offs_dv = tl.arange(0, DV)
    g_ok = offs_gp < G
    m_tot = tl.full([G_P], float("-inf"), tl.float32)
    l_tot = tl.zeros([G_P], tl.float32)
    n_tot = tl.zeros([G_P], tl.int32)
    o_tot = tl.zeros([G_P, DV], tl.float32)
    mb_tot = tl.full([G_P], float("-inf"), tl.float32)
    lb_tot = tl.zeros([G_P], tl.float32)
    s0 = 0
    while s0 < count:
        sp = s0 + offs_s
        sl = first + sp
        msk = (sp < count)[:, None] & g_ok[None, :]                          # [SC, G_P]
        m_s = tl.load(ws_ml_ptr + (sl[:, None] * 2) * G + offs_gp[None, :], mask=msk,
                      other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(ws_ml_ptr + (sl[:, None] * 2 + 1) * G + offs_gp[None, :], mask=msk,
                      other=0.0, cache_modifier=".cg")
        c_s = tl.load(ws_cnt_ptr + sl[:, None] * G + offs_gp[None, :], mask=msk, other=0,
                      cache_modifier=".cg")
        a_s = tl.load(ws_acc_ptr + (sl[:, None, None] * G + offs_gp[None, :, None]) * DV
                      + offs_dv[None, None, :], mask=msk[:, :, None], other=0.0,
                      cache_modifier=".cg")
        m_new = tl.maximum(m_tot, tl.max(m_s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_tot - m_use) * C)
        w_s = tl.exp2((m_s - m_use[None, :]) * C)                            # [SC, G_P]
        l_tot = l_tot * alpha + tl.sum(l_s * w_s, axis=0)
        o_tot = o_tot * alpha[:, None] + tl.sum(a_s * w_s[:, :, None], axis=0)
        n_tot += tl.sum(c_s, axis=0)
        m_tot = m_new
        if BELOW:
            mb_s = tl.load(ws_bl_ptr + (sl[:, None] * 2) * G + offs_gp[None, :], mask=msk,
                           other=float("-inf"), cache_modifier=".cg")
            lb_s = tl.load(ws_bl_ptr + (sl[:, None] * 2 + 1) * G + offs_gp[None, :],
                           mask=msk, other=0.0, cache_modifier=".cg")
            mb_new = tl.maximum(mb_tot, tl.max(mb_s, axis=0))
            mb_use = tl.where(mb_new == float("-inf"), 0.0, mb_new)
            lb_tot = (lb_tot * tl.exp2((mb_tot - mb_use) * C)
                      + tl.sum(lb_s * tl.exp2((mb_s - mb_use[None, :]) * C), axis=0))
            mb_tot = mb_new
        s0 += SPLIT_CHUNK
    return m_tot, l_tot, n_tot, o_tot, mb_tot, lb_tot


@triton.jit
def store_partial(ws_ml_ptr, ws_acc_ptr, ws_cnt_ptr, ws_bl_ptr, slot, m, l_sum, n, o, mb, lb,
                   G: tl.constexpr, G_P: tl.constexpr, DV: tl.constexpr, BELOW: tl.constexpr):
    """A merged (m, l, count, acc, below m, below l) written as the partial of ``slot``."""
    offs_gp = tl.arange(0, G_P)
    offs_dv = tl.arange(0, DV)
    g_ok = offs_gp < G
    tl.store(ws_ml_ptr + (slot * 2) * G + offs_gp, m, mask=g_ok)
    tl.store(ws_ml_ptr + (slot * 2 + 1) * G + offs_gp, l_sum, mask=g_ok)
    tl.store(ws_cnt_ptr + slot * G + offs_gp, n, mask=g_ok)
    tl.store(ws_acc_ptr + (slot * G + offs_gp[:, None]) * DV + offs_dv[None, :], o,
             mask=g_ok[:, None])
    if BELOW:
        tl.store(ws_bl_ptr + (slot * 2) * G + offs_gp, mb, mask=g_ok)
        tl.store(ws_bl_ptr + (slot * 2 + 1) * G + offs_gp, lb, mask=g_ok)


@triton.jit
def store_outputs(out_ptr, lse_ptr, natt_ptr, qh, g_ok, m_tot, l_tot, o_tot, n_tot, scale,
                  DV: tl.constexpr, col0=0, W: tl.constexpr = 0):
    """A merged head set's outputs: out = acc / l (0 where nothing was attended), lse =
    m * scale + log(l) (-inf there), the attended count; returns lse. o_tot holds the W
    columns [col0, col0 + W) of out's DV (W = 0: all of them)."""
    WIDTH: tl.constexpr = DV if W == 0 else W
    offs_dv = col0 + tl.arange(0, WIDTH)
    has = l_tot > 0.0
    l_safe = tl.where(has, l_tot, 1.0)
    o = tl.where(has[:, None], o_tot / l_safe[:, None], 0.0)
    tl.store(out_ptr + qh[:, None] * DV + offs_dv[None, :], o, mask=g_ok[:, None])
    lse_v = tl.where(has, m_tot * scale + tl.log(l_safe), float("-inf"))
    tl.store(lse_ptr + qh, lse_v, mask=g_ok)
    tl.store(natt_ptr + qh, n_tot, mask=g_ok)
    return lse_v
