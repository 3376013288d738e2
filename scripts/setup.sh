#!/usr/bin/env bash
# Create .venv (once) and install hfrecipes with its test and QLoRA extras at the tested versions.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.hfrecipes-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, alone: with a range pip could pick a multi-GB CUDA build; the pin takes the tested release.
    .venv/bin/python -m pip install -q -c constraints.txt torch
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,qlora]"
    echo "$want" > "$stamp"
fi
