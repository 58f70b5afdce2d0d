"""The demo's generated task: short string instructions with exact answers and noisy labels.

Each example is an instruction applied to a short word over a 16-letter alphabet::

    rev dcab=      -> bacd      (reverse the word)
    sort dcab=     -> abcd      (sort its letters)

A tiny GPT-2 learns both in about a minute of CPU training, and the answers are exact, so
greedy decoding can be scored by exact match. The examples are instruction records
(``instruction``/``input``/``output``) of :mod:`hf_optim.tasks`, which supplies the rest:

* label noise: :func:`hf_optim.tasks.inject_label_noise` with ``noise_type="shuffle"`` gives
  exactly ``round(noise_rate * train_size)`` training examples the answer of another example
  (a well-formed answer to a different question, never the right one). Only the training split
  goes through it; the evaluation split is clean and shares no prompt with the training split;
* prompt masking: :func:`hf_optim.tasks.tokenize_example` with the template
  ``"{instruction} {input}="`` labels the prompt ``-100``, so the model is trained and scored
  on the answer and its end-of-sequence token only.

Tokens are characters; the tokenizer is built here from a fixed vocabulary (no hub download)
and answers the small part of the ``transformers`` tokenizer interface that
``tokenize_example`` uses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..tasks import inject_label_noise, tokenize_example

__all__ = [
    "ALPHABET",
    "INSTRUCTIONS",
    "PROMPT_TEMPLATE",
    "CharTokenizer",
    "Example",
    "TaskSplits",
    "build_task",
    "encode_example",
    "PadCollator",
]

ALPHABET = "abcdefghijklmnop"
WORD_LENGTHS = (3, 6)  # inclusive range of word lengths
PROMPT_TEMPLATE = "{instruction} {input}="
NOISE_TYPE = "shuffle"

#: instruction name -> the exact answer for a word
INSTRUCTIONS: dict[str, Callable[[str], str]] = {
    "rev": lambda word: word[::-1],
    "sort": lambda word: "".join(sorted(word)),
}

IGNORE_INDEX = -100


class CharTokenizer:
    """Character-level tokenizer over the task's fixed vocabulary.

    Ids 0, 1 and 2 are padding, beginning and end of sequence; every other id is one character.
    Calling it returns ``{"input_ids": ...}`` with the beginning-of-sequence id in front when
    ``add_special_tokens``, like a ``transformers`` tokenizer.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self) -> None:
        template_text = PROMPT_TEMPLATE.format(instruction="", input="")
        characters = sorted(set(ALPHABET + "".join(INSTRUCTIONS) + template_text))
        self._char_to_id = {char: index + 3 for index, char in enumerate(characters)}
        self._id_to_char = {index: char for char, index in self._char_to_id.items()}
        self.vocab_size = len(characters) + 3

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text)
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}

    def encode(self, text: str) -> list[int]:
        return [self._char_to_id[char] for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Characters up to the first end-of-sequence token; special ids are dropped."""
        characters = []
        for token in ids:
            if token == self.eos_token_id:
                break
            characters.append(self._id_to_char.get(int(token), ""))
        return "".join(characters)


@dataclass(frozen=True)
class Example:
    """One instruction/response pair. ``target`` is what training sees; ``answer`` is the truth
    (they differ exactly when ``noisy``)."""

    instruction: str
    word: str
    answer: str
    target: str
    noisy: bool = False

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(instruction=self.instruction, input=self.word)

    @property
    def record(self) -> dict[str, str]:
        """The :mod:`hf_optim.tasks` record that training sees."""
        return {"instruction": self.instruction, "input": self.word, "output": self.target}


@dataclass(frozen=True)
class TaskSplits:
    train: list[Example]
    eval: list[Example]
    noise_rate: float

    @property
    def noisy_count(self) -> int:
        return sum(example.noisy for example in self.train)


def _random_word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def build_task(train_size: int, eval_size: int, noise_rate: float, seed: int) -> TaskSplits:
    """Generate the training split (with ``noise_rate`` of its targets wrong) and a clean,
    disjoint evaluation split, deterministically from ``seed``."""
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate!r}")
    if train_size < 1 or eval_size < 1:
        raise ValueError(f"train_size and eval_size must be >= 1, got {train_size}, {eval_size}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    records: list[dict[str, str]] = []
    while len(records) < train_size + eval_size:
        instruction = rng.choice(sorted(INSTRUCTIONS))
        word = _random_word(rng, rng.randint(*WORD_LENGTHS))
        if (instruction, word) not in seen:
            seen.add((instruction, word))
            output = INSTRUCTIONS[instruction](word)
            records.append({"instruction": instruction, "input": word, "output": output})

    noisy_train = inject_label_noise(
        records[:train_size], rate=noise_rate, noise_type=NOISE_TYPE, seed=seed
    )
    train = [
        Example(r["instruction"], r["input"], r["clean_output"], r["output"], r["is_noisy"])
        for r in noisy_train
    ]
    evaluation = [
        Example(r["instruction"], r["input"], r["output"], r["output"])
        for r in records[train_size:]
    ]
    return TaskSplits(train=train, eval=evaluation, noise_rate=noise_rate)


def encode_example(tokenizer: CharTokenizer, example: Example) -> dict[str, list[int]]:
    """``input_ids`` = BOS + prompt + target + EOS; ``labels`` mask the BOS and the prompt."""
    features = tokenize_example(example.record, tokenizer, template=PROMPT_TEMPLATE)
    return {"input_ids": features["input_ids"], "labels": features["labels"]}


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds the attention mask.

    Every batch is padded to the same ``length``: on CPU each new tensor shape costs a fresh
    kernel selection in the BLAS backend, which for a model this small is slower than the few
    wasted padding positions.
    """

    def __init__(self, pad_token_id: int, length: int) -> None:
        self.pad_token_id = pad_token_id
        self.length = length

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(self.length, *(len(feature["input_ids"]) for feature in features))
        input_ids, labels, attention_mask = [], [], []
        for feature in features:
            padding = length - len(feature["input_ids"])
            input_ids.append(feature["input_ids"] + [self.pad_token_id] * padding)
            labels.append(feature["labels"] + [IGNORE_INDEX] * padding)
            attention_mask.append([1] * len(feature["input_ids"]) + [0] * padding)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention_mask),
        }
