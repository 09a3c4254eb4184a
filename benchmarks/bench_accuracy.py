"""End-task accuracy of Louver's sparse decode attention on SmolLM2-135M-Instruct.

Three tasks, every decode step of all 30 layers served through an in-process session
(LocalSession, the kernels' torch path) with the policy under test:

- passkey: a pass key hidden at several depths of real text (stdlib docstrings) at several
  lengths and seeds; greedy answer; accuracy = fraction of prompts whose answer contains the key;
- agreement: greedy generation over long real text; accuracy = fraction of generated positions
  whose token equals the Dense() path's token (free-running; the first divergence is recorded);
- nll: teacher-forced negative log-likelihood over real text after a long prefix, each position
  a decode step (the true token is fed); accuracy = mean NLL (nats/token) and its change against
  Dense().

Rows: Dense() (every key, the same arithmetic path), Relative(eps), Mass(delta), TopK(k) and two
budget baselines implemented here over the same stored keys, each given, per prompt, the mean
attended fraction of the Louver row it is matched with (the same number of keys for every head
of every layer at a step, so its mean equals the Louver row's mean):

- quest: pages of 16 consecutive keys with per-page, per-channel min/max of the keys; a page's
  bound for query q is sum_c max(q_c min_c, q_c max_c); keys are taken page by page in order of
  decreasing bound (the last page truncated) until the budget is met;
- sinks: the first 4 keys plus the most recent keys up to the budget.

Every Louver attention call is checked: the exact float32 scores of all stored keys are
recomputed, every key with score >= tau (plus the unindexed buffer) must be attended (counts
equal, and the output equals dense attention over exactly that set); the certificate
(dropped-mass bound) and the true dropped mass are recorded for every call, and every head's
certificate is checked to bound its true dropped mass (up to CERT_TOL of float32 noise).

    python -m benchmarks.bench_accuracy --lengths 1024,2048 --nll-lengths 1024 \
        --out benchmarks/results/bench_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from louver_client.hf import capture_prefill, louver_attention
from louver_client.local import LocalSession
from louver_client.session import PreparedItem
from louver_client.smollm2 import load_smollm2, long_prompt, passkey_prompt
from louver_client.types import AttendOutput
from louver_kernels import Dense, Mass, Policy, Relative, TopK
from louver_kernels import reference as ref

PAGE = 16
SINKS = 4
AGREEMENT_QUESTIONS = [
    (0, "Summarize what the modules described above are used for, one by one."),
    (12, "Explain in detail what the first module described above does."),
]


# ---------------------------------------------------------------------------------- baselines


class Baseline:
    """A budget baseline: picks ``budget`` keys per query head from the stored keys."""

    name = "baseline"

    def select(self, q: torch.Tensor, keys: torch.Tensor, budget: int) -> torch.Tensor:
        """bool [Hq, N] attend mask with exactly min(budget, N) keys per head.

        Args:
            q: [Hq, D]; keys: [Hkv, N, D] (any float dtype).
        """
        raise NotImplementedError


class QuestPages(Baseline):
    """Quest-style page selection (pages of PAGE keys, per-channel min/max bound)."""

    name = "quest"

    def select(self, q: torch.Tensor, keys: torch.Tensor, budget: int) -> torch.Tensor:
        hkv, n, d = keys.shape
        hq = q.shape[0]
        g = hq // hkv
        pages = -(-n // PAGE)
        pad = pages * PAGE - n
        kf = keys.float()
        lo_src = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=math.inf)
        hi_src = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=-math.inf)
        kmin = lo_src.reshape(hkv, pages, PAGE, d).amin(dim=2)   # [Hkv, P, D]
        kmax = hi_src.reshape(hkv, pages, PAGE, d).amax(dim=2)
        qf = q.float().reshape(hkv, g, 1, d)
        ub = torch.maximum(qf * kmin[:, None], qf * kmax[:, None]).sum(-1)  # [Hkv, g, P]
        ub = ub.reshape(hq, pages)
        # rank keys by their page's bound; within a page, by position (pages stay contiguous)
        key_ub = ub.repeat_interleave(PAGE, dim=1)[:, :n]
        order = torch.argsort(key_ub, dim=1, descending=True, stable=True)
        k = min(budget, n)
        mask = torch.zeros(hq, n, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        return mask


class SinksRecent(Baseline):
    """Attention sinks (the first SINKS keys) plus a recent window."""

    name = "sinks"

    def select(self, q: torch.Tensor, keys: torch.Tensor, budget: int) -> torch.Tensor:
        n = keys.shape[1]
        k = min(budget, n)
        mask = torch.zeros(q.shape[0], n, dtype=torch.bool)
        sinks = min(SINKS, k)
        mask[:, :sinks] = True
        mask[:, n - (k - sinks):] = True
        return mask


# ---------------------------------------------------------------------------------- session


@dataclass
class CallLog:
    """Per attention call records (one layer of one decode step)."""

    attended_fraction: list[float] = field(default_factory=list)
    certificate: list[float] = field(default_factory=list)
    true_dropped: list[float] = field(default_factory=list)
    zfn_ok: list[bool] = field(default_factory=list)
    output_err: list[float] = field(default_factory=list)
    # per call: every head's certificate >= its true dropped mass (up to CERT_TOL)
    cert_ok: list[bool] = field(default_factory=list)


# The true dropped mass is measured as 1 - exp(lse_step - lse_all): the step's float32 LSE
# puts ~1e-6 of noise on it (a dense step "drops" 1e-6); below this a certificate is not
# judged.
CERT_TOL = 1e-5


class CheckedSession(LocalSession):
    """A LocalSession that checks every Louver call and can serve a budget baseline instead.

    With ``baseline`` set, decode steps append the token's K/V to the layer's index like any
    call, then attend the baseline's ``fraction`` of the stored keys (per head) over exactly
    those keys; otherwise the kernels attend under the call's policy and the result is checked.
    """

    def __init__(self, *args: Any, baseline: Baseline | None = None, fraction: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.baseline = baseline
        self.fraction = fraction
        self.log = CallLog()

    def _attend_prepared(self, item: PreparedItem) -> AttendOutput:
        if self.baseline is not None:
            return self._attend_baseline(item)
        out = super()._attend_prepared(item)
        index = self._layers[item.layer].index
        assert index is not None
        total, n = index.num_keys, index.num_indexed
        keys, values = index.keys_range(0, total)
        q = item.q.to(self.device)
        s = ref.scores(q, keys)                                  # float32 [Hq, total]
        must = torch.ones_like(s, dtype=torch.bool)
        must[:, :n] = s[:, :n] >= out.tau[:, None]              # the guarantee's key set
        counts_ok = bool((must.sum(dim=1) == out.num_attended).all())
        expect = _masked_attention(s, values, must, index.scale)
        err = float((expect - out.output).abs().max())
        self.log.zfn_ok.append(counts_ok and err <= 1e-3)
        self.log.output_err.append(err)
        dropped = self._record(s, out.num_attended, total, out.lse,
                               float(out.dropped_mass_bound.max()), index.scale)
        self.log.cert_ok.append(bool((out.dropped_mass_bound.double().cpu() + CERT_TOL
                                      >= dropped.cpu()).all()))
        return out

    def _attend_baseline(self, item: PreparedItem) -> AttendOutput:
        assert self.baseline is not None and item.new_keys is not None
        assert item.new_values is not None
        state = self._layers[item.layer]
        index = self._materialize(item.layer)
        assert index is not None, "baselines run after a prefill"
        index.append(item.new_keys.to(self.device), item.new_values.to(self.device))
        self._layer_tokens[item.layer] = state.num_keys
        total = index.num_keys
        keys, values = index.keys_range(0, total)
        q = item.q.to(self.device)
        budget = max(1, round(self.fraction * total))
        mask = self.baseline.select(q, keys, budget)
        out, lse = ref.masked_attention(q, keys, values, mask, index.scale)
        count = mask.sum(dim=1)
        self._record(ref.scores(q, keys), count, total, lse, math.nan, index.scale)
        nan = torch.full_like(lse, math.nan)
        return AttendOutput(out, lse, nan, count, count, nan)

    def _record(self, s: torch.Tensor, attended: torch.Tensor, total: int, lse: torch.Tensor,
                certificate: float, scale: float) -> torch.Tensor:
        """Log one call; returns the true dropped mass per head (float64 [Hq])."""
        lse_all = torch.logsumexp(s.double() * scale, dim=1)
        dropped = (1.0 - torch.exp(lse.double() - lse_all)).clamp_min(0.0)
        self.log.attended_fraction.append(float(attended.double().mean()) / total)
        self.log.certificate.append(certificate)
        self.log.true_dropped.append(float(dropped.max()))
        return dropped


def _masked_attention(s: torch.Tensor, values: torch.Tensor, attend: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Softmax(scale * s) over ``attend`` times V, from exact scores s float32 [Hq, N];
    values [Hkv, N, Dv]; attend bool [Hq, N] (non-empty rows). Returns float32 [Hq, Dv]."""
    hq, n = s.shape
    hkv, _, dv = values.shape
    p = torch.softmax((s * scale).masked_fill(~attend, -math.inf), dim=1)
    return torch.bmm(p.reshape(hkv, hq // hkv, n), values.float()).reshape(hq, dv)


# ---------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Row:
    """A policy row: a Louver policy, or a baseline matched to a Louver row's budget."""

    name: str
    policy: Policy | None = None
    baseline: Baseline | None = None
    match: str | None = None


@dataclass
class RunResult:
    """One (row, prompt) run."""

    value: float
    log: CallLog
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Model, tokenizer and the shared-prefill runner."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.model, self.tok = load_smollm2(progress=False)
        self.cfg = self.model.config
        self.dtype = dtype

    def session(self, row: Row, fraction: float) -> CheckedSession:
        c = self.cfg
        return CheckedSession(c.num_hidden_layers, c.num_attention_heads,
                              c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                              dtype=self.dtype, baseline=row.baseline, fraction=fraction)

    def run_rows(self, rows: list[Row], prefix: torch.Tensor,
                 work: Callable[[Any], tuple[float, dict[str, Any]]]) -> dict[str, RunResult]:
        """Prefill ``prefix`` once, then run ``work(handle)`` for every row (Louver rows
        first, so that baselines can take their matched row's attended fraction)."""
        kv = capture_prefill(self.model, prefix).kv
        results: dict[str, RunResult] = {}
        for row in rows:
            fraction = 1.0
            if row.baseline is not None:
                assert row.match is not None
                fraction = statistics.fmean(results[row.match].log.attended_fraction)
            sess = self.session(row, fraction)
            with sess:
                sess.prefill_layers(kv)
                with louver_attention(self.model, sess, row.policy or Dense()) as h:
                    value, extra = work(h)
            results[row.name] = RunResult(value, sess.log, extra)
        return results


def passkey_task(bench: Bench, rows: list[Row], lengths: list[int], depths: list[float],
                 seeds: int, tokens: int, trim: bool = False) -> list[dict[str, Any]]:
    out = []
    for length in lengths:
        for depth in depths:
            for seed in range(seeds):
                rng = random.Random(1000 * length + int(depth * 100) + seed)
                key = rng.randrange(10000, 100000)
                ids = passkey_prompt(bench.tok, length, key, skip=20 + 7 * seed, where=depth,
                                     trim=trim)

                def work(h: Any, ids: torch.Tensor = ids, key: int = key
                         ) -> tuple[float, dict[str, Any]]:
                    gen = h.generate(ids, tokens)[0, ids.shape[1]:]
                    text = bench.tok.decode(gen)
                    return float(str(key) in text), {"answer": text}

                t0 = time.perf_counter()
                res = bench.run_rows(rows, ids[:, :-1], work)
                out.append({"task": "passkey", "length": int(ids.shape[1]), "depth": depth,
                            "seed": seed, "passkey": key, "results": res,
                            "seconds": time.perf_counter() - t0})
                print(f"  passkey L={ids.shape[1]} depth={depth} seed={seed}: "
                      + " ".join(f"{k}={int(r.value)}" for k, r in res.items()), flush=True)
    return out


def agreement_task(bench: Bench, rows: list[Row], lengths: list[int], tokens: int,
                   skip_offset: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for length in lengths:
        skip, question = AGREEMENT_QUESTIONS[len(out) % len(AGREEMENT_QUESTIONS)]
        ids = long_prompt(bench.tok, length, question, skip=skip + skip_offset)
        dense_tokens: list[int] = []

        def work(h: Any, ids: torch.Tensor = ids, dense_tokens: list[int] = dense_tokens
                 ) -> tuple[float, dict[str, Any]]:
            gen = h.generate(ids, tokens)[0, ids.shape[1]:].tolist()
            if not dense_tokens:  # the first row is Dense()
                dense_tokens.extend(gen)
            same = [a == b for a, b in zip(gen, dense_tokens, strict=True)]
            first = same.index(False) if not all(same) else len(same)
            return sum(same) / len(same), {"first_divergence": first}

        t0 = time.perf_counter()
        res = bench.run_rows(rows, ids[:, :-1], work)
        out.append({"task": "agreement", "length": int(ids.shape[1]), "tokens": tokens,
                    "results": res, "seconds": time.perf_counter() - t0})
        print(f"  agreement L={ids.shape[1]}: "
              + " ".join(f"{k}={r.value:.3f}" for k, r in res.items()), flush=True)
    return out


def nll_task(bench: Bench, rows: list[Row], lengths: list[int], positions: int
             ) -> list[dict[str, Any]]:
    out = []
    for i, length in enumerate(lengths):
        text_ids = bench.tok(_text(length + positions + 64, skip=40 + 10 * i),
                             return_tensors="pt").input_ids
        ids = text_ids[:, : length + positions + 1]
        prefix = ids[:, :length]
        dense_argmax: list[int] = []

        def work(h: Any, ids: torch.Tensor = ids, length: int = length,
                 dense_argmax: list[int] = dense_argmax) -> tuple[float, dict[str, Any]]:
            cache = h.cache_kwargs()
            nll: list[float] = []
            top1: list[int] = []
            with torch.inference_mode():
                for p in range(length, length + positions):
                    logits = bench.model(input_ids=ids[:, p:p + 1], use_cache=True, **cache
                                         ).logits[0, -1].float()
                    nll.append(float(torch.logsumexp(logits, 0) - logits[ids[0, p + 1]]))
                    top1.append(int(logits.argmax()))
            if not dense_argmax:
                dense_argmax.extend(top1)
            agree = sum(a == b for a, b in zip(top1, dense_argmax, strict=True)) / len(top1)
            return statistics.fmean(nll), {"top1_agreement_with_dense": agree}

        t0 = time.perf_counter()
        res = bench.run_rows(rows, prefix, work)
        out.append({"task": "nll", "length": length, "positions": positions, "results": res,
                    "seconds": time.perf_counter() - t0})
        print(f"  nll prefix={length}: "
              + " ".join(f"{k}={r.value:.4f}" for k, r in res.items()), flush=True)
    return out


def _text(min_tokens: int, skip: int) -> str:
    from louver_client.smollm2 import stdlib_text

    return stdlib_text(int(min_tokens * 4.0), skip=skip)


# ---------------------------------------------------------------------------------- report


def summarize(rows: list[Row], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per row: per task accuracy and attended fraction, checks and certificates."""
    out = []
    dense_nll = [r["results"]["dense"].value for r in runs if r["task"] == "nll"]
    for row in rows:
        entry: dict[str, Any] = {"row": row.name, "louver": row.baseline is None,
                                 "matched_to": row.match}
        calls = zfn = cert_ok = 0
        cert = dropped = 0.0
        for task in ("passkey", "agreement", "nll"):
            these = [r["results"][row.name] for r in runs if r["task"] == task]
            if not these:
                continue
            fr = [f for res in these for f in res.log.attended_fraction]
            entry[task] = {"accuracy": statistics.fmean(res.value for res in these),
                           "mean_attended_fraction": statistics.fmean(fr),
                           "prompts": len(these)}
            if task == "nll":
                mine = [res.value for res in these]
                entry[task]["nll_rel_change"] = statistics.fmean(
                    (a - b) / b for a, b in zip(mine, dense_nll, strict=True))
                entry[task]["top1_agreement_with_dense"] = statistics.fmean(
                    res.extra["top1_agreement_with_dense"] for res in these)
            for res in these:
                calls += len(res.log.zfn_ok)
                zfn += sum(res.log.zfn_ok)
                cert_ok += sum(res.log.cert_ok)
                cert = max([cert, *[c for c in res.log.certificate if not math.isnan(c)]])
                dropped = max([dropped, *res.log.true_dropped])
        entry["zfn_calls_checked"] = calls
        entry["zfn_calls_ok"] = zfn
        if row.baseline is None:
            entry["certificate_calls_ok"] = cert_ok
        entry["max_certificate"] = cert if row.baseline is None else None
        entry["max_true_dropped_mass"] = dropped
        out.append(entry)
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    head = (f"{'row':<18}{'passkey':>8}{'attd':>7}{'agree':>8}{'attd':>7}{'NLL':>8}"
            f"{'dNLL%':>8}{'attd':>7}{'ZFN ok/calls':>16}{'cert ok':>9}{'max cert':>10}"
            f"{'max drop':>10}")
    print(head)
    for e in summary:
        def cell(task: str, key: str, fmt: str, e: dict[str, Any] = e) -> str:
            return format(e[task][key], fmt) if task in e else "-"
        zfn = f"{e['zfn_calls_ok']}/{e['zfn_calls_checked']}" if e["louver"] else "n/a"
        cert_ok = str(e["certificate_calls_ok"]) if e["louver"] else "n/a"
        cert = f"{e['max_certificate']:.2e}" if e["max_certificate"] is not None else "-"
        print(f"{e['row']:<18}{cell('passkey', 'accuracy', '.3f'):>8}"
              f"{cell('passkey', 'mean_attended_fraction', '.3f'):>7}"
              f"{cell('agreement', 'accuracy', '.3f'):>8}"
              f"{cell('agreement', 'mean_attended_fraction', '.3f'):>7}"
              f"{cell('nll', 'accuracy', '.4f'):>8}"
              f"{(format(100 * e['nll']['nll_rel_change'], '+.2f') if 'nll' in e else '-'):>8}"
              f"{cell('nll', 'mean_attended_fraction', '.3f'):>7}{zfn:>16}{cert_ok:>9}{cert:>10}"
              f"{e['max_true_dropped_mass']:>10.2e}")


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [(task, label) for task, label in (
        ("passkey", "passkey accuracy"), ("agreement", "greedy token agreement"),
        ("nll", "teacher-forced NLL (nats/token)")) if any(task in e for e in summary)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.4 * len(tasks), 4.8), squeeze=False)
    colors = {"louver": "tab:blue", "quest": "tab:orange", "sinks": "tab:green",
              "dense": "black"}
    for ax, (task, label) in zip(axes[0], tasks, strict=True):
        for e in summary:
            if task not in e:
                continue
            kind = ("dense" if e["row"] == "dense" else "louver" if e["louver"]
                    else e["row"].split("@")[0])
            x, y = e[task]["mean_attended_fraction"], e[task]["accuracy"]
            ax.scatter([x], [y], color=colors[kind], marker="o" if e["louver"] else "s")
            ax.annotate(e["row"], (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("mean attended fraction of keys")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        d = {k: v for k, v in r.items() if k != "results"}
        d["results"] = {name: {"value": res.value, **res.extra,
                               "mean_attended_fraction":
                                   statistics.fmean(res.log.attended_fraction),
                               "zfn_calls_ok": sum(res.log.zfn_ok),
                               "zfn_calls_checked": len(res.log.zfn_ok),
                               "certificate_calls_ok": sum(res.log.cert_ok),
                               "max_output_err": max(res.log.output_err, default=None),
                               "max_certificate": max((c for c in res.log.certificate
                                                       if not math.isnan(c)), default=None),
                               "max_true_dropped_mass": max(res.log.true_dropped)}
                        for name, res in r["results"].items()}
        out.append(d)
    return out


def build_rows(topk: int, match: list[str], keep: list[str] | None = None) -> list[Row]:
    """The Louver rows (only those named in ``keep`` and dense, when given), then the two
    budget baselines matched to each row named in ``match``."""
    rows = [Row("dense", Dense()),
            Row("rel_1e-2", Relative(1e-2)), Row("rel_1e-3", Relative(1e-3)),
            Row("rel_1e-4", Relative(1e-4)),
            Row("mass_1e-2", Mass(1e-2)), Row("mass_1e-3", Mass(1e-3)),
            Row(f"topk_{topk}", TopK(topk))]
    if keep is not None:
        unknown = set(keep) - {r.name for r in rows}
        if unknown:
            raise ValueError(f"--rows {sorted(unknown)} are not Louver rows "
                             f"({[r.name for r in rows]})")
        rows = [r for r in rows if r.name == "dense" or r.name in keep]
    names = {r.name for r in rows}
    for m in match:
        if m not in names:
            raise ValueError(f"--match {m!r} is not a Louver row ({sorted(names)})")
        rows.append(Row(f"quest@{m}", baseline=QuestPages(), match=m))
        rows.append(Row(f"sinks@{m}", baseline=SinksRecent(), match=m))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,2048", help="prompt lengths (tokens)")
    ap.add_argument("--depths", default="0.25,0.75", help="passkey depths")
    ap.add_argument("--seeds", type=int, default=2, help="passkey seeds per length and depth")
    ap.add_argument("--passkey-tokens", type=int, default=7)
    ap.add_argument("--trim", action="store_true",
                    help="passkey prompts within ~20 %% of --lengths (default: whole modules of "
                         "text, which can overshoot by more than half)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="agreement: generated tokens")
    ap.add_argument("--prompt-skip", type=int, default=0,
                    help="agreement: start the prompts' text this many modules later (other "
                         "prompts than the default run)")
    ap.add_argument("--nll-lengths", default="1024", help="NLL prefix lengths")
    ap.add_argument("--nll-positions", type=int, default=128)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--match", default="rel_1e-3,rel_1e-2",
                    help="Louver rows the budget baselines are matched to")
    ap.add_argument("--rows", default="",
                    help="only these Louver rows (and dense); default: all")
    ap.add_argument("--tasks", default="passkey,agreement,nll")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (more threads thrash when the cores are shared)")
    ap.add_argument("--out", default="benchmarks/results/bench_accuracy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # subnormal float32 arithmetic is ~6x slower on this CPU (tiny exp() terms of the
    # softmax); flushing them to zero changes no row's result measurably
    torch.set_flush_denormal(True)
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = args.tasks.split(",")
    rows = build_rows(args.topk, [m for m in args.match.split(",") if m],
                      [r for r in args.rows.split(",") if r] or None)
    t0 = time.perf_counter()
    bench = Bench(getattr(torch, args.dtype))
    runs: list[dict[str, Any]] = []
    hardware = f"{platform.processor() or platform.machine()}, {args.threads} CPU threads"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(summary: list[dict[str, Any]], complete: bool) -> None:
        doc = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32 compute)",
               "hardware": hardware, "torch": torch.__version__, "kv_dtype": args.dtype,
               "args": vars(args), "complete": complete,
               "seconds": time.perf_counter() - t0,
               "rows": [{"name": r.name, "policy": repr(r.policy) if r.policy else None,
                         "baseline": r.baseline.name if r.baseline else None,
                         "match": r.match} for r in rows],
               "summary": summary, "runs": _jsonable(runs)}
        out.write_text(json.dumps(doc, indent=1))

    if "passkey" in tasks:
        runs += passkey_task(bench, rows, lengths, [float(x) for x in args.depths.split(",")],
                             args.seeds, args.passkey_tokens, args.trim)
        write(summarize(rows, runs), complete=False)
    if "agreement" in tasks:
        runs += agreement_task(bench, rows, lengths, args.gen_tokens, args.prompt_skip)
        write(summarize(rows, runs), complete=False)
    if "nll" in tasks:
        runs += nll_task(bench, rows, [int(x) for x in args.nll_lengths.split(",")],
                         args.nll_positions)
    summary = summarize(rows, runs)
    elapsed = time.perf_counter() - t0
    print(f"\nSmolLM2-135M-Instruct, KV {args.dtype}, torch {torch.__version__}, {hardware}, "
          f"{elapsed:.0f} s")
    print_table(summary)
    write(summary, complete=True)
    plot(summary, out.with_suffix(".png"),
         f"SmolLM2-135M, lengths {args.lengths}; baselines matched to the attended fraction "
         f"of {args.match}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
