"""The demo's outputs: a markdown table and a PNG of the learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "plot_learning_curves"]

_CURVE_PANELS = (
    ("loss", "training loss (noisy labels included)"),
    ("eval_clean_loss", "clean held-out loss"),
    ("eval_train_noisy_loss", "loss on the wrong training labels"),
)


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown_table(report: dict[str, Any]) -> str:
    """One row per optimizer: clean-eval loss, exact match, memorisation of wrong labels, time."""
    lines = [
        "| optimizer | optim_args | lr | clean-eval loss | exact match | "
        "wrong labels memorized | loss on wrong labels | time (s) | CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        lines.append(
            f"| {result['name']} | {result['optim_args'] or '-'} | {result['learning_rate']:g} | "
            f"{result['eval_loss']:.3f} | {result['exact_match']:.1%} | "
            f"{_number(result['noisy_memorized'], '.1%')} | "
            f"{_number(result['train_noisy_loss'], '.3f')} | {result['time_s']:.1f} | "
            f"{result['cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def plot_learning_curves(report: dict[str, Any], path: Path) -> Path:
    """Training loss, clean-eval loss and loss on the wrong labels against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (key, title)
        for key, title in _CURVE_PANELS
        if any(result["curves"].get(key) for result in report["results"])
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels, strict=True):
        for result in report["results"]:
            points = result["curves"].get(key, [])
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=result["name"], linewidth=1.5)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("cross-entropy per answer token")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    data = report["data"]
    figure.suptitle(
        f"small GPT-2, {data['train_size']} training examples, "
        f"{data['noise_rate']:.0%} wrong labels ({data['noisy_train_examples']})"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
