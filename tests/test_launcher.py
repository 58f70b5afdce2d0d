"""``python -m hf_optim``: it runs a script or module exactly as Python would (argv, ``__main__``,
``sys.path[0]``, exit code, traceback), and with it unmodified third-party training code takes
``--optim casmo`` / ``--optim momo``: an HfArgumentParser script of the transformers-examples
kind (``tests/hf_example_train.py``, which never imports hf_optim), under ``torchrun`` with two
processes, TRL's installed ``trl.scripts.sft`` module under ``accelerate launch``, and TRL's
``trl sft`` console command (slow pass)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hf_common import expected_loss_average, save_tiny_char_model

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "tests" / "hf_example_train.py"

PROBE = """
import json, sys
print(json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0],
                  "hf_optim": "hf_optim" in sys.modules}))
if "--fail" in sys.argv:
    1 / 0
sys.exit(int(sys.argv[-1]))
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)  # hf_optim importable; the scripts' folders are not
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(command: list[str], cwd: Path, timeout: int = 300, **extra: str):
    return subprocess.run(
        command, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=timeout
    )


def _report(result) -> dict:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_script_runs_as_python_runs_it(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    runs = {}
    for label, prefix in (("python", []), ("launcher", ["-m", "hf_optim"])):
        result = _run([sys.executable, *prefix, "scripts/probe.py", "a", "--b", "7"], tmp_path)
        assert result.returncode == 7, result.stderr[-3000:]
        runs[label] = json.loads(result.stdout)
    assert runs["launcher"]["hf_optim"] and not runs["python"]["hf_optim"]
    for key in ("name", "argv", "path0"):
        assert runs["launcher"][key] == runs["python"][key]
    assert runs["python"]["name"] == "__main__"
    assert runs["python"]["argv"] == ["scripts/probe.py", "a", "--b", "7"]
    assert runs["python"]["path0"] == str(folder.resolve())

    failed = _run([sys.executable, "-m", "hf_optim", "scripts/probe.py", "--fail", "0"], tmp_path)
    assert failed.returncode == 1
    assert "ZeroDivisionError: division by zero" in failed.stderr
    assert 'scripts/probe.py", line 6, in <module>' in failed.stderr


def test_module_runs_as_python_dash_m_runs_it(tmp_path):
    (tmp_path / "probe_module.py").write_text(PROBE)
    runs = {}
    for label, prefix in (("python", []), ("launcher", ["-m", "hf_optim"])):
        result = _run([sys.executable, *prefix, "-m", "probe_module", "x", "3"], tmp_path)
        assert result.returncode == 3, result.stderr[-3000:]
        runs[label] = json.loads(result.stdout)
    for key in ("name", "argv", "path0"):
        assert runs["launcher"][key] == runs["python"][key]
    assert runs["python"]["argv"] == [str(tmp_path / "probe_module.py"), "x", "3"]


def test_usage_errors(capsys, monkeypatch, tmp_path):
    from hf_optim.__main__ import main

    monkeypatch.chdir(tmp_path)
    for argv, code, text in (
        ([], 2, "usage: python -m hf_optim SCRIPT.py"),
        (["-m"], 2, "-m needs a module name"),
        (["missing.py"], 2, "can't open file 'missing.py'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == code and text in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "-m MODULE" in capsys.readouterr().out


TRAINING = [
    "--max_steps", "4", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
    "--max_grad_norm", "0", "--disable_tqdm", "true", "--save_strategy", "no",
    "--per_device_train_batch_size", "4", "--lr_scheduler_type", "constant",
]  # fmt: skip


def test_unmodified_example_script_with_casmo(tmp_path):
    pytest.importorskip("transformers")
    argv = [str(EXAMPLE), "--output_dir", str(tmp_path / "out"), "--optim", "casmo"]
    argv += ["--optim_args", "tau_init_steps=2", "--learning_rate", "1e-2", *TRAINING]
    argv += ["--exit_code", "5"]
    # Without the launcher the same parser refuses the name: test_hf_registration's fresh
    # process checks that (and the slow pass shows it for TRL's `trl sft` command).
    launched = _run([sys.executable, "-m", "hf_optim", *argv], tmp_path)
    assert launched.returncode == 5, launched.stderr[-4000:]
    report = json.loads(launched.stdout.strip().splitlines()[-1])
    assert report["name"] == "__main__" and report["argv"] == argv
    assert report["optimizer"] == "CASMO"
    assert len(report["losses"]) == 4 and report["losses"][-1] < report["losses"][0]
    assert "optim/confidence/group_0" in report["log_history"][0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_momo_log(log_history: list[dict]) -> list[float]:
    """Momo's logged loss average is the exponential average of the logged losses: it received
    exactly the loss the Trainer logged at every step."""
    steps = [entry for entry in log_history if "loss" in entry]
    losses = [entry["loss"] for entry in steps]
    averages = [entry["optim/loss_avg/group_0"] for entry in steps]
    assert averages == pytest.approx(expected_loss_average(losses, 0.9, False), rel=1e-6)
    return losses


@pytest.mark.slow  # two processes, each importing transformers: ~40 s of CPU
def test_unmodified_example_script_with_momo_on_two_processes(tmp_path):
    pytest.importorskip("transformers")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += ["-m", "hf_optim", str(EXAMPLE), "--output_dir", str(tmp_path / "out")]
    command += ["--optim", "momo", "--learning_rate", "1.0", "--ddp_backend", "gloo", *TRAINING]
    command += ["--gradient_accumulation_steps", "2"]
    report = _report(_run(command, tmp_path, timeout=400, ACCELERATE_USE_CPU="true"))
    assert report["optimizer"] == "Momo" and report["world_size"] == 2
    losses = _check_momo_log(report["log_history"])
    assert len(losses) == 4


@pytest.mark.slow  # accelerate launch + trl import: ~30 s of CPU
def test_trl_sft_module_with_momo_under_accelerate_launch(tmp_path):
    pytest.importorskip("trl")
    model = save_tiny_char_model(str(tmp_path / "model"))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"the number {i} is {i * 7 % 13}."} for i in range(32)]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "hf_optim", "-m", "trl.scripts.sft", "--model_name_or_path", model]
    command += ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    command += ["--optim", "momo", "--learning_rate", "1.0", "--max_length", "32", *TRAINING]
    command += ["--save_strategy", "steps", "--save_steps", "4"]
    result = _run(command, tmp_path, timeout=400)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    _check_momo_log(state["log_history"])
    assert (tmp_path / "out" / "model.safetensors").exists()


CONSOLE_SCRIPT = """#!/usr/bin/env python
import atexit, json, sys, tempfile
import torch.distributed as dist

dist.init_process_group(
    "gloo", rank=0, world_size=1, init_method="file://" + tempfile.mktemp(prefix="pg")
)
atexit.register(lambda: print(json.dumps({"argv": sys.argv, "name": __name__,
    "hf_optim": "hf_optim" in sys.modules, "group_at_exit": dist.is_initialized()})))
"""


def test_console_command_and_process_group_left_behind(tmp_path):
    """A console command on PATH written in Python runs as that script (argv[0] its path, as
    the shell gives it); a process group the script leaves is destroyed before exit (the atexit
    report runs after that); a command that is not Python gets a clear error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = bin_dir / "train-cli"
    command.write_text(CONSOLE_SCRIPT)
    (bin_dir / "not-python").write_text("#!/bin/sh\necho hello\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    path_env = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    launched = _report(
        _run([sys.executable, "-m", "hf_optim", "train-cli", "x"], tmp_path, PATH=path_env)
    )
    assert not launched["group_at_exit"]  # `python train-cli x` would print True here
    assert launched["argv"] == [str(command), "x"]
    assert launched["name"] == "__main__" and launched["hf_optim"]
    refused = _run([sys.executable, "-m", "hf_optim", "not-python"], tmp_path, PATH=path_env)
    assert refused.returncode == 2 and "is not a Python script" in refused.stderr


@pytest.mark.slow  # two TRL processes (the command and the training script): ~45 s of CPU
def test_trl_console_command_with_casmo(tmp_path):
    """``trl sft`` is a console command that parses the arguments, then starts TRL's sft.py
    through ``accelerate launch``: alone it refuses ``--optim casmo``; through the launcher,
    with ``-m hf_optim`` passed on to ``accelerate launch``, it trains with CASMO."""
    pytest.importorskip("trl")
    trl = shutil.which("trl") or str(Path(sys.executable).with_name("trl"))
    if not Path(trl).exists():
        pytest.skip("TRL's `trl` console command is not installed")
    model = save_tiny_char_model(str(tmp_path / "model"))
    data = tmp_path / "data"
    data.mkdir()
    text = (REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt").read_text()
    (data / "train.txt").write_text(text[:20000])
    arguments = ["sft", "--model_name_or_path", model, "--dataset_name", str(data)]
    arguments += ["--output_dir", str(tmp_path / "out"), "--optim", "casmo", "--max_length", "32"]
    arguments += ["--optim_args", "tau_init_steps=2", "--learning_rate", "1e-2", *TRAINING]
    arguments += ["--save_strategy", "steps", "--save_steps", "4"]
    plain = _run([trl, *arguments], tmp_path)
    assert plain.returncode == 2 and "invalid choice: 'casmo'" in plain.stderr
    launched = _run([sys.executable, "-m", "hf_optim", trl, *arguments, "-m", "hf_optim"], tmp_path)
    assert launched.returncode == 0, (launched.stdout[-2000:], launched.stderr[-4000:])
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    losses = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 4 and "optim/confidence/group_0" in losses[0]
