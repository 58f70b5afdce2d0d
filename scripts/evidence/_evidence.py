"""Shared helpers of the evidence scripts: one thread, per-run JSON files, mean +- std.

Every evidence script runs each (variant, seed) pair as one *run*, writes the run's JSON to
``<out>/runs/<variant>__s<seed>.json`` as soon as it finishes (so a long sweep can be stopped
and resumed, and partial results can be summarised), and then summarises whatever runs exist
into ``<out>/summary.json`` and a PNG plot.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
#: ``../shared/data`` beside the checkout, or the folder named by HF_OPTIM_DATA (as the tests).
DATA_DIR = Path(os.environ.get("HF_OPTIM_DATA", REPO_ROOT.parent / "shared" / "data"))


def one_thread() -> None:
    """The evidence runs use one intra-op thread (the numbers in docs/evidence say so)."""
    torch.set_num_threads(1)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def run_path(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant}__s{seed}.json"


def run_all(
    out: Path,
    variants: Iterable[str],
    seeds: Iterable[int],
    train: Callable[[str, int], dict[str, Any]],
    *,
    config: dict[str, Any],
    redo: bool = False,
) -> None:
    """Run every (variant, seed) that has no result yet; each result is written when done."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for variant in variants:
            path = run_path(out, variant, seed)
            if path.exists() and not redo:
                previous = json.loads(path.read_text())
                if previous.get("config") == config:
                    continue
            start = time.perf_counter()
            cpu_start = time.process_time()
            result = train(variant, seed)
            result.update(
                variant=variant,
                seed=seed,
                config=config,
                wall_s=round(time.perf_counter() - start, 1),
                cpu_s=round(time.process_time() - cpu_start, 1),
                machine=machine(),
                finished_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            )
            path.write_text(json.dumps(result, indent=1))
            print(f"[{variant} seed {seed}] {summary_line(result)} ({result['wall_s']} s)", flush=True)


def summary_line(result: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in result.get("final", {}).items())


def load_runs(out: Path, config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((out / "runs").glob("*.json")):
        run = json.loads(path.read_text())
        if config is None or run.get("config") == config:
            runs.append(run)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per variant: seeds present and mean/std/min/max of every final metric."""
    table: dict[str, Any] = {}
    for variant in variants:
        mine = [run for run in runs if run["variant"] == variant]
        if not mine:
            continue
        metrics: dict[str, Any] = {}
        for key in mine[0]["final"]:
            values = [float(run["final"][key]) for run in mine]
            mean, std = mean_std(values)
            metrics[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values),
                            "values": values}
        table[variant] = {"seeds": [run["seed"] for run in mine], "metrics": metrics,
                          "wall_s": [run["wall_s"] for run in mine]}
    return table


def write_summary(out: Path, payload: dict[str, Any]) -> Path:
    path = out / "summary.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display on a CI machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    """Lay ``figure`` out, write it to ``path`` as a PNG and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def markdown_table(table: dict[str, Any], keys: list[str], fmt: str = "{:.3f}") -> str:
    """A mean +- std table (n seeds) of the summary, one row per variant."""
    lines = ["| variant | seeds | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for variant, entry in table.items():
        cells = []
        for key in keys:
            metric = entry["metrics"].get(key)
            if metric is None:
                cells.append("-")
            else:
                cells.append(f"{fmt.format(metric['mean'])} ± {fmt.format(metric['std'])}")
        lines.append(f"| {variant} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finite(value: float) -> bool:
    return math.isfinite(value)
