"""The transformers integration on a tiny random Llama (fast): decode-time attention served by a
session gives the tokens of transformers' own dense generation."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import grpc
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from louver_client import Dense, LocalSession, LouverClient, LouverError, Relative, Session
from louver_client.hf import (
    ATTN_IMPLEMENTATION,
    LouverCache,
    cache_argument,
    capture_prefill,
    louver_attention,
)

LAYERS, HQ, HKV, HEAD_DIM = 2, 4, 2, 16
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=HQ * HEAD_DIM, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HQ,
                         num_key_value_heads=HKV, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    m = LlamaForCausalLM(config).eval()
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, 128, (1, 80), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_tokens(model: LlamaForCausalLM, prompt: torch.Tensor) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, prompt.shape[1]:]


@pytest.fixture(params=["local", "remote"])
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    if request.param == "local":
        s: Session = LocalSession(LAYERS, HQ, HKV, HEAD_DIM, dtype=torch.float32)
    else:
        c: LouverClient = request.getfixturevalue("client")
        s = c.create_session(LAYERS, HQ, HKV, HEAD_DIM, dtype=torch.float32)
    yield s
    s.delete()


def test_greedy_loop_matches_dense_generation(model: LlamaForCausalLM, prompt: torch.Tensor,
                                              dense_tokens: torch.Tensor,
                                              session: Session) -> None:
    stages: list[tuple[str, int, int]] = []
    with louver_attention(model, session, Dense(),
                          progress=lambda *a: stages.append(a)) as h:
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        ids = h.generate(prompt, NEW_TOKENS)
    assert model.config._attn_implementation == "sdpa"
    assert ids[0, prompt.shape[1]:].tolist() == dense_tokens.tolist()
    assert session.info().layer_tokens == (80 + NEW_TOKENS - 1,) * LAYERS
    assert ("prefill", LAYERS, LAYERS) in stages and stages[-1] == ("index", 1, 1)
    # one StepStats per decode step (the first token comes from the local prefill)
    assert len(h.stats) == NEW_TOKENS - 1
    assert [s.position for s in h.stats] == list(range(80, 80 + NEW_TOKENS - 1))
    assert all(s.candidate_fraction == 1.0 and s.max_dropped_mass == 0.0 for s in h.stats)
    summary = h.summary()
    assert summary["steps"] == NEW_TOKENS - 1 and summary["attend_s_median"] > 0


def test_model_generate_with_louver_cache(model: LlamaForCausalLM, prompt: torch.Tensor,
                                          dense_tokens: torch.Tensor, session: Session) -> None:
    with louver_attention(model, session, Relative(1e-6), use_stream=False) as h:
        kwargs = h.cache_kwargs()     # the cache under the name this transformers uses
        (cache,) = kwargs.values()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs,
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == dense_tokens.tolist()
    assert isinstance(cache, LouverCache) and cache.get_seq_length() == 80 + NEW_TOKENS - 1
    stored = [getattr(layer, "keys", None) for layer in cache.layers]
    assert all(k is None or k.numel() == 0 for k in stored)  # no K/V duplicated locally


def test_model_generate_with_its_own_cache(model: LlamaForCausalLM, prompt: torch.Tensor,
                                           dense_tokens: torch.Tensor) -> None:
    session = LocalSession(LAYERS, HQ, HKV, HEAD_DIM, dtype=torch.float32)
    with louver_attention(model, session, Dense()):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == dense_tokens.tolist()


def test_shared_prefill_and_continuation(model: LlamaForCausalLM, prompt: torch.Tensor,
                                         dense_tokens: torch.Tensor, session: Session) -> None:
    # capture the K/V of all but the last 3 prompt tokens once, feed them to the session;
    # the remaining 3 prompt tokens and every generated token are served by the session
    capture = capture_prefill(model, prompt[:, :-3])
    assert len(capture.kv) == LAYERS and capture.kv[0][0].shape == (HKV, 77, HEAD_DIM)
    session.prefill_layers(capture.kv)
    with louver_attention(model, session, Dense()) as h:
        ids = h.generate(prompt, NEW_TOKENS)
    assert ids[0, prompt.shape[1]:].tolist() == dense_tokens.tolist()
    # the 3 prompt tokens were served token by token but are not decode steps
    assert len(h.stats) == NEW_TOKENS - 1


def test_errors_and_restoration(model: LlamaForCausalLM, prompt: torch.Tensor) -> None:
    session = LocalSession(LAYERS, HQ, HKV, HEAD_DIM, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size 1"), louver_attention(model, session):
        model(input_ids=prompt.repeat(2, 1))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(Exception, match="geometry"):
        with louver_attention(model, LocalSession(LAYERS + 1, HQ, HKV, HEAD_DIM)):
            pass
    with pytest.raises(RuntimeError, match="louver_attention"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        try:
            model(input_ids=prompt)
        finally:
            model.set_attn_implementation("sdpa")
    with louver_attention(model, session), pytest.raises(RuntimeError, match="already"):
        with louver_attention(model, session):
            pass
    with louver_attention(model, session) as h:
        h.generate(prompt, 1)
    # the session holds the prompt now: a model that restarts at position 0 is refused
    with louver_attention(model, session) as h, pytest.raises(ValueError, match="holds"):
        h.generate(prompt[:, :4], 1)
    with louver_attention(model, session), pytest.raises(LouverError) as exc:
        model(input_ids=prompt[:, :1])  # no cache: position 0
    assert exc.value.code is grpc.StatusCode.FAILED_PRECONDITION
    out = model(input_ids=prompt)  # the model still works normally
    assert out.logits.shape == (1, 80, 128)


def test_cache_argument_follows_the_forward_signature(model: LlamaForCausalLM) -> None:
    """The handle passes its cache by the name the installed transformers' forward takes:
    ``cache`` from 5.24 on, ``past_key_values`` before."""

    class New(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, cache: object = None) -> None: ...

    class Old(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None) -> None: ...

    assert cache_argument(New()) == "cache"
    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(model) in inspect.signature(model.forward).parameters
