"""Cost of each hf-optim optimizer under FSDP2: time per optimizer step on 2 CPU ranks (gloo)
against torch's AdamW in the same run, and the collectives each step issues.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scripts/bench_sharded.py

Every contender trains its own copy of the same ``fully_shard``-ed MLP; rounds interleave the
contenders (forward/backward untimed, then the timed ``optimizer.step()``), so load on the
machine hits them alike. Reports the median over rounds (worst rank), its ratio to AdamW, and
the collectives counted during one step by ``CommDebugMode`` (every c10d collective, DTensor's
implicit ones included) and how many of them are explicit ``torch.distributed`` calls (hf-optim's
one ``finish_sums`` per reduction phase).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

#: name -> (registry name or "adamw", kwargs)
CONTENDERS = {
    "adamw": ("adamw", {"lr": 1e-3}),
    "casmo (group)": ("casmo", {"lr": 1e-3}),
    "casmo (parameter)": ("casmo", {"lr": 1e-3, "granularity": "parameter"}),
    "autosgm (num_lrc 0)": ("autosgm", {"lr": 1e-3}),
    "autosgm (num_lrc 4)": ("autosgm", {"lr": 1e-3, "num_lrc": 4}),
    "amac (everything on)": ("amac", {"lr": 1e-3, "total_steps": 1000}),
    "momo": ("momo", {"lr": 1.0}),
    "momo_adam": ("momo_adam", {"lr": 1e-2}),
}
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
)


class Counter:
    """Counts explicit torch.distributed collectives while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        for name in _COLLECTIVES:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(original))

    def _wrap(self, fn):
        def wrapper(*args, **kwargs):
            if self.active:
                self.count += 1
            return fn(*args, **kwargs)

        return wrapper


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for index in range(depth):
        layers += [nn.Linear(width, width + (1 if index % 2 == 0 else -1) * 3), nn.Tanh()]
        width += (1 if index % 2 == 0 else -1) * 3
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def make_optimizer(name: str, kwargs: dict, params, implementation: str):
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except Exception:  # fused AdamW may not take DTensors on this build
            return torch.optim.AdamW(params, foreach=True, **kwargs)
    import hf_optim

    cls = hf_optim.get_optimizer_class(name)
    if "implementation" in inspect.signature(cls.__init__).parameters:
        kwargs = {**kwargs, "implementation": implementation}
    return cls(params, **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--implementation", default="auto", choices=("auto", "compiled", "eager"))
    parser.add_argument("--only", nargs="*", help="contender names (default: all)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.debug import CommDebugMode

        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        base = make_model(args.width, args.depth)
        numel = sum(p.numel() for p in base.parameters())
        torch.manual_seed(1 + rank)
        x = torch.randn(32, args.width)
        y = torch.randn(32, 1)

        def build(name: str, kwargs: dict, implementation: str):
            model = copy.deepcopy(base)
            for module in model:
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, make_optimizer(name, dict(kwargs), model.parameters(), implementation)

        names = args.only or list(CONTENDERS)
        runs = {}
        for label in names:
            name, kwargs = CONTENDERS[label]
            model, optimizer = build(name, kwargs, args.implementation)
            runs[label] = (model, optimizer, name in ("momo", "momo_adam"), [])
        # Collectives per step, counted on an eager twin of each contender (CommDebugMode is a
        # dispatch mode, which compiled kernels refuse; the count does not depend on it).
        counter = Counter()
        explicit: dict[str, int] = {}
        implicit: dict[str, int] = {}
        failed: dict[str, str] = {}
        for label in names:
            name, kwargs = CONTENDERS[label]
            needs_loss = runs[label][2]
            try:
                model, optimizer = build(name, kwargs, "eager")
                for _ in range(2):  # the second step is a steady-state one
                    loss = nn.functional.mse_loss(model(x), y)
                    loss.backward()
                    counter.count, counter.active = 0, True
                    with CommDebugMode() as comm:
                        optimizer.step(**({"loss": loss.detach()} if needs_loss else {}))
                    counter.active = False
                    optimizer.zero_grad(set_to_none=True)
                explicit[label], implicit[label] = counter.count, comm.get_total_counts()
            except Exception as exc:  # noqa: BLE001 - both ranks fail alike; reported
                counter.active = False
                failed[label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                dist.barrier()

        for round_index in range(args.warmup + args.rounds):
            for label, (model, optimizer, needs_loss, times) in runs.items():
                if label in failed:
                    continue
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                step_kwargs = {"loss": loss.detach()} if needs_loss else {}
                if round_index == 0:  # a contender that cannot step is reported, not fatal
                    try:
                        optimizer.step(**step_kwargs)
                    except Exception as exc:  # noqa: BLE001 - both ranks fail alike
                        failed[label] = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
                        dist.barrier()
                        continue
                dist.barrier()
                start = time.perf_counter()
                optimizer.step(**step_kwargs)
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if round_index >= args.warmup:
                    times.append(elapsed.item())
                optimizer.zero_grad(set_to_none=True)

        if rank == 0:
            adamw = statistics.median(runs["adamw"][3]) if "adamw" in runs else None
            print(
                f"FSDP2, {world} CPU ranks (gloo), {numel:,} parameters, "
                f"implementation={args.implementation}, {args.rounds} rounds, medians, worst rank"
            )
            print("| optimizer | step (ms) | vs AdamW | collectives per step (of them explicit) |")
            print("|---|---|---|---|")
            for label, (_, _, _, times) in runs.items():
                if label in failed:
                    print(f"| {label} | fails: {failed[label]} | | |")
                    continue
                median = statistics.median(times)
                ratio = f"{median / adamw:.2f}x" if adamw else "-"
                print(
                    f"| {label} | {median * 1e3:.2f} | {ratio} | "
                    f"{implicit[label]} ({explicit[label]}) |"
                )
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
