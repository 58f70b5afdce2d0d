"""Smoke test of scripts/bench_step.py on a tiny parameter set (one round, a few contenders):
it runs, times AdamW as the reference, and prints a table with state sizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_step.py"


@pytest.fixture
def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)
    del sys.modules["bench_step"]


def test_bench_step_prints_a_table_of_ratios(bench_step, capsys) -> None:
    only = ["adamw-foreach", "adamw-fused", "momo", "momo_adam", "no-such-module"]
    bench_step.CONFIGS.append(bench_step.Config("no-such-module", "no_such_module:Optimizer"))
    assert (
        bench_step.main(["--size", "tiny", "--rounds", "1", "--steps", "1", "--only", *only]) == 0
    )
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "adamw-foreach (reference)" in rows and "| 1.00 |" in rows["adamw-foreach (reference)"]
    assert {"adamw-fused", "momo", "momo_adam"} <= set(rows)
    # state bytes: AdamW keeps two moments per parameter, Momo one
    assert rows["adamw-fused"].rstrip(" |").endswith("2.00")
    assert rows["momo"].rstrip(" |").endswith("1.00")
    assert "skipped no-such-module: ModuleNotFoundError" in out


def test_gpt2_shapes_of_124m_have_124m_parameters(bench_step) -> None:
    shapes = bench_step.gpt2_shapes(*bench_step.SIZES["124m"])
    total = sum(torch.Size(shape).numel() for shape in shapes)
    assert 124e6 < total < 125e6 and len(shapes) == 2 + 12 * 12 + 2
