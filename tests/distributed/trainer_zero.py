"""DeepSpeed ZeRO through the Hugging Face Trainer on CPU: the same training, either with
``--zero 2`` under ``torchrun --nproc_per_node 2`` (gloo, ``use_cpu=True``) or with ``--zero 0``
in one process on the whole batch (the reference). Writes each run's final weights, or the error
it stopped with, to ``--out`` (a ``.pt`` file of ``{name: {"params": ..., "error": ...}}``).

Sequential sampling gives rank 0 and rank 1 the two halves of the reference's batch of 8 at
every step; gradient clipping is off (``max_grad_norm=0``: DeepSpeed would clip at 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

#: name -> (optim, optim_args)
RUNS = {
    "adamw": ("adamw_torch", ""),
    "casmo-group": ("casmo", "granularity=group,tau_init_steps=4,implementation=eager"),
    "casmo-parameter": ("casmo", "granularity=parameter,tau_init_steps=4,implementation=eager"),
    "momo": ("momo", "implementation=eager"),
}


class Model(h.Net):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:  # the Trainer passes columns
        return {"loss": torch.nn.functional.mse_loss(super().forward(x), y)}


class Data(torch.utils.data.Dataset):
    def __init__(self, steps: int) -> None:
        pairs = [h.batch(step, torch.float32) for step in range(steps)]
        self.x = torch.cat([x for x, _ in pairs])
        self.y = torch.cat([y for _, y in pairs])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "y": self.y[index]}


def train(name: str, zero: int, steps: int, folder: str) -> dict:
    from transformers import Trainer, TrainingArguments

    optim, optim_args = RUNS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {}
    if zero:
        extra["deepspeed"] = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": zero},
            "zero_allow_untested_optimizer": True,
        }
        extra["ddp_backend"] = "gloo"
    args = TrainingArguments(
        output_dir=os.path.join(folder, name),
        use_cpu=True,
        per_device_train_batch_size=h.BATCH // world,
        max_steps=steps,
        learning_rate=1e-2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        optim=optim,
        optim_args=optim_args or None,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=10**6,
        seed=0,
        **extra,
    )
    torch.manual_seed(0)
    model = Model()
    model.unused.requires_grad_(False)
    trainer = Trainer(model=model, args=args, train_dataset=Data(steps))
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.zero:
        import deepspeed.comm.torch  # noqa: F401 - see zero_check._without_shm_comm

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import hf_optim  # noqa: F401 - registers optim="casmo" etc. with the Trainer

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.runs:
            try:
                results[name] = {"params": train(name, args.zero, args.steps, folder)}
            except Exception as exc:  # noqa: BLE001 - written out for the test to judge
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, results[name].get("error", "trained"), flush=True)
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, args.out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
