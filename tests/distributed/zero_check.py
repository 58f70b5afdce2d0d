"""DeepSpeed ZeRO-1/2/3 check: each optimizer driven by a ``deepspeed.initialize`` engine (2 CPU
ranks, gloo, float32 master weights) either equals one process trained on the whole batch
(float32, 1e-5 relative) or is refused at its first step with exactly the message
``hf_optim._backends.refusal`` gives for it.

Run from the repository root::

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/zero_check.py

Each configuration runs with the harness's three parameter groups and with one group (Momo and
MomoAdam are right under ZeRO only with one: ZeRO steps each group separately). The model is the
FSDP2 check's without its unused parameter (ZeRO gives a parameter without gradient a zero
gradient, which is DeepSpeed's semantics, not the optimizer's). DeepSpeed clips gradients at
1.0 by default: the config here turns that off, as the reference does not clip.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _harness as h
import torch
import torch.distributed as dist
from configs import STEPS, select

DTYPE = torch.float32
LAYOUTS = ("groups", "one-group")


def _groups(model: h.Net, config, layout: str):
    model.unused.requires_grad_(False)
    if layout == "one-group":
        return [p for p in model.parameters() if p.requires_grad]
    return [
        {**g, "params": [p for p in g["params"] if p.requires_grad]}
        for g in h.param_groups(model, config)
    ]


def reference(config, layout: str, steps: int, implementation: str) -> h.Net:
    model = h.build_model(DTYPE)
    optimizer = h.make_optimizer(config, _groups(model, config, layout), implementation)
    h.train_reference(config, DTYPE, range(steps), implementation, model, optimizer)
    return model


def _without_shm_comm() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it starts
    (minutes on a small box, and a stale lock file after an interrupted build hangs every later
    start); gloo does the same job, so skip it."""
    import deepspeed.comm.torch  # noqa: F401 - the module, not the torch it re-exports

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def zero_run(config, layout: str, stage: int, steps: int, implementation: str) -> dict:
    import deepspeed

    start = h.build_model(DTYPE)
    model = h.build_model(DTYPE)
    optimizer = h.make_optimizer(config, _groups(model, config, layout), implementation)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": h.BATCH // dist.get_world_size(),
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        },
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * h.BATCH // world, (rank + 1) * h.BATCH // world)
    for step in range(steps):
        x, y = h.batch(step, DTYPE)
        loss = torch.nn.functional.mse_loss(engine(x[rows]), y[rows])
        engine.backward(loss)
        if h.needs_loss(config):
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            optimizer.set_loss(mean_loss / world)
        engine.step()
    return h.compare(engine.module, REFERENCES[config.name, layout], start)


REFERENCES: dict = {}


def expected_refusal(config, layout: str, stage: int) -> str | None:
    """What ``hf_optim._backends`` must say for this run: its rules applied to the options of
    every parameter group, read from the optimizer built exactly as the run builds it."""
    if config.optimizer in ("adamw",):
        return None
    from hf_optim._backends import _info_of, _refusal

    optimizer = h.make_optimizer(config, _groups(h.build_model(DTYPE), config, layout), "eager")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return _refusal(_info_of(optimizer), f"zero{stage}", groups, len(groups))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["all"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3], choices=(1, 2, 3))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--implementation", default="eager", choices=("eager", "compiled", "auto"))
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()
    configs = [c for c in select(args.config) if not c.expect_mismatch]

    errors = {}
    for config in configs:
        for layout in args.layouts:
            try:
                REFERENCES[config.name, layout] = reference(
                    config, layout, args.steps, args.implementation
                )
            except Exception as exc:  # noqa: BLE001 - reported below
                errors[config.name, layout] = f"reference: {type(exc).__name__}: {exc}"

    import deepspeed

    _without_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    try:
        for config in configs:
            for layout in args.layouts:
                for stage in args.stages:
                    if stage == 3 and config.optimizer == "adamw":
                        continue  # comparing ZeRO-3's partitioned parameters needs a gather
                    expected = expected_refusal(config, layout, stage)
                    if (config.name, layout) in errors:
                        result = {"error": errors[config.name, layout]}
                    else:
                        result = h.run_guarded(
                            zero_run, config, layout, stage, args.steps, args.implementation
                        )
                    tolerance = h.TOLERANCE[DTYPE]
                    result.update(
                        config=config.name,
                        backend=f"zero{stage}",
                        layout=layout,
                        dtype="float32",
                        tolerance=tolerance,
                        expected_refusal=expected,
                    )
                    if expected is not None:
                        result["ok"] = result.get("error") == f"RuntimeError: {expected}"
                        detail = "refused" if result["ok"] else result.get("error", "ran")
                    else:
                        result["ok"] = "error" not in result and result["rel"] <= tolerance
                        detail = result.get("error") or f"rel {result['rel']:.2e}"
                    results.append(result)
                    h.write_results(args.json, results)
                    h.rank_print(
                        f"{'ok  ' if result['ok'] else 'FAIL'} {config.name:36s} zero{stage} "
                        f"{layout:9s} {detail[:160]}"
                    )
    finally:
        dist.barrier()
        dist.destroy_process_group()
    if args.json and h.int_rank() == 0:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
