"""Distributed-checkpoint check: save with ``get_state_dict`` + ``dcp.save`` in the middle of an
FSDP2 run, load in *fresh processes* with ``get_state_dict`` / ``dcp.load`` / ``set_state_dict``,
continue, and compare with one process trained without interruption (float64, 1e-9).

Two launches from the repository root::

    torchrun --standalone --nproc_per_node 2 tests/distributed/dcp_check.py --phase save --dir D
    torchrun --standalone --nproc_per_node 2 tests/distributed/dcp_check.py --phase load --dir D

The save phase also checks torch.distributed.checkpoint's state-initialising call on a fresh
optimizer (``step()`` with zero gradients and lr 0, made by ``get_state_dict``): it must leave
no trace, so a run trained after it equals the reference (``dcp-init``), and it must not move a
parameter. The load phase checks the same on the fresh optimizer it loads into.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import _harness as h
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from configs import STEPS, select
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

DTYPE = torch.float64


def _fresh(config, implementation: str):
    start = h.build_model(DTYPE)
    model = h.shard_model(copy.deepcopy(start), "fsdp")
    optimizer = h.make_optimizer(config, h.param_groups(model, config), implementation)
    return start, model, optimizer


def _initialise_through_dcp(model, optimizer) -> dict:
    """``get_state_dict`` on a fresh optimizer makes DCP's zero-grad, lr-0 ``step()``; it must
    not move a parameter. Returns the state dicts it produced."""
    before = [h.full(p.detach()).clone() for p in model.parameters()]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    after = [h.full(p.detach()) for p in model.parameters()]
    if not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise AssertionError("DCP's state-initialising step() moved the parameters")
    return {"model": model_sd, "optim": optim_sd}


def init_trace(config, steps: int, implementation: str) -> dict:
    start, model, optimizer = _fresh(config, implementation)
    _initialise_through_dcp(model, optimizer)
    for step in range(steps):
        h.sharded_step(model, optimizer, config, step, DTYPE)
    return h.compare(model, REFERENCES[config.name], start)


def save(config, steps: int, split: int, directory: Path, implementation: str) -> dict:
    start, model, optimizer = _fresh(config, implementation)
    for step in range(split):
        h.sharded_step(model, optimizer, config, step, DTYPE)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / config.name))
    return {"saved_at": split}


def load(config, steps: int, split: int, directory: Path, implementation: str) -> dict:
    start, model, optimizer = _fresh(config, implementation)
    state = _initialise_through_dcp(model, optimizer)
    # A parameter that never had a gradient (``unused``) has no saved state, but DCP's
    # initialising step gave it some: partial loading keeps that fresh state (torch's AdamW
    # needs the same). A missing entry of a trained parameter would still break the comparison.
    dcp.load(
        state,
        checkpoint_id=str(directory / config.name),
        planner=DefaultLoadPlanner(allow_partial_load=True),
    )
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    for step in range(split, steps):
        h.sharded_step(model, optimizer, config, step, DTYPE)
    return h.compare(model, REFERENCES[config.name], start)


REFERENCES: dict = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, choices=("save", "load"))
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--config", nargs="+", default=["all"])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--split", type=int, default=5, help="save after this many steps")
    parser.add_argument("--implementation", default="eager", choices=("eager", "compiled", "auto"))
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()
    configs = [c for c in select(args.config) if not c.expect_mismatch]

    errors = {}
    for config in configs:
        try:
            REFERENCES[config.name], _ = h.train_reference(
                config, DTYPE, range(args.steps), args.implementation
            )
        except Exception as exc:  # noqa: BLE001 - reported below
            errors[config.name] = f"reference: {type(exc).__name__}: {exc}"

    h.init_process_group()
    results = []
    try:
        for config in configs:
            runs = [("dcp-resume", save if args.phase == "save" else load)]
            # torch's AdamW counts DCP's initialising call as a step (its step counters become
            # 1, which only a following load overwrites): no trace-free init to check there
            if args.phase == "save" and config.optimizer != "adamw":
                runs.append(("dcp-init", None))
            for backend, fn in runs:
                if config.name in errors:
                    result = {"error": errors[config.name]}
                elif fn is None:
                    result = h.run_guarded(init_trace, config, args.steps, args.implementation)
                else:
                    result = h.run_guarded(
                        fn, config, args.steps, args.split, args.dir, args.implementation
                    )
                if "saved_at" in result:
                    h.rank_print(f"saved {config.name} after {args.split} steps")
                    continue
                tolerance = h.TOLERANCE[DTYPE]
                result.update(
                    config=config.name, backend=backend, dtype="float64", tolerance=tolerance
                )
                result["ok"] = "error" not in result and result["rel"] <= tolerance
                results.append(result)
                h.write_results(args.json, results)
                detail = result.get("error") or f"rel {result['rel']:.2e}"
                h.rank_print(
                    f"{'ok  ' if result['ok'] else 'FAIL'} {config.name:36s} {backend:10s} {detail}"
                )
    finally:
        dist.barrier()
        dist.destroy_process_group()
    if args.json and h.int_rank() == 0:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
