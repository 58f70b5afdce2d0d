"""End-to-end throughput of ``hf_optim.Trainer`` full fine-tuning, per optimizer name, against
``adamw_torch_fused`` (the Trainer's default) in the same run.

A GPT-2 built from a config (random weights, the same for every run) is trained on fixed
random token sequences for a few steps per run. The runs are alternated round by round (each
round trains once with every name, in an order that rotates from round to round); a callback
records the wall time between consecutive ``on_step_end`` events (forward, backward, optimizer
step, scheduler, data loading: everything a training step costs) and, between
``on_pre_optimizer_step`` and ``on_optimizer_step``, the time of ``optimizer.step()`` alone.
The first ``--warmup`` steps of each run are dropped (compilation, state creation), and a
run's times are the medians of the rest.

Reported per name (medians over rounds): time per step, tokens per second, the optimizer
step's time, and two throughput ratios to ``adamw_torch_fused`` (target: at least 0.98):

* ``direct``: fused AdamW's time per step over this name's, in the same round;
* ``paired``: the same ratio with the rest of the step (everything but ``optimizer.step()``)
  taken as the median over all runs of the round, ``(rest + step_adamw) / (rest + step_name)``.
  The rest does the same work for every name, but its time scatters from run to run by more
  than an optimizer step costs; pairing removes that scatter from the comparison. The
  ``rest x fused`` column shows how far the premise holds (each name's own rest over fused
  AdamW's: 1 up to the run-to-run scatter).

    python scripts/bench_trainer.py                      # every hf-optim name, CPU, 1 thread
    python scripts/bench_trainer.py --names momo casmo --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # after PYTHONPATH: a worktree given there wins

YARDSTICK = "adamw_torch_fused"
TARGET = 0.98
#: settings a run of a few steps needs (AMaC refuses a warm-up longer than the run)
OPTIM_ARGS = {"amac": "warmup_steps=1"}

#: GPT-2 shapes: (vocab, positions = sequence length, width, layers, heads, batch size)
MODELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (256, 32, 32, 1, 2, 2),
    "small": (8192, 128, 256, 4, 4, 4),
}


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences; labels are the inputs (causal LM)."""

    def __init__(self, vocab: int, length: int, count: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (count, length), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def make_model(model: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab, positions, width, layers, heads, _ = MODELS[model]
    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def train_once(
    name: str, model: str, steps: int, warmup: int, workdir: str
) -> tuple[list[float], list[float]]:
    """Seconds per training step and per ``optimizer.step()`` after the warm-up, for one short
    run with optimizer ``name``."""
    from transformers import PrinterCallback, TrainerCallback

    import hf_optim

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.optimizer_starts: list[float] = []
            self.optimizer_ends: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_starts.append(time.perf_counter())

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    vocab, positions, *_, batch = MODELS[model]
    clock = StepClock()
    args = hf_optim.TrainingArguments(
        output_dir=workdir,
        optim=name,
        optim_args=OPTIM_ARGS.get(name),
        max_steps=warmup + steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = hf_optim.Trainer(
        model=make_model(model),
        args=args,
        train_dataset=RandomTokens(vocab, positions, batch * (warmup + steps)),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # no metrics dict printed after every run
    trainer.train()
    durations = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    optimizer = [
        b - a for a, b in zip(clock.optimizer_starts, clock.optimizer_ends, strict=True)
    ]
    # durations[i] is step i + 1 (the first step has no start mark): drop the warm-up steps
    return durations[warmup - 1 :], optimizer[warmup:]


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [YARDSTICK, *[n for n in args.names if n != YARDSTICK]]
    vocab, positions, width, layers, heads, batch = MODELS[args.model]
    tokens = positions * batch
    params = sum(p.numel() for p in make_model(args.model).parameters())
    print(
        f"model {args.model}: GPT-2 with {params / 1e6:.1f}M parameters ({layers} layers, width "
        f"{width}, vocab {vocab}), {batch} x {positions} tokens per step; {args.rounds} rounds "
        f"x {args.steps} timed steps after {args.warmup} warm-up steps per run",
        flush=True,
    )
    per_step: dict[str, list[float]] = {name: [] for name in names}
    per_optimizer: dict[str, list[float]] = {name: [] for name in names}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as workdir:
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if name in failed:
                    per_step[name].append(float("nan"))
                    per_optimizer[name].append(float("nan"))
                    continue
                try:
                    durations, optimizer = train_once(
                        name, args.model, args.steps, args.warmup, workdir
                    )
                except Exception as error:  # one broken optimizer must not stop the others
                    failed[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                    print(f"failed {name}: {failed[name]}", flush=True)
                    per_step[name].append(float("nan"))
                    per_optimizer[name].append(float("nan"))
                    continue
                per_step[name].append(statistics.median(durations))
                per_optimizer[name].append(statistics.median(optimizer))
                print(
                    f"round {round_index + 1} {name}: {per_step[name][-1] * 1e3:.1f} ms/step, "
                    f"optimizer.step() {per_optimizer[name][-1] * 1e3:.1f} ms",
                    flush=True,
                )
    working = [name for name in names if name not in failed]
    rests = {
        name: [s - o for s, o in zip(per_step[name], per_optimizer[name], strict=True)]
        for name in working
    }
    # per round, the rest of a step as the median over every run of the round
    pooled = [statistics.median(rests[name][r] for name in working) for r in range(args.rounds)]
    rows = []
    for name in working:
        direct = [b / a for a, b in zip(per_step[name], per_step[YARDSTICK], strict=True)]
        paired = [
            (rest + yardstick) / (rest + own)
            for rest, own, yardstick in zip(
                pooled, per_optimizer[name], per_optimizer[YARDSTICK], strict=True
            )
        ]
        rest_ratio = [a / b for a, b in zip(rests[name], rests[YARDSTICK], strict=True)]
        row = {
            "name": name,
            "ms": statistics.median(per_step[name]) * 1e3,
            "tokens_per_s": tokens / statistics.median(per_step[name]),
            "optimizer_ms": statistics.median(per_optimizer[name]) * 1e3,
            "ratio": statistics.median(direct),
            "ratio_paired": statistics.median(paired),
            "rest_ratio": statistics.median(rest_ratio),
            "per_round_ms": [t * 1e3 for t in per_step[name]],
        }
        row["met"] = row["ratio_paired"] >= TARGET if name != YARDSTICK else None
        rows.append(row)
    return {
        "model": args.model,
        "params": params,
        "tokens_per_step": tokens,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "failed": failed,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n| optim ({result['model']}, {result['params'] / 1e6:.1f}M) | ms / step | tokens / s | "
        f"optimizer.step() ms | direct x {YARDSTICK} | paired x {YARDSTICK} | rest x fused | "
        f"target >= {TARGET} (paired) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in result["rows"]:
        met = "-" if row["met"] is None else ("pass" if row["met"] else "FAIL")
        print(
            f"| {row['name']} | {row['ms']:.1f} | {row['tokens_per_s']:.0f} | "
            f"{row['optimizer_ms']:.1f} | {row['ratio']:.3f} | {row['ratio_paired']:.3f} | "
            f"{row['rest_ratio']:.3f} | {met} |"
        )
    for name, reason in result["failed"].items():
        print(f"- failed {name}: {reason}")


def main(argv: list[str] | None = None) -> int:
    import hf_optim

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", default=hf_optim.list_optimizers(), metavar="OPTIM")
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's time is not measured)")
    unknown = sorted(set(args.names) - {*hf_optim.list_optimizers(), YARDSTICK, "adamw_torch"})
    if unknown:
        parser.error(
            f"unknown optim name(s) {unknown}; valid: {YARDSTICK}, adamw_torch, "
            f"{', '.join(hf_optim.list_optimizers())}"
        )
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("hf_optim").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"torch {torch.__version__}, {args.threads} thread(s), CPU kernels "
        f"{torch.backends.cpu.get_cpu_capability()}, load average "
        f"{os.getloadavg()[0]:.1f}, hf_optim from {Path(hf_optim.__file__).parent}",
        flush=True,
    )
    result = run(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
