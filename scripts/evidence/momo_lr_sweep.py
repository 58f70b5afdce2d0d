"""Momo and MomoAdam vs SGD with momentum and AdamW: a learning-rate sweep on scikit-learn's digits.

The claim (Momo README, paper): Momo and MomoAdam work over a wide range of learning rates, where
SGD-M and Adam need tuning. Task: scikit-learn's 8x8 digits (1797 images, shipped with the
package, no download), a fixed 80/20 split, pixels scaled to [0, 1]; an MLP 64-128-128-10 with
ReLU; batch 64, constant learning rate, no weight decay, no clipping, ``--epochs`` epochs.

Optimizers (each at every lr of the grid, 10^-5 .. 10^3 in decades by default):

* ``sgdm``: ``torch.optim.SGD(momentum=0.9, dampening=0.9)`` (the averaging Momo uses, so that
  at small lr Momo and SGD-M coincide, as in the authors' comparison);
* ``momo``: ``hf_optim.Momo(lr, beta=0.9, lb=0)``;
* ``adamw``: ``torch.optim.AdamW(lr, weight_decay=0)``;
* ``momo_adam``: ``hf_optim.MomoAdam(lr, lb=0)``.

Reported per (optimizer, lr): final test accuracy and training loss, mean +- std over seeds
(the seed sets the initial weights and the batch order). A run whose loss becomes non-finite is
stopped and scored as it stands (diverged). The *plateau* of an optimizer is the set of grid
learning rates whose mean test accuracy is within ``--tolerance`` (default 2 points) of the best
mean test accuracy of any optimizer; its width is reported in decades.

    python scripts/evidence/momo_lr_sweep.py                # full: 9 lrs x 4 optimizers x 3 seeds, 20 epochs
    python scripts/evidence/momo_lr_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402

import hf_optim  # noqa: E402

OPTIMIZERS = ("sgdm", "momo", "adamw", "momo_adam")
NEEDS_LOSS = ("momo", "momo_adam")


def load_digits_split() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    train, test = order[:n_train], order[n_train:]
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


def variant_name(optimizer: str, lr: float) -> str:
    return f"{optimizer}@{lr:.3g}"


def build(optimizer: str, lr: float, params):
    if optimizer == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.9)
    if optimizer == "momo":
        return hf_optim.Momo(params, lr=lr, beta=0.9, lb=0.0)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if optimizer == "momo_adam":
        return hf_optim.MomoAdam(params, lr=lr, lb=0.0)
    raise SystemExit(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def train_one(optimizer_name: str, lr: float, seed: int, data, epochs: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    optimizer = build(optimizer_name, lr, model.parameters())
    generator = torch.Generator().manual_seed(1000 + seed)
    n_train = len(data["train_y"])
    diverged = False
    curve = []
    for _epoch in range(epochs):
        total = torch.zeros(())
        for batch in torch.randperm(n_train, generator=generator).split(64):
            loss = F.cross_entropy(model(data["train_x"][batch]), data["train_y"][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optimizer_name in NEEDS_LOSS:
                optimizer.step(loss=loss.detach())
            else:
                optimizer.step()
            total += loss.detach() * len(batch)
        epoch_loss = total.item() / n_train
        curve.append(epoch_loss)
        if not math.isfinite(epoch_loss):
            diverged = True
            break
    with torch.no_grad():
        train_loss = F.cross_entropy(model(data["train_x"]), data["train_y"]).item()
        test_acc = (model(data["test_x"]).argmax(-1) == data["test_y"]).float().mean().item()
    if not math.isfinite(train_loss):
        diverged = True
        train_loss = 1e9  # JSON has no inf; the plot clips it
    return {"final": {"test_acc": test_acc, "train_loss": train_loss, "diverged": float(diverged)},
            "optimizer": optimizer_name, "lr": lr,
            "epoch_train_loss": [x if math.isfinite(x) else None for x in curve]}


def plateaus(table: dict[str, Any], grid: list[float], tolerance: float) -> dict[str, Any]:
    best = max(entry["metrics"]["test_acc"]["mean"] for entry in table.values())
    result = {}
    for optimizer in OPTIMIZERS:
        good = [lr for lr in grid
                if variant_name(optimizer, lr) in table
                and table[variant_name(optimizer, lr)]["metrics"]["test_acc"]["mean"]
                >= best - tolerance]
        means = {f"{lr:.3g}": table[variant_name(optimizer, lr)]["metrics"]["test_acc"]["mean"]
                 for lr in grid if variant_name(optimizer, lr) in table}
        if not means:
            continue
        best_lr = max(means, key=means.get)
        result[optimizer] = {
            "good_lrs": good,
            "width_decades": (math.log10(max(good)) - math.log10(min(good))) if good else None,
            "contiguous": bool(good) and all(
                variant_name(optimizer, lr) in table and lr in good
                for lr in grid if min(good) <= lr <= max(good)),
            "best_lr": float(best_lr), "best_test_acc": means[best_lr],
        }
    return {"best_overall": best, "tolerance": tolerance, "optimizers": result}


def plot(out: Path, table: dict[str, Any], grid: list[float]) -> Path:
    plt = _evidence.pyplot()

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for optimizer in OPTIMIZERS:
        lrs = [lr for lr in grid if variant_name(optimizer, lr) in table]
        if not lrs:
            continue
        acc = [table[variant_name(optimizer, lr)]["metrics"]["test_acc"] for lr in lrs]
        loss = [table[variant_name(optimizer, lr)]["metrics"]["train_loss"] for lr in lrs]
        accuracy_axis.errorbar(lrs, [a["mean"] for a in acc], yerr=[a["std"] for a in acc],
                               marker="o", capsize=3, label=optimizer)
        loss_axis.errorbar(lrs, [min(v["mean"], 10.0) for v in loss],
                           yerr=[min(v["std"], 10.0) for v in loss], marker="o", capsize=3,
                           label=optimizer)
    accuracy_axis.set(xscale="log", xlabel="learning rate", ylabel="test accuracy",
                      title="digits MLP: final test accuracy (mean ± std)")
    loss_axis.set(xscale="log", yscale="log", xlabel="learning rate",
                  ylabel="final training loss (clipped at 10)", title="final training loss")
    for axis in (accuracy_axis, loss_axis):
        axis.legend()
    return _evidence.save_figure(figure, out / "momo_lr_sweep.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--lrs", nargs="+", type=float,
                        default=[10.0**k for k in range(-5, 4)])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=Path("results/evidence/momo_lr_sweep"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lrs, args.epochs = [1e-3, 1e-1, 10.0], 2
    _evidence.one_thread()
    data = load_digits_split()
    config = {"epochs": args.epochs, "batch_size": 64, "model": "64-128-128-10"}
    grid = sorted(args.lrs)
    lookup = {variant_name(o, lr): (o, lr) for o in args.optimizers for lr in grid}
    _evidence.run_all(args.out, list(lookup), args.seeds,
                    lambda v, s: train_one(*lookup[v], s, data, args.epochs), config=config)
    runs = [run for run in _evidence.load_runs(args.out, config) if run["variant"] in lookup]
    table = _evidence.summarise(runs, list(lookup))
    payload = {"claim": "momo_lr_sweep", "config": config, "grid": grid, "variants": table,
               "plateaus": plateaus(table, grid, args.tolerance), "machine": _evidence.machine()}
    _evidence.write_summary(args.out, payload)
    plot(args.out, table, grid)
    for optimizer, entry in payload["plateaus"]["optimizers"].items():
        print(optimizer, entry)
    return payload


if __name__ == "__main__":
    main()
