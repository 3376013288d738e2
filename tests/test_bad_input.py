"""Bad input across the whole CLI: each case gives one clear message naming what is wrong and exit code 2, no
traceback (that needs --debug), and leaves every file the user already had as it was. Plus the safe defaults:
pickled weights refused unless allowed, remote code off unless set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets  # noqa: F401  (imported at collection, so its log handler writes to a stream that stays open)
import pytest

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
    (root / "wrong_columns.jsonl").write_text('{"question": "hi", "reply": "hello"}\n')
    (root / "empty.jsonl").write_text("")
    _damaged_models(root)
    _bad_data_files(root)
    (root / "broken_template.jinja").write_text("{% for m in messages %}{{ m.content")
    (root / "prompts.jsonl").write_text('{"prompt": "What is 2 plus 3?"}\n')
    (root / "broken_reward.py").write_text("def score(completions, **kwargs):\n    return [1.0 for c in completions\n")
    recipes = {
        "unknown_key": "dataset_name: tiny:corpus\nlearning_rat: 0.1\n",
        "bad_type": "dataset_name: tiny:corpus\nmax_steps: ten\n",
        "bad_yaml": "dataset_name: [tiny:corpus\n",
        "a_list": "- a\n- b\n",
        "hub_token": "dataset_name: tiny:corpus\nhub_token: hf_secret\n",
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
        "weights_garbage": ("model.safetensors", b"\x00garbage" * 64),
        "config_empty": ("config.json", b""),
        "config_not_json": ("config.json", b"model_type: llama\n"),
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
    (root / "garbage.gguf").write_bytes(b"\x00garbage" * 64)
    (root / "cut_short.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8))


def _bad_data_files(root: Path) -> None:
    """Data files cut short partway through a line, or with rows a chat template cannot take."""
    conv = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]
    good = "".join(json.dumps({"messages": conv}) + "\n" for _ in range(4))
    files = {
        "cut_short.jsonl": good + '{"messages": [{"role": "user", "content": "What is',
        "unterminated.json": json.dumps([{"messages": conv}] * 4)[:-12],
        "cut_in_a_quote.csv": 'prompt,completion\n"What is 2 plus 3?","5"\n"What is 4 plus 1?","4 plu',
        "ragged.csv": "prompt,completion\nWhat is 2 plus 3?,5\nWhat is 4 plus 1?,5,6\n",
        "cut_short.parquet": "PAR1 cut short",
    }
    for role in ("tool", "bot", "narrator"):
        files[f"role_{role}.jsonl"] = good + json.dumps({"messages": [{"role": role, "content": "hi"}, conv[1]]})
    messages = {
        "no_content": [{"role": "user"}, conv[1]],
        "int_content": [{"role": "user", "content": 3}, conv[1]],
        "no_role": [{"content": "hi"}, conv[1]],
        "two_user_turns": [conv[0], conv[0], conv[1]],
    }
    for name, m in messages.items():
        files[f"{name}.jsonl"] = good + json.dumps({"messages": m}) + "\n"
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "not_utf8.jsonl").write_bytes(good.encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')


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
REWARD = ["reward", "--config", "tiny/reward", "--model_name_or_path", "{user}/model", "--output_dir", "{out}"]


def _on(argv: list[str], model: str) -> list[str]:
    """`argv` with the user's model replaced by another of the user's folders or files."""
    return [f"{{user}}/{model}" if a == "{user}/model" else a for a in argv]


def _generate(model: str) -> list[str]:
    return ["generate", f"{{user}}/{model}", "--prompts", "{user}/prompts.jsonl", "--out", "{out}/o.jsonl"]


CASES = {
    # recipes and flags
    "no_config": (["pretrain"], ["needs --config"]),
    "recipe_not_found": (["sft", "--config", "tiny/nope"], ["tiny/nope", "not found"]),
    "unknown_recipe_key": (["pretrain", "--config", "{user}/unknown_key.yaml"], ["learning_rat", "learning_rate"]),
    "wrong_value_type": (["pretrain", "--config", "{user}/bad_type.yaml"], ["max_steps", "'ten'"]),
    "invalid_yaml": (["pretrain", "--config", "{user}/bad_yaml.yaml"], ["not valid YAML"]),
    "recipe_not_a_mapping": (["pretrain", "--config", "{user}/a_list.yaml"], ["mapping", "list"]),
    "hub_token_in_recipe": (["pretrain", "--config", "{user}/hub_token.yaml"], ["hub_token", "HF_TOKEN"]),
    "unknown_flag": ([*PRE, "--learning_rat", "0.1"], ["--learning_rat", "learning_rate"]),
    "bad_flag_value": ([*PRE, "--max_steps", "ten"], ["max_steps"]),
    # out-of-range hyperparameters
    "negative_learning_rate": ([*PRE, "--learning_rate=-1e-3"], ["learning_rate", "-0.001"]),
    "zero_batch_size": ([*PRE, "--per_device_train_batch_size", "0"], ["per_device_train_batch_size"]),
    "zero_grad_accumulation": ([*PRE, "--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps"]),
    "warmup_ratio_above_one": ([*PRE, "--warmup_ratio", "1.5"], ["warmup_ratio"]),
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
    "unknown_tiny_dataset": ([*PRE, "--dataset_name", "tiny:nothing"], ["tiny:nothing"]),
    "dataset_file_missing": ([*SFT, "--dataset_name", "./missing.jsonl"], ["missing.jsonl", "does not exist"]),
    "dataset_wrong_columns": ([*SFT, "--dataset_name", "{user}/wrong_columns.jsonl"], ["wrong_columns.jsonl"]),
    "dataset_empty": ([*SFT, "--dataset_name", "{user}/empty.jsonl"], ["empty"]),
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
    "quantized_without_adapters": ([*SFT, "--load_in_4bit", "true"], ["use_peft"]),
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
    # data files cut short partway through a line: the file, the line, the fix
    "dataset_jsonl_cut_short": (
        [*SFT, "--dataset_name", "{user}/cut_short.jsonl"],
        ["cut_short.jsonl", "line 5", "not valid JSON", "cut short"],
    ),
    "dataset_json_unterminated": (
        [*SFT, "--dataset_name", "{user}/unterminated.json"],
        ["unterminated.json", "line 1", "not valid JSON", "cut short"],
    ),
    "dataset_csv_cut_in_a_quote": (
        [*SFT, "--dataset_name", "{user}/cut_in_a_quote.csv"],
        ["cut_in_a_quote.csv", "line 3", "quoted field never closes"],
    ),
    "dataset_csv_ragged_line": (
        [*SFT, "--dataset_name", "{user}/ragged.csv"],
        ["ragged.csv", "line 3", "3 fields", "header 2"],
    ),
    "dataset_parquet_cut_short": (
        [*SFT, "--dataset_name", "{user}/cut_short.parquet"],
        ["cut_short.parquet", "not a readable Parquet file"],
    ),
    "dataset_not_utf8": ([*SFT, "--dataset_name", "{user}/not_utf8.jsonl"], ["not_utf8.jsonl", "line 5", "UTF-8"]),
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
    "message_without_content": (
        [*SFT, "--dataset_name", "{user}/no_content.jsonl"],
        ["row 4", "message 0", "has no 'content'"],
    ),
    "message_content_not_a_string": (
        [*SFT, "--dataset_name", "{user}/int_content.jsonl"],
        ["an int as 'content'", "expected a string"],
    ),
    "message_without_role": ([*SFT, "--dataset_name", "{user}/no_role.jsonl"], ["row 4", "has no 'role'"]),
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
    # damaged model files, wherever a model is named
    "weights_cut_short": (
        _on(SFT, "weights_cut_short"),
        ["model_name_or_path", "model.safetensors", "not a readable safetensors file", "download it again"],
    ),
    "weights_garbage": (
        _on(DPO, "weights_garbage"),
        ["model.safetensors", "not a readable safetensors file"],
    ),
    "config_empty": (
        _on(SFT, "config_empty"),
        ["config.json", "is empty"],
    ),
    "config_not_json": (
        _on(REWARD, "config_not_json"),
        ["config.json", "not valid JSON"],
    ),
    "tokenizer_cut_short": (
        _on(SFT, "tokenizer_cut_short"),
        ["tokenizer.json", "not valid JSON"],
    ),
    "tokenizer_wrong_shape": (
        _on(SFT, "tokenizer_wrong_shape"),
        ["tokenizer", "could not be loaded", "download it again"],
    ),
    "generation_config_cut_short": (
        _on(SFT, "generation_config_cut_short"),
        ["generation_config.json", "not valid JSON"],
    ),
    "gguf_garbage": (
        _on(SFT, "garbage.gguf"),
        ["garbage.gguf", "not a readable GGUF file"],
    ),
    "gguf_cut_short": (
        _on(SFT, "cut_short.gguf"),
        ["cut_short.gguf", "not a readable GGUF file"],
    ),
    "reward_model_weights_cut_short": (
        [*GRPO, "--reward_model_path", "{user}/weights_cut_short"],
        ["reward_model_path", "model.safetensors", "not a readable safetensors file"],
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
    "generate_weights_cut_short": (
        _generate("weights_cut_short"),
        ["model folder", "model.safetensors", "not a readable safetensors file"],
    ),
    "generate_generation_config_cut_short": (
        _generate("generation_config_cut_short"),
        ["model folder", "generation_config.json"],
    ),
}


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
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("hfrecipes: error:") == 1, err
    message = err[err.index("hfrecipes: error:") :]
    assert message.count("\n") == 1, err  # one message, on one line
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert _digest(user) == before, "a file the user had was changed"
    assert not (tmp_path / "out").exists(), "a refused run must not create its output folder"


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
