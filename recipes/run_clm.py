"""Causal language modelling with any hf-optim (or stock) optimizer.

Tiny Shakespeare at character level (nanoGPT's ``shakespeare_char``) or with the GPT-2 BPE
tokenizer, WikiText-2 / WikiText-103 (raw) with the GPT-2 tokenizer, or any text dataset; a
GPT-2 trained from a config, or any pretrained causal LM; full training or LoRA.

    accelerate launch recipes/run_clm.py recipes/configs/shakespeare_char.yaml \\
        --optim casmo --optim_args "c_min=0.1" --output_dir runs/shakespeare_char_casmo

The text is tokenized line by line (line breaks kept), concatenated and cut into blocks of
``--block_size`` tokens (HF ``run_clm`` style). Without a validation split, the last
``--validation_split_percentage`` percent of the training rows (a contiguous tail, as nanoGPT's
90/10 split) are the validation set. Writes the Trainer's own files to ``--output_dir``:
``all_results.json`` (validation and test loss and perplexity), ``trainer_state.json`` (every
log, the optimizer's statistics included) and the checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from _common import LoraArguments, ModelArguments  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments, default_data_collator  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import hf_optim  # noqa: E402,F401  (registers optim="casmo", ... before the arguments are parsed)

logger = logging.getLogger("hf_optim.recipes.run_clm")

CHAR_TOKENIZER = "char"


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset, e.g. Salesforce/wikitext (needs the hub or its cache)."},
    )
    dataset_config_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset config, e.g. wikitext-2-raw-v1 or wikitext-103-raw-v1."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training text file, or a directory of them (overrides the hub)."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation text file."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Local test text file (evaluated at the end)."}
    )
    text_column: str = field(
        default="text", metadata={"help": "Column holding the text in hub datasets."}
    )
    validation_split_percentage: float = field(
        default=10.0,
        metadata={
            "help": "Without a validation split: percent of training rows (the tail) held out."
        },
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training blocks."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation blocks."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization."}
    )


def load_raw_splits(data_args: DataArguments) -> Any:
    """A ``DatasetDict`` of text rows with ``train`` and ``validation`` (and maybe ``test``)."""
    from datasets import DatasetDict, load_dataset

    if data_args.train_file:
        files = {"train": _common.data_files(data_args.train_file)}
        if data_args.validation_file:
            files["validation"] = _common.data_files(data_args.validation_file)
        if data_args.test_file:
            files["test"] = _common.data_files(data_args.test_file)
        raw = load_dataset("text", data_files=files, keep_linebreaks=True)
        column = "text"
    elif data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        column = data_args.text_column
    else:
        raise ValueError("give --dataset_name (hub) or --train_file (local text)")
    if column != "text":
        raw = raw.rename_column(column, "text")
    raw = DatasetDict({split: data.select_columns(["text"]) for split, data in raw.items()})
    if "validation" not in raw:
        size = len(raw["train"])
        held_out = max(1, round(size * data_args.validation_split_percentage / 100))
        train_rows = raw["train"]
        raw["train"] = train_rows.select(range(size - held_out))
        raw["validation"] = train_rows.select(range(size - held_out, size))
    return raw


def build_char_tokenizer(texts: list[str]) -> Any:
    """A character-level tokenizer over the sorted characters of ``texts`` (nanoGPT's ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(chain.from_iterable(texts)))
    backend = Tokenizer(
        models.WordLevel(vocab={c: i for i, c in enumerate(characters)}, unk_token=None)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def tokenize_into_blocks(raw: Any, tokenizer: Any, data_args: DataArguments) -> Any:
    """Tokenize every split and cut it into ``block_size`` blocks with ``labels = input_ids``."""
    block_size = data_args.block_size

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        return tokenizer(batch["text"], add_special_tokens=False)

    def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) - len(ids) % block_size
        blocks = [ids[start : start + block_size] for start in range(0, usable, block_size)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * block_size for _ in blocks],
            "labels": [b[:] for b in blocks],
        }

    tokenized = raw.map(
        tokenize,
        batched=True,
        remove_columns=["text"],
        num_proc=data_args.preprocessing_num_workers,
        desc="tokenizing",
    )
    tokenized = tokenized.remove_columns(
        [c for c in tokenized["train"].column_names if c != "input_ids"]
    )
    return tokenized.map(
        group,
        batched=True,
        batch_size=1000,
        num_proc=data_args.preprocessing_num_workers,
        desc=f"blocks of {block_size}",
    )


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

    raw = load_raw_splits(data_args)
    if model_args.tokenizer_name_or_path == CHAR_TOKENIZER:
        if model_args.model_name_or_path:
            raise ValueError(
                "--tokenizer_name_or_path char needs a from-scratch model (--model_config)"
            )
        tokenizer = build_char_tokenizer([text for split in raw.values() for text in split["text"]])
    else:
        tokenizer = _common.load_tokenizer(model_args)
    with training_args.main_process_first(desc="tokenization"):
        blocks = tokenize_into_blocks(raw, tokenizer, data_args)
    train_blocks = blocks["train"]
    eval_blocks = blocks["validation"]
    if data_args.max_train_samples is not None:
        train_blocks = train_blocks.select(
            range(min(data_args.max_train_samples, len(train_blocks)))
        )
    if data_args.max_eval_samples is not None:
        eval_blocks = eval_blocks.select(range(min(data_args.max_eval_samples, len(eval_blocks))))
    logger.info(
        "vocabulary %d, %d training and %d validation blocks of %d tokens",
        len(tokenizer),
        len(train_blocks),
        len(eval_blocks),
        data_args.block_size,
    )

    model = _common.load_model(
        model_args, vocab_size=len(tokenizer), min_positions=data_args.block_size
    )
    model = _common.apply_lora(model, lora_args)

    trainer = hf_optim.Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    checkpoint = last_checkpoint(training_args)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    metrics: dict[str, Any] = {"recipe": "run_clm", "resumed_from": checkpoint}
    metrics.update(
        world_size=training_args.world_size,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    metrics.update(train_result.metrics)
    metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    if "test" in blocks:
        test_blocks = blocks["test"]
        if data_args.max_eval_samples is not None:
            test_blocks = test_blocks.select(
                range(min(data_args.max_eval_samples, len(test_blocks)))
            )
        metrics.update(trainer.evaluate(test_blocks, metric_key_prefix="test"))
    metrics.update(
        vocab_size=len(tokenizer),
        block_size=data_args.block_size,
        num_train_blocks=len(train_blocks),
        num_eval_blocks=len(eval_blocks),
        global_step=trainer.state.global_step,
    )
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
