"""One decode step of a QUANT index on the GPU: threshold, candidate filter, sparse attention.

The step reads, per KV head: the top bit planes of every indexed key (and the rest of the
planes and the residual norms of the keys whose coarse bound reaches tau), then K of the
group's candidates and V of the keys some head attends, then the recent buffer. It computes
exactly what ``LouverIndex.attend`` computes on the reference backend for the policies it
supports (Fixed, Relative, Dense): the same tau, the same attended set {s >= tau} U buffer, the
same per-group candidate counts, and a certificate from the same terms.

Launches: a few tiny torch ops for the slack and tau, one filter launch, one attention launch,
a few tiny ops for the certificate. Every size the launches see is a function of the index's
capacity and of device-side counters, so the step can be captured in a CUDA graph (see
``CapturedStep``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from louver_kernels import reference as ref
from louver_kernels.threshold import Dense, Fixed, Policy, Relative
from louver_kernels.triton.attention import sparse_attention
from louver_kernels.triton.quant_filter import quant_filter

if TYPE_CHECKING:
    from louver_kernels.index import AttendOutput, LouverIndex

SUPPORTED = (Fixed, Relative, Dense)


def probe_max(q: torch.Tensor, keys: torch.Tensor, num_indexed: int, total: int, sinks: int,
              recent: int) -> torch.Tensor:
    """m_lo float32 [Hq]: the largest exact score over the first ``sinks`` keys, the buffer
    [num_indexed, total) and the last ``recent`` keys (the reference's construction); -inf if
    total == 0."""
    hq = q.shape[0]
    if total == 0:
        return torch.full((hq,), -math.inf, device=q.device)
    head = min(sinks, total)
    tail_start = max(head, min(total - recent, num_indexed))
    parts = [ref.scores(q, keys[:, :head])] if head else []
    if tail_start < total:
        parts.append(ref.scores(q, keys[:, tail_start:total]))
    return torch.cat(parts, dim=1).amax(dim=1)


def attend(index: LouverIndex, q: torch.Tensor, policy: Policy) -> AttendOutput:
    """``index.attend(q, policy)`` through the Triton kernels (QUANT index, planar layout).

    Args:
        index: a QUANT LouverIndex whose codes are stored as bit planes.
        q: [Hq, D] validated query on the index's device.
        policy: Fixed, Relative or Dense.
    """
    from louver_kernels.index import AttendOutput

    cfg = index.config
    hq = q.shape[0]
    hkv = index.num_kv_heads
    g = hq // hkv
    n, total = index.num_indexed, index.num_keys
    keys, values = index.keys_range(0, index.num_keys)
    if isinstance(policy, Dense):
        tau = torch.full((hq,), -math.inf, device=q.device)
    elif isinstance(policy, Fixed):
        tau = policy.taus(hq).to(q.device)
    elif isinstance(policy, Relative):
        m_lo = probe_max(q, keys, n, total, cfg.sink_tokens, cfg.probe_recent)
        tau = m_lo - math.log(1.0 / policy.eps) / index.scale
    else:
        raise ValueError(f"policy {policy!r} has no GPU step; use the reference path")
    groups = index.head_dim // cfg.quant_group
    slack = ref.quant_slack(q, index._kmax, index._rmax, index._lmax, groups)
    nseg = -(-n // cfg.buffer_size) if n else 0
    cand_pos, cand_count, pruned_lse = quant_filter(
        q, index._codes, index._err, index._lo[:, : max(nseg, 1)],
        index._step[:, : max(nseg, 1)], slack, tau, num_indexed=n, bits=cfg.quant_bits,
        coarse_bits=cfg.quant_coarse_bits, group=cfg.quant_group, scale=index.scale,
        segment_size=cfg.buffer_size)
    below_lse = torch.empty(hq, device=q.device)
    out, lse, num_att = sparse_attention(
        q, index._keys, index._values, tau, scale=index.scale, cand_pos=cand_pos,
        cand_count=cand_count, buffer_start=n, buffer_end=total, below_lse=below_lse)
    skipped = torch.logaddexp(pruned_lse.double(), below_lse.double())
    dropped = torch.sigmoid(skipped - lse.double())
    dropped = torch.where(torch.isneginf(skipped), torch.zeros_like(dropped), dropped)
    b = total - n
    num_cand = cand_count.long().repeat_interleave(g) + b
    return AttendOutput(output=out, lse=lse, tau=tau.float(), num_candidates=num_cand,
                        num_attended=num_att.long(), dropped_mass_bound=dropped.float())
