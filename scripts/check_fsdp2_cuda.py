"""The FSDP2 equivalence check through Accelerate on CUDA devices (Accelerate enables FSDP only on
accelerators, so the CPU tests use raw ``fully_shard``; this runs the same configurations the
way a user's Accelerate or Trainer run does).

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \\
        scripts/check_fsdp2_cuda.py --config all

Each rank first trains the single-process reference on its GPU (whole batch), then the same model
is built, its optimizer created *before* ``accelerator.prepare`` (Accelerate swaps the
parameters for DTensors afterwards, which hf-optim's lazily created state must survive), wrapped
per Linear by the config's auto-wrap policy, and trained on 1/N of each batch. Loss-aware
optimizers get the rank-mean loss through ``set_loss``. float64 must agree to 1e-9 relative,
float32 to 1e-5. Exits 2 without CUDA, 1 if any configuration fails.

CUDA path untested on hardware: written and checked for syntax on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

HARNESS = Path(__file__).resolve().parent.parent / "tests" / "distributed"
sys.path.insert(0, str(HARNESS))

import _harness as h  # noqa: E402
from configs import STEPS, select  # noqa: E402


class WrappedNet(h.Net):
    #: what Accelerate's TRANSFORMER_BASED_WRAP policy wraps: every Linear (uneven rows)
    _no_split_modules = ["Linear"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["all"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=h.DTYPES)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--implementation", default="auto", choices=("eager", "compiled", "auto"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "check_fsdp2_cuda.py needs CUDA devices (Accelerate enables FSDP only on "
            "accelerators). On CPU run the raw fully_shard check instead: torchrun --standalone "
            "--nproc_per_node 2 tests/distributed/fsdp2_check.py --config all",
            file=sys.stderr,
        )
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    configs = [c for c in select(args.config) if not c.expect_mismatch]
    dtypes = [h.DTYPES[d] for d in args.dtypes]

    def build(dtype):
        torch.manual_seed(0)
        return WrappedNet().to(device=device, dtype=dtype)

    # references first, in plain torch on this rank's GPU, before any process group exists
    references = {}
    for config in configs:
        for dtype in dtypes:
            model = build(dtype)
            optimizer = h.make_optimizer(config, h.param_groups(model, config), args.implementation)
            for step in range(args.steps):
                x, y = (t.to(device) for t in h.batch(step, dtype))
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                h.optimizer_step(optimizer, config, loss.detach())
                optimizer.zero_grad(set_to_none=True)
            references[config.name, dtype] = model

    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    accelerator = Accelerator()
    if accelerator.distributed_type.name != "FSDP":
        print(f"expected FSDP, Accelerate runs {accelerator.distributed_type}", file=sys.stderr)
        return 2
    rank, world = accelerator.process_index, accelerator.num_processes
    failures = 0
    for config in configs:
        for dtype in dtypes:
            try:
                start = build(dtype)
                model = copy.deepcopy(start)
                optimizer = h.make_optimizer(
                    config, h.param_groups(model, config), args.implementation
                )
                model, optimizer = accelerator.prepare(model, optimizer)
                rows = slice(rank * h.BATCH // world, (rank + 1) * h.BATCH // world)
                for step in range(args.steps):
                    x, y = (t.to(device) for t in h.batch(step, dtype))
                    loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
                    accelerator.backward(loss)
                    if h.needs_loss(config):
                        optimizer.optimizer.set_loss(accelerator.reduce(loss.detach(), "mean"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                worst = 0.0
                reference = dict(references[config.name, dtype].named_parameters())
                begin = dict(start.named_parameters())
                for name, p in model.named_parameters():
                    value = p.full_tensor() if isinstance(p, DTensor) else p
                    ref, p0 = reference[name].detach(), begin[name].detach()
                    diff = (value.detach().double() - ref.double()).abs().max().item()
                    scale = max(ref.abs().max().item(), (ref - p0).abs().max().item(), 1e-30)
                    worst = max(worst, diff / scale if diff == diff else float("inf"))
                ok = worst <= h.TOLERANCE[dtype]
                detail = f"rel {worst:.2e}"
            except Exception as exc:  # noqa: BLE001 - reported
                ok, detail = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            failures += not ok
            if accelerator.is_main_process:
                print(f"{'ok  ' if ok else 'FAIL'} {config.name:36s} {str(dtype):14s} {detail}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
