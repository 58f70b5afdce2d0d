"""Tasks shared by the recipes and the demo: instruction data with prompt-masked labels,
controlled label noise, and an offline exact-match metric.

Nothing here imports ``transformers``, ``datasets`` or ``evaluate`` at import time; the
functions take a tokenizer object, and the metric module is loaded by path::

    import evaluate
    from hf_optim.tasks import (
        EXACT_MATCH_METRIC_PATH, inject_label_noise, normalize_record, tokenize_example,
    )

    records = [normalize_record(r) for r in raw_training_records]   # GSM8K, Alpaca, ...
    records = inject_label_noise(records, rate=0.3, noise_type="shuffle", seed=0)
    features = [tokenize_example(r, tokenizer, template="alpaca") for r in records]
    metric = evaluate.load(EXACT_MATCH_METRIC_PATH)

``extract_final_answer`` and ``answers_match`` (the metric's own answer logic) are importable
from here too; they load the metric module, which imports ``evaluate``, on first access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .instructions import (
    IGNORE_INDEX,
    PROMPT_TEMPLATES,
    format_prompt,
    normalize_record,
    tokenize_example,
)
from .noise import NOISE_TYPES, inject_label_noise, noise_summary

#: path of the exact-match metric module, for ``evaluate.load(EXACT_MATCH_METRIC_PATH)``
EXACT_MATCH_METRIC_PATH = str(Path(__file__).resolve().with_name("exact_match_metric.py"))

_METRIC_FUNCTIONS = ("extract_final_answer", "normalize_answer", "answers_match")

__all__ = [
    "EXACT_MATCH_METRIC_PATH",
    "IGNORE_INDEX",
    "NOISE_TYPES",
    "PROMPT_TEMPLATES",
    "format_prompt",
    "inject_label_noise",
    "noise_summary",
    "normalize_record",
    "tokenize_example",
    *_METRIC_FUNCTIONS,
]


def __getattr__(name: str) -> Any:
    if name in _METRIC_FUNCTIONS:
        from . import exact_match_metric

        return getattr(exact_match_metric, name)
    raise AttributeError(f"module 'hf_optim.tasks' has no attribute {name!r}")
