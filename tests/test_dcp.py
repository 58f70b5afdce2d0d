"""torch.distributed.checkpoint under FSDP2: save mid-run with ``get_state_dict`` + ``dcp.save``,
load in fresh processes with ``dcp.load`` + ``set_state_dict``, continue, and equal one process
trained without interruption (float64, 1e-9 relative), for every optimizer configuration.
Two launches of ~1 minute each on a small box: marked slow (CI runs them in its second pass).

``dcp-init``: DCP's state-initialising ``step()`` (zero gradients, lr 0) on a fresh optimizer
moves no parameter and leaves no trace: training after it equals the reference.

The default suite runs the same save / fresh template / load / continue path in one process
(DCP works without a process group), bitwise against the uninterrupted run: it catches state that
a fresh optimizer's template lacks (and DCP therefore silently does not restore) in seconds.
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


#: one process: every optimizer, with the options that carry the most state
ONE_PROCESS = [
    "casmo-group",
    "casmo-parameter",
    "autosgm-lrc3-logistic-restart",
    "autosgm-lrc4-beta_exp-elementwise",
    "amac-everything",
    "momo",
    "momo-fstar",
    "momo_adam",
    "momo_adam-fstar",
]


@pytest.mark.parametrize("config", ONE_PROCESS)
def test_dcp_resume_in_one_process_is_exact(tmp_path, config):
    """Momo's step count and loss average once existed only from the first real step: DCP's
    template had no place for them and a resumed run restarted its averages (0.35 .. 1.06)."""
    import _harness as h
    import torch
    import torch.distributed.checkpoint as dcp
    from configs import STEPS
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    chosen, dtype, split = CONFIGS[config], torch.float64, 5
    reference, _ = h.train_reference(chosen, dtype, range(STEPS), "eager")
    model = h.build_model(dtype)
    optimizer = h.make_optimizer(chosen, h.param_groups(model, chosen), "eager")
    h.train_reference(chosen, dtype, range(split), "eager", model, optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))

    resumed = h.build_model(dtype)
    fresh = h.make_optimizer(chosen, h.param_groups(resumed, chosen), "eager")
    model_sd, optim_sd = get_state_dict(resumed, fresh)  # DCP's initialising step
    state = {"model": model_sd, "optim": optim_sd}
    # partial: the never-trained parameter has state in the template only (as in the launch)
    planner = DefaultLoadPlanner(allow_partial_load=True)
    dcp.load(state, checkpoint_id=str(tmp_path), planner=planner)
    set_state_dict(resumed, fresh, model_state_dict=state["model"], optim_state_dict=state["optim"])
    h.train_reference(chosen, dtype, range(split, STEPS), "eager", resumed, fresh)
    for (name, got), want in zip(resumed.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want), f"{config}: {name} differs after the resume"
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(reference.parameters(), h.build_model(dtype).parameters(), strict=True)
    )
    assert moved > 1e-3, "nothing moved: the comparison would be vacuous"
