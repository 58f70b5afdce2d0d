"""Controlled label noise for instruction tuning, recorded per example.

Only a training split should pass through :func:`inject_label_noise`; evaluation data stays
clean. Exactly ``round(rate * len(records))`` records are made noisy, chosen with a seeded
``random.Random``, so a run is reproducible and the noisy share is what was asked for. Each
returned record carries

* ``is_noisy`` (bool): whether its ``output`` was replaced,
* ``clean_output`` (str): the original response, whatever happened to ``output``,

so a run can report its loss on the clean and the noisy part separately.

Noise types (:data:`NOISE_TYPES`):

* ``shuffle``: the response of another example (the chosen records' responses are permuted
  among themselves with no fixed point; a lone chosen record takes a random other record's).
* ``corrupt``: the response's own words in a random order (length and vocabulary kept,
  meaning destroyed); a response whose word order cannot change gets random words drawn
  from the other responses instead.
* ``wrong_answer``: only the final answer changes (GSM8K's ``#### 42``, or else the last number
  of the response), to a different integer; the reasoning text stays. Records without a
  number cannot take this noise and raise ``ValueError``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["NOISE_TYPES", "inject_label_noise", "noise_summary"]

NOISE_TYPES = ("shuffle", "corrupt", "wrong_answer")

_NUMBER = r"-?\d(?:[\d,]*\d)?(?:\.\d+)?"
_LAST_NUMBER = re.compile(rf"({_NUMBER})(?!.*\d)", re.DOTALL)
_HASH_NUMBER = re.compile(rf"(####\s*\$?)({_NUMBER})")


def inject_label_noise(
    records: Sequence[Mapping[str, Any]],
    *,
    rate: float,
    noise_type: str = "shuffle",
    seed: int = 0,
    output_key: str = "output",
) -> list[dict[str, Any]]:
    """Copies of ``records`` where a share ``rate`` of responses (``output_key``) is noisy.

    Returns new dicts (the input is not modified) with ``is_noisy`` and ``clean_output``
    added. Every noisy record's response differs from its clean one. Raises ``ValueError``
    for a rate outside ``[0, 1]``, an unknown ``noise_type``, or data that cannot take the
    requested noise (e.g. all responses identical).
    """
    if isinstance(rate, bool) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate!r}")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    noisy_records = [
        {**record, "is_noisy": False, "clean_output": str(record[output_key])} for record in records
    ]
    count = round(float(rate) * len(noisy_records))
    if count == 0:
        return noisy_records
    rng = random.Random(seed)
    chosen = rng.sample(range(len(noisy_records)), count)
    clean = [record["clean_output"] for record in noisy_records]
    if noise_type == "shuffle":
        new_outputs = _shuffled_outputs(clean, chosen, rng)
    elif noise_type == "corrupt":
        new_outputs = {index: _corrupted(clean, index, rng) for index in chosen}
    else:
        new_outputs = {index: _wrong_answer(clean[index], rng) for index in chosen}
    for index, output in new_outputs.items():
        noisy_records[index][output_key] = output
        noisy_records[index]["is_noisy"] = True
    return noisy_records


def noise_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Counts of noisy and clean records and the noisy share."""
    noisy = sum(bool(record.get("is_noisy", False)) for record in records)
    total = len(records)
    return {
        "num_examples": total,
        "num_noisy": noisy,
        "num_clean": total - noisy,
        "noisy_share": noisy / total if total else 0.0,
    }


def _shuffled_outputs(clean: list[str], chosen: list[int], rng: random.Random) -> dict[int, str]:
    # A cyclic shift of the (already random) chosen order is a permutation without fixed points.
    outputs = {
        index: clean[chosen[(position + 1) % len(chosen)]] for position, index in enumerate(chosen)
    }
    for index in chosen:
        if outputs[index] == clean[index]:
            # A lone chosen record, or a duplicate response: take any different response.
            donors = [donor for donor, text in enumerate(clean) if text != clean[index]]
            if not donors:
                raise ValueError("cannot shuffle responses: all responses are identical")
            outputs[index] = clean[rng.choice(donors)]
    return outputs


def _corrupted(clean: list[str], index: int, rng: random.Random) -> str:
    words = clean[index].split()
    if len(set(words)) > 1:
        while True:
            shuffled = words[:]
            rng.shuffle(shuffled)
            if shuffled != words:
                return " ".join(shuffled)
    pool = [
        word for position, text in enumerate(clean) if position != index for word in text.split()
    ]
    pool = [word for word in pool if word not in words]
    if not pool:
        raise ValueError("cannot corrupt a response: the data holds no other words")
    return " ".join(rng.choice(pool) for _ in range(max(len(words), 1)))


def _wrong_answer(text: str, rng: random.Random) -> str:
    hash_answers = list(_HASH_NUMBER.finditer(text))
    if hash_answers:
        match = hash_answers[-1]
        start, end = match.span(2)
    else:
        match = _LAST_NUMBER.search(text)
        if match is None:
            raise ValueError(
                f"noise_type='wrong_answer' needs a number in every chosen response, got {text!r}"
            )
        start, end = match.span(1)
    number = text[start:end].replace(",", "").replace("$", "")
    value = float(number)
    offset = rng.choice([-1, 1]) * rng.randint(1, max(10, int(abs(value) * 0.5)))
    wrong = value + offset
    wrong_text = str(int(wrong)) if wrong.is_integer() else f"{wrong:g}"
    return text[:start] + wrong_text + text[end:]
