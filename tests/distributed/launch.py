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
    rows = json.loads(json_path.read_text())
    if done.returncode not in (0, 1):  # 1: some run failed; anything else: the launch died
        died = f"the launch died after this point (exit {done.returncode}): " + _tail(done)
        rows.append({"config": None, "launch_died": died})
    return rows


def _tail(done: subprocess.CompletedProcess) -> str:
    lines = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "Error" in line or "what()" in line or line.startswith(("ok", "FAIL"))
    ]
    return "\n".join(lines[-12:])


def index(rows: list[dict], *fields: str) -> dict:
    """Results keyed by ``fields``; ``"launch_died"`` holds why a launch stopped early."""
    out: dict = {tuple(r[f] for f in fields): r for r in rows if r.get("config")}
    for row in rows:
        if "launch_died" in row:
            out["launch_died"] = row["launch_died"]
    return out


def missing(results: dict, key: tuple) -> str:
    """Why ``key`` has no result: the launch died before reaching it."""
    died = results.get("launch_died", "the launch wrote no result for it")
    return f"no result for {key}: {died}"


def describe(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return (
        f"max relative difference {result['rel']:.3e} (tolerance {result['tolerance']:.0e}; "
        f"relative to the update {result['of_update']:.3e})"
    )
