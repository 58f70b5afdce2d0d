"""Instruction/response records, prompt templates and prompt-masked tokenization.

A *record* is a plain dict with the string fields ``instruction``, ``input`` (may be empty)
and ``output`` (the response the model learns). :func:`normalize_record` maps the usual
layouts onto it: Alpaca (``instruction``/``input``/``output``), GSM8K (``question``/``answer``)
and prompt/response pairs (``prompt``/``response`` or ``prompt``/``completion``).

:func:`tokenize_example` turns a record into ``input_ids``/``attention_mask``/``labels``
where every prompt token has the label ``-100`` (ignored by the loss of every causal LM in
``transformers``): the model is trained on the response only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATES",
    "normalize_record",
    "format_prompt",
    "tokenize_example",
]

#: the label of tokens that the loss ignores
IGNORE_INDEX = -100

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

#: Named templates. ``alpaca`` is Stanford Alpaca's (two variants, with and without input);
#: ``plain`` is the short "Instruct:/Output:" format of CASMO's B6 benchmark; ``chat`` uses the
#: tokenizer's own chat template (instruct models such as SmolLM2-Instruct).
PROMPT_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA_WITH_INPUT,
    "alpaca_no_input": _ALPACA_NO_INPUT,
    "plain": "Instruct: {instruction}\n{input}\nOutput: ",
    "plain_no_input": "Instruct: {instruction}\nOutput: ",
    "chat": "",
}

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")

_FIELD_ALIASES = (
    ("instruction", "input", "output"),
    ("question", None, "answer"),
    ("prompt", None, "response"),
    ("prompt", None, "completion"),
)


def normalize_record(
    record: Mapping[str, Any], *, strip_calculator_annotations: bool = False
) -> dict[str, str]:
    """Map an Alpaca, GSM8K or prompt/response record onto ``instruction``/``input``/``output``.

    ``strip_calculator_annotations`` removes GSM8K's ``<<48/2=24>>`` calculator marks from the
    output. Raises ``ValueError`` naming the fields found when the layout is not recognised.
    """
    for instruction_key, input_key, output_key in _FIELD_ALIASES:
        if instruction_key in record and output_key in record:
            output = str(record[output_key] or "")
            if strip_calculator_annotations:
                output = _CALCULATOR_ANNOTATION.sub("", output)
            return {
                "instruction": str(record[instruction_key] or ""),
                "input": str(record.get(input_key) or "") if input_key else "",
                "output": output,
            }
    raise ValueError(
        "record has none of the known layouts (instruction/input/output, question/answer, "
        f"prompt/response, prompt/completion); its fields are {sorted(record)}"
    )


def format_prompt(
    record: Mapping[str, Any], template: str = "alpaca", tokenizer: Any = None
) -> str:
    """The prompt text for ``record``: everything the model sees before the response.

    ``template`` is a name in :data:`PROMPT_TEMPLATES` or a format string with the fields
    ``{instruction}`` and optionally ``{input}``. ``alpaca`` and ``plain`` switch to their
    ``*_no_input`` variant when the record's input is empty. ``chat`` needs ``tokenizer`` (one
    with a chat template) and renders a single user turn with the generation prompt.
    """
    instruction = record["instruction"]
    extra_input = record.get("input") or ""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer that has a chat_template")
        content = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template in PROMPT_TEMPLATES:
        if not extra_input and f"{template}_no_input" in PROMPT_TEMPLATES:
            template = f"{template}_no_input"
        template = PROMPT_TEMPLATES[template]
    elif "{instruction}" not in template:
        raise ValueError(
            f"template must be one of {sorted(PROMPT_TEMPLATES)} or a format string containing "
            f"'{{instruction}}', got {template!r}"
        )
    return template.format(instruction=instruction, input=extra_input)


def tokenize_example(
    record: Mapping[str, Any],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    max_length: int = 512,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """Token ids, attention mask and labels for one record, with the prompt masked out.

    The prompt and the response are tokenized separately and concatenated, so the boundary
    is exact: ``labels`` is ``-100`` on every prompt token and equals ``input_ids`` on every
    response token (and on the end-of-sequence token when ``add_eos``). Sequences longer
    than ``max_length`` lose tokens from the end of the response; a prompt that alone fills
    ``max_length`` is cut from the left so that at least one response token remains.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt_text = format_prompt(record, template, tokenizer)
    # A chat template already starts with its own special tokens.
    add_special = template != "chat"
    prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    if not response_ids:
        raise ValueError("the record's output is empty and add_eos is off: nothing to learn")
    if len(prompt_ids) >= max_length:
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - 1) :]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    input_ids = [*prompt_ids, *response_ids]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }
