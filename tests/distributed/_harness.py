"""The model, data and training loops the sharded-training checks share.

The model is built to hit every awkward case of sharded optimizer state at once:

* ``inp``: ``Linear(16, 33)``, 33 rows over 2 ranks (17 / 16 rows: uneven shards);
* ``head``: ``Linear(7, 1)``, one row: rank 1 holds an *empty* shard of weight and bias;
* ``mid``: ``Linear(33, 7)`` left out of FSDP (``ignored_params``): plain tensors replicated on
  every rank, gradients averaged by hand as DDP would;
* ``unused``: a parameter the forward never touches (its gradient stays ``None``);
* three parameter groups, mixing sharded and replicated parameters in one group.

The reference is the same model in one process on the whole batch (each rank computes it itself,
before the process group exists, so nothing in it can see a process group).
"""

from __future__ import annotations

import datetime
import inspect
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from configs import CONTROLS, STEPS, Config
from torch import nn

BATCH = 8  # whole batch; each of the 2 ranks gets BATCH // world rows

#: maximum relative difference to the single-process run that counts as equal
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 33)
        self.mid = nn.Linear(33, 7)
        self.head = nn.Linear(7, 1)
        self.unused = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def build_model(dtype: torch.dtype) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def param_groups(model: Net, config: Config) -> list[dict[str, Any]]:
    return [
        {"params": [model.inp.weight, model.head.weight, model.mid.bias]},
        {"params": [model.inp.bias, model.head.bias, model.unused], **config.second},
        {"params": [model.mid.weight]},
    ]


def replicated_params(model: Net) -> list[nn.Parameter]:
    return list(model.mid.parameters())


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 16, generator=generator, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


class NaiveNormSGD(torch.optim.Optimizer):
    """Negative control: SGD scaled by the gradient norm over all groups, summed naively over
    every rank's local pieces (``all_reduce`` over the world). Right in one process, silently
    wrong under sharding: replicated tensors (the unsharded module; every tensor under HSDP)
    are counted once per rank. The harness must catch it in every layout."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        square_sum = torch.stack([g.double().square().sum() for g in local]).sum()
        if dist.is_initialized():
            dist.all_reduce(square_sum)
        norm = square_sum.sqrt()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad * norm.to(p.dtype), alpha=-group["lr"])


def make_optimizer(config: Config, groups: list[dict[str, Any]], implementation: str):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, **config.kwargs)
    if config.optimizer == "naive-norm-control":
        return NaiveNormSGD(groups, **config.kwargs)
    import hf_optim

    cls = hf_optim.get_optimizer_class(config.optimizer)
    kwargs = dict(config.kwargs)
    # the base of issue 8 adds ``implementation``; older code has no such argument
    if "implementation" in inspect.signature(cls.__init__).parameters:
        kwargs["implementation"] = implementation
    return cls(groups, **kwargs)


def needs_loss(config: Config) -> bool:
    if config.optimizer in CONTROLS:
        return False
    import hf_optim

    return hf_optim.get_optimizer_info(config.optimizer).needs_loss


def optimizer_step(optimizer, config: Config, loss: torch.Tensor) -> None:
    if needs_loss(config):
        optimizer.step(loss=loss)
    else:
        optimizer.step()


def train_reference(
    config: Config,
    dtype: torch.dtype,
    steps: range,
    implementation: str,
    model=None,
    optimizer=None,
):
    """Single process, whole batch. Returns (model, optimizer)."""
    if model is None:
        model = build_model(dtype)
        optimizer = make_optimizer(config, param_groups(model, config), implementation)
    for step in steps:
        x, y = batch(step, dtype)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer_step(optimizer, config, loss.detach())
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


# -- the sharded side ------------------------------------------------------------------------
LAYOUTS = ("fsdp", "hsdp")


def init_process_group() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))


def shard_model(model: Net, layout: str) -> Net:
    """``fsdp``: 1-D mesh over all ranks. ``hsdp``: 2-D mesh (replicate=world, shard=1), so every
    rank holds whole tensors as DTensors with a Replicate placement: a reduction over the
    replicate dimension would count each element ``world`` times."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(replicated_params(model)))
    return model


def sharded_step(model: Net, optimizer, config: Config, step: int, dtype: torch.dtype) -> None:
    """One step on this rank's slice of the batch; the loss handed to loss-aware optimizers is
    the rank mean (= the whole-batch loss)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch(step, dtype)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = nn.functional.mse_loss(model(x[rows]), y[rows])
    loss.backward()
    for p in replicated_params(model):  # the module FSDP does not manage: average like DDP
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss.div_(world)
    optimizer_step(optimizer, config, mean_loss)
    optimizer.zero_grad(set_to_none=True)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def compare(model: Net, reference: Net, start: Net) -> dict[str, float]:
    """``rel``: max over parameters of max|sharded - reference| divided by the larger of
    max|reference| and max|reference - start| (rounding scales with the values a run goes
    through, and a weight that passes near zero would otherwise inflate the ratio);
    ``of_update``: the difference relative to how far the reference moved; ``moved``: the
    largest distance a parameter travelled relative to its size (a check where nothing moves
    would pass by accident). Worst over ranks."""
    rel = of_update = moved = 0.0
    ref_params = dict(reference.named_parameters())
    start_params = dict(start.named_parameters())
    for name, p in model.named_parameters():
        value = full(p.detach()).double()
        ref, p0 = ref_params[name].detach().double(), start_params[name].detach().double()
        if not bool(torch.isfinite(ref).all()):
            raise FloatingPointError(f"the single-process reference diverged ({name})")
        if value.numel() == 0:
            continue
        diff = (value - ref).abs().max().item()
        if not math.isfinite(diff):  # a NaN must never compare as "small"
            diff = math.inf
        scale = ref.abs().max().item()
        travel = (ref - p0).abs().max().item()
        rel = max(rel, diff / max(scale, travel, 1e-30))
        if name != "unused":
            of_update = max(of_update, diff / max(travel, 1e-30))
            moved = max(moved, travel / max(scale, 1e-30))
    worst = torch.tensor([rel, of_update, moved], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"rel": worst[0].item(), "of_update": worst[1].item(), "moved": worst[2].item()}


def run_guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn`` and turn an exception into an ``error`` entry. Both ranks run the same code, so
    an optimizer bug raises on both; the barrier after it keeps the ranks in step."""
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed silently
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
        result = {"error": message}
    dist.barrier()
    return result


def write_results(path: str | None, results: list[dict]) -> None:
    """Rank 0 rewrites the results file after every run, so a launch that dies (a collective
    mismatch aborts both ranks) still reports every run before the one that killed it."""
    if path and int_rank() == 0:
        import json

        with open(path, "w") as handle:
            json.dump(results, handle, indent=1)


def int_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def rank_print(*args: Any) -> None:
    if int_rank() == 0:
        print(*args, flush=True)


__all__ = ["STEPS", "TOLERANCE", "DTYPES", "LAYOUTS"]
