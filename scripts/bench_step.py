"""Time one optimizer ``step()`` and measure optimizer-state bytes, against AdamW.

Every contender steps its own copy of a GPT-2-shaped set of parameter tensors (embeddings,
attention, MLP and LayerNorm tensors of the size given by ``--size``) with fixed random
gradients assigned once. Contenders are interleaved round by round (each round times every
contender once, a few steps each, in a rotating order), and each is reported as the median
time of one step and as a ratio to ``torch.optim.AdamW(foreach=True)`` measured in the same
run. When the contenders do not all fit in memory at once, they are timed in batches and each
batch times AdamW (foreach) again, so every ratio compares timings taken side by side.

State bytes: the sum of the bytes of every tensor in ``optimizer.state`` after the warm-up
steps (storage shared between entries counted once). Upstream packages that keep statistics
outside ``optimizer.state`` are under-counted by exactly that.

    python scripts/bench_step.py --size 10m
    python scripts/bench_step.py --size 124m --only momo momo_adam upstream-momo
    python scripts/bench_step.py --list

Optimizers that need the loss get ``loss=`` a fixed tensor. A configuration whose class fails
to import or to construct is skipped with the reason printed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

REFERENCE = "adamw-foreach"

#: (vocab, positions, width, layers) of the GPT-2-shaped parameter sets; "tiny" is for smoke tests
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (512, 64, 64, 2),
    "10m": (16384, 256, 256, 7),
    "124m": (50257, 1024, 768, 12),
}
#: (rounds, steps per round, warm-up steps) per size, so that 124m stays near 10 minutes
DEFAULT_SCHEDULE: dict[str, tuple[int, int, int]] = {
    "tiny": (1, 1, 2),
    "10m": (9, 3, 4),
    "124m": (3, 1, 3),
}

#: AMaC with every feature on. The keywords follow hf_optim.amac.AMaC; adjust here if they change.
AMAC_EVERY_FEATURE: dict[str, Any] = {
    "lr": 1e-3,
    "total_steps": 10_000,
    "warmup_steps": 2,
    "cosine": True,
    "centralize_gradients": True,
    "noise_factor": 0.01,
    "clip_value": 1.0,
    "dynamic_weight_decay": True,
    "momentum": 0.9,
    "lookahead": True,
    "lookahead_k": 5,
    "swa": True,
    "swa_start": 1,
}
#: CASMO's calibration window. Contenders warm up past it so that the steady-state step is
#: timed; upstream 0.1.0 refuses fewer than 50 steps, and its warm-up dominates a 124m run.
CASMO_CALIBRATION_STEPS = 2
UPSTREAM_CASMO_CALIBRATION_STEPS = 50


@dataclass(frozen=True)
class Config:
    """One contender: ``source`` is ``torch:<class>``, ``hf_optim:<registry name>``,
    ``casmo-upstream:<version>`` or ``<module>:<class>`` (e.g. ``momo:Momo``)."""

    name: str
    source: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs_loss: bool = False
    note: str = ""
    #: untimed steps this configuration needs to reach its steady state (e.g. a calibration)
    steady_after: int = 0


CONFIGS: list[Config] = [
    Config(REFERENCE, "torch:AdamW", {"lr": 1e-3, "foreach": True}, note="reference"),
    Config("adamw-fused", "torch:AdamW", {"lr": 1e-3, "fused": True}),
    Config(
        "casmo-group",
        "hf_optim:casmo",
        {"granularity": "group", "tau_init_steps": CASMO_CALIBRATION_STEPS},
        steady_after=CASMO_CALIBRATION_STEPS,
    ),
    Config(
        "casmo-parameter",
        "hf_optim:casmo",
        {"granularity": "parameter", "tau_init_steps": CASMO_CALIBRATION_STEPS},
        steady_after=CASMO_CALIBRATION_STEPS,
    ),
    Config("autosgm-lrc0", "hf_optim:autosgm", {"num_lrc": 0}),
    Config("autosgm-lrc2", "hf_optim:autosgm", {"num_lrc": 2}),
    Config("autosgm-lrc3", "hf_optim:autosgm", {"num_lrc": 3}),
    Config("autosgm-lrc4", "hf_optim:autosgm", {"num_lrc": 4}),
    Config("amac-all", "hf_optim:amac", AMAC_EVERY_FEATURE, note="every feature on"),
    Config("momo", "hf_optim:momo", {"lr": 1.0}),
    Config("momo_adam", "hf_optim:momo_adam", {"lr": 1e-2}),
    Config(
        "upstream-casmo-0.1.0-group",
        "casmo-upstream:0.1.0",
        {
            "granularity": "group",
            "tau_init_steps": UPSTREAM_CASMO_CALIBRATION_STEPS,
            "log_level": 0,
        },
        steady_after=UPSTREAM_CASMO_CALIBRATION_STEPS,
    ),
    Config(
        "upstream-casmo-0.1.0-parameter",
        "casmo-upstream:0.1.0",
        {
            "granularity": "parameter",
            "tau_init_steps": UPSTREAM_CASMO_CALIBRATION_STEPS,
            "log_level": 0,
        },
        steady_after=UPSTREAM_CASMO_CALIBRATION_STEPS,
    ),
    Config("upstream-momo", "momo:Momo", {"lr": 1.0}, needs_loss=True, note="momo-opt"),
    Config("upstream-momo_adam", "momo:MomoAdam", {"lr": 1e-2}, needs_loss=True, note="momo-opt"),
]


# -- building contenders ----------------------------------------------------------------------
def gpt2_shapes(vocab: int, positions: int, width: int, layers: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 (tied output embedding), in module order."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln_1
            (width, 3 * width), (3 * width,),  # attn.c_attn
            (width, width), (width,),  # attn.c_proj
            (width,), (width,),  # ln_2
            (width, 4 * width), (4 * width,),  # mlp.c_fc
            (4 * width, width), (width,),  # mlp.c_proj
        ]  # fmt: skip
    return shapes + [(width,), (width,)]  # ln_f


def upstream_dir() -> Path:
    return Path(os.environ.get("HF_OPTIM_UPSTREAM", REPO_ROOT / ".upstream"))


def load_class(source: str) -> tuple[type, bool]:
    """The optimizer class named by ``source`` and whether it needs the loss."""
    kind, _, name = source.partition(":")
    if kind == "torch":
        return getattr(torch.optim, name), False
    if kind == "hf_optim":
        from hf_optim import get_optimizer_class

        cls = get_optimizer_class(name)
        return cls, bool(getattr(cls, "needs_loss", False))
    if kind == "casmo-upstream":
        path = upstream_dir() / f"casmo-{name}" / "casmo.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path} (run scripts/install_upstream.sh)")
        module_name = f"_casmo_upstream_{name.replace('.', '_')}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module.CASMO, False
    return getattr(importlib.import_module(kind), name), False


@dataclass
class Contender:
    config: Config
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    state_bytes: int
    times: list[float] = field(default_factory=list)

    def footprint(self) -> int:
        return self.state_bytes + sum(p.numel() * p.element_size() for p in self.params)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for state in optimizer.state.values():
        visit(state)
    return total


def build(
    config: Config, base: list[torch.Tensor], grads: list[torch.Tensor], warmup: int
) -> Contender:
    cls, needs_loss = load_class(config.source)
    needs_loss = needs_loss or config.needs_loss
    params = [p.detach().clone().requires_grad_() for p in base]
    for p, g in zip(params, grads, strict=True):
        p.grad = g  # shared, read-only: optimizers must not write into gradients
    optimizer = cls(params, **config.kwargs)
    loss = torch.tensor(3.0)

    def step() -> None:
        if needs_loss:
            optimizer.step(loss=loss)
        else:
            optimizer.step()

    # warm-up is not timed: use every core for it
    timing_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for _ in range(max(warmup, config.steady_after + 1 if config.steady_after else 0)):
            step()
    finally:
        torch.set_num_threads(timing_threads)
    return Contender(config, params, optimizer, step, state_bytes(optimizer))


def grad_checksums(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.abs().sum(dtype=torch.float64) for g in grads])


# -- timing ------------------------------------------------------------------------------------
def time_batch(batch: list[Contender], rounds: int, steps: int) -> None:
    """Interleave: each round times every contender once (``steps`` steps), in an order that
    rotates from round to round so that no contender always follows the same neighbour."""
    for round_index in range(rounds):
        shift = round_index % len(batch)
        for contender in batch[shift:] + batch[:shift]:
            samples = []
            for _ in range(steps):
                start = time.perf_counter()
                contender.step()
                samples.append(time.perf_counter() - start)
            contender.times.append(statistics.median(samples))


def memory_budget(requested_gb: float | None) -> int:
    if requested_gb is not None:
        return int(requested_gb * 2**30)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * 2**30


def run_size(size: str, configs: list[Config], args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds, steps, warmup = DEFAULT_SCHEDULE[size]
    rounds = args.rounds or rounds
    steps = args.steps or steps
    warmup = args.warmup if args.warmup is not None else warmup
    shapes = gpt2_shapes(*SIZES[size])
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(shape, generator=gen) * 0.02 for shape in shapes]
    grads = [torch.randn(shape, generator=gen) * 1e-3 for shape in shapes]
    numel = sum(p.numel() for p in base)
    param_bytes = sum(p.numel() * p.element_size() for p in base)
    print(
        f"\n## size {size}: {numel / 1e6:.1f}M parameters in {len(shapes)} tensors; "
        f"{rounds} rounds x {steps} steps after {warmup} warm-up steps",
        flush=True,
    )
    checksum = grad_checksums(grads)
    budget = memory_budget(args.memory_gb)

    reference = build(next(c for c in CONFIGS if c.name == REFERENCE), base, grads, warmup)
    rows: dict[str, dict[str, Any]] = {}
    skipped: list[tuple[str, str]] = []
    reference_times: list[float] = []

    def finish(batch: list[Contender]) -> None:
        names = ", ".join(c.config.name for c in batch)
        print(f"timing {REFERENCE} with: {names or '(nothing else)'}", flush=True)
        reference.times = []
        time_batch([reference, *batch], rounds, steps)
        reference_times.extend(reference.times)
        reference_median = statistics.median(reference.times)
        for contender in batch:
            median = statistics.median(contender.times)
            rows[contender.config.name] = {
                "name": contender.config.name,
                "note": contender.config.note,
                "ms": median * 1e3,
                "ratio": median / reference_median,
                "state_bytes": contender.state_bytes,
            }
        if not torch.equal(grad_checksums(grads), checksum):
            print("warning: an optimizer wrote into the shared gradients", flush=True)

    batch: list[Contender] = []
    for config in configs:
        if config.name == REFERENCE:
            continue
        try:
            contender = build(config, base, grads, warmup)
        except Exception as error:  # a missing or broken contender must not stop the others
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            skipped.append((config.name, reason))
            print(f"skipped {config.name}: {reason}", flush=True)
            continue
        print(f"built {config.name}: state {contender.state_bytes / 2**20:.1f} MiB", flush=True)
        batch.append(contender)
        used = reference.footprint() + sum(c.footprint() for c in batch)
        if used > budget and len(batch) > 1:
            last = batch.pop()
            finish(batch)
            batch = [last]
            gc.collect()
    if batch or not rows:
        finish(batch)

    rows[REFERENCE] = {
        "name": REFERENCE,
        "note": "reference",
        "ms": statistics.median(reference_times) * 1e3,
        "ratio": 1.0,
        "state_bytes": reference.state_bytes,
    }
    ordered = [rows[c.name] for c in CONFIGS if c.name in rows]
    print_table(size, ordered, param_bytes)
    if skipped:
        print("\nSkipped:")
        for name, reason in skipped:
            print(f"- {name}: {reason}")
    return ordered


def print_table(size: str, rows: list[dict[str, Any]], param_bytes: int) -> None:
    print(f"\n| optimizer ({size}) | ms / step | x AdamW foreach | state MiB | state / params |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        name = row["name"] + (f" ({row['note']})" if row["note"] else "")
        print(
            f"| {name} | {row['ms']:.1f} | {row['ratio']:.2f} | "
            f"{row['state_bytes'] / 2**20:.1f} | {row['state_bytes'] / param_bytes:.2f} |"
        )


def machine_line(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{threads} thread(s), Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*SIZES, "both"], default="10m")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: per size)")
    parser.add_argument("--steps", type=int, help="timed steps per contender per round")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="contenders to run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--memory-gb", type=float, help="memory for contenders alive at once (default: half free)"
    )
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = parser.parse_args(argv)

    if args.list:
        for config in CONFIGS:
            print(f"{config.name:32s} {config.source:24s} {config.kwargs}")
        return 0
    names = {config.name for config in CONFIGS}
    if args.only:
        unknown = sorted(set(args.only) - names)
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; --list shows them")
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_line(args.threads)}")
    sizes = ["10m", "124m"] if args.size == "both" else [args.size]
    for size in sizes:
        run_size(size, configs, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
