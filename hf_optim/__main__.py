"""``python -m hf_optim SCRIPT.py ARGS...`` / ``python -m hf_optim -m MODULE ARGS...``

Runs an unmodified training script or module with hf-optim's ``optim=`` names registered, so
``--optim casmo`` works in transformers' example scripts and TRL's without editing them::

    python -m hf_optim run_clm.py --optim casmo --output_dir out ...
    python -m hf_optim -m trl.scripts.sft --optim momo --learning_rate 1.0 ...
    accelerate launch -m hf_optim run_clm.py --optim casmo ...
    torchrun --nproc_per_node 2 -m hf_optim run_clm.py --optim casmo ...

TRL's ``trl sft`` (``trl dpo``, ...) command parses the arguments in its own process, then
starts ``trl/scripts/sft.py`` in a new one through ``accelerate launch``; both processes need
the names, so the command is ``python -m hf_optim trl sft -m hf_optim --optim casmo ...``: TRL
hands the arguments its parser does not know (``-m hf_optim``) to ``accelerate launch``, which
then runs the script through this launcher.

Everything else is as ``python SCRIPT.py ARGS`` (or ``python -m MODULE ARGS``) would run it:
``sys.argv`` is ``[SCRIPT.py, ARGS...]`` (``[path of MODULE, ARGS...]``), the code runs as
``__main__``, ``sys.path[0]`` is the script's folder (the current folder for ``-m``), and exit
codes, ``SystemExit`` and tracebacks pass through unchanged.

Two conveniences go beyond what ``python`` does: a SCRIPT that is not a file but a console
command on ``PATH`` written in Python (``trl``, ``accelerate``) runs that command's script, and
a process group the code left initialised is destroyed after it finishes (torch with gloo
aborts at exit now and then otherwise; transformers' example scripts leave theirs).

What it adds is one ``import hf_optim`` before the script starts. That imports torch (the
optimizers' only dependency) and installs an import hook that registers the names when
transformers loads; it does not import transformers itself. hf-optim installs no ``.pth``
file: a ``.pth`` hook would run in every Python process of the environment, including the
ones that never train, and would hide where the names come from.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys

USAGE = """\
usage: python -m hf_optim SCRIPT.py [ARGS ...]
       python -m hf_optim -m MODULE [ARGS ...]

Run a training script or module with hf-optim's optim= names (casmo, autosgm, amac, momo,
momo_adam) registered with transformers, e.g.
  python -m hf_optim run_clm.py --optim casmo --optim_args "c_min=0.05" ...
  python -m hf_optim -m trl.scripts.sft --optim momo --learning_rate 1.0 ...
  python -m hf_optim trl sft -m hf_optim --optim momo --learning_rate 1.0 ...
  accelerate launch -m hf_optim run_clm.py --optim casmo ...
"""


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        stream = sys.stdout if argv else sys.stderr
        stream.write(USAGE)
        raise SystemExit(0 if argv else 2)

    import hf_optim  # noqa: F401 - registers the optim= names (import hook on transformers)

    if argv[0] == "-m":
        if len(argv) < 2:
            sys.stderr.write("python -m hf_optim: -m needs a module name\n\n" + USAGE)
            raise SystemExit(2)
        sys.argv = argv[1:]  # run_module replaces argv[0] with the module's file, as -m does
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return

    script = _script_path(argv[0])
    sys.argv = [script, *argv[1:]]
    # `python SCRIPT.py` puts the script's folder first on sys.path (`python -m` put ours).
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")


def _script_path(name: str) -> str:
    """``name`` itself if it is a file, else the Python console script of that name on PATH."""
    if os.path.exists(name):
        return name
    found = shutil.which(name) if os.sep not in name else None
    if found is None:
        sys.stderr.write(f"python -m hf_optim: can't open file {name!r}: no such file\n")
        raise SystemExit(2)
    with open(found, "rb") as handle:
        first_line = handle.readline()
    if not (first_line.startswith(b"#!") and b"python" in first_line):
        sys.stderr.write(
            f"python -m hf_optim: {name!r} is {found}, which is not a Python script; give a "
            "Python script or -m MODULE\n"
        )
        raise SystemExit(2)
    return found


def _destroy_process_group() -> None:
    """Destroy the process group the script left initialised (gloo may abort at exit
    otherwise). Only after a normal end: after an error the traceback and exit code come
    first, and a rank stuck in a collective must not be waited for."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _run(argv: list[str]) -> None:
    try:
        main(argv)
    except SystemExit as exit_request:
        if exit_request.code in (None, 0):
            _destroy_process_group()
        raise
    _destroy_process_group()


if __name__ == "__main__":
    _run(sys.argv[1:])
