"""The demo's generated task: short string instructions with exact answers and noisy labels.

Each example is an instruction applied to a short word over a 16-letter alphabet::

    rev dcab=      -> bacd      (reverse the word)
    sort dcab=     -> abcd      (sort its letters)

A tiny GPT-2 learns both in about a minute of CPU training, the answers are exact (so greedy
decoding can be scored by exact match), and a wrong answer is easy to make: a noisy training
example keeps its prompt but gets a random word of the same length that is not the right
answer. Noise touches the training split only, and exactly ``round(noise_rate * train_size)``
examples are corrupted, so the share is the one asked for. The held-out evaluation split is
clean and shares no prompt with the training split.

Tokens are characters. The tokenizer is built here from a fixed vocabulary (no hub download);
prompt tokens are masked out of the loss (label ``-100``), so the model is trained and scored
on the answer and its end-of-sequence token only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ALPHABET",
    "INSTRUCTIONS",
    "CharTokenizer",
    "Example",
    "TaskSplits",
    "build_task",
    "encode_example",
    "PadCollator",
]

ALPHABET = "abcdefghijklmnop"
WORD_LENGTHS = (3, 6)  # inclusive range of word lengths

#: instruction name -> the exact answer for a word
INSTRUCTIONS: dict[str, Callable[[str], str]] = {
    "rev": lambda word: word[::-1],
    "sort": lambda word: "".join(sorted(word)),
}

IGNORE_INDEX = -100


class CharTokenizer:
    """Character-level tokenizer over the task's fixed vocabulary.

    Ids 0, 1 and 2 are padding, beginning and end of sequence; every other id is one character.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self) -> None:
        characters = sorted(set(ALPHABET + "".join(INSTRUCTIONS) + " ="))
        self._char_to_id = {char: index + 3 for index, char in enumerate(characters)}
        self._id_to_char = {index: char for char, index in self._char_to_id.items()}
        self.vocab_size = len(characters) + 3

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
        return f"{self.instruction} {self.word}="


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


def _wrong_answer(rng: random.Random, answer: str) -> str:
    while True:
        candidate = _random_word(rng, len(answer))
        if candidate != answer:
            return candidate


def build_task(train_size: int, eval_size: int, noise_rate: float, seed: int) -> TaskSplits:
    """Generate the training split (with ``noise_rate`` of its targets wrong) and a clean,
    disjoint evaluation split, deterministically from ``seed``."""
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate!r}")
    if train_size < 1 or eval_size < 1:
        raise ValueError(f"train_size and eval_size must be >= 1, got {train_size}, {eval_size}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    pairs: list[tuple[str, str]] = []
    while len(pairs) < train_size + eval_size:
        pair = (rng.choice(sorted(INSTRUCTIONS)), _random_word(rng, rng.randint(*WORD_LENGTHS)))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)

    noisy_indices = set(rng.sample(range(train_size), round(noise_rate * train_size)))
    train = []
    for index, (instruction, word) in enumerate(pairs[:train_size]):
        answer = INSTRUCTIONS[instruction](word)
        noisy = index in noisy_indices
        target = _wrong_answer(rng, answer) if noisy else answer
        train.append(Example(instruction, word, answer, target, noisy))
    evaluation = [
        Example(instruction, word, INSTRUCTIONS[instruction](word), INSTRUCTIONS[instruction](word))
        for instruction, word in pairs[train_size:]
    ]
    return TaskSplits(train=train, eval=evaluation, noise_rate=noise_rate)


def encode_example(tokenizer: CharTokenizer, example: Example) -> dict[str, list[int]]:
    """``input_ids`` = BOS + prompt + target + EOS; ``labels`` mask the BOS and the prompt."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(example.prompt)]
    response_ids = [*tokenizer.encode(example.target), tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


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
