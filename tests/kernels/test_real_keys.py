"""Zero false negatives and the certificate on real SmolLM2 keys, decoded step by step."""

from __future__ import annotations

import pytest
import torch

from louver_kernels import IndexConfig, IndexKind, LouverIndex, Mass, Relative, TopK
from louver_kernels import reference as ref

pytestmark = pytest.mark.model

CONFIGS = [IndexConfig(kind=IndexKind.BALLS), IndexConfig(kind=IndexKind.QUANT),
           IndexConfig(kind=IndexKind.QUANT, quant_bits=4, quant_group=8, buffer_size=32)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind.value}-{c.quant_bits}")
def test_real_keys_decode(smollm2_capture, config: IndexConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    for layer, states in smollm2_capture["layers"].items():
        q_all, k_all, v_all = states["q"], states["k"], states["v"]
        n = k_all.shape[1]
        prefill = n - 80
        index = LouverIndex.build(k_all[:, :prefill], v_all[:, :prefill], config)
        for t in range(prefill, n):
            index.append(k_all[:, t: t + 1], v_all[:, t: t + 1])
            if t % 8:
                continue
            q = q_all[:, t]
            keys, values = index.keys_range(0, index.num_keys)
            s = ref.scores(q, keys)
            # tau on an exact key score, and the 20th largest score: no false negatives
            pick = torch.randint(0, index.num_keys, (q.shape[0], 1), generator=gen)
            for tau in (s.gather(1, pick).squeeze(1), s.topk(20, dim=1).values[:, -1]):
                missed = (s >= tau[:, None]) & ~index.search(q, tau).mask
                assert not bool(missed.any()), f"layer {layer} step {t}"
            for policy in (Relative(1e-3), TopK(16), Mass(1e-3)):
                out = index.attend(q, policy)
                attend = s >= out.tau[:, None]
                attend[:, index.num_indexed:] = True
                p = torch.softmax(s.double() * index.scale, dim=1)
                true_dropped = (p * ~attend).sum(dim=1)
                assert bool((out.dropped_mass_bound.double() + 1e-6 >= true_dropped).all())
                ref_out, ref_lse = ref.masked_attention(q, keys, values, attend, index.scale)
                torch.testing.assert_close(out.output, ref_out, rtol=1e-4, atol=1e-5)
