"""Bad input across the whole CLI: each case gives one clear message naming what is wrong and exit code 2, no
traceback (that needs --debug), and leaves every file the user already had as it was. Plus the safe defaults:
pickled weights refused unless allowed, remote code off unless set. The rows run `cli.main` in this process; one row
also runs as `python -m hfrecipes` in a process of its own. A data file or a model file a stage is given, damaged or
of the wrong shape, is a row of tests/test_bad_data.py, which also checks that no model loads first."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import datasets  # noqa: F401  (imported at collection, so its log handler writes to a stream that stays open)
import pytest
from conftest import subprocess_env

from hfrecipes import cli, modeling


def _tiny_model(folder: Path, vocab_size: int | None = None) -> None:
    """A one-layer model and its tokenizer, saved as a checkpoint folder (vocab_size overrides the model's)."""

    texts = [f"{a} plus {b} is {a + b}." for a in range(30) for b in range(30)]
    tok = modeling.train_tiny_tokenizer(texts, vocab_size=300, model_max_length=64)
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = modeling.config_from("tiny", {**dims, "num_key_value_heads": 1}, tok)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    modeling.init_model(config, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """What a user already has: models, data, recipes, a finished stage, a folder of their own."""
    import torch

    root = tmp_path_factory.mktemp("user")
    _tiny_model(root / "model")
    _tiny_model(root / "mismatch", vocab_size=64)
    _tiny_model(root / "pickled")
    from safetensors.torch import load_file

    weights = load_file(root / "pickled" / "model.safetensors")
    torch.save(weights, root / "pickled" / "pytorch_model.bin")
    (root / "pickled" / "model.safetensors").unlink()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes\n")
    (root / "finished").mkdir()
    (root / "finished" / "record.json").write_text(json.dumps({"stage": "sft", "run_id": "0", "status": "complete"}))
    (root / "a_file.txt").write_text("not a folder\n")
    _damaged_models(root)
    _other_models(root)
    _bad_data_files(root)
    (root / "broken_template.jinja").write_text("{% for m in messages %}{{ m.content")
    (root / "prompts.jsonl").write_text('{"prompt": "What is 2 plus 3?"}\n')
    (root / "ggufs").mkdir()
    (root / "ggufs" / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    (root / "broken_reward.py").write_text("def score(completions, **kwargs):\n    return [1.0 for c in completions\n")
    recipes = {
        "nan_learning_rate": "dataset_name: tiny:corpus\ntrain_tokenizer: true\nlearning_rate: .nan\n",
        "inf_max_grad_norm": "dataset_name: tiny:corpus\ntrain_tokenizer: true\nmax_grad_norm: .inf\n",
        "nan_string_beta": "beta: nan\n",
        "nan_lifecycle_override": (
            "stages:\n  - id: pre\n    stage: pretrain\n    recipe: tiny/pretrain\n"
            "    overrides: {learning_rate: .nan}\n"
        ),
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "not_utf8.yaml").write_bytes(b"dataset_name: tiny:corpus\n# caf\xe9\n")
    return root


def _damaged_models(root: Path) -> None:
    """Copies of the user's model with one file damaged the way a cut-short download or a bad edit leaves it."""
    import shutil

    weights = (root / "model" / "model.safetensors").read_bytes()
    tokenizer = (root / "model" / "tokenizer.json").read_text()
    damage = {
        "weights_cut_short": ("model.safetensors", weights[: len(weights) // 2]),
        "config_empty": ("config.json", b""),
        "tokenizer_cut_short": ("tokenizer.json", tokenizer[: len(tokenizer) // 2].encode()),
        "tokenizer_wrong_shape": ("tokenizer.json", b'{"model": {"type": "Nope"}}'),
        "generation_config_cut_short": ("generation_config.json", b"{"),
    }
    for name, (file, content) in damage.items():
        shutil.copytree(root / "model", root / name)
        (root / name / file).write_bytes(content)
    # a template that refuses two user turns in a row, as many instruct models' templates do
    shutil.copytree(root / "model", root / "alternating")
    (root / "alternating" / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )


def _other_models(root: Path) -> None:
    """Models GGUF export cannot write: another architecture (GPT-2), a LoRA adapter whose base is gone, scaled RoPE,
    and a tokenizer whose pre-tokenizer llama.cpp does not know."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    tok = AutoTokenizer.from_pretrained(root / "model")
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    adapter_config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(root / "deleted-base")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    edits = {
        "rope_scaled": ("config.json", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        "metaspace": ("tokenizer.json", "pre_tokenizer", {"type": "Metaspace", "replacement": "\u2581"}),
    }
    for name, (file, key, value) in edits.items():
        shutil.copytree(root / "model", root / name)
        content = json.loads((root / name / file).read_text())
        (root / name / file).write_text(json.dumps({**content, key: value}))


ROLES = ("tool", "bot", "narrator")


def _bad_data_files(root: Path) -> None:
    """Conversations a chat template cannot take."""
    conv = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]
    good = "".join(json.dumps({"messages": conv}) + "\n" for _ in range(4))
    files = {f"role_{r}.jsonl": json.dumps({"messages": [{"role": r, "content": "hi"}, conv[1]]}) for r in ROLES}
    files["two_user_turns.jsonl"] = json.dumps({"messages": [conv[0], conv[0], conv[1]]}) + "\n"
    for name, text in files.items():
        (root / name).write_text(good + text)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


PRE = ["pretrain", "--config", "tiny/pretrain", "--output_dir", "{out}"]
SFT = ["sft", "--config", "tiny/sft", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
DPO = ["dpo", "--config", "tiny/dpo", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
GRPO = ["grpo", "--config", "tiny/grpo", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
RLOO = ["rloo", "--config", "tiny/rloo", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]


def _on(argv: list[str], model: str) -> list[str]:
    """`argv` with the user's model replaced by another of the user's folders or files."""
    return [f"{{user}}/{model}" if a == "{user}/model" else a for a in argv]


def _generate(model: str) -> list[str]:
    return ["generate", f"{{user}}/{model}", "--prompts", "{user}/prompts.jsonl", "--out", "{out}/o.jsonl"]


CASES = {
    # recipes and flags (a recipe's keys, values and YAML: tests/test_recipes.py; a token in one: tests/test_hub.py)
    "no_config": (["pretrain"], ["needs --config"]),
    "recipe_not_found": (["sft", "--config", "tiny/nope"], ["tiny/nope", "not found"]),
    "unknown_flag": ([*PRE, "--learning_rat", "0.1"], ["--learning_rat", "--learning_rate"]),
    # out-of-range hyperparameters
    "negative_learning_rate": ([*PRE, "--learning_rate=-1e-3"], ["learning_rate", "-0.001"]),
    "zero_batch_size": ([*PRE, "--per_device_train_batch_size", "0"], ["per_device_train_batch_size"]),
    "zero_grad_accumulation": ([*PRE, "--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps"]),
    "negative_warmup": ([*PRE, "--warmup_steps=-0.5"], ["warmup_steps", "[0, inf]"]),
    "negative_weight_decay": ([*PRE, "--weight_decay=-0.1"], ["weight_decay"]),
    "block_size_one": ([*PRE, "--block_size", "1"], ["block_size"]),
    "zero_save_steps": ([*PRE, "--save_steps", "0"], ["save_steps"]),
    "lora_rank_zero": ([*SFT, "--use_peft", "true", "--lora_r", "0"], ["lora_r"]),
    "lora_dropout_one": ([*SFT, "--use_peft", "true", "--lora_dropout", "1.0"], ["lora_dropout"]),
    "zero_max_length": ([*SFT, "--max_length", "0"], ["max_length"]),
    "negative_dpo_beta": ([*DPO, "--beta=-0.1"], ["beta"]),
    "one_generation": ([*GRPO, "--num_generations", "1"], ["num_generations"]),
    "generations_do_not_divide_batch": ([*GRPO, "--num_generations", "3"], ["num_generations"]),
    "zero_temperature": ([*GRPO, "--temperature", "0"], ["temperature"]),
    "unknown_reward_function": ([*GRPO, "--reward_funcs", "nosuch"], ["nosuch"]),
    # datasets
    "unknown_tiny_dataset": ([*PRE, "--dataset_name", "tiny:nothing"], ["tiny:nothing", "tiny:corpus"]),
    "dataset_file_missing": ([*SFT, "--dataset_name", "./missing.jsonl"], ["missing.jsonl", "does not exist"]),
    "pretrain_dataset_file_missing": (
        [*PRE, "--dataset_name", "./missing.jsonl"],
        ["dataset_name", "./missing.jsonl", "does not exist"],
    ),
    "preference_stage_on_plain_text": ([*DPO, "--dataset_name", "tiny:corpus"], ["chosen"]),
    "bad_knowledge_cutoff": ([*PRE, "--knowledge_cutoff", "lastspring"], ["knowledge_cutoff"]),
    # paths and folders
    "output_dir_is_a_file": ([*PRE[:-1], "{user}/a_file.txt"], ["is a file"]),
    "output_dir_holds_user_files": ([*PRE[:-1], "{user}/mine"], ["holds other files"]),
    "output_dir_holds_a_finished_stage": ([*SFT[:-1], "{user}/finished"], ["finished stage"]),
    "model_path_missing": ([*SFT[:3], "--model_name_or_path", "./nope", "--output_dir", "{out}"], ["./nope"]),
    "lifecycle_recipe_missing": (["lifecycle", "tiny/nope"], ["tiny/nope"]),
    "accelerate_config_missing": (["launch", "zero9", "--", "sft", "--config", "tiny/sft"], ["zero9"]),
    # models and tokenizers
    "pickled_weights": (
        _on(SFT, "pickled"),
        ["allow_pickle_weights"],
    ),
    "tokenizer_larger_than_model": (
        _on(SFT, "mismatch"),
        ["vocab_size", "64"],
    ),
    "lm_head_adapter": ([*SFT, "--use_peft", "true", "--lora_target_modules", "q_proj", "lm_head"], ["lm_head"]),
    # devices
    "bf16_without_a_gpu": ([*PRE, "--bf16", "true"], ["bf16", "GPU"]),
    "fp16_without_a_gpu": ([*SFT, "--fp16", "true"], ["fp16", "GPU"]),
    # non-finite hyperparameters: every comparison with nan is false, so only an explicit check stops them
    "nan_learning_rate_in_recipe": (
        ["pretrain", "--config", "{user}/nan_learning_rate.yaml", "--output_dir", "{out}"],
        ["nan_learning_rate.yaml", "'learning_rate'", "nan", "expected a finite number"],
    ),
    "inf_max_grad_norm_in_recipe": (
        ["pretrain", "--config", "{user}/inf_max_grad_norm.yaml", "--output_dir", "{out}"],
        ["'max_grad_norm'", "inf", "0 turns gradient clipping off"],
    ),
    "nan_string_beta_in_recipe": (
        [*DPO[:2], "{user}/nan_string_beta.yaml", *DPO[3:]],
        ["nan_string_beta.yaml", "'beta'", "nan"],
    ),
    "inf_learning_rate_flag": ([*PRE, "--learning_rate", "inf"], ["command line", "'learning_rate'", "inf"]),
    "nan_weight_decay_flag": ([*PRE, "--weight_decay", "nan"], ["command line", "'weight_decay'", "nan"]),
    "inf_epochs_flag": ([*PRE, "--num_train_epochs", "inf", "--max_steps", "-1"], ["num_train_epochs", "max_steps"]),
    "nan_dpo_beta_flag": ([*DPO, "--beta", "nan"], ["command line", "'beta'", "nan"]),
    "nan_grpo_temperature_flag": ([*GRPO, "--temperature", "nan"], ["'temperature'", "nan"]),
    "nan_reward_weight_flag": (
        [*GRPO, "--reward_funcs", "accuracy", "format", "--reward_weights", "1", "nan"],
        ["'reward_weights[1]'", "nan"],
    ),
    "nan_in_json_overrides_flag": (
        [*PRE, "--model_init_overrides", '{{"rms_norm_eps": NaN}}'],
        ["command line", "'model_init_overrides.rms_norm_eps'", "nan"],
    ),
    "nan_in_lifecycle_recipe": (
        ["lifecycle", "{user}/nan_lifecycle_override.yaml", "--run_dir", "{out}"],
        ["'stages[0].overrides.learning_rate'", "nan"],
    ),
    "nan_in_lifecycle_set": (
        ["lifecycle", "tiny/lifecycle", "--run_dir", "{out}", "--set", "*.learning_rate=nan"],
        ["'learning_rate'", "nan"],
    ),
    "recipe_not_utf8": (["pretrain", "--config", "{user}/not_utf8.yaml"], ["not_utf8.yaml", "line 2", "UTF-8"]),
    # conversations the chat template cannot take
    "role_tool_unknown_to_the_template": (
        [*SFT, "--dataset_name", "{user}/role_tool.jsonl"],
        ["role 'tool'", "row 4", "chat_template_path"],
    ),
    "role_bot_unknown_to_the_template": ([*SFT, "--dataset_name", "{user}/role_bot.jsonl"], ["role 'bot'"]),
    "role_narrator_unknown_to_the_template": (
        [*SFT, "--dataset_name", "{user}/role_narrator.jsonl"],
        ["role 'narrator'"],
    ),
    "template_raises_on_a_row": (
        [*_on(SFT, "alternating"), "--dataset_name", "{user}/two_user_turns.jsonl", "--assistant_only_loss", "false"],
        ["cannot render", "row 4", "Conversation roles must alternate"],
    ),
    "chat_template_path_missing": ([*SFT, "--chat_template_path", "./nope.jinja"], ["chat_template_path", "nope"]),
    "chat_template_path_not_jinja": (
        [*SFT, "--chat_template_path", "{user}/prompts.jsonl"],
        ["chat_template_path", "not a .jinja"],
    ),
    "chat_template_path_broken": (
        [*SFT, "--chat_template_path", "{user}/broken_template.jinja"],
        ["broken_template.jinja", "not valid Jinja", "line 1"],
    ),
    "reward_module_syntax_error": (
        [*GRPO, "--reward_funcs", "broken_reward:score"],
        ["broken_reward:score", "broken_reward.py", "line 2", "never closed"],
    ),
    # damaged model files: a tokenizer only loading shows wrong, and the folders export and generate read (each file
    # damaged in a stage's model_name_or_path: tests/test_bad_data.py)
    "tokenizer_wrong_shape": (
        _on(SFT, "tokenizer_wrong_shape"),
        ["tokenizer", "could not be loaded", "download it again"],
    ),
    "export_weights_cut_short": (
        ["export", "{user}/weights_cut_short", "{out}", "--no-vllm"],
        ["stage folder", "model.safetensors", "not a readable safetensors file"],
    ),
    "export_config_empty": (["export", "{user}/config_empty", "{out}", "--no-vllm"], ["stage folder", "config.json"]),
    "export_tokenizer_cut_short": (
        ["export", "{user}/tokenizer_cut_short", "{out}", "--no-vllm"],
        ["stage folder", "tokenizer.json", "not valid JSON"],
    ),
    # GGUF export: refused before any weights load
    "export_gguf_architecture_unmapped": (
        ["export", "{user}/gpt2", "{out}", "--format", "gguf"],
        ["config.json", "model_type 'gpt2'", "--format safetensors"],
    ),
    "export_gguf_quant_unsupported": (
        ["export", "{user}/model", "{out}", "--format", "gguf", "--quant", "q5_k"],
        ["--quant 'q5_k'", "f16, q8_0, q4_0"],
    ),
    "export_gguf_into_a_folder_of_files": (
        ["export", "{user}/model", "{user}/mine", "--format", "gguf"],
        ["export folder", "holds files", "--force"],
    ),
    "export_gguf_adapter_base_missing": (
        ["export", "{user}/adapter", "{out}", "--format", "gguf"],
        ["deleted-base", "base_model_name_or_path", "does not exist"],
    ),
    "export_gguf_rope_scaled": (
        ["export", "{user}/rope_scaled", "{out}", "--format", "gguf"],
        ["config.json", "rope_parameters.rope_type 'linear'", "--format safetensors"],
    ),
    "export_gguf_pre_tokenizer_unknown": (
        ["export", "{user}/metaspace", "{out}", "--format", "gguf"],
        ["tokenizer.json", "pre_tokenizer (Metaspace)", "llama.cpp"],
    ),
    "export_gguf_out_named_like_a_file": (
        ["export", "{user}/model", "{out}/model.gguf", "--format", "gguf"],
        ["model.gguf", "named like a file", "Name a folder"],
    ),
    "export_gguf_with_a_dtype": (
        ["export", "{user}/model", "{out}", "--format", "gguf", "--dtype", "float16"],
        ["--dtype float16", "--quant"],
    ),
    "export_format_unknown": (["export", "{user}/model", "{out}", "--format", "onnx"], ["--format 'onnx'", "gguf"]),
    "generate_weights_cut_short": (
        _generate("weights_cut_short"),
        ["model folder", "model.safetensors", "not a readable safetensors file"],
    ),
    "generate_n_copies_of_greedy": ([*_generate("model"), "--n", "3"], ["n=3", "temperature 0", "--temperature"]),
    "generate_generation_config_cut_short": (
        _generate("generation_config_cut_short"),
        ["model folder", "generation_config.json"],
    ),
}


PPO = ["ppo", "--config", "tiny/ppo", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
DISTILL = ["distill", "--config", "tiny/distill", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]
COST = ["cost", "--params", "7e9", "--tokens", "2e12"]

CASES.update(
    {
        # a key that cannot be unset (unsetting an optional one: tests/test_recipes.py)
        "null_for_a_key_that_always_has_a_value": ([*PRE, "--learning_rate", "null"], ["learning_rate", "unset"]),
        # a value the library would refuse only once training runs
        "grpo_loss_type_unknown": ([*GRPO, "--loss_type", "gspo"], ["loss_type", "'gspo'", "'dapo'"]),
        "rloo_vllm_mode_unknown": ([*RLOO, "--vllm_mode", "colocated"], ["vllm_mode", "'colocated'", "'colocate'"]),
        # RLOO's baseline is the mean of a reply's siblings: a group needs two replies, and a batch whole groups
        "rloo_one_generation": ([*RLOO, "--num_generations", "1"], ["num_generations", "at least 2"]),
        "rloo_batch_splits_a_group": (
            [*RLOO, "--per_device_train_batch_size", "6"],
            ["generation_batch_size (6)", "divisible by num_generations (8)"],
        ),
        "report_to_unknown": ([*SFT, "--report_to", "tensorbord"], ["report_to", "'tensorbord'", "'tensorboard'"]),
        "lora_target_names_no_module": (
            [*SFT, "--use_peft", "true", "--lora_target_modules", "q_proj", "qkv"],
            ["lora_target_modules ['qkv']", "q_proj", "all-linear"],
        ),
        "max_length_below_the_prompt": (
            [*DPO, "--max_length", "3", "--max_train_samples", "8", "--max_eval_samples", "8"],
            ["no training example", "max_length 3", "Raise max_length"],
        ),
        "push_repo_id_malformed": (
            ["push", "{user}/finished", "--repo-id", "me/tiny/sft"],
            ["me/tiny/sft", "namespace/"],
        ),
        "launch_negative_processes": (
            ["launch", "ddp", "--num_processes", "-2", "--", "sft", "--config", "tiny/sft"],
            ["--num_processes -2", "1 or more"],
        ),
        "check_stage_unknown": (["check", "tiny/sft", "--stage", "nosuch"], ["--stage", "'nosuch'", "--help"]),
        "generate_n_not_a_number": ([*_generate("model"), "--n", "three"], ["--n", "'three'"]),
        # a path named for something that must exist
        "resume_from_checkpoint_missing": (
            [*SFT, "--resume_from_checkpoint", "{user}/nope/checkpoint-5"],
            ["resume_from_checkpoint", "checkpoint-5", "does not exist"],
        ),
        "knowledge_probe_file_missing": (
            [*PRE, "--knowledge_probe", "./facts.jsonl"],
            ["knowledge_probe", "./facts.jsonl", "does not exist"],
        ),
        "reward_model_folder_missing": (
            [*PPO, "--reward_model_path", "runs/none/reward"],
            ["reward_model_path", "runs/none/reward", "does not exist"],
        ),
        "value_model_folder_missing": (
            [*PPO, "--reward_model_path", "null", "--value_model_path", "./critic"],
            ["value_model_path", "./critic", "does not exist"],
        ),
        "distill_teacher_missing": (
            [*DISTILL, "--teacher_model_name_or_path", "runs/none/grpo"],
            ["teacher_model_name_or_path", "runs/none/grpo", "does not exist"],
        ),
        "distill_teacher_of_another_vocab_size": (
            [*DISTILL, "--teacher_model_name_or_path", "{user}/mismatch"],
            ["do not share a vocabulary", "vocab_size", "mismatch", "teacher_model_name_or_path"],
        ),
        "distill_teacher_unset": (
            [*DISTILL, "--teacher_model_name_or_path", "null"],
            ["teacher_model_name_or_path is required"],
        ),
        # an output that is, lies inside or holds an input
        "output_dir_inside_the_model": (
            [*SFT[:-1], "{user}/model/sft"],
            ["output_dir", "lies inside model_name_or_path", "outside"],
        ),
        "output_dir_holds_the_model": ([*SFT[:-1], "{user}"], ["output_dir", "holds model_name_or_path"]),
        "output_dir_inside_the_dataset_folder": (
            [*SFT[:-1], "{user}/mine/sft", "--dataset_name", "{user}/mine"],
            ["lies inside dataset_name"],
        ),
        "export_out_inside_the_stage_folder": (
            ["export", "{user}/model", "{user}/model/export", "--no-vllm"],
            ["OUT_DIR", "lies inside STAGE_DIR"],
        ),
        "export_force_over_the_folder_holding_the_stage": (
            ["export", "{user}/model", "{user}", "--force", "--no-vllm"],
            ["OUT_DIR", "holds STAGE_DIR"],
        ),
        "convert_force_over_the_gguf_folder": (
            ["convert", "{user}/ggufs/model.gguf", "{user}/ggufs", "--force"],
            ["OUT_DIR", "holds FILE"],
        ),
        "generate_out_is_the_prompts_file": (
            ["generate", "{user}/model", "--prompts", "{user}/prompts.jsonl", "--out", "{user}/prompts.jsonl"],
            ["--out", "is --prompts"],
        ),
        "generate_out_exists": (
            ["generate", "{user}/model", "--prompts", "{user}/prompts.jsonl", "--out", "{user}/mine/notes.txt"],
            ["--out", "notes.txt", "exists", "--force"],
        ),
        "generate_out_inside_the_model": (
            ["generate", "{user}/model", "--prompts", "{user}/prompts.jsonl", "--out", "{user}/model/o.jsonl"],
            ["--out", "lies inside MODEL_DIR"],
        ),
        "serve_log_inside_the_export": (
            ["serve", "{user}/model", "--log", "{user}/model/server.log"],
            ["--log", "lies inside EXPORT_DIR"],
        ),
        # numbers outside their physical range (a stage's keys: tests/test_recipes.py)
        "generate_top_p_above_one": ([*_generate("model"), "--top_p", "1.5"], ["--top_p", "(0, 1]"]),
        "generate_batch_size_zero": ([*_generate("model"), "--batch_size", "0"], ["--batch_size", "[1, inf]"]),
        "generate_negative_price": ([*_generate("model"), "--price_per_hour=-2"], ["--price_per_hour", "[0, inf]"]),
        "cost_mfu_above_one": ([*COST, "--mfu", "1.5"], ["--mfu", "1.5", "(0, 1]"]),
        "cost_serve_mfu_above_one": ([*COST, "--serve-mfu", "3"], ["--serve-mfu", "(0, 1]"]),
        "cost_pue_below_one": ([*COST, "--pue", "0.5"], ["--pue", "[1, inf]"]),
        "cost_negative_price": ([*COST, "--price=-1"], ["--price", "[0, inf]"]),
        "cost_negative_grid": ([*COST, "--grid=-1"], ["--grid", "[0, inf]"]),
        "cost_zero_power": ([*COST, "--power", "0"], ["--power", "(0, inf]"]),
        "cost_negative_layers": ([*COST, "--n-layers=-2", "--seq-len", "8", "--d-model", "8"], ["--n-layers"]),
        "serve_port_out_of_range": (["serve", "{user}/model", "--port", "70000"], ["--port", "[1, 65535]"]),
        "serve_zero_startup_timeout": (["serve", "{user}/model", "--startup-timeout", "0"], ["--startup-timeout"]),
    }
)


def test_the_table_is_large():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, user, tmp_path, capsys, monkeypatch):
    argv, words = CASES[name]
    if name.endswith("without_a_gpu") and modeling.has_accelerator():
        pytest.skip("this machine has a GPU")
    monkeypatch.syspath_prepend(str(user))  # the user's own reward modules
    argv = [a.format(user=user, out=tmp_path / "out") for a in argv]
    before = _digest(user)
    assert cli.main(argv) == 2
    _assert_one_message(capsys.readouterr().err, words)
    assert _digest(user) == before, "a file the user had was changed"
    assert not (tmp_path / "out").exists(), "a refused run must not create its output folder"


def _assert_one_message(err: str, words: list[str]) -> None:
    """stderr holds one error message, on one line, with every word, and no traceback."""
    assert "Traceback" not in err
    assert err.count("hfrecipes: error:") == 1, err
    message = err[err.index("hfrecipes: error:") :]
    assert message.count("\n") == 1, err  # one message, on one line
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_a_row_from_a_shell_prints_its_message_and_exits_2(tmp_path):
    """One row as a user meets it: `python -m hfrecipes` in a process of its own (the rows above call `cli.main`).
    The row is one found before any heavy import, so the process is quick."""
    argv, words = CASES["no_config"]
    command = [sys.executable, "-m", "hfrecipes", *argv]
    r = subprocess.run(command, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_one_message(r.stderr, words)


def test_debug_shows_the_traceback(user):
    from hfrecipes.errors import UsageError

    with pytest.raises(UsageError, match="learning_rate"):
        cli.main(["--debug", "pretrain", "--config", "tiny/pretrain", "--learning_rate=-1"])


def test_remote_code_is_off_unless_the_recipe_sets_it():
    from hfrecipes.api import parse_stage_args

    for stage, recipe in [("pretrain", "tiny/pretrain"), ("sft", "tiny/sft"), ("dpo", "tiny/dpo")]:
        (_, _, model_args), _ = parse_stage_args(stage, recipe)
        assert model_args.trust_remote_code is False
        assert model_args.allow_pickle_weights is False
    (_, _, model_args), _ = parse_stage_args("sft", "tiny/sft", trust_remote_code=True)
    assert model_args.trust_remote_code is True


def test_pickled_weights_load_when_allowed(user):
    from hfrecipes.api import parse_stage_args

    (_, _, model_args), _ = parse_stage_args(
        "sft", "tiny/sft", model_name_or_path=str(user / "pickled"), allow_pickle_weights=True
    )
    model = modeling.load_pretrained(model_args)
    assert model.config.vocab_size > 64
