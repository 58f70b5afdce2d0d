"""CASMO benchmark B2 (grokking with 30% wrong labels), multi-seed, with its ablation.

The seed README's B2: (a + b) mod 97 over all 97^2 pairs, half for training with 30% of the
training labels replaced by a uniformly drawn wrong class, the other half (true labels) for
validation. Inputs ``[a, b, 97]``; one post-LN transformer encoder layer (d=128, 4 heads,
feed-forward 512, ReLU, no dropout) over token + learned position embeddings, a linear head on
the last position. Batch 512 (10 steps per epoch), 2000 epochs, cross-entropy, one param group.

Variants (``--variants``):

* ``casmo``: hf-optim CASMO with the README's B2 settings and the library defaults otherwise
  (lr 1e-3, weight decay 1.0, group granularity, ``tau_init_steps`` = 5% of all steps,
  ``c_min`` 0.1, betas (0.9, 0.999), ``adaptive_c_min=True``).
* ``casmo_fixed_floor``: the same with ``adaptive_c_min=False`` (``c_min`` stays the floor).
* ``adamw``: the README's baseline, AdamW lr 1e-3, weight decay 1.0, betas (0.9, 0.98).
* ``adamw_b999``: AdamW with CASMO's betas (0.9, 0.999): the beta2 confound alone.
* ``casmo_frozen``: CASMO with its confidence frozen at the mean confidence ``c`` of the
  ``casmo`` run of the same seed, which is exactly AdamW with lr ``1e-3 * c``, weight decay
  ``1.0 / c`` (so lr * wd, CASMO's per-step decay, is unchanged) and betas (0.9, 0.999):
  CASMO's update ``-lr*C*adam_direction - lr*wd*theta`` with a constant ``C``. This separates
  the effective step size from AGAR's step-by-step selectivity.
* ``casmo_short_calibration`` / ``casmo_long_calibration``: ``casmo`` with ``tau_init_steps``
  2.5% / 10% of all steps (the run length is ``--epochs``).

The model computes the attention query, the residuals, the norms and the feed-forward only for
the last position (the only one the head reads): the same function and gradients as
``nn.TransformerEncoderLayer`` followed by ``[:, -1]`` (checked in tests/test_evidence.py), at
less than half the cost.

    python scripts/evidence/casmo_b2.py --seeds 0 1 2            # full size
    python scripts/evidence/casmo_b2.py --smoke                  # seconds, for the tests
    python scripts/evidence/casmo_b2.py --summarise-only         # table + plot of finished runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence  # noqa: E402

import hf_optim  # noqa: E402

PRIME = 97
VARIANTS = (
    "casmo",
    "casmo_fixed_floor",
    "adamw",
    "adamw_b999",
    "casmo_frozen",
    "casmo_short_calibration",
    "casmo_long_calibration",
)


def make_data(noise: float, data_seed: int) -> dict[str, torch.Tensor]:
    """All pairs, a 50/50 split, ``noise`` of the training labels replaced by a wrong class."""
    generator = torch.Generator().manual_seed(data_seed)
    a, b = torch.meshgrid(torch.arange(PRIME), torch.arange(PRIME), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    inputs = torch.stack([a, b, torch.full_like(a, PRIME)], dim=1)
    labels = (a + b) % PRIME
    order = torch.randperm(len(labels), generator=generator)
    n_train = len(labels) // 2
    train, val = order[:n_train], order[n_train:]
    true_train = labels[train]
    noisy = torch.rand(n_train, generator=generator) < noise
    shift = torch.randint(1, PRIME, (n_train,), generator=generator)  # never the true class
    train_labels = torch.where(noisy, (true_train + shift) % PRIME, true_train)
    return {
        "train_x": inputs[train], "train_y": train_labels, "train_true": true_train,
        "noisy": noisy, "val_x": inputs[val], "val_y": labels[val],
    }


class LastPositionEncoder(nn.Module):
    """Embeddings, one ``nn.TransformerEncoderLayer`` (post-LN), a head on the last position."""

    def __init__(self, d_model: int = 128, heads: int = 4, ff: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(PRIME + 1, d_model)
        self.position = nn.Parameter(torch.randn(1, 3, d_model) * 0.02)
        self.layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, PRIME + 1)
        self.heads = heads

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain module: every position through the layer, then the last one."""
        return self.head(self.layer(self.embed(x) + self.position)[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every input is [a, b, 97]: the last token is fixed, so the attention query is one
        # vector, and each position's key and value depend only on that position's token. They
        # are computed once per call for the (position, token) table and gathered; the output
        # projection, the residual, the norms, the feed-forward and the head run per example.
        # Same function as reference_forward, about half the operations.
        attention = self.layer.self_attn
        width = self.embed.embedding_dim
        head_dim = width // self.heads
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        inputs = self.embed.weight[None] + self.position.transpose(0, 1)  # (3, V, width)
        last = inputs[2, PRIME]
        query = F.linear(last, weight[:width], bias[:width]).view(self.heads, head_dim)
        keys = F.linear(inputs, weight[width:2 * width], bias[width:2 * width])
        values = F.linear(inputs, weight[2 * width:], bias[2 * width:])
        scores_table = torch.einsum("pvhd,hd->pvh", keys.view(3, -1, self.heads, head_dim),
                                    query) / head_dim**0.5  # (3, V, heads)
        positions = torch.arange(3, device=x.device)
        probabilities = scores_table[positions, x].softmax(1)  # (B, 3, heads)
        gathered = values[positions, x].view(len(x), 3, self.heads, head_dim)
        mixed = (gathered * probabilities[..., None]).sum(1).reshape(len(x), width)
        z = self.layer.norm1(last + attention.out_proj(mixed))
        z = self.layer.norm2(z + self.layer.linear2(F.relu(self.layer.linear1(z))))
        return self.head(z)


def frozen_confidence(out: Path, seed: int, fallback: float | None) -> float:
    source = _evidence.run_path(out, "casmo", seed)
    if source.exists():
        return float(json.loads(source.read_text())["mean_confidence"])
    if fallback is None:
        raise SystemExit(
            f"casmo_frozen needs {source} (run casmo for seed {seed} first) "
            "or --frozen-confidence")
    return fallback


def build_optimizer(variant: str, params, total_steps: int, confidence: float | None):
    lr, wd = 1e-3, 1.0
    calibration = max(1, int(0.05 * total_steps))
    casmo_kwargs = dict(lr=lr, weight_decay=wd, granularity="group", c_min=0.1)
    if variant == "casmo":
        return hf_optim.CASMO(params, tau_init_steps=calibration, **casmo_kwargs)
    if variant == "casmo_fixed_floor":
        return hf_optim.CASMO(params, tau_init_steps=calibration, adaptive_c_min=False,
                              **casmo_kwargs)
    if variant == "casmo_short_calibration":
        return hf_optim.CASMO(params, tau_init_steps=max(1, calibration // 2), **casmo_kwargs)
    if variant == "casmo_long_calibration":
        return hf_optim.CASMO(params, tau_init_steps=2 * calibration, **casmo_kwargs)
    if variant == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.98))
    if variant == "adamw_b999":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.999))
    if variant == "casmo_frozen":
        assert confidence is not None
        return torch.optim.AdamW(params, lr=lr * confidence, weight_decay=wd / confidence,
                                 betas=(0.9, 0.999), eps=1e-8)
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    train_pred = torch.cat([model(chunk).argmax(-1) for chunk in data["train_x"].split(2048)])
    val_logits = torch.cat([model(chunk) for chunk in data["val_x"].split(2048)])
    model.train()
    noisy = data["noisy"]
    return {
        "train_acc": (train_pred == data["train_y"]).float().mean().item(),
        "val_acc": (val_logits.argmax(-1) == data["val_y"]).float().mean().item(),
        "val_loss": F.cross_entropy(val_logits, data["val_y"]).item(),
        "clean_train_acc": (train_pred[~noisy] == data["train_y"][~noisy]).float().mean().item(),
        "wrong_labels_memorised": (train_pred[noisy] == data["train_y"][noisy]).float().mean().item(),
    }


def train_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    data = make_data(args.noise, args.data_seed)
    torch.manual_seed(seed)
    model = LastPositionEncoder()
    n_train = len(data["train_y"])
    steps_per_epoch = -(-n_train // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    confidence = (frozen_confidence(args.out, seed, args.frozen_confidence)
                  if variant == "casmo_frozen" else None)
    optimizer = build_optimizer(variant, model.parameters(), total_steps, confidence)
    order_generator = torch.Generator().manual_seed(1000 + seed)
    curve: list[dict[str, float]] = []
    confidences: list[float] = []
    losses: list[float] = []
    step = 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(n_train, generator=order_generator)
        epoch_loss = torch.zeros(())
        for batch in order.split(args.batch_size):
            loss = F.cross_entropy(model(data["train_x"][batch]), data["train_y"][batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            step += 1
            if isinstance(optimizer, hf_optim.CASMO):
                confidences.append(optimizer.param_groups[0]["confidence"].detach().clone())
        losses.append(epoch_loss.item() / steps_per_epoch)
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            point = {"epoch": epoch, "step": step, "train_loss": losses[-1], **evaluate(model, data)}
            if confidences:
                point["confidence"] = float(confidences[-1])
            curve.append(point)
            if args.progress:
                print(f"  {variant} seed {seed} epoch {epoch}: val {point['val_acc']:.3f} "
                      f"train {point['train_acc']:.3f} conf {point.get('confidence', 1):.3f}",
                      flush=True)
    final = {key: curve[-1][key] for key in
             ("val_acc", "train_acc", "clean_train_acc", "wrong_labels_memorised", "val_loss")}
    final["best_val_acc"] = max(point["val_acc"] for point in curve)
    result: dict[str, Any] = {"final": final, "curve": curve, "total_steps": total_steps}
    if confidences:
        trajectory = torch.stack([torch.as_tensor(c).float().reshape(()) for c in confidences])
        result["mean_confidence"] = trajectory.mean().item()
        stride = max(1, len(trajectory) // 400)
        result["confidence_trajectory"] = {"stride": stride,
                                           "values": trajectory[::stride].tolist()}
        result["statistics"] = optimizer.statistics()
        final["mean_confidence"] = result["mean_confidence"]
    if confidence is not None:
        result["frozen_confidence"] = confidence
    return result


def plot(out: Path, runs: list[dict[str, Any]], variants: list[str]) -> Path:
    plt = _evidence.pyplot()

    figure, (accuracy_axis, confidence_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, variant in enumerate(variants):
        mine = [run for run in runs if run["variant"] == variant]
        if not mine:
            continue
        colour = colours[index % len(colours)]
        for number, run in enumerate(mine):
            epochs = [p["epoch"] for p in run["curve"]]
            label = f"{variant} ({len(mine)} seeds)" if number == 0 else None
            accuracy_axis.plot(epochs, [p["val_acc"] for p in run["curve"]], color=colour,
                               label=label, alpha=0.8)
            accuracy_axis.plot(epochs, [p["train_acc"] for p in run["curve"]], color=colour,
                               linestyle=":", alpha=0.6)
            if "confidence_trajectory" in run:
                trajectory = run["confidence_trajectory"]
                x = [i * trajectory["stride"] for i in range(len(trajectory["values"]))]
                confidence_axis.plot(x, trajectory["values"], color=colour, alpha=0.7,
                                     label=label)
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy",
                      title="B2: validation (solid) and noisy-train (dotted) accuracy")
    accuracy_axis.legend(fontsize=8)
    confidence_axis.set(xlabel="step", ylabel="confidence", title="CASMO confidence")
    confidence_axis.legend(fontsize=8)
    return _evidence.save_figure(figure, out / "casmo_b2.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["casmo", "casmo_fixed_floor", "adamw",
                                                            "casmo_frozen"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--frozen-confidence", type=float, default=None,
                        help="confidence for casmo_frozen when no casmo run of the seed exists")
    parser.add_argument("--out", type=Path, default=Path("results/evidence/casmo_b2"))
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    parser.add_argument("--progress", action="store_true", help="print every evaluation")
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.eval_every = 6, 3
        args.frozen_confidence = args.frozen_confidence or 0.5
    _evidence.one_thread()
    config = {key: getattr(args, key) for key in ("epochs", "batch_size", "noise", "data_seed")}
    if not args.summarise_only:
        _evidence.run_all(args.out, args.variants, args.seeds,
                        lambda v, s: train_one(v, s, args), config=config)
    runs = _evidence.load_runs(args.out, config)
    variants = [v for v in VARIANTS if any(run["variant"] == v for run in runs)]
    table = _evidence.summarise(runs, variants)
    payload = {"claim": "casmo_b2", "config": config, "variants": table,
               "machine": _evidence.machine()}
    _evidence.write_summary(args.out, payload)
    plot(args.out, runs, variants)
    print(_evidence.markdown_table(table, ["val_acc", "best_val_acc", "train_acc",
                                         "wrong_labels_memorised", "mean_confidence"]))
    return payload


if __name__ == "__main__":
    main()
