#!/usr/bin/env bash
# The test suite, as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
# compile (or load from numba's cache) the CPU kernels once, so that daemons started together by the
# tests do not each compile them cold; says which kernels this machine runs
python -m kernels.cpu_path
exec python -m pytest -q -p no:cacheprovider "$@"
