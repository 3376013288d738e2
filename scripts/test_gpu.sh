#!/usr/bin/env bash
# The test suite on a CUDA machine whose Python already holds torch with CUDA (and possibly transformers, peft,
# accelerate), with or without network. Packages it lacks come from wheels in .whl/ when that folder exists (fetch
# them elsewhere with `pip download --no-deps -d .whl ...`); they go into a folder of their own on PYTHONPATH, which
# the tests pass on to every process they start. Where the machine has fewer GPUs than a multi-process engine test
# needs, or lacks DeepSpeed or vLLM, those tests skip and say why.
#   bash scripts/test_gpu.sh                       # the whole suite
#   bash scripts/test_gpu.sh tests/test_device.py  # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=${HFRECIPES_WHEEL_SITE:-/tmp/hfrecipes-site}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use scripts/test.sh on a CPU'; \
print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
# Tests share one GPU: a few workers keep it busy without running it out of memory.
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
"$PY" -m pytest -q -n "$workers" --dist loadfile --durations=15 "$@"
