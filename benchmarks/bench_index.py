"""Pruning power of the sound index kinds on real SmolLM2 keys.

For each index variant, layer and context length N: the index is built over the first N - steps
keys (prefill), then the last ``steps`` tokens are decoded one at a time: append the token's K/V,
then query with its q. Per step and query head we record, for each threshold policy:

- the true fraction {n : q.k_n >= tau} / N (what any exact method must attend),
- the candidate fraction (bound >= tau, plus the buffer) / N,
- bytes a kernel reads per layer-step: index records (QUANT: the top ``quant_coarse_bits`` bits
  of every indexed key's codes, its residual norms and range tables, the low bits of the keys
  whose coarse bound reaches tau), K of the candidates and of the threshold's probe keys and V
  of the attended keys (each as the union over a GQA group, read once per KV head), the
  buffer's K and V; against dense K+V bytes,
- the oracle bytes: K and V of the keys some head of the group truly attends plus the buffer,
  what an exact method reads even with a free search (a lower bound on every variant's bytes),
- a zero-false-negative check of every step,
- the two-level idea: the fraction of blocks of 16 and 128 consecutive keys whose per-block
  box bound (per-channel min / max) reaches tau, i.e. blocks a coarse level could not skip.

Also: index bytes per key vs KV bytes per key, build and flush time, and the candidate fraction
after many decode-time appends against a fresh build over the same keys.

    python -m benchmarks.bench_index --capture data/captures/smollm2_8k.pt \
        --contexts 2048,4096,8192 --out benchmarks/results/bench_index.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from louver_kernels import Dense, IndexConfig, IndexKind, LouverIndex, Mass, Relative, TopK
from louver_kernels import reference as ref

VARIANTS: dict[str, IndexConfig] = {
    "balls_s4_c4": IndexConfig(kind=IndexKind.BALLS, num_subspaces=4, cluster_size=4),
    "balls_s16_c4": IndexConfig(kind=IndexKind.BALLS, num_subspaces=16, cluster_size=4),
    "quant_b8_p4": IndexConfig(kind=IndexKind.QUANT, quant_bits=8, quant_coarse_bits=4),
    "quant_b7_p4": IndexConfig(kind=IndexKind.QUANT, quant_bits=7, quant_coarse_bits=4),
    "quant_b6_p4": IndexConfig(kind=IndexKind.QUANT, quant_bits=6, quant_coarse_bits=4),
    "quant_b6_p2": IndexConfig(kind=IndexKind.QUANT, quant_bits=6, quant_coarse_bits=2),
    "quant_b5_p4": IndexConfig(kind=IndexKind.QUANT, quant_bits=5, quant_coarse_bits=4),
    "quant_b4_p4": IndexConfig(kind=IndexKind.QUANT, quant_bits=4, quant_coarse_bits=4),
    # the default codes with a shorter buffer and probe window (fewer keys read densely)
    "quant_b6_p4_buf128": IndexConfig(kind=IndexKind.QUANT, buffer_size=128, probe_recent=128),
    "quant_b6_p4_buf64": IndexConfig(kind=IndexKind.QUANT, buffer_size=64, probe_recent=64),
}
POLICIES = {"rel_1e-2": Relative(1e-2), "rel_1e-3": Relative(1e-3), "rel_1e-4": Relative(1e-4),
            "top20": TopK(20), "mass_1e-3": Mass(1e-3)}


def hardware() -> dict[str, Any]:
    """What this ran on."""
    info: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor(),
                            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def probe_mask(index: LouverIndex, policy: object) -> torch.Tensor:
    """bool [n]: the indexed keys whose K the threshold's probe reads (sink tokens and the
    indexed part of the recent window, LouverIndex._probe_max), for the policies that probe."""
    n = index.num_indexed
    mask = torch.zeros(n, dtype=torch.bool)
    if isinstance(policy, (Relative, Mass)):
        cfg = index.config
        recent = max(cfg.probe_recent - (index.num_keys - n), 0)
        mask[: min(cfg.sink_tokens, n)] = True
        mask[max(n - recent, 0):] = True
    return mask


def step_stats(index: LouverIndex, q: torch.Tensor, name: str) -> dict[str, float]:
    """One decode step under one policy: fractions, bytes and the false-negative check."""
    keys, _ = index.keys_range(0, index.num_keys)
    s = ref.scores(q, keys)
    n, total = index.num_indexed, index.num_keys
    policy = POLICIES[name]
    out = index.attend(q, policy)
    tau = out.tau
    ub = index.bounds(q)
    cand = ub >= tau[:, None]
    true_mask = s >= tau[:, None]
    missed = true_mask[:, :n] & ~cand
    hq, hkv = q.shape[0], index.num_kv_heads
    g = hq // hkv
    # K of the group's candidates and of the probe keys (each read once per KV head)
    k_read = (cand.reshape(hkv, g, n).any(dim=1) | probe_mask(index, policy)[None]).sum().item()
    att_union = (cand & true_mask[:, :n]).reshape(hkv, g, n).any(dim=1).sum().item()
    item = keys.element_size()
    d, dv = index.head_dim, index.value_dim
    buf = total - n
    cfg = index.config
    record = LouverIndex.record_bytes(d, cfg)
    if cfg.kind is IndexKind.QUANT and cfg.quant_coarse_bits < cfg.quant_bits:
        # every key: the coarse field, residual norms and ranges; survivors: the fine field
        fine = d * (cfg.quant_bits - cfg.quant_coarse_bits) // 8
        coarse = (index.bounds(q, top=cfg.quant_coarse_bits) >= tau[:, None]
                  ).reshape(hkv, g, n).any(dim=1)
        scan = hkv * n * (record - fine) + int(coarse.sum().item()) * fine
    else:
        scan = hkv * n * record
    read = scan + k_read * d * item + att_union * dv * item + hkv * buf * (d + dv) * item
    dense = hkv * total * (d + dv) * item
    true_union = true_mask[:, :n].reshape(hkv, g, n).any(dim=1).sum().item()
    oracle = (true_union + hkv * buf) * (d + dv) * item
    true_frac = true_mask.float().mean().item()
    cand_frac = ((cand.sum(dim=1) + buf).float() / total).mean().item()
    return {"true_frac": true_frac, "cand_frac": cand_frac, "bytes_ratio": read / dense,
            "oracle_bytes_ratio": oracle / dense,
            "false_negatives": int(missed.sum().item()),
            "max_certificate": out.dropped_mass_bound.max().item(),
            **{f"block{b}_frac": block_fraction(q, keys[:, :n], tau, b) for b in BLOCKS}}


BLOCKS = (16, 128)


def block_fraction(q: torch.Tensor, keys: torch.Tensor, tau: torch.Tensor, block: int
                   ) -> float:
    """The two-level idea, measured: the fraction of blocks of ``block`` consecutive indexed
    keys (per KV head) whose box bound sum_d max(q_d min_d, q_d max_d) (per-channel min / max
    over the block's keys) reaches tau for some query head of the group, i.e. the blocks a
    coarse per-block level could not skip. 1.0 means no block would be skipped."""
    hkv, n, d = keys.shape
    nb = n // block
    if nb == 0:
        return 1.0
    kb = keys[:, : nb * block].float().reshape(hkv, nb, block, d)
    lo = ref.expand_heads(kb.amin(dim=2), q.shape[0])                  # [Hq, nb, D]
    hi = ref.expand_heads(kb.amax(dim=2), q.shape[0])
    qf = q.float()[:, None, :]
    ub = torch.maximum(qf * lo, qf * hi).sum(dim=-1)                     # [Hq, nb]
    hit = (ub >= tau[:, None]).reshape(hkv, -1, nb).any(dim=1)
    return hit.float().mean().item()


def run_case(cap: dict[str, torch.Tensor], config: IndexConfig, n_ctx: int, steps: int
             ) -> dict[str, Any]:
    """Build over n_ctx - steps keys, decode ``steps`` tokens; mean stats per policy."""
    k, v, q = cap["k"], cap["v"], cap["q"]
    prefill = n_ctx - steps
    t0 = time.perf_counter()
    index = LouverIndex.build(k[:, :prefill], v[:, :prefill], config)
    build_s = time.perf_counter() - t0
    per_policy: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
    for t in range(prefill, n_ctx):
        index.append(k[:, t: t + 1], v[:, t: t + 1])
        for name in POLICIES:
            per_policy[name].append(step_stats(index, q[:, t], name))
    result: dict[str, Any] = {"build_s": build_s, "build_keys_per_s": prefill * k.shape[0] /
                              build_s, "flush_s": flush_time(k, v, config, n_ctx)}
    for name, rows in per_policy.items():
        result[name] = {key: (sum(r[key] for r in rows) / len(rows) if key != "false_negatives"
                              else sum(r[key] for r in rows)) for key in rows[0]}
        result[name]["max_certificate"] = max(r["max_certificate"] for r in rows)
    return result


def flush_time(k: torch.Tensor, v: torch.Tensor, config: IndexConfig, n_ctx: int,
               repeats: int = 5) -> float:
    """Median seconds of a decode-time flush: the append that fills the buffer, then the flush
    a step runs after itself (LouverIndex._after_step)."""
    seg = config.buffer_size
    base = n_ctx - seg
    times = []
    for _ in range(repeats):
        index = LouverIndex.build(k[:, :base], v[:, :base], config)
        index.append(k[:, base: n_ctx - 1], v[:, base: n_ctx - 1])
        flushes = index.num_flushes
        t0 = time.perf_counter()
        index.append(k[:, n_ctx - 1: n_ctx], v[:, n_ctx - 1: n_ctx])
        index._after_step()
        index._await_flush()
        times.append(time.perf_counter() - t0)
        assert index.num_flushes == flushes + 1 and index.num_buffered == 0
    return statistics.median(times)


def incremental_case(cap: dict[str, torch.Tensor], config: IndexConfig, n_ctx: int,
                     appends: int, queries: int = 16) -> dict[str, float]:
    """Candidate fraction at relative 1e-3 after ``appends`` decode-time appends, against a
    fresh build over the same keys (same queries)."""
    k, v, q = cap["k"], cap["v"], cap["q"]
    grown = LouverIndex.build(k[:, : n_ctx - appends], v[:, : n_ctx - appends], config)
    for t in range(n_ctx - appends, n_ctx):
        grown.append(k[:, t: t + 1], v[:, t: t + 1])
    grown.attend(q[:, n_ctx - 1], Dense())   # a step: runs a flush the last append made due
    fresh = LouverIndex.build(k[:, :n_ctx], v[:, :n_ctx], config)
    fracs = {"grown": 0.0, "fresh": 0.0}
    for j in range(queries):
        qt = q[:, n_ctx - 1 - j]
        for name, index in (("grown", grown), ("fresh", fresh)):
            out = index.attend(qt, Relative(1e-3))
            fracs[name] += out.num_candidates.float().mean().item() / n_ctx / queries
    fracs["ratio"] = fracs["grown"] / max(fracs["fresh"], 1e-12)
    return fracs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True, help="capture file from benchmarks.capture")
    parser.add_argument("--contexts", default="2048,4096,8192")
    parser.add_argument("--layers", default="", help="comma list (default: all captured)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=16, help="decode steps per case")
    parser.add_argument("--appends", type=int, default=4096)
    parser.add_argument("--out", default="benchmarks/results/bench_index.json")
    parser.add_argument("--plot", default="benchmarks/results/bench_index.png")
    args = parser.parse_args()

    from benchmarks.capture import load_capture

    capture = load_capture(args.capture)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted(
        int(x) for x in capture["layers"])
    contexts = [int(x) for x in args.contexts.split(",")]
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    rows: list[dict[str, Any]] = []
    print(f"{'variant':14} {'layer':>5} {'N':>6} {'B/key':>6} {'idx%KV':>7} "
          f"{'true@1e-3':>9} {'cand@1e-3':>9} {'ratio':>6} {'bytes':>6} {'FN':>3} "
          f"{'build ms':>8} {'flush ms':>8}")
    for vname, config in variants.items():
        for layer in layers:
            cap = {key: t.float() if key == "q" else t
                   for key, t in capture["layers"][layer].items()}
            for n_ctx in contexts:
                if n_ctx > cap["k"].shape[1]:
                    continue
                res = run_case(cap, config, n_ctx, args.steps)
                d = cap["k"].shape[2]
                rec = LouverIndex.record_bytes(d, config)
                kv = 2 * d * cap["k"].element_size()
                row = {"variant": vname, "config": {k2: (v2.value if hasattr(v2, "value")
                                                         else v2)
                                                    for k2, v2 in asdict(config).items()},
                       "layer": layer, "context": n_ctx, "index_bytes_per_key": rec,
                       "kv_bytes_per_key": kv, **res}
                rows.append(row)
                r = res["rel_1e-3"]
                print(f"{vname:14} {layer:5d} {n_ctx:6d} {rec:6d} {rec / kv:7.1%} "
                      f"{r['true_frac']:9.4f} {r['cand_frac']:9.4f} "
                      f"{r['cand_frac'] / max(r['true_frac'], 1e-9):6.2f} "
                      f"{r['bytes_ratio']:6.3f} {r['false_negatives']:3d} "
                      f"{res['build_s'] * 1e3:8.1f} {res['flush_s'] * 1e3:8.2f}", flush=True)
    incremental = []
    n_inc = max(c for c in contexts if c <= capture["layers"][layers[0]]["k"].shape[1])
    if args.appends and n_inc > args.appends:
        for vname, config in variants.items():
            for layer in layers:
                cap = {key: t.float() if key == "q" else t
                       for key, t in capture["layers"][layer].items()}
                inc = incremental_case(cap, config, n_inc, args.appends)
                incremental.append({"variant": vname, "layer": layer, "context": n_inc,
                                    "appends": args.appends, **inc})
                print(f"incremental {vname:14} layer {layer:2d}: grown {inc['grown']:.4f} "
                      f"fresh {inc['fresh']:.4f} ratio {inc['ratio']:.2f}", flush=True)
    summary = summarize(rows, incremental)
    print(json.dumps(summary, indent=1))
    out = {"benchmark": "bench_index", "hardware": hardware(), "capture": capture["meta"],
           "steps": args.steps, "rows": rows, "incremental": incremental, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(rows, args.plot)
    print(f"wrote {args.out}")


def summarize(rows: list[dict[str, Any]], incremental: list[dict[str, Any]]
              ) -> dict[str, Any]:
    """Per variant: means over layers/contexts of the figures the targets are stated in."""
    summary: dict[str, Any] = {}
    for vname in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == vname]
        entry: dict[str, Any] = {"index_bytes_per_key": sel[0]["index_bytes_per_key"],
                                 "index_over_kv": sel[0]["index_bytes_per_key"] /
                                 sel[0]["kv_bytes_per_key"],
                                 "false_negatives": sum(r[p]["false_negatives"] for r in sel
                                                        for p in POLICIES),
                                 "build_keys_per_s": statistics.median(
                                     r["build_keys_per_s"] for r in sel),
                                 "flush_s": statistics.median(r["flush_s"] for r in sel)}
        for p in POLICIES:
            true = sum(r[p]["true_frac"] for r in sel) / len(sel)
            cand = sum(r[p]["cand_frac"] for r in sel) / len(sel)
            entry[p] = {"true_frac": true, "cand_frac": cand,
                        "cand_over_true": cand / max(true, 1e-12),
                        "bytes_ratio": sum(r[p]["bytes_ratio"] for r in sel) / len(sel),
                        "oracle_bytes_ratio": sum(r[p]["oracle_bytes_ratio"] for r in sel)
                        / len(sel),
                        "max_certificate": max(r[p]["max_certificate"] for r in sel),
                        **{f"block{b}_frac": sum(r[p][f"block{b}_frac"] for r in sel)
                           / len(sel) for b in BLOCKS}}
        inc = [r["ratio"] for r in incremental if r["variant"] == vname]
        if inc:
            entry["incremental_ratio_max"] = max(inc)
        summary[vname] = entry
    return summary


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Candidate fraction (eps=1e-3) per layer for every variant, against the true fraction;
    bytes per key in the legend; bytes read per layer-step against the oracle's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    n_max = max(r["context"] for r in rows)
    for vname in variants:
        sel = sorted((r for r in rows if r["variant"] == vname and r["context"] == n_max),
                     key=lambda r: r["layer"])
        layers = [r["layer"] for r in sel]
        axes[0].plot(layers, [r["rel_1e-3"]["cand_frac"] for r in sel], marker="o",
                     label=f"{vname} ({sel[0]['index_bytes_per_key']} B/key)")
        axes[1].plot(layers, [r["rel_1e-3"]["bytes_ratio"] for r in sel], marker="o",
                     label=vname)
    sel = sorted((r for r in rows if r["variant"] == variants[0] and r["context"] == n_max),
                 key=lambda r: r["layer"])
    axes[0].plot([r["layer"] for r in sel], [r["rel_1e-3"]["true_frac"] for r in sel], "k--",
                 label="true fraction (q.k >= tau)")
    axes[0].set_title(f"candidate fraction, relative eps=1e-3, N={n_max}")
    axes[0].set_xlabel("layer")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].plot([r["layer"] for r in sel], [r["rel_1e-3"]["oracle_bytes_ratio"] for r in sel],
                 "k--", label="oracle: K+V of the attended keys + buffer (free search)")
    axes[1].axhline(0.25, color="k", ls=":", label="target 0.25")
    axes[1].set_title("bytes read / dense K+V bytes, eps=1e-3")
    axes[1].set_xlabel("layer")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
