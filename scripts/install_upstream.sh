#!/usr/bin/env bash
# Install the upstream reference packages used by the parity tests and benchmarks.
# casmo-optimizer 0.1.0 and 0.2.0 both ship a top-level module `casmo`, so each goes into its
# own folder under .upstream/ (or $HF_OPTIM_UPSTREAM); the tests import them from there.
# momo-opt is an ordinary dependency of the `test` extra.
set -euo pipefail
root="${HF_OPTIM_UPSTREAM:-$(cd "$(dirname "$0")/.." && pwd)/.upstream}"
python="${PYTHON:-python}"
for version in 0.1.0 0.2.0; do
  target="$root/casmo-$version"
  if [ ! -f "$target/casmo.py" ]; then
    "$python" -m pip install -q --no-deps --target "$target" "casmo-optimizer==$version"
  fi
done
echo "upstream packages in $root"
