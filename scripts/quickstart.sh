#!/usr/bin/env bash
# Set up, then run the main job: the whole lifecycle of the embedded tiny model (no downloads). Output: runs/tiny/.
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hfrecipes lifecycle "$@"
