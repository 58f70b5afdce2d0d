"""Unit tests for hf_optim.tasks: instruction formatting and masking, label noise, exact match."""

from __future__ import annotations

import json
import os

import pytest

from hf_optim.tasks import (
    EXACT_MATCH_METRIC_PATH,
    IGNORE_INDEX,
    NOISE_TYPES,
    format_prompt,
    inject_label_noise,
    noise_summary,
    normalize_record,
    tokenize_example,
)


class CharTokenizer:
    """The smallest tokenizer :func:`tokenize_example` needs: one id per character."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(char) for char in text]}


def _gsm8k_like(count: int) -> list[dict[str, str]]:
    return [
        normalize_record(
            {"question": f"What is {i} times 3?", "answer": f"{i}*3={i * 3}\n#### {i * 3}"}
        )
        for i in range(count)
    ]


# --- records and prompts ---------------------------------------------------------------------


def test_normalize_record_maps_known_layouts() -> None:
    alpaca = normalize_record({"instruction": "Add", "input": "1 and 2", "output": "3"})
    assert alpaca == {"instruction": "Add", "input": "1 and 2", "output": "3"}
    gsm8k = normalize_record(
        {"question": "Q?", "answer": "6/2=<<6/2=3>>3\n#### 3"}, strip_calculator_annotations=True
    )
    assert gsm8k == {"instruction": "Q?", "input": "", "output": "6/2=3\n#### 3"}
    assert normalize_record({"prompt": "p", "completion": "c"})["output"] == "c"
    with pytest.raises(ValueError, match=r"fields are \['label', 'text'\]"):
        normalize_record({"text": "x", "label": 1})


def test_format_prompt_templates() -> None:
    with_input = format_prompt({"instruction": "Add", "input": "1 and 2"}, "alpaca")
    assert "### Input:\n1 and 2" in with_input and with_input.endswith("### Response:\n")
    without_input = format_prompt({"instruction": "Add", "input": ""}, "alpaca")
    assert "### Input" not in without_input and "### Instruction:\nAdd" in without_input
    assert format_prompt({"instruction": "Hi", "input": ""}, "plain") == "Instruct: Hi\nOutput: "
    assert (
        format_prompt({"instruction": "Hi", "input": "x"}, "Q: {instruction} ({input})\nA:")
        == "Q: Hi (x)\nA:"
    )
    with pytest.raises(ValueError, match="template must be one of"):
        format_prompt({"instruction": "Hi"}, "no placeholders")
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt({"instruction": "Hi"}, "chat", CharTokenizer())


def test_tokenize_example_masks_exactly_the_prompt() -> None:
    record = {"instruction": "Add", "input": "", "output": "3"}
    features = tokenize_example(record, CharTokenizer(), template="plain", max_length=64)
    prompt = format_prompt(record, "plain")
    assert features["input_ids"] == [ord(c) for c in prompt + "3"] + [0]
    assert features["labels"] == [IGNORE_INDEX] * len(prompt) + [ord("3"), 0]
    assert features["attention_mask"] == [1] * len(features["input_ids"])


def test_tokenize_example_truncation_keeps_a_response_token() -> None:
    record = {"instruction": "x" * 50, "input": "", "output": "abcdef"}
    cut_response = tokenize_example(
        record, CharTokenizer(), template="{instruction}", max_length=53
    )
    assert len(cut_response["input_ids"]) == 53
    assert [label for label in cut_response["labels"] if label != IGNORE_INDEX] == [
        ord(c) for c in "abc"
    ]
    long_prompt = tokenize_example(record, CharTokenizer(), template="{instruction}", max_length=10)
    assert len(long_prompt["input_ids"]) == 10
    assert long_prompt["labels"][:-1] == [IGNORE_INDEX] * 9 and long_prompt["labels"][-1] == ord(
        "a"
    )


def test_tokenize_example_with_the_gpt2_tokenizer(data_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer")
    record = _gsm8k_like(3)[2]
    features = tokenize_example(record, tokenizer, template="alpaca", max_length=256)
    response_ids = [
        tok
        for tok, label in zip(features["input_ids"], features["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(response_ids) == record["output"] + tokenizer.eos_token
    prompt_ids = features["input_ids"][: features["labels"].count(IGNORE_INDEX)]
    assert tokenizer.decode(prompt_ids) == format_prompt(record, "alpaca")


# --- label noise --------------------------------------------------------------------------------


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 1.0])
def test_noise_hits_the_requested_share_and_only_it(noise_type: str, rate: float) -> None:
    records = _gsm8k_like(40)
    originals = json.dumps(records)
    noisy = inject_label_noise(records, rate=rate, noise_type=noise_type, seed=3)
    assert json.dumps(records) == originals, "the input records were modified"
    summary = noise_summary(noisy)
    assert summary["num_noisy"] == round(rate * 40) and summary["num_examples"] == 40
    for record, original in zip(noisy, records, strict=True):
        assert record["clean_output"] == original["output"]
        assert record["instruction"] == original["instruction"]
        if record["is_noisy"]:
            assert record["output"] != original["output"]
        else:
            assert record["output"] == original["output"]


def test_noise_is_seeded() -> None:
    records = _gsm8k_like(30)
    first = inject_label_noise(records, rate=0.5, noise_type="shuffle", seed=7)
    again = inject_label_noise(records, rate=0.5, noise_type="shuffle", seed=7)
    other = inject_label_noise(records, rate=0.5, noise_type="shuffle", seed=8)
    assert first == again
    assert [r["is_noisy"] for r in first] != [r["is_noisy"] for r in other]


def test_noise_types_do_what_they_say() -> None:
    records = _gsm8k_like(20)
    clean_outputs = [r["output"] for r in records]
    shuffled = inject_label_noise(records, rate=0.5, noise_type="shuffle", seed=0)
    for position, record in enumerate(shuffled):
        if record["is_noisy"]:
            assert record["output"] in clean_outputs and record["output"] != clean_outputs[position]
    corrupted = inject_label_noise(records, rate=0.5, noise_type="corrupt", seed=0)
    for record in corrupted:
        assert sorted(record["output"].split()) == sorted(record["clean_output"].split())
    wrong = inject_label_noise(records, rate=0.5, noise_type="wrong_answer", seed=0)
    for record in wrong:
        reasoning, _, answer = record["output"].rpartition("#### ")
        clean_reasoning, _, clean_answer = record["clean_output"].rpartition("#### ")
        assert reasoning == clean_reasoning
        assert (answer != clean_answer) == record["is_noisy"]


def test_noise_single_record_and_impossible_cases() -> None:
    records = _gsm8k_like(5)
    one = inject_label_noise(records, rate=0.2, noise_type="shuffle", seed=0)
    assert sum(r["is_noisy"] for r in one) == 1
    same = [{"instruction": str(i), "input": "", "output": "same"} for i in range(4)]
    with pytest.raises(ValueError, match="identical"):
        inject_label_noise(same, rate=0.5, noise_type="shuffle")
    with pytest.raises(ValueError, match="needs a number"):
        inject_label_noise(same, rate=0.5, noise_type="wrong_answer")
    with pytest.raises(ValueError, match="no other words"):
        inject_label_noise(same, rate=0.5, noise_type="corrupt")
    one_word = [{"instruction": str(i), "input": "", "output": f"w{i}"} for i in range(4)]
    corrupted = inject_label_noise(one_word, rate=1.0, noise_type="corrupt", seed=0)
    for record in corrupted:
        assert record["is_noisy"] and record["output"] != record["clean_output"]
        assert record["output"] in {"w0", "w1", "w2", "w3"}
    with pytest.raises(ValueError, match="rate"):
        inject_label_noise(records, rate=1.5)
    with pytest.raises(ValueError, match="noise_type"):
        inject_label_noise(records, rate=0.1, noise_type="swap")


# --- exact match --------------------------------------------------------------------------------


def test_extract_and_normalize_answers() -> None:
    from hf_optim.tasks import answers_match, extract_final_answer, normalize_answer

    assert extract_final_answer("3*4=12\n#### 12") == "12"
    assert extract_final_answer("so #### 1,200 apples\nnext") == "1,200"
    assert extract_final_answer("Thus the answer is $5.") == "$5"
    assert extract_final_answer("first 3 then 7") == "7"
    assert extract_final_answer("no digits") == ""
    assert normalize_answer("1,200.0") == "1200" and normalize_answer(" Paris. ") == "paris"
    assert answers_match("... #### 42", "#### 42.0")
    assert not answers_match("... #### 41", "#### 42")
    assert not answers_match("nothing", "no answer either")
    assert not answers_match("12", "#### 12", extract_answers=False)


def test_exact_match_metric_loads_offline_by_path() -> None:
    import evaluate

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: no hub access possible
    metric = evaluate.load(EXACT_MATCH_METRIC_PATH)
    result = metric.compute(
        predictions=["a #### 42", "b #### 7", "c 5"], references=["#### 42", "#### 8", "#### 5"]
    )
    assert result == {"exact_match": pytest.approx(2 / 3)}
    assert metric.compute(predictions=["12"], references=["#### 12"], extract_answers=False) == {
        "exact_match": 0.0
    }
