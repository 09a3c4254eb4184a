"""Key generators for the property tests: random, adversarial and real keys; fresh seeds."""

from __future__ import annotations

import os

import torch


def gen_seed() -> tuple[torch.Generator, int]:
    """A generator on a fresh random seed (tests name it in their failure messages), or on
    LOUVER_TEST_SEED when set, to replay a failure: LOUVER_TEST_SEED=<seed> pytest -k <test>."""
    env = os.environ.get("LOUVER_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


KINDS = ("random", "duplicates", "boundary", "huge", "tiny", "fp16_extreme", "outlier_channel",
         "clustered", "single")


def make_keys(kind: str, hkv: int, n: int, d: int, dtype: torch.dtype,
              gen: torch.Generator) -> torch.Tensor:
    """Keys [Hkv, N, D] of a named family, in ``dtype``, drawn from ``gen``."""
    if kind == "single":
        n = min(n, 1)
    base = torch.randn(hkv, n, d, generator=gen)
    if kind == "duplicates":
        # few distinct keys, each repeated many times (clusters of identical points)
        distinct = torch.randn(hkv, max(1, n // 16), d, generator=gen)
        pick = torch.randint(0, distinct.shape[1], (n,), generator=gen)
        base = distinct[:, pick]
    elif kind == "boundary":
        # keys on a lattice: many ties on every coordinate, so medians split equal values
        base = torch.randint(-2, 3, (hkv, n, d), generator=gen).float()
    elif kind == "huge":
        base = base * 3.0e3
    elif kind == "tiny":
        base = base * 1.0e-4
    elif kind == "fp16_extreme":
        # magnitudes up to the float16 maximum, mixed with subnormal-sized entries
        mag = torch.where(torch.rand(hkv, n, d, generator=gen) < 0.5,
                          torch.full((hkv, n, d), 6.0e4), torch.full((hkv, n, d), 1.0e-6))
        base = torch.sign(base) * mag * torch.rand(hkv, n, d, generator=gen)
    elif kind == "outlier_channel":
        base[..., 3] *= 50.0
        base[..., d // 2] += 20.0
    elif kind == "clustered":
        centers = torch.randn(hkv, 8, d, generator=gen) * 4
        pick = torch.randint(0, 8, (n,), generator=gen)
        base = centers[:, pick] + 0.1 * base
    return base.to(dtype)


def tau_on_a_key(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """tau [Hq] equal to the exact float32 score of a random key (the hardest boundary)."""
    hq, n = scores.shape
    pick = torch.randint(0, n, (hq, 1), generator=gen)
    return scores.gather(1, pick).squeeze(1)
