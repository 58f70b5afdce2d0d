"""torch.distributed.checkpoint under FSDP2: save mid-run with ``get_state_dict`` + ``dcp.save``,
load in fresh processes with ``dcp.load`` + ``set_state_dict``, continue, and equal one process
trained without interruption (float64, 1e-9 relative), for every optimizer configuration.
Two launches of ~1 minute each on a small box: marked slow (CI runs them in its second pass).

``dcp-init``: DCP's state-initialising ``step()`` (zero gradients, lr 0) on a fresh optimizer
moves no parameter and leaves no trace: training after it equals the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

from configs import CONFIGS  # noqa: E402
from launch import describe, index, missing, torchrun  # noqa: E402

NAMES = [name for name, config in CONFIGS.items() if not config.expect_mismatch]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("dcp")
    checkpoints = folder / "checkpoints"
    saved = torchrun(
        "dcp_check.py",
        "--phase",
        "save",
        "--dir",
        str(checkpoints),
        json_path=folder / "save.json",
    )
    loaded = torchrun(
        "dcp_check.py",
        "--phase",
        "load",
        "--dir",
        str(checkpoints),
        json_path=folder / "load.json",
    )
    out = index(loaded, "config", "backend")
    out.update(index(saved, "config", "backend"))  # a save error explains a load failure best
    return out


CHECKS = [(name, "dcp-resume") for name in NAMES] + [
    # torch's AdamW counts DCP's initialising call as a step: not trace-free, nothing to check
    (name, "dcp-init")
    for name in NAMES
    if CONFIGS[name].optimizer != "adamw"
]


@pytest.mark.slow
@pytest.mark.parametrize(("config", "check"), CHECKS)
def test_dcp(results, config, check):
    result = results.get((config, check)) or pytest.fail(missing(results, (config, check)))
    assert result["ok"], f"{config} {check}: {describe(result)}"
