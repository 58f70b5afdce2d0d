"""Launched by tests/test_hf_ddp.py with ``torchrun --nproc_per_node 2`` (gloo, CPU).

One launch runs every check, to pay the ~6 s ``import transformers`` once per process: for each
optimizer a 4-step ``hf_optim.Trainer`` run with gradient accumulation 2, the stock Trainer with
``optim="momo"``, and a negative control in which Momo gets its rank-local
loss. Each rank writes ``rank<r>.json``: a hash of its final parameters, the losses the
loss-aware optimizers received, and the losses the Trainer logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import torch
import transformers  # noqa: E402  (after hf_optim on purpose: the import hook registers)
from hf_common import (
    NAMES,
    ToyLM,
    freeze_import_heap,
    parameters_vector,
    tiny_gpt2,
    train_losses,
    training_kwargs,
)
from transformers import TrainingArguments  # noqa: E402

import hf_optim

#: large enough that Momo's Polyak step, not the lr cap, sets the step: replicas that got
#: different losses would then diverge
DDP_LEARNING_RATES = {"momo": 100.0, "momo_adam": 1.0}

received: list[float] = []


def _spy_on_loss() -> None:
    for name in ("momo", "momo_adam"):
        cls = hf_optim.get_optimizer_class(name)
        if "_step" not in vars(cls):  # inherited: already wrapped through its base
            continue
        original = cls._step

        def spy(self, loss, _original=original):
            received.append(float(loss))
            return _original(self, loss)

        cls._step = spy


def run(name: str, trainer_cls: type, output_dir: str) -> dict:
    received.clear()
    overrides = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4)
    if name in DDP_LEARNING_RATES:
        overrides["learning_rate"] = DDP_LEARNING_RATES[name]
    args = TrainingArguments(**training_kwargs(name, output_dir, **overrides))
    trainer = trainer_cls(model=tiny_gpt2(), args=args, train_dataset=ToyLM(64))
    trainer.train()
    vector = parameters_vector(trainer.model)
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped": type(trainer.model_wrapped).__name__,
        "params_sha": hashlib.sha256(vector.float().numpy().tobytes()).hexdigest(),
        "finite": bool(torch.isfinite(vector).all()),
        "fed": list(received),
        "logged": train_losses(trainer),
    }


def main(out_dir: str) -> None:
    freeze_import_heap()
    _spy_on_loss()
    rank = int(os.environ["RANK"])
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in NAMES:
            results[f"mixin/{name}"] = run(name, hf_optim.Trainer, scratch)
        results["stock/momo"] = run("momo", transformers.Trainer, scratch)
        # Negative control: without the average over ranks the replicas must drift apart.
        import hf_optim.hf._loss as loss_plumbing

        loss_plumbing._mean_over_ranks = lambda value, accelerator: value
        results["control/momo_rank_local_loss"] = run("momo", hf_optim.Trainer, scratch)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    # gloo aborts at exit now and then unless the process group is gone first.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
