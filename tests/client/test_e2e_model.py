"""End to end over gRPC on loopback with the real SmolLM2-135M-Instruct.

For each of three long prompts (>= 1,500 tokens of standard-library docstrings with a question;
the third hides a passkey), the model generates greedily with every decode-step attention of
all 30 layers served by the in-process Louver server:

- Relative(eps=1e-4) generates exactly the tokens of the same path with Dense() (every key
  attended), and both agree with transformers' own dense generation on >= 95 % of tokens;
- the passkey is retrieved.

One prefill per prompt is shared: transformers' own generation (the dense reference) leaves its
post-RoPE K/V in its cache; the K/V of all prompt tokens but the last feed one fresh session per
policy, and the last prompt token plus every generated token go through the service.
Run with ``pytest -m model tests/client/test_e2e_model.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from louver_client import Dense, LouverClient, Policy, Relative
from louver_client.hf import StepStats, louver_attention
from louver_client.smollm2 import load_smollm2, long_prompt, model_folder, passkey_prompt

pytestmark = [pytest.mark.model,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # stdlib imports

NEW_TOKENS = 32
MIN_PROMPT_TOKENS = 1500
PASSKEY = 59364
PROMPTS: dict[str, dict[str, Any]] = {
    "modules": {"skip": 0, "question": "Which Python modules are described in the text above? "
                                       "Name three of them."},
    "first-module": {"skip": 12, "question": "What is the first module described above used "
                                             "for? Explain briefly."},
    "passkey": {"passkey": PASSKEY},
}


@dataclass
class Served:
    """One policy's run: generated token ids, per-step stats, tokens the session held."""

    tokens: list[int]
    stats: list[StepStats]
    layer_tokens: tuple[int, ...]


@dataclass
class PromptRun:
    """Everything measured on one prompt."""

    prompt_tokens: int
    reference: list[int]           # transformers' own dense generation (sdpa)
    relative: Served
    dense: Served


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer), loaded once for the module."""
    try:
        model_folder()
    except RuntimeError as exc:  # reported as a skip with its reason, never silently
        pytest.skip(f"SmolLM2 weights unavailable: {exc}")
    return load_smollm2(progress=False)


def _prompt(tok: Any, spec: dict[str, Any]) -> torch.Tensor:
    if "passkey" in spec:
        return passkey_prompt(tok, MIN_PROMPT_TOKENS, spec["passkey"])
    return long_prompt(tok, MIN_PROMPT_TOKENS, spec["question"], skip=spec["skip"])


def _serve(model: Any, client: LouverClient, kv: list[tuple[torch.Tensor, torch.Tensor]],
           ids: torch.Tensor, policy: Policy) -> Served:
    cfg = model.config
    session = client.create_session(cfg.num_hidden_layers, cfg.num_attention_heads,
                                    cfg.num_key_value_heads,
                                    cfg.hidden_size // cfg.num_attention_heads,
                                    dtype=torch.float16,
                                    expected_tokens=ids.shape[1] + NEW_TOKENS)
    with session:
        session.prefill_layers(kv)
        with louver_attention(model, session, policy) as h:
            out = h.generate(ids, NEW_TOKENS)
        layer_tokens = session.info().layer_tokens
    return Served(out[0, ids.shape[1]:].tolist(), h.stats, layer_tokens)


class Runs:
    """Runs per prompt name, computed on first use and kept for the module."""

    def __init__(self, model: Any, tok: Any, client: LouverClient) -> None:
        self.model, self.tok, self.client = model, tok, client
        self._done: dict[str, PromptRun] = {}

    def __getitem__(self, name: str) -> PromptRun:
        if name not in self._done:
            self._done[name] = self._run(PROMPTS[name])
        return self._done[name]

    def _run(self, spec: dict[str, Any]) -> PromptRun:
        model = self.model
        ids = _prompt(self.tok, spec)
        n = int(ids.shape[1])
        with torch.inference_mode():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[],
                                 pad_token_id=0, return_dict_in_generate=True)
        reference = ref.sequences[0, n:].tolist()
        # the K/V of prompt positions [0, n - 1) from the reference's own cache (post-RoPE)
        kv = [(layer.keys[0, :, : n - 1], layer.values[0, :, : n - 1])
              for layer in ref.cache.layers]
        del ref
        return PromptRun(n, reference, _serve(model, self.client, kv, ids, Relative(1e-4)),
                         _serve(model, self.client, kv, ids, Dense()))


@pytest.fixture(scope="module")
def runs(smollm2: tuple[Any, Any], server: Any) -> Iterator[Runs]:
    with LouverClient(server.target, timeout=120.0) as client:
        yield Runs(*smollm2, client)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_every_decode_step_is_served(runs: Runs, name: str) -> None:
    run = runs[name]
    assert run.prompt_tokens >= MIN_PROMPT_TOKENS
    for served in (run.relative, run.dense):
        assert len(served.tokens) == NEW_TOKENS
        # the last prompt token and NEW_TOKENS - 1 generated tokens went through all 30 layers
        assert len(served.stats) == NEW_TOKENS
        assert served.layer_tokens == (run.prompt_tokens + NEW_TOKENS - 1,) * 30
    assert all(0 < s.candidate_fraction <= 1 for s in run.relative.stats)
    assert all(0 <= s.max_dropped_mass < 1 for s in run.relative.stats)
    assert all(s.candidate_fraction == 1 and s.max_dropped_mass == 0 for s in run.dense.stats)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_relative_equals_dense_path(runs: Runs, name: str) -> None:
    run = runs[name]
    assert run.relative.tokens == run.dense.tokens


@pytest.mark.parametrize("name", list(PROMPTS))
def test_agrees_with_transformers_dense_generation(runs: Runs, name: str) -> None:
    run = runs[name]
    for served in (run.relative, run.dense):
        same = sum(a == b for a, b in zip(served.tokens, run.reference, strict=True))
        assert same >= 0.95 * NEW_TOKENS, (same, served.tokens, run.reference)


def test_passkey_is_retrieved(runs: Runs, smollm2: tuple[Any, Any]) -> None:
    run = runs["passkey"]
    _, tok = smollm2
    assert str(PASSKEY) in tok.decode(run.relative.tokens)
    assert str(PASSKEY) in tok.decode(run.reference)


def test_report(runs: Runs) -> None:
    """Print what was measured (shown with ``pytest -s``)."""
    print(f"\n{'prompt':<14}{'tokens':>7}{'rel=dense':>10}{'agree':>7}{'cand':>7}{'attd':>7}"
          f"{'cert':>10}{'step ms':>9}")
    for name in PROMPTS:
        run = runs[name]
        rel = run.relative
        agree = sum(a == b for a, b in zip(rel.tokens, run.reference, strict=True))
        cand = sum(st.candidate_fraction for st in rel.stats) / len(rel.stats)
        attd = sum(st.attended_fraction for st in rel.stats) / len(rel.stats)
        cert = max(st.max_dropped_mass for st in rel.stats)
        step = sorted(st.attend_s for st in rel.stats)[len(rel.stats) // 2] * 1e3
        print(f"{name:<14}{run.prompt_tokens:>7}{str(rel.tokens == run.dense.tokens):>10}"
              f"{agree:>4}/{NEW_TOKENS}{cand:>7.3f}{attd:>7.3f}{cert:>10.2e}{step:>9.1f}")


def test_demo(smollm2: tuple[Any, Any], server: Any, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> None:
    """louver-demo against the in-process server (the model loaded once, shared)."""
    from louver_client import demo
    from louver_client import smollm2 as smollm2_module

    monkeypatch.setattr(smollm2_module, "load_smollm2", lambda progress=True: smollm2)
    rc = demo.main(["--target", server.target, "--tokens", "6", "--prompt-tokens", "400"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for line in ("answer:", "token agreement with dense decoding:", "mean candidate fraction:",
                 "largest certificate", "per-step latency", "index   built"):
        assert line in out, out
