"""Helpers shared by the attention kernels' tests: fresh seeded data, garbage-filled storage,
poisoned outputs and the comparison against reference.masked_attention."""

from __future__ import annotations

import math

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def storage(hkv: int, cap: int, valid: int, dim: int, dtype: torch.dtype,
            gen: torch.Generator) -> torch.Tensor:
    """[Hkv, cap, dim] storage: random rows below ``valid``, NaN garbage above."""
    x = torch.randn(hkv, cap, dim, generator=gen)
    x[:, valid:] = float("nan")
    return x.to(dtype).to(DEVICE)


def poisoned(hq: int, dv: int, count_dtype: torch.dtype = torch.int32
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.full((hq, dv), float("nan"), device=DEVICE)
    lse = torch.full((hq,), float("nan"), device=DEVICE)
    cnt = torch.full((hq,), -12345, dtype=count_dtype, device=DEVICE)
    return out, lse, cnt


def check(got: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           want: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seed: int,
           rtol: float = 1e-4, lse_atol: float = 0.0, out_atol: float = 0.0) -> None:
    """got against want: equal counts, no NaN, -inf / zero output exactly where want has them,
    lse within 1e-4 + 1e-6 |lse| (+ lse_atol), out within rtol of its largest entry (+ out_atol).
    """
    out, lse, cnt = (t.cpu() for t in got)
    r_out, r_lse, r_cnt = want
    msg = f"seed={seed}"
    assert torch.equal(cnt.long(), r_cnt.long()), f"{msg}: counts {cnt} vs {r_cnt}"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{msg}: NaN left"
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"{msg}: lse {lse} vs {r_lse}"
    assert (lse[~finite] == -math.inf).all(), msg
    assert (out[~finite] == 0).all(), f"{msg}: head attending nothing must output 0"
    tol = 1e-4 + 1e-6 * r_lse[finite].abs() + lse_atol
    assert ((lse[finite] - r_lse[finite]).abs() <= tol).all(), \
        f"{msg}: lse max err {(lse[finite] - r_lse[finite]).abs().max()}"
    amax = r_out.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    err = ((out - r_out).abs() / amax).max()
    assert torch.allclose(out, r_out, rtol=rtol, atol=rtol * float(amax.max()) + out_atol), \
        f"{msg}: out max rel err {err}"


def make_q(hq: int, d: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0
       ) -> torch.Tensor:
    return (torch.randn(hq, d, generator=gen) * scale).to(dtype).to(DEVICE)
