"""DeepSpeed ZeRO on 2 CPU ranks (gloo): each optimizer driven by a ``deepspeed.initialize``
engine equals one process on the whole batch (float32, 1e-5 relative), or is refused at its
first step with the message of ``hf_optim._backends.refusal``; ZeRO-3 is refused.

Needs ``DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8 torch==2.13.0``; the
tests skip with that command as the reason when DeepSpeed is missing. Importing DeepSpeed alone
takes ~20 s here, so everything is marked slow: a representative subset in one launch
(``-k quick``), the whole matrix, and the Trainer runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

from configs import CONFIGS  # noqa: E402
from launch import describe, index, missing, torchrun  # noqa: E402

INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8 torch==2.13.0"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason=f"DeepSpeed missing: {INSTALL}"
)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

#: the default suite's subset: the control, group statistics reduced over ZeRO's partitions
#: (CASMO group, Momo and MomoAdam with one group) and refusals of per-tensor statistics
QUICK = ["adamw", "casmo-group", "casmo-parameter", "momo", "momo_adam-fstar"]
NAMES = [name for name, config in CONFIGS.items() if not config.expect_mismatch]
LAYOUTS = ("groups", "one-group")


def _run(tmp_path_factory, names, stages):
    path = tmp_path_factory.mktemp("zero") / "results.json"
    rows = torchrun(
        "zero_check.py", "--config", *names, "--stages", *map(str, stages), json_path=path
    )
    return index(rows, "config", "backend", "layout")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return _run(tmp_path_factory, QUICK, [2, 3])


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    return _run(tmp_path_factory, NAMES, [1, 2, 3])


def _check(results, config, backend, layout):
    if backend == "zero3" and CONFIGS[config].optimizer == "adamw":
        pytest.skip("AdamW is the ZeRO-1/2 control; ZeRO-3 is only checked for refusals")
    result = results.get((config, backend, layout)) or pytest.fail(
        missing(results, (config, backend, layout))
    )
    if result["expected_refusal"] is not None:
        assert result["ok"], (
            f"{config} under {backend} ({layout}) should be refused with "
            f"{result['expected_refusal']!r}, got: {result.get('error', 'a run without error')}"
        )
    else:
        assert result["ok"], f"{config} under {backend} ({layout}): {describe(result)}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["zero2", "zero3"])
@pytest.mark.parametrize("config", QUICK)
def test_zero_quick(quick, config, backend, layout):
    _check(quick, config, backend, layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
@pytest.mark.parametrize("config", NAMES)
def test_zero_everything(everything, config, backend, layout):
    _check(everything, config, backend, layout)


# -- through the Hugging Face Trainer ----------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    import subprocess

    import torch
    from launch import REPO_ROOT, torchrun_command

    folder = tmp_path_factory.mktemp("trainer_zero")
    script = str(REPO_ROOT / "tests" / "distributed" / "trainer_zero.py")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    single = folder / "single.pt"
    sharded = folder / "zero2.pt"
    done = subprocess.run(
        [sys.executable, script, "--zero", "0", "--out", str(single)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert single.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    done = subprocess.run(
        torchrun_command(script, "--zero", "2", "--out", str(sharded)),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sharded.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(single), torch.load(sharded)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "casmo-group"])
def test_trainer_zero2_equals_one_process(trainer_runs, name):
    single, sharded = trainer_runs
    assert "error" not in sharded[name], sharded[name]["error"]
    reference, params = single[name]["params"], sharded[name]["params"]
    worst = max(
        (params[n] - reference[n]).abs().max().item() / reference[n].abs().max().item()
        for n in reference
    )
    assert worst <= 1e-5, f"{name}: ZeRO-2 through the Trainer differs by {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "backend_options"),
    [
        ("casmo-parameter", ("casmo", {"granularity": "parameter"})),
        # the Trainer builds two groups (with and without weight decay)
        ("momo", ("momo", {"param_groups": 2})),
    ],
)
def test_trainer_zero2_refuses_with_the_library_message(trainer_runs, name, backend_options):
    from hf_optim._backends import refusal

    _, sharded = trainer_runs
    expected = refusal(backend_options[0], "zero2", backend_options[1])
    assert expected is not None
    assert expected in sharded[name].get("error", ""), sharded[name]
