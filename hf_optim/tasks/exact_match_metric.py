"""Exact match of the final answer, as an offline ``evaluate`` metric module.

Load it by path, which needs no network::

    import evaluate
    from hf_optim.tasks import EXACT_MATCH_METRIC_PATH

    metric = evaluate.load(EXACT_MATCH_METRIC_PATH)
    metric.compute(predictions=["... #### 42"], references=["... #### 42.0"])
    # {'exact_match': 1.0}

``evaluate.load`` copies this file into its module cache and imports it there, so the file is
self-contained: it imports only the standard library, ``datasets`` and ``evaluate``.

The final answer of a text is, in order of preference: what follows the last ``####`` (the
GSM8K convention), what follows the last "The answer is", or else the last number in the
text. Answers are normalised before comparison: surrounding whitespace, a trailing full stop,
``$`` and thousands separators are dropped, case is folded, and two answers that both parse
as numbers are equal when their values are equal (``42`` equals ``42.0``). With
``extract_answers=False`` the whole strings are normalised and compared instead.
"""

from __future__ import annotations

import re

import datasets
import evaluate

__all__ = ["ExactMatch", "extract_final_answer", "normalize_answer", "answers_match"]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _first_line_answer(tail: str) -> str:
    # "#### 42 apples" and "The answer is $1,000." both answer with their first number.
    line = tail.strip().lstrip(":").strip()
    line = line.splitlines()[0].strip() if line else ""
    numbers = _NUMBER.findall(line)
    return numbers[0] if numbers else line


def extract_final_answer(text: str) -> str:
    """The final answer of ``text`` (unnormalised), or ``""`` when it has none."""
    if "####" in text:
        return _first_line_answer(text.rsplit("####", 1)[1])
    position = text.lower().rfind("answer is")
    if position >= 0:
        answer = _first_line_answer(text[position + len("answer is") :])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else ""


def normalize_answer(answer: str) -> str:
    """Canonical form of an answer: numbers as their value, other text case-folded."""
    text = answer.strip().rstrip(".").strip().lower()
    number_text = text.replace(",", "").replace("$", "").strip()
    try:
        value = float(number_text)
    except ValueError:
        return " ".join(text.split())
    if value.is_integer():
        return str(int(value))
    return repr(value)


def answers_match(prediction: str, reference: str, extract_answers: bool = True) -> bool:
    """Whether ``prediction`` and ``reference`` have the same (normalised) final answer.

    An empty reference answer never matches, so a reference without an answer cannot be
    matched by a prediction without one.
    """
    if extract_answers:
        prediction, reference = extract_final_answer(prediction), extract_final_answer(reference)
    reference = normalize_answer(reference)
    return bool(reference) and normalize_answer(prediction) == reference


class ExactMatch(evaluate.Metric):
    """Share of predictions whose final answer equals the reference's final answer."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=(
                "predictions: list of generated texts; references: list of reference texts; "
                "extract_answers (bool, default True): compare final answers, not whole texts."
            ),
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], extract_answers: bool = True
    ) -> dict[str, float]:
        if not references:
            return {"exact_match": 0.0}
        hits = sum(
            answers_match(prediction, reference, extract_answers)
            for prediction, reference in zip(predictions, references, strict=True)
        )
        return {"exact_match": hits / len(references)}
