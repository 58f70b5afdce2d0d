"""Smoke tests of scripts/bench_step.py on a tiny parameter set: the table has a row (or a
stated reason) for every configuration, finite ratios to fused AdamW, state sizes, the
recompile counter, the cold first-step latency and the baseline comparison. Nothing here is
timed: speed goals are read from the script's output, never asserted by a test."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_step.py"


# Each benchmark smoke run builds and steps every configuration: minutes on 2 cores.
pytestmark = pytest.mark.slow


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


class RecompilingSGD(torch.optim.Optimizer):
    """SGD whose compiled kernel (for the first tensor; dynamo's backend "eager", so no C++
    compiler is needed) takes the learning rate as a Python float, which dynamo specialises
    on: the first new lr compiles a second graph."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self._kernel = torch.compile(_sgd_kernel, backend="eager", dynamic=False)

    @torch.no_grad()
    def step(self, closure=None):
        first, *rest = self.param_groups[0]["params"]
        self._kernel(first, first.grad, self.param_groups[0]["lr"])
        for p in rest:
            _sgd_kernel(p, p.grad, self.param_groups[0]["lr"])


def _sgd_kernel(param, grad, lr):
    param.sub_(grad * lr)


def run(bench_step, tmp_path, *argv: str) -> dict:
    out = tmp_path / "bench.json"
    common = ["--size", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1"]
    assert bench_step.main([*common, "--json", str(out), *argv]) == 0
    return json.loads(out.read_text())["results"][0]


def test_every_configuration_has_a_row_or_a_reason(bench_step, tmp_path, capsys) -> None:
    options = ["--latency", "off", "--implementation", "eager", "--baseline", str(ROOT)]
    result = run(bench_step, tmp_path, *options)
    out = capsys.readouterr().out
    rows = {row["name"]: row for row in result["rows"]}
    skipped = result["skipped"]
    for config in bench_step.CONFIGS:
        assert config.name in rows or config.name in skipped, config.name
        printed = config.name + (f" ({config.note})" if config.note else "")
        assert (f"| {printed} |" in out) == (config.name in rows)
    # every hf-optim optimizer and both AdamWs are measured; a skip_nonfinite variant only
    # when the class has the keyword, and otherwise the reason says so
    for config in bench_step.CONFIGS:
        if config.source.startswith(("hf_optim:", "torch:")) and config.skip_of is None:
            assert config.name in rows, skipped.get(config.name)
        if config.skip_of is not None and config.name in skipped:
            assert "no skip_nonfinite keyword" in skipped[config.name]
    for row in rows.values():
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert math.isfinite(row["ratio_foreach"]) and row["ratio_foreach"] > 0, row
        assert row["recompiles"] == 0, row
    assert rows["adamw-fused"]["ratio"] == 1.0
    # state: AdamW keeps two float32 moments per parameter, Momo one
    assert rows["adamw-fused"]["bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert rows["momo"]["bytes_per_param"] == pytest.approx(4.0, abs=0.01)
    # the baseline is this very checkout: the same per-element state (to 1e-3 bytes per
    # parameter: a buffer the size of the parameters is >= 1; a few 0-d entries are not, and
    # the baseline's subprocess, which steps each configuration on its own, can hold a
    # different few)
    for name, row in rows.items():
        if bench_step.CONFIG_BY_NAME[name].source.startswith("hf_optim:"):
            assert row["baseline_bytes_per_param"] == pytest.approx(
                row["bytes_per_param"], abs=1e-3
            )
        if name in bench_step.TARGETS:
            assert row["target"] == bench_step.TARGETS[name] and isinstance(row["met"], bool)
    for name, row in rows.items():
        if bench_step.CONFIG_BY_NAME[name].skip_of in rows:
            assert math.isfinite(row["skip_cost"]) and row["skip_cost"] > 0


def test_recompiles_during_the_timed_steps_are_counted(bench_step, tmp_path, capsys) -> None:
    bench_step.CONFIGS.append(bench_step.Config("recompiling", f"{__name__}:RecompilingSGD"))
    bench_step.CONFIG_BY_NAME["recompiling"] = bench_step.CONFIGS[-1]
    result = run(bench_step, tmp_path, "--latency", "off", "--only", "adamw-fused", "recompiling")
    rows = {row["name"]: row for row in result["rows"]}
    # the timed steps change the learning rate; a kernel specialised on it compiles again
    assert rows["recompiling"]["recompiles"] >= 1
    assert rows["adamw-fused"]["recompiles"] == 0
    assert "PROBLEM recompiling:" in capsys.readouterr().out


@pytest.mark.slow  # a fresh process: ~5 s on a quiet 2-core machine, 35 s on a busy one
def test_cold_first_step_latency(bench_step) -> None:
    # one fresh process; eager, because compiling the real kernels costs seconds per process
    args = bench_step.argparse.Namespace(threads=1, device="cpu", implementation="eager")
    latency = bench_step.measure_latency("tiny", [bench_step.CONFIG_BY_NAME["momo"]], args)["momo"]
    assert latency["first_s"] > 0 and latency["second_s"] > 0 and latency["graphs"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_is_refused_clearly_without_a_gpu(bench_step, capsys) -> None:
    with pytest.raises(SystemExit):
        bench_step.main(["--device", "cuda", "--size", "tiny"])
    assert "torch.cuda.is_available() == False" in capsys.readouterr().err


def test_gpt2_shapes_of_124m_have_124m_parameters(bench_step) -> None:
    shapes = bench_step.gpt2_shapes(*bench_step.SIZES["124m"])
    total = sum(torch.Size(shape).numel() for shape in shapes)
    assert 124e6 < total < 125e6 and len(shapes) == 2 + 12 * 12 + 2


@pytest.mark.slow  # three short Trainer runs: ~10 s quiet, 35 s on a busy machine
def test_bench_trainer_prints_a_row_per_optim_name(tmp_path) -> None:
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "bench_trainer", SCRIPT.with_name("bench_trainer.py")
    )
    bench_trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_trainer)
    threads = torch.get_num_threads()
    out = tmp_path / "trainer.json"
    argv = ["--model", "tiny", "--rounds", "1", "--steps", "2", "--warmup", "1"]
    try:
        assert bench_trainer.main([*argv, "--names", "momo", "casmo", "amac", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"adamw_torch_fused", "momo", "casmo", "amac"} and not result["failed"]
    assert rows["adamw_torch_fused"]["ratio"] == 1.0
    assert rows["adamw_torch_fused"]["ratio_paired"] == 1.0
    for row in rows.values():
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["tokens_per_s"] > 0
        assert math.isfinite(row["ratio_paired"]) and row["ratio_paired"] > 0
        assert 0 < row["optimizer_ms"] < row["ms"] and row["rest_ratio"] > 0
    assert isinstance(rows["momo"]["met"], bool)
