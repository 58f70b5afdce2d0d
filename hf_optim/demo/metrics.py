"""Greedy decoding and exact match for the demo task."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from .task import CharTokenizer, Example

__all__ = ["greedy_answers", "exact_match", "answer_budget"]


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 512,
) -> list[str]:
    """The model's greedy answer to each prompt.

    Each batch is one fixed-size buffer, prompts right-padded: causal attention makes the
    logits at a row's last real token independent of the padding after it, so every step
    runs the same shape (no new kernel selection per shape, no cache or position-id
    bookkeeping; the sequences are a few tokens long).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            [tokenizer.bos_token_id, *tokenizer.encode(prompt)]
            for prompt in prompts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded) + max_new_tokens
        buffer = torch.full((len(encoded), width), tokenizer.pad_token_id, device=device)
        for row, ids in enumerate(encoded):
            buffer[row, : len(ids)] = torch.tensor(ids)
        positions = torch.tensor([len(ids) for ids in encoded], device=device)
        rows = torch.arange(len(encoded), device=device)
        for _ in range(max_new_tokens):
            logits = model(input_ids=buffer, attention_mask=torch.ones_like(buffer)).logits
            buffer[rows, positions] = logits[rows, positions - 1].argmax(dim=-1)
            positions += 1
        for ids, row in zip(encoded, buffer.tolist(), strict=True):
            answers.append(tokenizer.decode(row[len(ids) :]))
    model.train(was_training)
    return answers


@functools.cache
def _exact_match_metric() -> Any:
    import evaluate

    from ..tasks import EXACT_MATCH_METRIC_PATH

    return evaluate.load(EXACT_MATCH_METRIC_PATH)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference, through hf-optim's offline ``evaluate``
    exact-match module (whole strings compared: the answers are words, not numbers)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    result = _exact_match_metric().compute(
        predictions=list(predictions), references=list(references), extract_answers=False
    )
    return float(result["exact_match"])


def answer_budget(examples: Sequence[Example]) -> int:
    """Enough new tokens for the longest answer and its end-of-sequence token."""
    return max(len(example.answer) for example in examples) + 1
