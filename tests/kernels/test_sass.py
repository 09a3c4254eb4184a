"""The decode step's kernels compile for sm_90 (the H200), checked on any machine.

The interpreter runs the kernels' Python, not their compilation, so without this test a change
that only the GPU compiler rejects (inline PTX, a layout) would pass CI. Each case compiles one
launch exactly as its launcher makes it (benchmarks/sass.py) in a subprocess without
TRITON_INTERPRET, with the ptxas that ships with Triton.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _report(kernel: str, shape: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-m", "benchmarks.sass", kernel, "--shape", shape,
                          "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize("shape", ["9/3/64", "32/8/128"])
def test_filter_compiles_without_spills(shape: str) -> None:
    """The filter's launcher caps it at 128 registers for G <= 4 and D <= 128, on the grounds
    that ptxas spills nothing there: checked here, with its hot loop present."""
    report = _report("filter", shape)
    assert report["registers"] <= 128, report["registers"]
    assert report["stack_bytes"] == 0 and report["local_bytes"] == 0, report
    assert report["loops"] and report["opcodes"].get("IMMA", 0) > 0   # int8 tensor-core dots


@pytest.mark.parametrize("shape", ["9/3/64", "32/8/128"])
def test_attention_compiles(shape: str) -> None:
    """The sparse attention compiles for sm_90 (exact float32 scores: FMAs, no tensor cores)."""
    report = _report("attention", shape)
    assert report["loops"] and report["instructions"] > 0
    assert report["opcodes"].get("FFMA", 0) > 0 and "HMMA" not in report["opcodes"]


@pytest.mark.parametrize("shape", ["9/3/64", "32/8/128"])
def test_dense_compiles_without_spills(shape: str) -> None:
    """The dense attention compiles for sm_90, on tensor cores, with no spills."""
    report = _report("dense", shape)
    assert report["loops"] and report["opcodes"].get("HMMA", 0) > 0
    assert report["stack_bytes"] == 0 and report["local_bytes"] == 0, report
