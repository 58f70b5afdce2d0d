"""Start a check script under ``torchrun`` with 2 CPU processes and read its JSON results
(used by the pytest wrappers: one launch runs many configurations, because each launch costs
~10 s of start-up on a small box)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent


def torchrun_command(script: str, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node 2 script args`` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        *args,
    ]


def torchrun(script: str, *args: str, json_path: Path, timeout: float = 900) -> list[dict]:
    """Run ``tests/distributed/<script>`` on 2 ranks; return the results it wrote to
    ``json_path``. Raises with the output tail when the launch itself fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / script),
        *args,
        "--json",
        str(json_path),
    ]
    done = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if not json_path.exists():
        raise RuntimeError(
            f"{script} wrote no results (exit {done.returncode}):\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return json.loads(json_path.read_text())


def describe(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return (
        f"max relative difference {result['rel']:.3e} (tolerance {result['tolerance']:.0e}; "
        f"relative to the update {result['of_update']:.3e})"
    )
