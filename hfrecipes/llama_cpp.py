"""Run a GGUF file in llama.cpp itself, through node-llama-cpp (npm), whose prebuilt binaries need no compiler: greedy
tokens, its tokenizer, the end-of-turn token it reads and the chat template rendered by its own Jinja engine, each
compared with the transformers model the file was written from. `hfrecipes.gguf_export.verify_gguf` runs it after
transformers' read-back wherever node-llama-cpp is installed (`scripts/setup.sh` puts it in `.venv/node`).

    hfrecipes export runs/tiny/sft runs/tiny/gguf --format gguf    # record: export.verify.llama_cpp

The CPU backend only, so the figures do not depend on a GPU's kernels. llama.cpp multiplies an F16 or Q8_0 matrix
with activations rounded to the same type, where transformers dequantizes the weights and keeps fp32 activations: its
logits differ from the source's by more than the file's own rounding, and a near-tie can turn a greedy reply.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

NODE_MODULES_ENV = "HFRECIPES_NODE_MODULES"
SCRIPT = Path(__file__).with_name("llama_cpp_check.mjs")
# Text a pre-tokenizer can split wrongly: digits, runs of spaces, newlines, tabs, apostrophes, punctuation, non-ASCII
TOKENIZER_TEXTS = [
    "Tom's 12 dogs ran  home.\n\nThey're 345 today!",
    "I'll add 1,234.56 and 7 -- isn't that 1241.56?\n\tOK.",
    "   three leading spaces, two trailing  ",
    "Café naïve résumé: 10% off, 2x faster.",
]
TOP_LOGITS = 5


def node_modules() -> Path | None:
    """The node_modules folder holding node-llama-cpp: $HFRECIPES_NODE_MODULES, else the one `scripts/setup.sh`
    installs beside the Python environment (`<sys.prefix>/node/node_modules`); None where it or `node` is missing."""
    folder = Path(os.environ.get(NODE_MODULES_ENV) or Path(sys.prefix) / "node" / "node_modules")
    if shutil.which("node") is None or not (folder / "node-llama-cpp" / "package.json").is_file():
        return None
    return folder


def available() -> bool:
    return node_modules() is not None


def run(
    file: Path,
    prompts: list[list[int]],
    max_new_tokens: int,
    texts: list[str] = (),
    chats: list[list[dict]] = (),
    threads: int = 1,
    timeout: float = 600,
) -> dict[str, Any]:
    """llama.cpp's answer for `file` (see llama_cpp_check.mjs): greedy tokens and top logits of each prompt (token
    ids, so no template or tokenizer stands between), its token ids of `texts`, its special tokens, and `chats`
    rendered with the file's chat template. Raises RuntimeError with node's last lines where it fails."""
    modules = node_modules()
    if modules is None:
        raise RuntimeError(f"node-llama-cpp is not installed (node on PATH and {NODE_MODULES_ENV} or .venv/node)")
    request = {
        "model": str(Path(file).resolve()),
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "top_logits": TOP_LOGITS,
        "texts": list(texts),
        "chats": list(chats),
        "threads": threads,
    }
    done = subprocess.run(
        ["node", str(SCRIPT), str(modules)], input=json.dumps(request), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        # node's message from the first line naming an error, without the stack frames
        lines = [x.strip() for x in (done.stderr or done.stdout).splitlines() if x.strip() and " at " not in x[:8]]
        start = next((i for i, x in enumerate(lines) if "Error" in x), max(0, len(lines) - 3))
        tail = " ".join(lines[start : start + 3])
        raise RuntimeError(f"llama.cpp (node-llama-cpp) failed on {Path(file).name}: {tail}")
    return json.loads(done.stdout)


def compare(
    file: Path, model, tok, prompts, source_replies: list[list[int]], stops: set[int], eot: int, max_new_tokens: int
) -> dict[str, Any]:
    """Run `file` in llama.cpp and compare it with `model` (the fp32 source) and `tok`: greedy replies (both cut at the
    first of `stops`), the source's most likely token and top logits on llama.cpp's own contexts (so one early
    difference does not count twice; where llama.cpp's token differs, its margin below the source's best), the
    tokenizer's ids on the prompts and TOKENIZER_TEXTS, the end-of-turn token llama.cpp reads, and the chat prompts
    rendered by llama.cpp's Jinja engine."""
    import torch

    from hfrecipes.inference import prompt_ids, until_eos

    ids = prompt_ids(tok, prompts)
    chats = [p for p in prompts if isinstance(p, list)]
    chats.append([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there!"}])
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
             for p in prompts] + TOKENIZER_TEXTS  # fmt: skip
    got = run(file, ids, max_new_tokens, texts, chats, threads=torch.get_num_threads())

    same, first, agree, steps, worst, tie = 0, None, 0, 0, 0.0, 0.0
    with torch.no_grad():
        for i, (x, reply) in enumerate(zip(ids, got["replies"], strict=True)):
            ours, theirs = until_eos(source_replies[i], stops), until_eos(reply["tokens"], stops)
            same += ours == theirs
            if ours != theirs and first is None:
                first = {"prompt": str(prompts[i]), "source": ours, "llama_cpp": theirs}
            # the source's logits at each of llama.cpp's steps, on llama.cpp's own tokens
            logits = model(torch.tensor([x + reply["tokens"][:-1]])).logits[0, len(x) - 1 :].float()
            for row, top in zip(logits, reply["logits"], strict=True):
                agree += int(row.argmax()) == top[0][0]
                worst = max(worst, max(abs(row[t].item() - v) for t, v in top))
                tie = max(tie, (row.max() - row[top[0][0]]).item())
                steps += 1
    want_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    want_chats = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    tokens = got["tokens"]
    result = {
        "runtime": got["runtime"],
        "llama_cpp": got["llama_cpp"],
        "backend": got["backend"],
        "prompts": len(ids),
        "greedy_matches": same,
        "greedy_max_new_tokens": max_new_tokens,
        "top1_agreement": agree / steps if steps else None,
        "top_logits_max_abs_diff": worst,
        # where llama.cpp picks another token than the source would, how far below the source's best it was: a flip
        # of a near-tie (within the logit difference above) or a real disagreement
        "top1_max_source_margin": tie,
        "tokenizer_texts": len(texts),
        "tokenizer_ids_match": sum(a == b for a, b in zip(want_ids, got["tokenized"], strict=True)),
        "end_of_turn": {"eos": tokens["eos"], "eot": tokens["eot"], "expected": eot},
        "chat_template_renders_same": (
            None if got["rendered"] is None else sum(a == b for a, b in zip(want_chats, got["rendered"], strict=True))
        ),
        "chats": len(chats),
    }
    if first:
        result["first_greedy_mismatch"] = first
    return result
