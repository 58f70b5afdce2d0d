#!/usr/bin/env bash
# Install everything the test suite needs into ./.venv (unless a virtual environment is
# already active) and run it. Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# torch 2.13.0 is the CPU build these machines carry; an unpinned torch would pull CUDA.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# DeepSpeed runs on CPU without its compiled ops (the ZeRO tests drive it with gloo).
DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed==0.19.8" "torch==2.13.0"
bash scripts/install_upstream.sh
python -m ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The default pass runs implementation="auto" eagerly: compiling every optimizer's kernels takes
# minutes on 2 cores. The compiled kernels are tested explicitly (implementation="compiled") in the
# slow pass (-m slow), which leaves "auto" to compile.
case " $* " in
  *" -m slow "*) ;;
  *) export HF_OPTIM_IMPLEMENTATION="${HF_OPTIM_IMPLEMENTATION:-eager}" ;;
esac
python -m pytest -q "$@"
