#!/usr/bin/env bash
# Set up, then run the test suite (CPU only, no network).
#   bash scripts/test.sh
# HFRECIPES_REQUIRE_VLLM=1 and HFRECIPES_REQUIRE_REAL_MODEL=1 (`.ci/run` sets both): set-up must have installed vLLM
# and fetched SmolLM2's GGUF, and the run stops before any test where it did not. HFRECIPES_REQUIRE_LLAMA_CPP=1 does
# the same for llama.cpp (node-llama-cpp), whose tests also run wherever set-up installed it (its stamp promises them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
missing() { echo "scripts/test.sh: error: $*" >&2; status=1; }
if [ "${HFRECIPES_REQUIRE_VLLM:-0}" = "1" ] && ! err=$(.venv/bin/python -c "import vllm" 2>&1); then
    missing "HFRECIPES_REQUIRE_VLLM=1 but vLLM does not import in .venv: $(tail -n 1 <<<"$err")." \
        "scripts/setup.sh installs it on Linux x86_64 unless HFRECIPES_NO_VLLM=1."
fi
gguf=.venv/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${HFRECIPES_REQUIRE_REAL_MODEL:-0}" = "1" ] && [ "$(head -c 4 "$gguf" 2>/dev/null)" != "GGUF" ]; then
    missing "HFRECIPES_REQUIRE_REAL_MODEL=1 but $gguf is missing or not a GGUF file." \
        "scripts/setup.sh fetches it unless HFRECIPES_NO_REAL_MODEL=1."
fi
if [ "${HFRECIPES_REQUIRE_LLAMA_CPP:-0}" = "1" ] && ! .venv/bin/python -c \
    "import sys; from hfrecipes import llama_cpp; sys.exit(not llama_cpp.available())" 2>/dev/null; then
    missing "HFRECIPES_REQUIRE_LLAMA_CPP=1 but node-llama-cpp is not in .venv/node (or node is not on PATH)." \
        "scripts/setup.sh installs it where npm is, unless HFRECIPES_NO_LLAMA_CPP=1."
fi
[ "$status" = 0 ] || exit 1
# Two workers, one per core (each test process uses one torch thread); a test file stays on one worker. Files go
# out in the order tests/conftest.py gives them, longest first (xdist would otherwise send the files with the most
# tests first, and the long ladder last, alone). The slowest tests are listed at the end.
.venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
