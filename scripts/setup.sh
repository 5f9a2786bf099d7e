#!/usr/bin/env bash
# Creates .venv beside the repository and installs cake-swarm with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
