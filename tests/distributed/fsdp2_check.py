"""FSDP2 equivalence check: each optimizer trained on a ``fully_shard``-ed model (2 ranks, gloo,
CPU) must give the parameters one process gives on the whole batch.

Run from the repository root (``--standalone`` picks a free port)::

    torchrun --standalone --nproc_per_node 2 tests/distributed/fsdp2_check.py --config casmo

``--config`` takes configuration names, optimizer families (``casmo``, ``autosgm``, ``amac``,
``momo``, ``momo_adam``, ``adamw``) or ``all``; see ``configs.py``. Each configuration runs in
every ``--layouts`` (``fsdp``: 1-D mesh; ``hsdp``: 2-D mesh, replicate x shard) and ``--dtypes``
(float64 must agree to 1e-9 relative, float32 to 1e-5). To test another checkout, put it first
on ``PYTHONPATH``. Prints one line per run and exits 1 if any run fails or errors; ``--json``
writes the results for the pytest wrapper.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import _harness as h
import torch
import torch.distributed as dist
from configs import STEPS, select


def check(config, layout: str, dtype: torch.dtype, steps: int, implementation: str) -> dict:
    start = h.build_model(dtype)
    model = h.shard_model(copy.deepcopy(start), layout)
    optimizer = h.make_optimizer(config, h.param_groups(model, config), implementation)
    for step in range(steps):
        h.sharded_step(model, optimizer, config, step, dtype)
    return h.compare(model, REFERENCES[config.name, dtype], start)


REFERENCES: dict = {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="+", default=["all"])
    parser.add_argument("--layouts", nargs="+", default=["fsdp", "hsdp"], choices=h.LAYOUTS)
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=h.DTYPES)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--implementation", default="eager", choices=("eager", "compiled", "auto"))
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()
    configs = select(args.config)
    dtypes = [h.DTYPES[d] for d in args.dtypes]

    # the references first, before any process group exists
    reference_errors = {}
    for config in configs:
        for dtype in dtypes:
            try:
                model, _ = h.train_reference(config, dtype, range(args.steps), args.implementation)
                REFERENCES[config.name, dtype] = model
            except Exception as exc:  # noqa: BLE001 - reported below
                reference_errors[config.name, dtype] = f"reference: {type(exc).__name__}: {exc}"

    h.init_process_group()
    results = []
    try:
        for config in configs:
            for layout in args.layouts:
                for dtype in dtypes:
                    if (config.name, dtype) in reference_errors:
                        result = {"error": reference_errors[config.name, dtype]}
                    else:
                        result = h.run_guarded(
                            check, config, layout, dtype, args.steps, args.implementation
                        )
                    tolerance = h.TOLERANCE[dtype]
                    result.update(
                        config=config.name,
                        backend=layout,
                        dtype=str(dtype).removeprefix("torch."),
                        tolerance=tolerance,
                    )
                    result["ok"] = "error" not in result and (
                        (result["rel"] > tolerance)
                        if config.expect_mismatch
                        else (result["rel"] <= tolerance)
                    )
                    results.append(result)
                    h.write_results(args.json, results)
                    if "error" in result:
                        detail = result["error"]
                    else:
                        detail = (
                            f"rel {result['rel']:.2e} (of update {result['of_update']:.2e}, "
                            f"moved {result['moved']:.1e})"
                        )
                    h.rank_print(
                        f"{'ok  ' if result['ok'] else 'FAIL'} {config.name:36s} {layout:5s} "
                        f"{result['dtype']:8s} {detail}"
                    )
    finally:
        dist.barrier()
        dist.destroy_process_group()
    if args.json and h.int_rank() == 0:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
