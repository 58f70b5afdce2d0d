"""The demo's outputs: a markdown table and a PNG of the learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["aggregate_seeds", "markdown_table", "plot_learning_curves", "seeds_markdown_table"]

#: the per-optimizer numbers summarised over seeds (mean, sample std, min, max)
SEED_METRICS = ("eval_loss", "exact_match", "noisy_memorized", "train_noisy_loss", "time_s")

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


def _spread(values: list[float]) -> dict[str, Any]:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {
        "mean": mean,
        "std": variance**0.5,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def aggregate_seeds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One demo report per seed -> per optimizer, the mean, std, min and max of each number."""
    summary = []
    for index, first in enumerate(reports[0]["results"]):
        rows = [report["results"][index] for report in reports]
        metrics = {}
        for key in SEED_METRICS:
            values = [row[key] for row in rows if row[key] is not None]
            if values:
                metrics[key] = _spread([float(v) for v in values])
        summary.append(
            {
                "name": first["name"],
                "optim_args": first["optim_args"],
                "learning_rate": first["learning_rate"],
                "metrics": metrics,
            }
        )
    return {"seeds": [report["config"]["seed"] for report in reports], "summary": summary}


def seeds_markdown_table(aggregate: dict[str, Any]) -> str:
    """One row per optimizer: mean ± std over the seeds, and the range in brackets."""

    def cell(metrics: dict[str, Any], key: str, fmt: str) -> str:
        if key not in metrics:
            return "n/a"
        m = metrics[key]
        return (
            f"{format(m['mean'], fmt)} ± {format(m['std'], fmt)} "
            f"[{format(m['min'], fmt)}, {format(m['max'], fmt)}]"
        )

    lines = [
        f"{len(aggregate['seeds'])} seeds ({', '.join(map(str, aggregate['seeds']))}): "
        "mean ± std [min, max]",
        "",
        "| optimizer | optim_args | lr | clean-eval loss | exact match | "
        "wrong labels memorized | loss on wrong labels | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in aggregate["summary"]:
        m = row["metrics"]
        lines.append(
            f"| {row['name']} | {row['optim_args'] or '-'} | {row['learning_rate']:g} | "
            f"{cell(m, 'eval_loss', '.3f')} | {cell(m, 'exact_match', '.1%')} | "
            f"{cell(m, 'noisy_memorized', '.1%')} | {cell(m, 'train_noisy_loss', '.3f')} | "
            f"{m['time_s']['mean']:.1f} |"
        )
    return "\n".join(lines)


def plot_learning_curves(report: dict[str, Any] | list[dict[str, Any]], path: Path) -> Path:
    """Training loss, clean-eval loss and loss on the wrong labels against the step (one line
    per optimizer, one per seed when given several reports)."""
    reports = report if isinstance(report, list) else [report]
    report = reports[0]
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
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for number, seed_report in enumerate(reports):
            for index, result in enumerate(seed_report["results"]):
                points = result["curves"].get(key, [])
                if points:
                    steps, values = zip(*points, strict=True)
                    axis.plot(
                        steps,
                        values,
                        label=result["name"] if number == 0 else None,
                        color=colours[index % len(colours)],
                        linewidth=1.5 if len(reports) == 1 else 1.0,
                        alpha=1.0 if len(reports) == 1 else 0.7,
                    )
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("cross-entropy per answer token")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    data = report["data"]
    figure.suptitle(
        f"small GPT-2, {data['train_size']} training examples, "
        f"{data['noise_rate']:.0%} wrong labels ({data['noisy_train_examples']})"
        + (
            f", seeds {', '.join(str(r['config']['seed']) for r in reports)}"
            if len(reports) > 1
            else ""
        )
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
