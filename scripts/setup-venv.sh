#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the pinned versions of constraints.txt.
# Usage: scripts/setup-venv.sh [extra]   e.g. scripts/setup-venv.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
stamp=".venv/.installed-$(sha256sum constraints.txt pyproject.toml | sha256sum | cut -c1-16)-${extra:-base}"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e "$spec"
    touch "$stamp"
fi
