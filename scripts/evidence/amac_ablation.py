"""AMaC: each feature switched off in turn against all on, and against AdamW, on digits.

The claim (AMaC README): each of its features (warm-up + cosine, gradient centralization, Adam
moments, annealed noise, update clipping, dynamic weight decay, heavy-ball momentum, Lookahead,
SWA) helps; its only number is a 97.3% MNIST *training* accuracy. Task here: scikit-learn's 8x8
digits (shipped with the package, no download; MNIST is not available offline), a fixed 80/20
split, pixels in [0, 1], the README's MLP shape scaled to the input (64-128-64-10, ReLU),
batch 64, ``--epochs`` epochs.

AMaC with the README's MNIST settings (lr 1e-4 or ``--lr``, clip 0.5, noise 0.005, weight decay 1e-3,
momentum 0.9, Lookahead k=5 alpha 0.5, SWA from the end of warm-up) and warm-up over 10% of the
run; each ``no_<feature>`` variant switches one feature off and keeps the rest. Baselines:
``adamw`` (lr 1e-3, the usual default, weight decay 1e-3), ``adamw_lr1e-4`` (AMaC's README lr),
``adamw_lr3e-3`` and ``adamw_lr1e-2`` (AdamW's lr tuned on the same grid).
AMaC is scored with the weights its ``eval()`` puts in the model (the SWA average, else the
Lookahead slow weights), as the Trainer integration does; ``fast_test_acc`` is the same model
scored with the fast weights.

    python scripts/evidence/amac_ablation.py            # full: 13 variants x 5 seeds
    python scripts/evidence/amac_ablation.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402
from momo_lr_sweep import load_digits_split  # noqa: E402

import hf_optim  # noqa: E402

FEATURE_OFF = {
    "no_schedule": {"schedule": False},
    "no_centralization": {"centralize_gradients": False},
    "no_noise": {"noise_factor": 0.0},
    "no_clipping": {"clip_value": None},
    "no_dynamic_decay": {"dynamic_weight_decay": False},
    "no_momentum": {"momentum": 0.0},
    "no_lookahead": {"lookahead": False},
    "no_swa": {"swa": False},
}
ADAMW_LRS = {"adamw": 1e-3, "adamw_lr1e-4": 1e-4, "adamw_lr3e-3": 3e-3, "adamw_lr1e-2": 1e-2}
VARIANTS = ("amac_all", *FEATURE_OFF, *ADAMW_LRS)


def build(variant: str, params, total_steps: int, lr: float = 1e-4):
    if variant in ADAMW_LRS:
        return torch.optim.AdamW(params, lr=ADAMW_LRS[variant], weight_decay=1e-3)
    settings = dict(lr=lr, clip_value=0.5, noise_factor=0.005, weight_decay=1e-3,
                    warmup_steps=max(1, total_steps // 10), seed=0)
    if variant != "amac_all":
        if variant not in FEATURE_OFF:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        settings.update(FEATURE_OFF[variant])
    return hf_optim.AMaC(params, total_steps, **settings)


@torch.no_grad()
def score(model: nn.Module, data) -> dict[str, float]:
    logits = model(data["test_x"])
    return {"test_acc": (logits.argmax(-1) == data["test_y"]).float().mean().item(),
            "test_loss": F.cross_entropy(logits, data["test_y"]).item(),
            "train_loss": F.cross_entropy(model(data["train_x"]), data["train_y"]).item()}


def train_one(variant: str, seed: int, data, epochs: int, lr: float = 1e-4) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    n_train = len(data["train_y"])
    steps_per_epoch = -(-n_train // 64)
    optimizer = build(variant, model.parameters(), steps_per_epoch * epochs, lr)
    generator = torch.Generator().manual_seed(1000 + seed)
    curve = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(n_train, generator=generator).split(64):
            loss = F.cross_entropy(model(data["train_x"][batch]), data["train_y"][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            if isinstance(optimizer, hf_optim.AMaC):
                optimizer.eval()
            point = {"epoch": epoch, **score(model, data)}
            if isinstance(optimizer, hf_optim.AMaC):
                optimizer.train()
            curve.append(point)
    final = dict(curve[-1])
    final.pop("epoch")
    final["fast_test_acc"] = score(model, data)["test_acc"]
    return {"final": final, "curve": curve}


def plot(out: Path, table: dict[str, Any]) -> Path:
    plt = _evidence.pyplot()

    names = list(table)
    accuracy = [table[n]["metrics"]["test_acc"] for n in names]
    loss = [table[n]["metrics"]["test_loss"] for n in names]
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = ["tab:blue" if n == "amac_all" else "tab:gray" if n.startswith("adamw")
               else "tab:orange" for n in names]
    accuracy_axis.bar(names, [a["mean"] for a in accuracy], yerr=[a["std"] for a in accuracy],
                      color=colours, capsize=3)
    low = min(a["mean"] - a["std"] for a in accuracy)
    accuracy_axis.set(ylim=(max(0.0, low - 0.02), 1.0), ylabel="test accuracy",
                      title="AMaC feature ablation on digits (mean ± std)")
    loss_axis.bar(names, [v["mean"] for v in loss], yerr=[v["std"] for v in loss],
                  color=colours, capsize=3)
    loss_axis.set(ylabel="test cross-entropy", title="test loss")
    for axis in (accuracy_axis, loss_axis):
        axis.tick_params(axis="x", rotation=60)
    return _evidence.save_figure(figure, out / "amac_ablation.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4, help="AMaC's lr (the README's 1e-4)")
    parser.add_argument("--out", type=Path, default=Path("results/evidence/amac_ablation"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 3
    _evidence.one_thread()
    data = load_digits_split()
    config = {"epochs": args.epochs, "batch_size": 64, "model": "64-128-64-10"}
    if args.lr != 1e-4:
        config["amac_lr"] = args.lr
    _evidence.run_all(args.out, args.variants, args.seeds,
                    lambda v, s: train_one(v, s, data, args.epochs, args.lr), config=config)
    runs = [run for run in _evidence.load_runs(args.out, config) if run["variant"] in args.variants]
    table = _evidence.summarise(runs, [v for v in VARIANTS if v in args.variants])
    reference = table.get("amac_all", {}).get("metrics", {}).get("test_acc", {}).get("mean")
    payload = {"claim": "amac_ablation", "config": config, "variants": table,
               "machine": _evidence.machine(),
               "delta_test_acc_vs_all_on": {
                   name: entry["metrics"]["test_acc"]["mean"] - reference
                   for name, entry in table.items()} if reference is not None else {}}
    _evidence.write_summary(args.out, payload)
    plot(args.out, table)
    print(_evidence.markdown_table(table, ["test_acc", "test_loss", "train_loss",
                                         "fast_test_acc"]))
    return payload


if __name__ == "__main__":
    main()
