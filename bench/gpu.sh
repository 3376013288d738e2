#!/usr/bin/env bash
# hfrecipes' stages on one GPU, each timed beside its baseline in the same run; under 8 minutes on one H100/H200.
#   bash bench/gpu.sh            # prints every measurement as it is made, then a summary table for docs/performance.md
#   bash bench/gpu.sh --smoke    # every part with tiny shapes on a CPU (about 2 minutes): proves the code paths
# Each measurement is also one JSON line in $BENCH_OUT/results.jsonl (BENCH_OUT: a new temporary folder unless set).
# On the GPU machine the wheels in .whl/ (trl, datasets, liger-kernel, bitsandbytes, ...) are installed into
# /tmp/site first, without network; a part whose packages are missing prints one "skipped:" line. hfrecipes runs
# from this checkout (PYTHONPATH), installed or not. Models are built from configs with random weights.
#   1. pretrain stage vs a hand-written loop (~123M Llama, batch 16 x 2048): default flags, torch_compile,
#      use_liger_kernel; tokens/s, ratio, MFU over the measured bf16 matmul rate and the nominal peak
#   2. sft, reward, dpo stages vs plain TRL trainers on the same model, data and config: steady seconds per step
#   3. grpo, ppo stages: seconds per step and the share of it spent generating
#   4. full vs LoRA vs QLoRA at 7B: peak memory and step time
# Each part runs in its own process under its own time cap (and what is left of BUDGET seconds); a part that stops
# prints one "part N stopped" line and the run goes on.
set -u
cd "$(dirname "$0")/.."
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export BENCH_OUT=${BENCH_OUT:-$(mktemp -d)}
mkdir -p "$BENCH_OUT" && : >"$BENCH_OUT/results.jsonl"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET=${BUDGET:-470}
part() { echo; echo "== $1 ($(( $(date +%s) - START )) s elapsed)"; }
cap() { local left=$(( BUDGET - ($(date +%s) - START) )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
run_part() {  # number, cap in seconds, subcommand
  timeout -k 10 "$(cap "$2")" "$PY" bench/gpu_bench.py "$3" $SMOKE --work "$WORK" || echo "part $1 stopped (exit $?)"
}

part "environment"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && [ -z "$SMOKE" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH || echo "installing .whl/ failed: the installed packages are used"
fi
"$PY" - <<'PY'
import importlib.metadata as md

names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "bitsandbytes", "triton"]


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


print(", ".join(f"{n} {version(n)}" for n in names))
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "results: $BENCH_OUT/results.jsonl"

part "1. pretrain stage vs a hand-written loop"
run_part 1 200 pretrain
part "2. sft, reward, dpo stages vs plain TRL"
run_part 2 100 finetune
part "3. grpo, ppo stages: generation share"
run_part 3 80 rl
part "4. full vs LoRA vs QLoRA at 7B"
run_part 4 80 memory

part "summary"
"$PY" bench/gpu_bench.py summary
echo
echo "results: $BENCH_OUT/results.jsonl ($(( $(date +%s) - START )) s in all)"
