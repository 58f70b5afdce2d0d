"""A training script of the kind transformers ships in ``examples/pytorch``: HfArgumentParser,
the stock ``Trainer``, nothing from hf-optim (it must not import it).

Run through the launcher, ``python -m hf_optim tests/hf_example_train.py --optim casmo ...``,
it trains with an hf-optim optimizer unmodified. It trains a tiny GPT-2 built from a config on
sequences that repeat a short pattern, then prints one JSON line: the optimizer's class, the
logged losses and ``log_history``, ``__name__`` and ``sys.argv`` as the script saw them.
``--exit_code N`` exits with N after training, ``--fail`` raises after parsing (launcher tests).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

VOCAB, SEQ = 96, 16


@dataclass
class ScriptArguments:
    train_samples: int = field(default=32, metadata={"help": "number of training sequences"})
    exit_code: int = field(default=0, metadata={"help": "exit with this status after training"})
    fail: bool = field(default=False, metadata={"help": "raise an error after parsing"})


class PatternDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        generator = torch.Generator().manual_seed(1)
        starts = torch.randint(2, VOCAB - 8, (n, 1), generator=generator)
        self.ids = (starts + torch.arange(SEQ) % 4).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()
    if script_args.fail:
        raise RuntimeError("failing on purpose")
    torch.set_num_threads(1)
    torch.manual_seed(training_args.seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=training_args,
        train_dataset=PatternDataset(script_args.train_samples),
    )
    trainer.train()
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # Accelerate's wrapper
        optimizer = optimizer.optimizer
    if trainer.is_world_process_zero():
        report = {
            "name": __name__,
            "argv": sys.argv,
            "optimizer": type(optimizer).__name__,
            "world_size": training_args.world_size,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "log_history": trainer.state.log_history,
        }
        print(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(script_args.exit_code)


if __name__ == "__main__":
    main()
