#!/usr/bin/env bash
# The Python packages tools/gpu_check.sh needs that the lent GPU image lacks (its package list: the device
# README of the tool library), as wheels in .whl/ (git-ignored) for Python 3.12: omegaconf, its
# antlr4-python3-runtime (on PyPI only as a source archive: built here into a pure-Python wheel) and liger-kernel
# (the benchmark's peer). Run where pip reaches PyPI; the wheels then travel with the checkout (carry: .whl) and
# gpu_check.sh installs them into /tmp/site. Usage: bash tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py=${PYTHON:-python3}
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl omegaconf==2.3.0 liger-kernel==0.8.5
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
