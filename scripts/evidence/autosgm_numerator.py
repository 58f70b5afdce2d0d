"""AutoSGM: the iteration-dependent numerator (num_lrc 2/3/4) against Adam's (num_lrc 0),
across filter zeros gamma, on Shakespeare-char.

The claim (AutoSGM README figures, "blue mostly below red"): the correlation numerators beat the
fixed Adam numerator across the low-pass filter's zero gamma, GPT-2 on Shakespeare-char among
the tasks. Here: a tiny character GPT (``_chargpt.py``: pre-LN, ``--layers`` x ``--width``,
4 heads, block ``--block``, batch ``--batch``, tied embeddings, no dropout) trained for
``--steps`` steps by ``hf_optim.AutoSGM(lr, num_lrc, gamma=gamma, window='cosine',
window_steps=steps)`` with the seed's other defaults (beta_n 0.9999, beta_a 0.999, beta_i 0.9,
debiased filters, no weight decay). Every (num_lrc, gamma) pair uses the same lr (the trust
region mu), as in the README's comparison. Reported: final training loss (mean of the last 50
steps' batch losses) and validation loss (fixed 20 batches of 64 from the held-out 10%).

This is far smaller than upstream's figures (~30M parameters, 10k iterations); the default here
fits a 2-core CPU. Note that beta_n = 0.9999 gives the correlation numerators' EMAs a time scale
of 10k steps: in a short run they are still warming up (a smaller effective step), which is part
of what this measures.

    python scripts/evidence/autosgm_numerator.py                 # full: 4 x 3 x 3 runs
    python scripts/evidence/autosgm_numerator.py --smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _chargpt  # noqa: E402
import _evidence  # noqa: E402

import hf_optim  # noqa: E402

NUMERATORS = (0, 2, 3, 4)
GAMMAS = (0.0, 0.5528, 0.9)


def variant_name(num_lrc: int, gamma: float) -> str:
    return f"num_lrc{num_lrc}_gamma{gamma:g}"


def train_one(num_lrc: int, gamma: float, seed: int, data, args) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _chargpt.CharGPT(data["vocab_size"], args.block, args.width, args.layers)
    optimizer = hf_optim.AutoSGM(model.parameters(), lr=args.lr, num_lrc=num_lrc, gamma=gamma,
                                 window="cosine", window_steps=args.steps)
    generator = torch.Generator().manual_seed(1000 + seed)
    losses = []
    curve = []
    for step in range(1, args.steps + 1):
        loss = model(*_chargpt.batch(data["train"], args.block, args.batch, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step,
                          "train_loss": torch.stack(losses[-50:]).mean().item(),
                          "val_loss": _chargpt.estimate_loss(model, data["val"], args.block,
                                                             args.eval_batches)})
    final = {"train_loss": curve[-1]["train_loss"], "val_loss": curve[-1]["val_loss"],
             "best_val_loss": min(point["val_loss"] for point in curve)}
    return {"final": final, "curve": curve, "num_lrc": num_lrc, "gamma": gamma,
            "statistics": optimizer.statistics()}


def plot(out: Path, table: dict[str, Any], numerators, gammas) -> Path:
    plt = _evidence.pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, key in zip(axes, ("train_loss", "val_loss"), strict=True):
        for num_lrc in numerators:
            present = [g for g in gammas if variant_name(num_lrc, g) in table]
            values = [table[variant_name(num_lrc, g)]["metrics"][key] for g in present]
            axis.errorbar([str(g) for g in present], [v["mean"] for v in values],
                          yerr=[v["std"] for v in values], marker="o", capsize=3,
                          label=f"num_lrc={num_lrc}" + (" (Adam numerator)" if num_lrc == 0
                                                        else ""))
        axis.set(xlabel="filter zero gamma", ylabel=key.replace("_", " "),
                 title=f"Shakespeare-char: final {key.replace('_', ' ')} (mean ± std)")
        axis.legend()
    return _evidence.save_figure(figure, out / "autosgm_numerator.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-lrc", nargs="+", type=int, default=list(NUMERATORS))
    parser.add_argument("--gammas", nargs="+", type=float, default=list(GAMMAS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--data", type=Path, default=_chargpt.SHAKESPEARE)
    parser.add_argument("--out", type=Path, default=Path("results/evidence/autosgm_numerator"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_every, args.eval_batches = 30, 15, 2
        args.block, args.batch, args.width, args.layers = 32, 8, 32, 1
    _evidence.one_thread()
    data = _chargpt.load_shakespeare(args.data)
    config = {key: getattr(args, key) for key in
              ("steps", "lr", "block", "batch", "width", "layers", "eval_batches")}
    lookup = {variant_name(n, g): (n, g) for g in args.gammas for n in args.num_lrc}
    _evidence.run_all(args.out, list(lookup), args.seeds,
                    lambda v, s: train_one(*lookup[v], s, data, args), config=config)
    runs = [run for run in _evidence.load_runs(args.out, config) if run["variant"] in lookup]
    table = _evidence.summarise(runs, list(lookup))
    comparison = {}
    for gamma in args.gammas:
        base = table.get(variant_name(0, gamma))
        for num_lrc in args.num_lrc:
            mine = table.get(variant_name(num_lrc, gamma))
            if num_lrc == 0 or base is None or mine is None:
                continue
            comparison[variant_name(num_lrc, gamma)] = {
                key: mine["metrics"][key]["mean"] - base["metrics"][key]["mean"]
                for key in ("train_loss", "val_loss")}
    payload = {"claim": "autosgm_numerator", "config": config, "variants": table,
               "difference_vs_num_lrc0": comparison, "machine": _evidence.machine()}
    _evidence.write_summary(args.out, payload)
    plot(args.out, table, args.num_lrc, args.gammas)
    print(_evidence.markdown_table(table, ["train_loss", "val_loss", "best_val_loss"]))
    return payload


if __name__ == "__main__":
    main()
