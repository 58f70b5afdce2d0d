"""``hf-optim-demo`` / ``python -m hf_optim.demo``: AdamW and the hf-optim optimizers on noisy labels."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .contenders import CONTENDERS, DEFAULT_CONTENDERS, get_contender
from .run import QUICK, DemoConfig

__all__ = ["main", "build_parser"]


def _optimizer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        get_contender(name)  # raises with the valid names
    if not names:
        raise argparse.ArgumentTypeError("give at least one optimizer")
    return names


def _noise_rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"noise rate must be in [0, 1), got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers: {error}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError("give one or more distinct seeds, e.g. 0,1,2")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="hf-optim-demo",
        description=(
            "Train a small GPT-2 on a generated instruction task whose training labels are "
            "partly wrong, once per optimizer, through the Hugging Face Trainer; print a table "
            "(clean-eval loss, exact match, time) and plot the learning curves."
        ),
    )
    parser.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(DEFAULT_CONTENDERS),
        help=f"comma-separated, from: {','.join(CONTENDERS)} (default: all)",
    )
    parser.add_argument(
        "--steps", type=_positive, help=f"optimizer steps (default {defaults.steps})"
    )
    parser.add_argument(
        "--noise-rate",
        type=_noise_rate,
        help=f"share of training examples with a wrong answer (default {defaults.noise_rate})",
    )
    parser.add_argument(
        "--train-size",
        type=_positive,
        help=f"training examples (default {defaults.train_size})",
    )
    parser.add_argument(
        "--seed", type=int, help=f"data, model and order seed (default {defaults.seed})"
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        help="several seeds, e.g. 0,1,2: one full run per seed (in <output-dir>/seed_<n>), "
        "and a table of mean ± std [min, max] over them",
    )
    parser.add_argument("--output-dir", help=f"where results go (default ./{defaults.output_dir})")
    parser.add_argument(
        "--threads",
        type=_positive,
        help=f"torch threads (default {defaults.threads}, at most the CPU count)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced size for smoke tests ({QUICK.steps} steps, {QUICK.train_size} examples)",
    )
    parser.add_argument(
        "--implementation",
        choices=("eager", "auto", "compiled"),
        default="eager",
        help="hf-optim kernels (default eager: on the demo's small model, compiling them on a "
        "CPU takes longer than the compiled kernels save; the results are the same)",
    )
    parser.add_argument("--list", action="store_true", help="print the optimizer table and exit")
    return parser


def contender_table(steps: int) -> str:
    lines = [
        "| name | optim | optim_args | lr | Trainer scheduler | warm-up | weight decay | "
        "max_grad_norm | why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for contender in CONTENDERS.values():
        lines.append(
            f"| {contender.name} | `{contender.optim}` | "
            f"`{contender.resolved_optim_args(steps) or ''}` | {contender.learning_rate:g} | "
            f"{contender.lr_scheduler_type} | {contender.warmup_ratio:g} | "
            f"{contender.weight_decay:g} | {contender.max_grad_norm:g} | {contender.why} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = QUICK if args.quick else DemoConfig()
    overrides = {
        "steps": args.steps,
        "noise_rate": args.noise_rate,
        "train_size": args.train_size,
        "seed": args.seed,
        "output_dir": args.output_dir,
        "threads": args.threads,
    }
    config = replace(
        config, **{key: value for key, value in overrides.items() if value is not None}
    )
    config = replace(config, threads=min(config.threads, os.cpu_count() or 1))
    if args.list:
        print(contender_table(config.steps))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous = os.environ.get("HF_OPTIM_IMPLEMENTATION")
    os.environ["HF_OPTIM_IMPLEMENTATION"] = args.implementation
    try:
        return _run(args, config)
    finally:  # main() is also called in-process (tests): leave the environment as it was
        if previous is None:
            del os.environ["HF_OPTIM_IMPLEMENTATION"]
        else:
            os.environ["HF_OPTIM_IMPLEMENTATION"] = previous


def _run(args: argparse.Namespace, config: DemoConfig) -> int:
    from .report import markdown_table, plot_learning_curves
    from .run import run_demo

    contenders = [get_contender(name) for name in args.optimizers]
    output_dir = Path(config.output_dir)
    if args.seeds and len(args.seeds) > 1:
        from .report import aggregate_seeds, seeds_markdown_table

        reports = [
            run_demo(
                contenders, replace(config, seed=seed, output_dir=str(output_dir / f"seed_{seed}"))
            )
            for seed in args.seeds
        ]
        aggregate = aggregate_seeds(reports)
        (output_dir / "results.json").write_text(
            json.dumps({**aggregate, "reports": reports}, indent=1)
        )
        plot = plot_learning_curves(reports, output_dir / "learning_curves.png")
        table = seeds_markdown_table(aggregate)
        report = reports[0]
    else:
        if args.seeds:
            config = replace(config, seed=args.seeds[0])
        report = run_demo(contenders, config)
        plot = plot_learning_curves(report, output_dir / "learning_curves.png")
        table = markdown_table(report)
    (output_dir / "results.md").write_text(table + "\n")
    data = report["data"]
    print()
    print(
        f"{config.steps} steps, {data['train_size']} training examples of which "
        f"{data['noisy_train_examples']} ({data['noise_rate']:.0%}) have a wrong answer; "
        f"{data['eval_size']} clean held-out examples"
    )
    print()
    print(table)
    print()
    print(f"results: {output_dir / 'results.json'}, plot: {plot}")
    print(
        f"kernels: {report['machine']['cpu_capability']} (the numbers are deterministic for a "
        "seed on one kernel path; see docs/demo.md)"
    )
    return 0
