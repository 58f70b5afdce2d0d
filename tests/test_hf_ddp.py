"""Two-process data parallel on CPU (torchrun, gloo): bitwise-equal replicas for every optimizer
and Momo fed exactly the loss the Trainer logs. One launch runs all checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hf_common import NAMES

pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(REPO_ROOT / "tests" / "hf_ddp_script.py"),
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("run", [f"mixin/{name}" for name in NAMES] + ["stock/momo"])
def test_replicas_stay_bitwise_equal(ranks, run):
    first, second = ranks[0][run], ranks[1][run]
    assert first["distributed_type"].endswith("MULTI_CPU")
    assert first["wrapped"] == "DistributedDataParallel"
    assert first["finite"]
    assert first["params_sha"] == second["params_sha"]
    assert first["logged"] == second["logged"] and len(first["logged"]) == 4


@pytest.mark.parametrize("run", ["mixin/momo", "mixin/momo_adam", "stock/momo"])
def test_momo_gets_the_logged_loss_on_every_rank(ranks, run):
    for rank in ranks:
        assert rank[run]["fed"] == rank[run]["logged"]


def test_rank_local_loss_control_diverges(ranks):
    """Proves the equality checks above can fail: with each rank's own loss Momo's replicas
    drift apart."""
    first, second = (rank["control/momo_rank_local_loss"] for rank in ranks)
    assert first["fed"] != second["fed"]
    assert first["params_sha"] != second["params_sha"]
