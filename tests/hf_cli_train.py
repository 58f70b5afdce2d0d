"""A training script in the style of the transformers examples, built on HfArgumentParser.

``python tests/hf_cli_train.py --output_dir out --optim casmo --optim_args c_min=0.05`` trains
the tiny GPT-2 of ``hf_common`` with the *stock* ``transformers.Trainer``; the only hf-optim line
is ``import hf_optim``. Prints one JSON line describing what was trained.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import hf_optim  # noqa: F401 - registers the optim= names

IMPORTED_BY_HF_OPTIM = [name for name in ("transformers", "accelerate") if name in sys.modules]
importlib.util.find_spec("transformers.training_args")  # a bare look-up must not use the hook up

from hf_common import ToyLM, tiny_gpt2, train_losses  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS  # noqa: E402


def main(argv: list[str]) -> dict:
    defaults = [
        "--per_device_train_batch_size", "8", "--logging_steps", "1", "--report_to", "none",
        "--disable_tqdm", "true", "--use_cpu", "true", "--learning_rate", "1e-2",
        "--max_grad_norm", "0", "--lr_scheduler_type", "constant",
    ]  # fmt: skip
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(defaults + argv)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=ToyLM(8))
    trainer.train()
    optimizer = hf_optim.hf.unwrap_optimizer(trainer.optimizer)
    return {
        "imported_by_hf_optim": IMPORTED_BY_HF_OPTIM,
        "handlers": all(name in _OPTIMIZER_HANDLERS for name in hf_optim.OPTIMIZERS),
        "trainer_wrapped": getattr(Trainer.create_optimizer, "_hf_optim_wrapped", False),
        "hook_left": any("Registering" in type(finder).__name__ for finder in sys.meta_path),
        "optim": args.optim.value,
        "optimizer_class": type(optimizer).__name__,
        "c_min": optimizer.param_groups[0].get("c_min"),
        "losses": train_losses(trainer),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
