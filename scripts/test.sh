#!/usr/bin/env bash
# Set up, then run the test suite (CPU only, no network).
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers, one per core (each test process uses one torch thread); a test file stays on one worker. Files go
# out in the order tests/conftest.py gives them, longest first (xdist would otherwise send the files with the most
# tests first, and the long ladder last, alone). The slowest tests are listed at the end.
.venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
