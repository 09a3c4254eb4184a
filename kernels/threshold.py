"""Threshold policies: how tau is chosen per query head, and the dropped-mass certificate.

Scores are raw dot products s = q.k; attention weights are softmax(scale * s).

- ``Fixed(tau)``: tau given per query head (or one value for all).
- ``Relative(eps)``: keep every key whose softmax weight is >= eps times the largest weight.
  tau = m_lo - ln(1/eps) / scale, where m_lo <= max_n s_n is an exact score found cheaply
  (buffer, sink tokens, the keys with the largest bounds). Since m_lo <= max, every key with
  weight ratio >= eps has s >= max - ln(1/eps)/scale >= tau, so the guarantee holds.
- ``TopK(k)``: the exact k highest-scoring indexed keys (plus the buffer). tau starts at the
  k-th largest exact score among the k keys with the largest bounds (a lower bound of the true
  k-th score), and is then raised to the true k-th score found among the candidates.
- ``Mass(delta)``: the largest tau whose certified dropped mass is <= delta.
- ``Dense()``: every key.

Certificate. Let A be the attended keys and P the skipped ones, with bounds UB(k) >= s_k for
k in P. The skipped probability mass is sum_P e^{scale s_k} / (sum_A e^{scale s} + sum_P
e^{scale s_k}) <= sum_P e^{scale UB(k)} / sum_A e^{scale s} = exp(LSE_P(UB) - LSE_A(s)). Keys whose
exact score is known (candidates below tau) enter P with their exact score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fixed:
    """tau per query head: a float (all heads), a sequence of Hq floats, or a [Hq] tensor."""

    tau: float | Sequence[float] | torch.Tensor

    def __post_init__(self) -> None:
        values = self.tau.tolist() if isinstance(self.tau, torch.Tensor) else self.tau
        values = [values] if isinstance(values, (int, float)) else list(values)
        if not values or not all(math.isfinite(float(v)) for v in values):
            raise ValueError("Fixed.tau must be finite (one value or one per query head)")

    def taus(self, num_q_heads: int) -> torch.Tensor:
        """tau as a float32 tensor [Hq] on the CPU; raises ValueError on a length mismatch."""
        t = torch.as_tensor(self.tau, dtype=torch.float32).reshape(-1).cpu()
        if t.numel() == 1:
            return t.expand(num_q_heads).clone()
        if t.numel() != num_q_heads:
            raise ValueError(f"Fixed.tau has {t.numel()} values; expected 1 or {num_q_heads}")
        return t


@dataclass(frozen=True)
class Relative:
    """Keep every key whose softmax weight is >= eps times the largest; 0 < eps < 1."""

    eps: float

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and 0.0 < self.eps < 1.0):
            raise ValueError(f"Relative.eps must be in (0, 1), got {self.eps!r}")


@dataclass(frozen=True)
class TopK:
    """The exact k highest-scoring indexed keys (the recent buffer is always attended); k >= 1."""

    k: int

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"TopK.k must be an integer >= 1, got {self.k!r}")


@dataclass(frozen=True)
class Mass:
    """The largest tau whose certified dropped mass is <= delta; 0 < delta < 1."""

    delta: float

    def __post_init__(self) -> None:
        if not (isinstance(self.delta, (int, float)) and 0.0 < self.delta < 1.0):
            raise ValueError(f"Mass.delta must be in (0, 1), got {self.delta!r}")


@dataclass(frozen=True)
class Dense:
    """Attend every key (the same arithmetic path as the sparse policies)."""


Policy = Fixed | Relative | TopK | Mass | Dense


def relative_tau(m_lo: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    """tau [Hq] for Relative(eps) from exact lower bounds m_lo [Hq] of the max score."""
    return m_lo - math.log(1.0 / eps) / scale


def mass_tau(ub_sorted_desc: torch.Tensor, z_lo_log: torch.Tensor, delta: float,
             scale: float) -> torch.Tensor:
    """tau [Hq] for Mass(delta).

    Args:
        ub_sorted_desc: float32 [Hq, N] bounds of the indexed keys, sorted descending per head.
        z_lo_log: float32 [Hq] log of a lower bound of the attended normalizer
            (sum of exp(scale * s) over keys certain to be attended whatever tau is chosen).
        delta: the allowed certified dropped mass.

    Returns the largest tau among {ub values} U {+inf} such that the keys with bound < tau carry
    certified mass <= delta, i.e. logsumexp(scale * UB[ub < tau]) - z_lo_log <= log(delta).
    Keys with bound >= tau are candidates; the normalizer only grows with them, so the
    certificate computed after attention is <= delta too.
    """
    hq, n = ub_sorted_desc.shape
    if n == 0:
        return torch.full((hq,), float("inf"), dtype=torch.float32, device=z_lo_log.device)
    # suffix logsumexp: tail[i] = logsumexp(scale * ub[i:]) (mass pruned when tau = ub[i-1]...)
    x = ub_sorted_desc.double() * scale
    tail = torch.logcumsumexp(x.flip(-1), dim=-1).flip(-1)  # [Hq, N], tail[i] over ub[i:]
    # choosing tau = ub[i] (keep keys 0..i and ties) prunes ub[i+1:]; tau = +inf prunes all.
    pruned = torch.cat([tail[:, 1:], torch.full((hq, 1), -math.inf, dtype=x.dtype,
                                                device=x.device)], dim=-1)
    ok = pruned - z_lo_log.double()[:, None] <= math.log(delta)
    all_ok = tail[:, 0] - z_lo_log.double() <= math.log(delta)
    first_ok = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full_like(ok[:, 0], n - 1,
                                                                             dtype=torch.long))
    tau = ub_sorted_desc.gather(1, first_ok[:, None]).squeeze(1)
    return torch.where(all_ok, torch.full_like(tau, float("inf")), tau)
