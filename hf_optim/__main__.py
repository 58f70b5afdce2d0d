"""``python -m hf_optim SCRIPT.py ARGS...`` / ``python -m hf_optim -m MODULE ARGS...``

Runs an unmodified training script or module with hf-optim's ``optim=`` names registered, so
``--optim casmo`` works in transformers' example scripts and TRL's without editing them::

    python -m hf_optim run_clm.py --optim casmo --output_dir out ...
    python -m hf_optim -m trl.scripts.sft --optim momo --learning_rate 1.0 ...
    accelerate launch -m hf_optim run_clm.py --optim casmo ...
    torchrun --nproc_per_node 2 -m hf_optim run_clm.py --optim casmo ...

Everything else is as ``python SCRIPT.py ARGS`` (or ``python -m MODULE ARGS``) would run it:
``sys.argv`` is ``[SCRIPT.py, ARGS...]`` (``[path of MODULE, ARGS...]``), the code runs as
``__main__``, ``sys.path[0]`` is the script's folder (the current folder for ``-m``), and exit
codes, ``SystemExit`` and tracebacks pass through unchanged.

What it adds is one ``import hf_optim`` before the script starts. That imports torch (the
optimizers' only dependency) and installs an import hook that registers the names when
transformers loads; it does not import transformers itself. hf-optim installs no ``.pth``
file: a ``.pth`` hook would run in every Python process of the environment, including the
ones that never train, and would hide where the names come from.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = """\
usage: python -m hf_optim SCRIPT.py [ARGS ...]
       python -m hf_optim -m MODULE [ARGS ...]

Run a training script or module with hf-optim's optim= names (casmo, autosgm, amac, momo,
momo_adam) registered with transformers, e.g.
  python -m hf_optim run_clm.py --optim casmo --optim_args "c_min=0.05" ...
  python -m hf_optim -m trl.scripts.sft --optim momo --learning_rate 1.0 ...
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

    script = argv[0]
    if not os.path.exists(script):
        sys.stderr.write(f"python -m hf_optim: can't open file {script!r}: no such file\n")
        raise SystemExit(2)
    sys.argv = list(argv)
    # `python SCRIPT.py` puts the script's folder first on sys.path (`python -m` put ours).
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
