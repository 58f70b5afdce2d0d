"""Instruction tuning with controlled label noise, with any hf-optim (or stock) optimizer.

Data: Alpaca-style JSON (instruction/input/output), GSM8K-style JSON Lines (question/answer),
or a hub dataset by name. The prompt template's tokens are masked out of the loss. A share
``--noise_rate`` of the *training* examples gets noisy responses (``--noise_type``: shuffle,
corrupt or wrong_answer; see ``hf_optim.tasks.noise``); which ones is recorded per example in
``noise.json``. The evaluation split is held out before the noise and stays clean.

    accelerate launch recipes/run_instruction.py recipes/configs/gsm8k_noisy_lora.yaml \\
        --optim casmo --output_dir runs/gsm8k_casmo

Reports, in the Trainer's ``all_results.json`` (every log in ``trainer_state.json``): held-out loss and perplexity, the loss on clean and on noisy
training examples (as trained, and the noisy ones against their original responses), and
for GSM8K-style data the exact match of the final answer of greedy generations, computed with
``evaluate`` through the offline module ``hf_optim/tasks/exact_match_metric.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from _common import LoraArguments, ModelArguments  # noqa: E402
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import hf_optim  # noqa: E402  (registers optim="casmo", ... before the arguments are parsed)
from hf_optim.tasks import (  # noqa: E402
    EXACT_MATCH_METRIC_PATH,
    NOISE_TYPES,
    format_prompt,
    inject_label_noise,
    noise_summary,
    normalize_record,
    tokenize_example,
)

logger = logging.getLogger("hf_optim.recipes.run_instruction")


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset, e.g. openai/gsm8k (needs the hub or its cache)."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub dataset config, e.g. main."}
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local .json/.jsonl training records (a file or a directory of files)."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local .json/.jsonl held-out records."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Hub split to evaluate on (default: validation, else test, else a held-out slice)."
        },
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Without an evaluation split: percent of records held out (seeded)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training records."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N held-out records."}
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "alpaca, plain, chat (the tokenizer's chat template) or a format string with {instruction}."
        },
    )
    max_length: int = field(
        default=512, metadata={"help": "Maximum tokens per example (prompt + response)."}
    )
    strip_calculator_annotations: bool = field(
        default=True, metadata={"help": "Remove GSM8K's <<a*b=c>> calculator marks from responses."}
    )
    noise_rate: float = field(
        default=0.0, metadata={"help": "Share of training examples with noisy responses."}
    )
    noise_type: str = field(
        default="shuffle", metadata={"help": f"One of {', '.join(NOISE_TYPES)}."}
    )
    noise_seed: int = field(
        default=0, metadata={"help": "Seed of the noise (which examples, and how)."}
    )
    max_subset_eval_samples: int = field(
        default=200,
        metadata={"help": "Training examples per clean/noisy subset evaluated for the split loss."},
    )
    eval_exact_match: str = field(
        default="auto",
        metadata={
            "help": "Generate answers and score exact match: auto (when references have '#### n'), true, false."
        },
    )
    num_generation_samples: int = field(
        default=100, metadata={"help": "Held-out examples to generate for."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per answer."})


def _load_records(data_args: DataArguments, seed: int) -> tuple[list[dict], list[dict]]:
    """Raw training and held-out records, as dicts."""
    from datasets import load_dataset

    if data_args.train_file:
        files = {"train": _common.data_files(data_args.train_file)}
        if data_args.validation_file:
            files["validation"] = _common.data_files(data_args.validation_file)
        raw = load_dataset("json", data_files=files)
    elif data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        raise ValueError("give --dataset_name (hub) or --train_file (local JSON/JSON Lines)")
    eval_split = data_args.eval_split or next((s for s in ("validation", "test") if s in raw), None)
    train = raw["train"].to_list()
    if eval_split is not None:
        return train, raw[eval_split].to_list()
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held_out = max(1, round(len(train) * data_args.validation_split_percentage / 100))
    return [train[i] for i in order[held_out:]], [train[i] for i in order[:held_out]]


def build_instruction_splits(
    data_args: DataArguments, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Normalized training records with label noise (``is_noisy``/``clean_output`` per record),
    and clean held-out records. The held-out split is separated before any noise is added."""
    train_raw, eval_raw = _load_records(data_args, seed)
    if data_args.max_train_samples is not None:
        train_raw = train_raw[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        eval_raw = eval_raw[: data_args.max_eval_samples]
    strip = data_args.strip_calculator_annotations
    train = [normalize_record(r, strip_calculator_annotations=strip) for r in train_raw]
    held_out = [normalize_record(r, strip_calculator_annotations=strip) for r in eval_raw]
    train = inject_label_noise(
        train, rate=data_args.noise_rate, noise_type=data_args.noise_type, seed=data_args.noise_seed
    )
    return train, held_out


def _features(
    records: list[dict], tokenizer: Any, data_args: DataArguments, output_key: str = "output"
) -> Any:
    from datasets import Dataset

    rows = [
        tokenize_example(
            {**record, "output": record[output_key]},
            tokenizer,
            template=data_args.prompt_template,
            max_length=data_args.max_length,
        )
        for record in records
    ]
    return Dataset.from_list(rows)


def _wants_exact_match(setting: str, held_out: list[dict]) -> bool:
    if setting in ("true", "false"):
        return setting == "true"
    if setting != "auto":
        raise ValueError(f"--eval_exact_match must be auto, true or false, got {setting!r}")
    with_answers = sum("####" in record["output"] for record in held_out)
    return bool(held_out) and with_answers * 2 >= len(held_out)


@torch.no_grad()
def generate_responses(
    model: Any, tokenizer: Any, records: list[dict], data_args: DataArguments, batch_size: int
) -> list[str]:
    """Greedy responses to the prompts of ``records`` (left-padded batches)."""
    model.eval()
    device = next(model.parameters()).device
    saved_sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    responses: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            prompts = [
                format_prompt(r, data_args.prompt_template, tokenizer)
                for r in records[start : start + batch_size]
            ]
            batch = tokenizer(
                prompts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=data_args.max_length,
                add_special_tokens=data_args.prompt_template != "chat",
            ).to(device)
            generated = model.generate(
                **batch,
                max_new_tokens=data_args.max_new_tokens,
                do_sample=False,
                use_cache=True,  # the Trainer may have switched the config's cache off
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            responses += tokenizer.batch_decode(
                generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved_sides
    return responses


ARGUMENT_CLASSES = (ModelArguments, LoraArguments, DataArguments, TrainingArguments)


def parse_arguments(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Command-line flags, or a YAML/JSON config file (HfArgumentParser's ``parse_yaml_file`` /
    ``parse_json_file``) optionally followed by flags that override its values."""
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        return parser.parse_args_into_dataclasses(argv)
    config, flags = argv[0], argv[1:]
    if not flags:
        if config.endswith(".json"):
            return parser.parse_json_file(config)
        return parser.parse_yaml_file(config)
    text = Path(config).read_text(encoding="utf-8")
    values = json.loads(text) if config.endswith(".json") else yaml.safe_load(text)
    unknown = sorted(set(values) - {action.dest for action in parser._actions})
    if unknown:
        raise ValueError(f"{config}: unknown arguments {unknown}")
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(flags)


def last_checkpoint(training_args: TrainingArguments) -> str | None:
    """``--resume_from_checkpoint auto``: the latest checkpoint in ``output_dir``, if any."""
    requested = training_args.resume_from_checkpoint
    if requested != "auto":
        return requested
    if not os.path.isdir(training_args.output_dir):
        return None
    return get_last_checkpoint(training_args.output_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, lora_args, data_args, training_args = parse_arguments(argv)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    # Refuse an optimizer the launch's backend (FSDP, DeepSpeed ZeRO) cannot serve, before any
    # data or model work: hf-optim's backend policy, the one its Trainer glue applies too.
    hf_optim.hf.check_backend_at_start_up(training_args)
    training_args.prediction_loss_only = True  # no compute_metrics: do not gather logits
    transformers.set_seed(training_args.seed)

    train_records, held_out = build_instruction_splits(data_args, training_args.seed)
    summary = noise_summary(train_records)
    logger.info(
        "%d training records (%d noisy, %s), %d clean held-out records",
        len(train_records),
        summary["num_noisy"],
        data_args.noise_type,
        len(held_out),
    )
    if training_args.should_save:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        noise_record = {
            "noise_rate": data_args.noise_rate,
            "noise_type": data_args.noise_type,
            "noise_seed": data_args.noise_seed,
            "noisy_indices": [i for i, r in enumerate(train_records) if r["is_noisy"]],
            **summary,
        }
        (Path(training_args.output_dir) / "noise.json").write_text(
            json.dumps(noise_record) + "\n", encoding="utf-8"
        )

    tokenizer = _common.load_tokenizer(model_args)
    with training_args.main_process_first(desc="tokenization"):
        train_features = _features(train_records, tokenizer, data_args)
        eval_sets = {"heldout": _features(held_out, tokenizer, data_args)}
        limit = data_args.max_subset_eval_samples
        clean = [r for r in train_records if not r["is_noisy"]][:limit]
        noisy = [r for r in train_records if r["is_noisy"]][:limit]
        if noisy and limit > 0:
            eval_sets["train_clean"] = _features(clean, tokenizer, data_args)
            eval_sets["train_noisy"] = _features(noisy, tokenizer, data_args)
            eval_sets["train_noisy_clean_targets"] = _features(
                noisy, tokenizer, data_args, output_key="clean_output"
            )

    model = _common.load_model(
        model_args, vocab_size=len(tokenizer), min_positions=data_args.max_length
    )
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = _common.apply_lora(model, lora_args)

    trainer = hf_optim.Trainer(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=eval_sets,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    checkpoint = last_checkpoint(training_args)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()

    metrics: dict[str, Any] = {
        "recipe": "run_instruction",
        "resumed_from": checkpoint,
    }
    metrics.update(
        world_size=training_args.world_size,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    metrics.update(train_result.metrics)
    metrics.update(trainer.evaluate())
    metrics.update(
        {f"noise_{k}": v for k, v in summary.items()},
        noise_rate=data_args.noise_rate,
        noise_type=data_args.noise_type,
        prompt_template=data_args.prompt_template,
        num_heldout_examples=len(held_out),
        global_step=trainer.state.global_step,
    )
    if (
        _wants_exact_match(data_args.eval_exact_match, held_out)
        and data_args.num_generation_samples > 0
    ):
        if training_args.world_size > 1:
            logger.warning("exact match skipped: this recipe generates in one process only")
        elif trainer.is_world_process_zero():
            import evaluate

            records = held_out[: data_args.num_generation_samples]
            responses = generate_responses(
                trainer.model,
                tokenizer,
                records,
                data_args,
                training_args.per_device_eval_batch_size,
            )
            metric = evaluate.load(EXACT_MATCH_METRIC_PATH)
            references = [r["output"] for r in records]
            metrics.update(metric.compute(predictions=responses, references=references))
            metrics["num_generation_samples"] = len(records)
            with (Path(training_args.output_dir) / "generations.jsonl").open(
                "w", encoding="utf-8"
            ) as stream:
                for record, response in zip(records, responses, strict=True):
                    stream.write(json.dumps({**record, "prediction": response}) + "\n")
    for key in [k for k in metrics if k.endswith("_loss")]:
        loss = metrics[key]
        metrics[key.removesuffix("_loss") + "_perplexity"] = (
            math.exp(loss) if loss < 700 else math.inf
        )
    # The Trainer's own files: all_results.json (these metrics), trainer_state.json (every log).
    trainer.save_metrics("all", {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    trainer.save_state()
    trainer.end()  # ends the trackers and destroys the process group (clean exit under gloo)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    main()
