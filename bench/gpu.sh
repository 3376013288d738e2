#!/usr/bin/env bash
# Every GPU measurement of hfrecipes in one run, under 8 minutes on one H100/H200; prints everything as it goes.
#   bash bench/gpu.sh            # on a GPU machine with torch, transformers, peft, accelerate
#   bash bench/gpu.sh --smoke    # the same parts, tiny shapes, on a CPU (seconds to a few minutes)
# trl, datasets, bitsandbytes, vllm and liger-kernel are installed from wheels in .whl/ when that folder exists
# (no network is needed); a part whose packages are missing prints one "skipped:" line. Models are built from configs
# with random weights.
#   1. pretraining MFU of a ~125M Llama, bf16, SDPA; + Liger fused kernels (when installed); + torch.compile
#   2. peak memory and step time of full vs LoRA vs QLoRA fine-tuning of a ~0.5B model (bench/qlora_gpu.py)
#   3. GRPO seconds per step with transformers generation and with vLLM colocate
#   4. generation: vLLM batched vs transformers batched (bench/inference_throughput.py)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-$(command -v python || command -v python3)}
SMOKE=""; DEVICE=""
if [ "${1:-}" = "--smoke" ]; then SMOKE="--smoke"; DEVICE="--device cpu"; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET=${BUDGET:-460}  # seconds for everything; each part gets at most its own cap and what is left of this
part() { echo; echo "== $1 ($(( $(date +%s) - START )) s elapsed)"; }
cap() { local left=$(( BUDGET - ($(date +%s) - START) )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
has() { $PY -c "import $1" >/dev/null 2>&1; }

part "environment"
if [ -d .whl ]; then
  for pkg in trl datasets bitsandbytes vllm liger-kernel; do
    $PY -m pip install -q --no-index --find-links .whl "$pkg" >/dev/null 2>&1 && echo "installed $pkg from .whl/" \
      || echo "not installed from .whl/: $pkg"
  done
fi
$PY - <<'PY'
import importlib.metadata as md

import torch


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "vllm", "liger-kernel"]
print(", ".join(f"{n} {version(n)}" for n in names))
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device)")
PY

part "1. pretraining MFU (~125M Llama)"
timeout $(cap 170) $PY bench/gpu_bench.py pretrain $SMOKE $DEVICE || echo "part 1 stopped (exit $?)"

part "2. memory: full vs LoRA vs QLoRA (~0.5B)"
MODES=full,lora,qlora
has bitsandbytes || { MODES=full,lora; echo "skipped: QLoRA (bitsandbytes not installed)"; }
if [ -n "$SMOKE" ]; then
  timeout $(cap 120) $PY bench/qlora_gpu.py --tiny --device cpu --modes "$MODES" --steps 4 --warmup 1 || echo "part 2 stopped (exit $?)"
else
  timeout $(cap 110) $PY bench/qlora_gpu.py --modes "$MODES" --steps 8 --warmup 3 || echo "part 2 stopped (exit $?)"
fi

part "3. GRPO step time: transformers vs vLLM colocate generation"
timeout $(cap 40) $PY bench/gpu_bench.py build "$WORK/model" $SMOKE $DEVICE || echo "model build stopped (exit $?)"
if has trl && has datasets; then
  timeout $(cap 60) $PY bench/gpu_bench.py grpo "$WORK/model" $SMOKE $DEVICE || echo "part 3 (transformers) stopped (exit $?)"
  if has vllm && [ -z "$SMOKE" ]; then
    timeout $(cap 100) $PY bench/gpu_bench.py grpo "$WORK/model" --vllm || echo "part 3 (vLLM) stopped (exit $?)"
  else
    echo "skipped: GRPO with vLLM colocate (vllm not installed, or a CPU smoke run)"
  fi
else
  echo "skipped: GRPO (trl and datasets not installed)"
fi

part "4. generation: vLLM vs transformers"
if [ -n "$SMOKE" ]; then ARGS="--prompts 16 --single 4 --max_new_tokens 8"; else ARGS="--prompts 512 --single 16 --max_new_tokens 128 --batch_size 128"; fi
timeout $(cap 90) $PY bench/inference_throughput.py "$WORK/model" $ARGS || echo "part 4 stopped (exit $?)"
has vllm || echo "skipped: vLLM generation (vllm not installed)"

part "done"
