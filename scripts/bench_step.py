"""Time one optimizer ``step()`` against ``torch.optim.AdamW(fused=True)``, the yardstick.

Every contender steps its own copy of a GPT-2-shaped set of float32 parameter tensors
(embeddings, attention, MLP and LayerNorm tensors of the size given by ``--size``) with fixed
random gradients assigned once and shared read-only. Contenders are interleaved round by round
(each round times a block of steps of every contender, in an order that rotates from round to
round); the learning rate of every contender changes at every timed step, as under a scheduler.
Reported per contender:

* the median time of one step and its ratio to fused AdamW (and to ``AdamW(foreach=True)``):
  the median over rounds of the ratio of the two blocks timed in the same round;
* the target ratio from issue 8 (at 124m) and whether the measurement meets it;
* the number of graphs torch.compile built during the timed steps (recompiles: must be 0);
* the first-step latency, cold: a fresh process with an empty inductor cache times the first
  and the second step (the difference is mostly compile time), and counts the graphs compiled;
* the optimizer state in bytes per parameter (every tensor in ``optimizer.state`` and in the
  param groups, shared storage once), and with ``--baseline REV`` the same for the hf-optim
  of a git revision (or a directory holding an ``hf_optim`` package), which it must not exceed;
* with ``skip_nonfinite=True`` variants: their cost as a ratio to the same optimizer without it.

When the contenders do not all fit in memory, they are timed in batches and every batch times
the yardstick again (an optimizer and its ``skip_nonfinite`` variant stay in one batch).

    python scripts/bench_step.py --size 124m --baseline 1047e1e
    python scripts/bench_step.py --size 10m --only momo momo+skip adamw-foreach
    python scripts/bench_step.py --device cuda --size 124m
    python scripts/bench_step.py --list

Constructor keywords of the optimizer rewrite (``implementation``, ``skip_nonfinite``) are
detected from each class's signature, so the script measures any version of hf-optim put first
on ``PYTHONPATH``; a variant whose class lacks a keyword is skipped with the reason printed, as
is a contender whose class fails to import or to construct.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))  # after PYTHONPATH: a worktree given there wins

YARDSTICK = "adamw-fused"
FOREACH = "adamw-foreach"
SKIP_SUFFIX = "+skip"

#: (vocab, positions, width, layers) of the GPT-2-shaped parameter sets; "tiny" is for smoke tests
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (512, 64, 64, 2),
    "10m": (16384, 256, 256, 7),
    "124m": (50257, 1024, 768, 12),
}
#: (rounds, timed steps per contender per round, untimed warm-up steps) per size
DEFAULT_SCHEDULE: dict[str, tuple[int, int, int]] = {
    "tiny": (1, 1, 2),
    "10m": (9, 5, 3),
    "124m": (5, 5, 3),
}

#: AMaC with every feature on (noise included). Keywords follow hf_optim.amac.AMaC.
AMAC_EVERY_FEATURE: dict[str, Any] = {
    "lr": 1e-3,
    "total_steps": 10_000,
    "warmup_steps": 2,
    "cosine": True,
    "centralize_gradients": True,
    "noise_factor": 0.01,
    "clip_value": 1.0,
    "dynamic_weight_decay": True,
    "weight_decay": 0.01,
    "momentum": 0.9,
    "lookahead": True,
    "lookahead_k": 5,
    "swa": True,
    "swa_start": 1,
}
#: CASMO's calibration window. Contenders warm up past it so that the steady-state step is
#: timed; upstream 0.1.0 refuses fewer than 50 steps.
CASMO_CALIBRATION_STEPS = 2
UPSTREAM_CASMO_CALIBRATION_STEPS = 50

#: issue 8's targets: time per step at 124m as a multiple of AdamW(fused=True) in the same run
TARGETS: dict[str, float] = {
    "momo": 1.0,
    "autosgm-lrc0": 1.2,
    "autosgm-lrc2": 2.0,
    "autosgm-lrc3": 2.0,
    "autosgm-lrc4": 2.0,
    "momo_adam": 1.5,
    "casmo-group": 1.6,
    "casmo-parameter": 1.6,
    "amac-all": 2.5,
}
TARGET_SIZE = "124m"
#: issue 8: the first step (compilation included) of GPT-2 small stays under this on 2 cores
LATENCY_LIMIT_S = 10.0


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
    #: the step pattern repeats every ``period`` steps (Lookahead/SWA): time whole periods
    period: int = 1
    #: the configuration this one adds ``skip_nonfinite=True`` to
    skip_of: str | None = None


def _adamw_kernel(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay, bias1, bias2):
    """AdamW, one tensor: the 28-byte, one-pass update written as an hf-optim kernel."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.copy_(exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad)
    denominator = (exp_avg_sq / bias2).sqrt() + eps
    param.copy_(param * (1.0 - lr * decay) - (lr / bias1) * exp_avg / denominator)


class KernelAdamW(torch.optim.Optimizer):
    """AdamW as one ``hf_optim._kernels`` kernel, compiled (``Kernel.map`` where the installed
    hf-optim has it, else one call per tensor): what the compiled route reaches on
    this machine for an algorithm at fused AdamW's own floor (28 bytes per parameter, one pass).
    Hyperparameters reach the kernel as 0-d tensors, so a changing lr does not recompile."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
        implementation="compiled",
    ):  # fmt: skip
        from hf_optim._kernels import kernel

        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._kernel = kernel(_adamw_kernel)
        self._compiled = implementation != "eager"

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            device = params[0].device
            if "step" not in group:
                group["step"] = torch.zeros((), device=device)
                group["lr_tensor"] = torch.zeros((), device=device)
                group["constants"] = torch.tensor(
                    [*group["betas"], group["eps"], group["weight_decay"]], device=device
                )
            group["step"].add_(1.0)
            lr = group["lr_tensor"].fill_(group["lr"])
            beta1, beta2, eps, decay = group["constants"].unbind()
            bias1, bias2 = 1.0 - beta1 ** group["step"], 1.0 - beta2 ** group["step"]
            items = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                items.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2,
                              eps, decay, bias1, bias2))  # fmt: skip
            if hasattr(self._kernel, "map"):  # several tensors per compiled call
                self._kernel.map(items, compiled=self._compiled)
            else:
                for item in items:
                    self._kernel(*item, compiled=self._compiled)


def _hf(name: str, registry: str, kwargs: dict[str, Any], **extra: Any) -> list[Config]:
    """An hf-optim configuration and its ``skip_nonfinite=True`` variant."""
    base = Config(name, f"hf_optim:{registry}", kwargs, **extra)
    skip = replace(
        base,
        name=name + SKIP_SUFFIX,
        kwargs={**kwargs, "skip_nonfinite": True},
        note="skip_nonfinite=True",
        skip_of=name,
    )
    return [base, skip]


CONFIGS: list[Config] = [
    Config(YARDSTICK, "torch:AdamW", {"lr": 1e-3, "fused": True}, note="yardstick"),
    Config(FOREACH, "torch:AdamW", {"lr": 1e-3, "foreach": True}),
    Config("adamw-kernel", "bench:KernelAdamW", {"lr": 1e-3}, note="compiled hf-optim kernel"),
    *_hf("momo", "momo", {"lr": 1.0}),
    *_hf("autosgm-lrc0", "autosgm", {"num_lrc": 0}),
    *_hf("autosgm-lrc2", "autosgm", {"num_lrc": 2}),
    *_hf("autosgm-lrc3", "autosgm", {"num_lrc": 3}),
    *_hf("autosgm-lrc4", "autosgm", {"num_lrc": 4}),
    *_hf("momo_adam", "momo_adam", {"lr": 1e-2}),
    *_hf(
        "casmo-group",
        "casmo",
        {"granularity": "group", "tau_init_steps": CASMO_CALIBRATION_STEPS},
        steady_after=CASMO_CALIBRATION_STEPS,
    ),
    *_hf(
        "casmo-parameter",
        "casmo",
        {"granularity": "parameter", "tau_init_steps": CASMO_CALIBRATION_STEPS},
        steady_after=CASMO_CALIBRATION_STEPS,
    ),
    *_hf(
        "amac-all",
        "amac",
        AMAC_EVERY_FEATURE,
        note="every feature on",
        period=AMAC_EVERY_FEATURE["lookahead_k"],
        # the first Lookahead/SWA step creates the SWA average: time after it
        steady_after=AMAC_EVERY_FEATURE["lookahead_k"],
    ),
    Config("upstream-momo", "momo:Momo", {"lr": 1.0}, needs_loss=True, note="momo-opt 0.1.0"),
    Config(
        "upstream-momo_adam", "momo:MomoAdam", {"lr": 1e-2}, needs_loss=True, note="momo-opt 0.1.0"
    ),
    *(
        Config(
            f"upstream-casmo-0.1.0-{granularity}",
            "casmo-upstream:0.1.0",
            {
                "granularity": granularity,
                "tau_init_steps": UPSTREAM_CASMO_CALIBRATION_STEPS,
                "log_level": 0,
            },
            steady_after=UPSTREAM_CASMO_CALIBRATION_STEPS,
            note="casmo-optimizer 0.1.0",
        )
        for granularity in ("group", "parameter")
    ),
]
CONFIG_BY_NAME = {config.name: config for config in CONFIGS}


class Unsupported(Exception):
    """The class under test lacks a keyword this configuration needs."""


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


def make_tensors(size: str, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameter values and gradients, the same on every run and every device."""
    gen = torch.Generator().manual_seed(0)
    shapes = gpt2_shapes(*SIZES[size])
    base = [(torch.randn(shape, generator=gen) * 0.02).to(device) for shape in shapes]
    grads = [(torch.randn(shape, generator=gen) * 1e-3).to(device) for shape in shapes]
    return base, grads


def upstream_dir() -> Path:
    return Path(os.environ.get("HF_OPTIM_UPSTREAM", REPO_ROOT / ".upstream"))


def load_class(source: str) -> tuple[type, bool]:
    """The optimizer class named by ``source`` and whether it needs the loss."""
    kind, _, name = source.partition(":")
    if kind == "torch":
        return getattr(torch.optim, name), False
    if kind == "bench":
        return globals()[name], False
    if kind == "hf_optim":
        from hf_optim import get_optimizer_info

        info = get_optimizer_info(name)
        return info.load(), info.needs_loss
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


def constructor_kwargs(config: Config, cls: type, implementation: str | None) -> dict[str, Any]:
    """The configuration's keywords, plus ``implementation`` where the class takes it."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = dict(config.kwargs)
    if "skip_nonfinite" in kwargs and "skip_nonfinite" not in accepted:
        raise Unsupported(f"{cls.__module__}.{cls.__name__} has no skip_nonfinite keyword")
    if implementation is not None and "implementation" in accepted:
        kwargs["implementation"] = implementation  # older versions: their default path
    return kwargs


def check_buildable(config: Config, implementation: str | None) -> None:
    """Raise what building ``config`` would raise for a missing class or keyword."""
    cls, _ = load_class(config.source)
    constructor_kwargs(config, cls, implementation)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` and in the param-group entries."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for state in optimizer.state.values():
        visit(state)
    for group in optimizer.param_groups:
        visit({key: value for key, value in group.items() if key != "params"})
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class Contender:
    config: Config
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: Callable[[], None]
    device: torch.device
    base_lrs: list[Any]
    steps_done: int = 0
    state_bytes: int = 0
    #: seconds per step, one block per round
    times: list[float] = field(default_factory=list)
    recompiles: int = 0

    def footprint(self) -> int:
        """State and parameters, plus one parameter set's worth for temporaries of a step."""
        return self.state_bytes + 2 * sum(p.numel() * p.element_size() for p in self.params)

    def block(self, steps: int) -> float:
        """Time ``steps`` steps (whole periods), changing the learning rate at each one."""
        steps = math.ceil(steps / self.config.period) * self.config.period
        graphs = compiled_graphs()
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.steps_done += 1
            # a new learning rate every step, as a scheduler gives: must not recompile
            scale = 1.0 - 1e-4 * (self.steps_done % 97)
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                if not isinstance(lr, torch.Tensor):
                    group["lr"] = lr * scale
            self.step()
        synchronize(self.device)
        elapsed = (time.perf_counter() - start) / steps
        self.recompiles += compiled_graphs() - graphs
        return elapsed


def build(
    config: Config,
    base: list[torch.Tensor],
    grads: list[torch.Tensor],
    warmup: int,
    implementation: str | None,
    steady: bool = True,
) -> Contender:
    cls, needs_loss = load_class(config.source)
    needs_loss = needs_loss or config.needs_loss
    kwargs = constructor_kwargs(config, cls, implementation)
    params = [p.detach().clone().requires_grad_() for p in base]
    for p, g in zip(params, grads, strict=True):
        p.grad = g  # shared, read-only: optimizers must not write into gradients
    optimizer = cls(params, **kwargs)
    device = params[0].device
    loss = torch.tensor(3.0, device=device)

    def step() -> None:
        if needs_loss:
            optimizer.step(loss=loss)
        else:
            optimizer.step()

    contender = Contender(
        config, params, optimizer, step, device, [g["lr"] for g in optimizer.param_groups]
    )
    for _ in range(max(warmup, config.steady_after + 1) if steady else warmup):
        step()
    synchronize(device)
    contender.state_bytes = state_bytes(optimizer)
    return contender


def grad_checksums(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.abs().sum(dtype=torch.float64) for g in grads]).cpu()


# -- timing ------------------------------------------------------------------------------------
def time_batch(batch: list[Contender], rounds: int, steps: int) -> None:
    """Interleave: each round times a block of every contender, in an order that rotates from
    round to round so that no contender always follows the same neighbour."""
    for round_index in range(rounds):
        shift = round_index % len(batch)
        for contender in batch[shift:] + batch[:shift]:
            contender.times.append(contender.block(steps))


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of the ratio of two blocks timed in the same round."""
    return statistics.median(a / b for a, b in zip(times, reference, strict=True))


def memory_budget(requested_gb: float | None, device: torch.device) -> int:
    if requested_gb is not None:
        return int(requested_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):  # a shared machine: leave most of it
                    return int(line.split()[1]) * 1024 // 3
    except OSError:
        pass
    return 8 * 2**30


def units(configs: list[Config]) -> list[list[Config]]:
    """Configurations grouped so that a ``skip_nonfinite`` variant is timed with its base."""
    grouped: dict[str, list[Config]] = {}
    for config in configs:
        grouped.setdefault(config.skip_of or config.name, []).append(config)
    return list(grouped.values())


def skip_reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def run_size(size: str, configs: list[Config], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    rounds, steps, warmup = DEFAULT_SCHEDULE[size]
    rounds = args.rounds or rounds
    steps = args.steps or steps
    warmup = args.warmup if args.warmup is not None else warmup
    base, grads = make_tensors(size, device)
    numel = sum(p.numel() for p in base)
    param_bytes = sum(p.numel() * p.element_size() for p in base)  # and as much for gradients
    print(
        f"\n## size {size} on {device.type}: {numel / 1e6:.1f}M float32 parameters in "
        f"{len(base)} tensors; {rounds} rounds x {steps} steps (whole periods) after "
        f"{warmup} warm-up steps",
        flush=True,
    )
    checksum = grad_checksums(grads)
    budget = memory_budget(args.memory_gb, device)

    def make(config: Config) -> Contender:
        # warm up with the timing threads: compiled CPU kernels are built for a thread count
        # and a change of it recompiles them
        return build(config, base, grads, warmup, args.implementation)

    yardstick = make(CONFIG_BY_NAME[YARDSTICK])
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    yardstick_times: list[float] = []

    def finish(batch: list[Contender]) -> None:
        names = ", ".join(c.config.name for c in batch)
        print(f"timing {YARDSTICK} with: {names or '(nothing else)'}", flush=True)
        yardstick.times = []
        time_batch([yardstick, *batch], rounds, steps)
        yardstick_times.extend(yardstick.times)
        by_name = {c.config.name: c for c in batch}
        for contender in batch:
            name = contender.config.name
            row = {
                "name": name,
                "note": contender.config.note,
                "ms": statistics.median(contender.times) * 1e3,
                "ratio": paired_ratio(contender.times, yardstick.times),
                "recompiles": contender.recompiles,
                "state_bytes": contender.state_bytes,
                "bytes_per_param": contender.state_bytes / numel,
            }
            skip_of = by_name.get(contender.config.skip_of or "")
            if skip_of is not None:
                row["skip_cost"] = paired_ratio(contender.times, skip_of.times)
            rows[name] = row
        if not torch.equal(grad_checksums(grads), checksum):
            print("warning: an optimizer wrote into the shared gradients", flush=True)

    batch: list[Contender] = []
    for unit in units([c for c in configs if c.name != YARDSTICK]):
        built: list[Contender] = []
        for config in unit:
            try:
                built.append(make(config))
            except Exception as error:  # a missing or broken contender must not stop the others
                skipped[config.name] = skip_reason(error)
                print(f"skipped {config.name}: {skipped[config.name]}", flush=True)
                continue
            print(
                f"built {config.name}: state {built[-1].state_bytes / numel:.2f} B/param",
                flush=True,
            )
        used = 2 * param_bytes + yardstick.footprint() + sum(c.footprint() for c in batch + built)
        if used > budget and batch:
            finish(batch)
            batch = []
            gc.collect()
        batch += built
    if batch or not rows:
        finish(batch)
    del batch
    gc.collect()

    rows[YARDSTICK] = {
        "name": YARDSTICK,
        "note": "yardstick",
        "ms": statistics.median(yardstick_times) * 1e3,
        "ratio": 1.0,
        "recompiles": yardstick.recompiles,
        "state_bytes": yardstick.state_bytes,
        "bytes_per_param": yardstick.state_bytes / numel,
    }
    if FOREACH in rows:  # each batch times the yardstick: go through it
        for row in rows.values():
            row["ratio_foreach"] = row["ratio"] / rows[FOREACH]["ratio"]
    ordered = [rows[c.name] for c in configs if c.name in rows]
    for row in ordered:
        target = TARGETS.get(row["name"])
        if target is not None:
            row["target"] = target
            row["met"] = row["ratio"] <= target
    return {
        "size": size,
        "device": device.type,
        "numel": numel,
        "tensors": len(base),
        "rounds": rounds,
        "steps": steps,
        "warmup": warmup,
        "rows": ordered,
        "skipped": skipped,
    }


# -- first-step latency (a fresh process per configuration) -----------------------------------
def first_step(name: str, size: str, device: str, implementation: str | None) -> dict[str, Any]:
    """Time the first and second step of a fresh optimizer in this (fresh) process."""
    config = CONFIG_BY_NAME[name]
    dev = torch.device(device)
    base, grads = make_tensors(size, dev)
    contender = build(config, base, grads, 0, implementation, steady=False)
    times = []
    graphs = []
    for _ in range(2):
        before = compiled_graphs()
        synchronize(dev)
        start = time.perf_counter()
        contender.step()
        synchronize(dev)
        times.append(time.perf_counter() - start)
        graphs.append(compiled_graphs() - before)
    return {"first_s": times[0], "second_s": times[1], "graphs": graphs[0] + graphs[1]}


def measure_latency(
    size: str, configs: list[Config], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Cold first-step latency: each configuration in its own process, empty compile caches."""
    results: dict[str, dict[str, Any]] = {}
    for config in configs:
        try:
            check_buildable(config, args.implementation)
        except Exception as error:
            print(f"first step of {config.name}: not measured ({skip_reason(error)})", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="bench_step_cache_") as cache:
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": cache,
                "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
                "OMP_NUM_THREADS": str(args.threads),
            }
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--first-step-of",
                config.name,
                "--size",
                size,
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            if args.implementation is not None:
                command += ["--implementation", args.implementation]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"first step of {config.name}: failed ({reason})", flush=True)
            continue
        results[config.name] = json.loads(lines[-1])
        result = results[config.name]
        print(
            f"first step of {config.name}: {result['first_s']:.2f} s, second "
            f"{result['second_s']:.3f} s, {result['graphs']} graph(s) compiled",
            flush=True,
        )
    return results


# -- state size of another version of hf-optim -------------------------------------------------
def baseline_path(baseline: str, workdir: Path) -> Path:
    """A directory holding the ``hf_optim`` package of ``baseline`` (a directory or a git rev)."""
    path = Path(baseline)
    if (path / "hf_optim").is_dir():
        return path
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", baseline, "hf_optim"],
        capture_output=True,
    )
    if archive.returncode != 0:
        raise SystemExit(
            f"--baseline {baseline!r} is neither a directory with an hf_optim package nor a git "
            f"revision of {REPO_ROOT}: {archive.stderr.decode().strip()}"
        )
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive.stdout, check=True)
    return workdir


def baseline_state(size: str, configs: list[Config], args: argparse.Namespace) -> dict[str, float]:
    """State bytes per parameter of the baseline's version of each hf-optim configuration."""
    names = sorted({c.skip_of or c.name for c in configs if c.source.startswith("hf_optim:")})
    if not names:
        return {}
    with tempfile.TemporaryDirectory(prefix="bench_step_baseline_") as workdir:
        path = baseline_path(args.baseline, Path(workdir))
        # eager: the state's size does not depend on the kernels, and compiling every
        # configuration only to count its state would take many minutes on a small CPU
        env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": str(args.threads)}
        env["HF_OPTIM_IMPLEMENTATION"] = "eager"
        command = [sys.executable, str(Path(__file__).resolve()), "--state-only", "--size", size]
        command += ["--device", args.device, "--only", *names]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=workdir)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        print(f"baseline {args.baseline}: state not measured ({reason})", flush=True)
        return {}
    measured = json.loads(lines[-1])
    return {name: measured[c.skip_of or c.name] for c in configs for name in [c.name]
            if (c.skip_of or c.name) in measured}  # fmt: skip


def state_only(size: str, configs: list[Config], args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    base, grads = make_tensors(size, device)
    numel = sum(p.numel() for p in base)
    result = {}
    for config in configs:
        try:
            contender = build(config, base, grads, 2, None)
        except Exception as error:
            print(f"skipped {config.name}: {skip_reason(error)}", file=sys.stderr)
            continue
        result[config.name] = contender.state_bytes / numel
        del contender
        gc.collect()
    return result


# -- output ------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(result: dict[str, Any]) -> None:
    size = result["size"]
    rows = result["rows"]
    print(
        f"\n| optimizer ({size}, {result['device']}) | ms / step | x AdamW fused | "
        f"x AdamW foreach | target ({TARGET_SIZE}) | met | recompiles | first step s | "
        f"compiled graphs | state B/param | baseline B/param |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        name = row["name"] + (f" ({row['note']})" if row["note"] else "")
        target = row.get("target")
        met = "-" if target is None else ("pass" if row["met"] else "FAIL")
        if target is not None and size != TARGET_SIZE:
            met += " (info)"
        latency = row.get("latency", {})
        print(
            f"| {name} | {row['ms']:.1f} | {row['ratio']:.2f} | "
            f"{fmt(row.get('ratio_foreach'))} | {fmt(target, 1)} | {met} | "
            f"{row['recompiles']} | {fmt(latency.get('first_s'))} | "
            f"{latency.get('graphs', '-')} | {row['bytes_per_param']:.2f} | "
            f"{fmt(row.get('baseline_bytes_per_param'))} |"
        )
    costs = [row for row in rows if "skip_cost" in row]
    if costs:
        print(f"\n| skip_nonfinite=True ({size}) | ms without | ms with | cost (x without) |")
        print("|---|---:|---:|---:|")
        by_name = {row["name"]: row for row in rows}
        for row in costs:
            plain = by_name[CONFIG_BY_NAME[row["name"]].skip_of]
            print(
                f"| {plain['name']} | {plain['ms']:.1f} | {row['ms']:.1f} | "
                f"{row['skip_cost']:.3f} |"
            )
    problems = [
        f"{row['name']}: {row['recompiles']} recompile(s) during the timed steps"
        for row in rows
        if row["recompiles"]
    ] + [
        f"{row['name']}: state {row['bytes_per_param']:.2f} B/param > baseline "
        f"{row['baseline_bytes_per_param']:.2f}"
        for row in rows
        if row.get("baseline_bytes_per_param") is not None
        and row["bytes_per_param"] > row["baseline_bytes_per_param"] + 1e-6
    ]
    problems += [
        f"{row['name']}: first step {row['latency']['first_s']:.1f} s > {LATENCY_LIMIT_S:.0f} s"
        for row in rows
        if size == TARGET_SIZE and row.get("latency", {}).get("first_s", 0) > LATENCY_LIMIT_S
    ]
    kernels = sys.modules.get("hf_optim._kernels")
    problems += [
        f"compiling {name} for {device} failed, it ran eagerly: {error[:160]}"
        for name, device, error in getattr(kernels, "COMPILE_FAILURES", [])
    ]
    for problem in problems:
        print(f"PROBLEM {problem}")
    if result["skipped"]:
        print("\nSkipped:")
        for name, reason in result["skipped"].items():
            print(f"- {name}: {reason}")


def machine_line(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    line = (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{args.threads} thread(s), CPU kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if args.device == "cuda":
        line += f", GPU {torch.cuda.get_device_name()}"
    import hf_optim

    return line + f", hf_optim from {Path(hf_optim.__file__).parent}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=[*SIZES, "both"], default="10m")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: per size)")
    parser.add_argument("--steps", type=int, help="timed steps per contender per round")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="contenders to run")
    parser.add_argument("--no-skip", action="store_true", help="leave out the +skip variants")
    parser.add_argument(
        "--implementation",
        choices=["auto", "compiled", "eager"],
        help="passed to hf-optim optimizers that take it (default: theirs)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--memory-gb", type=float, help="memory for contenders alive at once (default: 1/3 free)"
    )
    parser.add_argument(
        "--latency",
        choices=["cold", "cold-all", "off"],
        default="cold",
        help="cold: time each first step in a fresh process with empty compile caches "
        "(cold-all: the skip_nonfinite variants too)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV_OR_DIR",
        help="compare state bytes per parameter with the hf_optim of this git revision or dir",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--first-step-of", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--state-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list:
        for config in CONFIGS:
            target = TARGETS.get(config.name)
            target_text = f"target <= {target}x" if target else ""
            print(f"{config.name:32s} {config.source:22s} {target_text:16s} {config.kwargs}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda needs a CUDA build of torch and a visible GPU; this torch "
            f"({torch.__version__}) reports torch.cuda.is_available() == False"
        )
    if args.only:
        unknown = sorted(set(args.only) - set(CONFIG_BY_NAME))
        if unknown:
            parser.error(f"unknown configuration(s) {unknown}; --list shows them")
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    if args.no_skip:
        configs = [c for c in configs if c.skip_of is None]
    torch.set_num_threads(args.threads)
    # One process holds every configuration here (a user's holds one): each is a few more
    # variants of the same kernels, and dynamo's per-function limit (8) would send the later
    # ones to eager mode.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    sizes = ["10m", "124m"] if args.size == "both" else [args.size]

    if args.first_step_of:
        print(
            json.dumps(first_step(args.first_step_of, sizes[0], args.device, args.implementation))
        )
        return 0
    if args.state_only:
        print(json.dumps(state_only(sizes[0], configs, args)))
        return 0

    print(f"machine: {machine_line(args)}", flush=True)
    results = []
    for size in sizes:
        baseline = baseline_state(size, configs, args) if args.baseline else {}
        timed = configs if args.latency == "cold-all" else [c for c in configs if not c.skip_of]
        latency = measure_latency(size, timed, args) if args.latency != "off" else {}
        result = run_size(size, configs, args)
        for row in result["rows"]:
            if row["name"] in latency:
                row["latency"] = latency[row["name"]]
            if row["name"] in baseline:
                row["baseline_bytes_per_param"] = baseline[row["name"]]
        result["baseline"] = args.baseline
        print_tables(result)
        results.append(result)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine_line(args), "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
