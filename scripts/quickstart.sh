#!/usr/bin/env bash
# Set up, then run the main job on the embedded tiny default (no downloads). Output under runs/.
#   bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hfrecipes pretrain --config tiny/pretrain "$@"
