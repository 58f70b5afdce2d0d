"""FSDP2 (``fully_shard``, DTensor parameters) on 2 CPU ranks equals one process on the whole
batch, for every optimizer configuration of issue 12 (tests/distributed/configs.py).

One torchrun launch per dtype runs every configuration in both layouts (1-D FSDP mesh and a 2-D
HSDP mesh whose replicate dimension must not be double counted); the tests read its results.
float64 (to 1e-9 relative) is in the default suite, float32 (to 1e-5) is marked slow. The model has uneven shards, an empty
shard, three parameter groups, a parameter without gradient and an unsharded module. A negative
control (a naive reduction) must be caught, proving that the comparison can fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

from configs import CONFIGS  # noqa: E402
from launch import describe, index, missing, torchrun  # noqa: E402

LAYOUTS = ("fsdp", "hsdp")
CASES = [(config, layout) for config in CONFIGS for layout in LAYOUTS]


def _launch(tmp_path_factory, dtype: str) -> dict:
    folder = tmp_path_factory.mktemp("fsdp2")
    rows = torchrun(
        "fsdp2_check.py", "--config", "all", "--dtypes", dtype, json_path=folder / f"{dtype}.json"
    )
    return index(rows, "config", "backend", "dtype")


@pytest.fixture(scope="module")
def float64_results(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, "float64")


@pytest.fixture(scope="module")
def float32_results(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory, "float32")


@pytest.mark.parametrize("config, layout", CASES)
def test_fsdp2_float64_equals_single_process(float64_results, config, layout):
    _check(float64_results, config, layout, "float64")


@pytest.mark.slow
@pytest.mark.parametrize("config, layout", CASES)
def test_fsdp2_float32_equals_single_process(float32_results, config, layout):
    _check(float32_results, config, layout, "float32")


def _check(results, config, layout, dtype):
    result = results.get((config, layout, dtype)) or pytest.fail(
        missing(results, (config, layout, dtype))
    )
    if CONFIGS[config].expect_mismatch:
        assert "error" not in result, result["error"]
        assert result["rel"] > result["tolerance"], (
            f"the negative control {config} was not caught: {describe(result)}"
        )
    else:
        assert result["ok"], f"{config} under {layout} in {dtype}: {describe(result)}"
    assert result["moved"] > 1e-3, "the parameters barely moved: the check would be vacuous"


def test_cuda_check_refuses_clearly_without_cuda():
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run scripts/check_fsdp2_cuda.py under accelerate")
    script = Path(__file__).resolve().parent.parent / "scripts" / "check_fsdp2_cuda.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs CUDA devices" in done.stderr and "fsdp2_check.py" in done.stderr
