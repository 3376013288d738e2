"""The `hfrecipes` command: parses, dispatches, owns no training logic. Bad input exits 2 with one message.

hfrecipes recipes
hfrecipes check tiny/pretrain
hfrecipes pretrain --config tiny/pretrain --max_steps 50
hfrecipes sft --config tiny/sft --plan
hfrecipes lifecycle tiny/lifecycle --plan
hfrecipes cost --params 7e9 --tokens 2e12 --device h100 --num-devices 64 --daily-tokens 1e9
hfrecipes push runs/tiny/pretrain --repo-id me/tiny-pretrain --private
hfrecipes serve runs/tiny/export --port 8000
hfrecipes convert SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2-135m
hfrecipes export runs/tiny/sft runs/tiny/gguf --format gguf --quant q8_0
hfrecipes eval runs/tiny/sft --tasks tiny_addition,tiny_facts --probe tiny:facts
hfrecipes launch ddp --num_processes 2 -- sft --config tiny/sft
hfrecipes accelerate-config zero3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hfrecipes.errors import UsageError
from hfrecipes.harness import BUNDLED as BUNDLED_TASKS
from hfrecipes.recipe import (
    COUNT,
    NON_NEGATIVE,
    PORT,
    POSITIVE,
    PROBABILITY,
    RANGES,
    check_apart,
    check_finite,
    check_ranges,
)
from hfrecipes.stages import STAGES, describe

EXIT_USAGE = 2

# The numbers each command's options take (a stage's recipe keys: recipe.RANGES), refused before any work.
OPTION_RANGES: dict[str, dict[str, tuple[float, float, bool, bool]]] = {
    "generate": {
        "--temperature": NON_NEGATIVE,
        "--top_p": PROBABILITY,
        "--max_new_tokens": COUNT,
        "--n": COUNT,
        "--batch_size": COUNT,
        "--price_per_hour": NON_NEGATIVE,
    },
    "cost": {
        "--params": POSITIVE,
        "--tokens": POSITIVE,
        "--num-devices": COUNT,
        "--mfu": PROBABILITY,
        "--price": NON_NEGATIVE,
        "--power": POSITIVE,
        "--pue": RANGES["pue"],
        "--grid": NON_NEGATIVE,
        "--n-layers": COUNT,
        "--seq-len": COUNT,
        "--d-model": COUNT,
        "--serve-mfu": PROBABILITY,
        "--serve-tokens-per-second": POSITIVE,
        "--serve-prefill-tokens-per-second": POSITIVE,
        "--kv-bytes-per-token": POSITIVE,
        "--context": COUNT,
        "--daily-tokens": NON_NEGATIVE,
        "--daily-input-tokens": NON_NEGATIVE,
        "--daily-output-tokens": NON_NEGATIVE,
    },
    "serve": {"--port": PORT, "--startup-timeout": POSITIVE},
    "lifecycle": {"--seeds": COUNT},
    "eval": {
        "--limit": COUNT,
        "--num_fewshot": NON_NEGATIVE,
        "--batch_size": COUNT,
        "--ngram": COUNT,
        "--price_per_hour": NON_NEGATIVE,
    },
}
# Each command's output and the inputs it must stay apart from (not be, lie inside or hold one): writing it would
# change what the command reads, and replacing it (--force) would delete it.
OUTPUT_APART: dict[str, tuple[str, tuple[str, ...]]] = {
    "export": ("out_dir", ("stage_dir",)),
    "convert": ("out_dir", ("gguf", "base")),
    "generate": ("out", ("model_dir", "prompts")),
    "serve": ("log", ("folder",)),
}
SHOWN = {
    "out": "--out",
    "log": "--log",
    "prompts": "--prompts",
    "base": "--base",
    "gguf": "FILE",
    "folder": "EXPORT_DIR",
}


def check_options(args: argparse.Namespace) -> None:
    """A command's numbers in range, its output apart from its inputs and no file of the user's replaced unasked,
    before anything loads."""
    if args.command in ("generate", "cost", "eval"):
        check_finite(vars(args), f"hfrecipes {args.command}")  # nan passes every range check
    ranges = OPTION_RANGES.get(args.command, {})
    values = {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in ranges}
    check_ranges(values, f"hfrecipes {args.command}", ranges, name="{}")
    if args.command in OUTPUT_APART:
        out, inputs = OUTPUT_APART[args.command]
        shown = {SHOWN.get(i, i.upper()): getattr(args, i) for i in inputs}
        check_apart(getattr(args, out), shown, f"hfrecipes {args.command}", SHOWN.get(out, out.upper()))
    if args.command == "generate" and args.out and Path(args.out).expanduser().exists() and not args.force:
        raise UsageError(f"--out '{args.out}' exists. Choose a new file, or pass --force to replace it.")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad choice, a value of the wrong type, a missing argument) are one UsageError line,
    not a usage dump; every subcommand's parser is of this class too."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}. `{self.prog} --help` lists the options.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hfrecipes",
        allow_abbrev=False,
        description="Every stage of a language model's life on Transformers and TRL, with cost and cutoff recorded.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("recipes", help="list the bundled recipes")
    check = sub.add_parser("check", help="parse recipes strictly without running them")
    check.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe names or paths")
    check.add_argument(
        "--stage", choices=[*STAGES, "lifecycle"], help="stage to check against (default: from the path)"
    )
    exp = sub.add_parser("export", help="merge adapters, write a folder vLLM serves as is, verify it")
    exp.add_argument("stage_dir", help="a stage folder (full weights or a LoRA adapter)")
    exp.add_argument("out_dir", help="the folder to write (refused if it holds files, unless --force)")
    exp.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    exp.add_argument("--format", default="safetensors", help="safetensors (a vLLM folder) or gguf (llama.cpp, Ollama)")
    exp.add_argument("--quant", help="the GGUF file's type: f16, q8_0 (default) or q4_0")
    exp.add_argument("--force", action="store_true", help="replace an existing export folder")
    exp.add_argument("--no-verify", dest="verify", action="store_false", help="skip the reload/vLLM check")
    exp.add_argument("--no-vllm", dest="vllm", action="store_false", default=None, help="skip the vLLM check")
    exp.add_argument("--trust_remote_code", action="store_true")
    conv = sub.add_parser("convert", help="dequantize a GGUF file once into a model folder stages start from")
    conv.add_argument("gguf", metavar="FILE", help="a .gguf file")
    conv.add_argument("out_dir", help="the folder to write (refused if it holds files, unless --force)")
    conv.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    conv.add_argument("--base", help="YAML of the base model's published figures (default: the bundled table)")
    conv.add_argument("--force", action="store_true", help="replace an existing folder")
    gen = sub.add_parser("generate", help="batched generation (vLLM when installed, else transformers)")
    gen.add_argument("model_dir")
    gen.add_argument("--prompts", required=True, help="jsonl: rows with 'prompt' (text or messages) or 'messages'")
    gen.add_argument("--out", help="jsonl of prompts and completions (refused if it exists, unless --force)")
    gen.add_argument("--force", action="store_true", help="replace an existing --out file")
    gen.add_argument("--engine", default="auto", help="auto, vllm or transformers")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch_size", type=int, default=32, help="prompts per batch (transformers)")
    gen.add_argument("--price_per_hour", type=float, help="device price in $/h, for $ per million tokens")
    ev = sub.add_parser("eval", help="score a model folder with lm-evaluation-harness; contamination checked")
    ev.add_argument("model_dir", help="a stage or export folder (its record gets the results)")
    ev.add_argument("--tasks", default="", help=f"comma-separated lm-eval tasks (bundled: {','.join(BUNDLED_TASKS)})")
    ev.add_argument("--limit", type=int, help="score only the first N documents of each task")
    ev.add_argument("--num_fewshot", type=int, help="shots (default: each task's own)")
    ev.add_argument("--engine", default="auto", help="auto (vLLM where installed), vllm or transformers")
    ev.add_argument("--batch_size", type=int, default=32, help="requests per batch (transformers)")
    ev.add_argument("--include_path", help="a folder of your own lm-eval task YAML")
    ev.add_argument("--chat_template", choices=["auto", "yes", "no"], default="auto",
                    help="apply the tokenizer's chat template (auto: where it has one)")  # fmt: skip
    ev.add_argument("--ngram", type=int, default=13, help="n of the contamination check's word n-grams")
    ev.add_argument("--no-contamination", dest="contamination", action="store_false", help="skip the check")
    ev.add_argument("--probe", help="dated facts (a tiny: name or a jsonl of prompt, answer, choices, date)")
    ev.add_argument("--cutoff", help="the cutoff the probe splits at, YYYY-MM-DD (default: the record's)")
    ev.add_argument("--price_per_hour", type=float, help="device price in $/h (default: the device table's)")
    cost = sub.add_parser("cost", help="plan a run: training FLOPs, device-hours, dollars, serving cost, break-even")
    cost.add_argument("--params", type=float, required=True, help="parameters N, e.g. 7e9")
    cost.add_argument("--tokens", type=float, required=True, help="training tokens D, e.g. 2e12")
    cost.add_argument("--device", default="h100", help="row of the device table (h100, a100, l4, cpu, ...)")
    cost.add_argument("--num-devices", type=int, default=1, help="devices training in parallel (wall time)")
    cost.add_argument("--mfu", type=float, default=None, help="training utilisation of peak FLOP/s (default 0.4)")
    cost.add_argument("--price", type=float, default=None, help="USD per device-hour (default: the table's)")
    cost.add_argument("--power", type=float, default=None, help="watts per device (default: the table's)")
    cost.add_argument("--pue", type=float, default=None, help="data-centre PUE (default 1.2)")
    cost.add_argument("--grid", type=float, default=None, help="grid intensity in gCO2/kWh (default 475)")
    cost.add_argument("--n-layers", type=int, default=None, help="with --seq-len and --d-model: add attention FLOPs")
    cost.add_argument("--seq-len", type=int, default=None, help="training sequence length (attention term)")
    cost.add_argument("--d-model", type=int, default=None, help="hidden size (attention term)")
    cost.add_argument(
        "--serve-mfu", type=float, default=None, help="share of peak a prompt (prefill) reaches (default: --mfu)"
    )
    cost.add_argument(
        "--serve-tokens-per-second", type=float, default=None, help="measured output (decode) tokens/s per device"
    )
    cost.add_argument(
        "--serve-prefill-tokens-per-second", type=float, default=None, help="measured input (prefill) tokens/s"
    )
    cost.add_argument(
        "--kv-bytes-per-token", type=float, default=None, help="KV cache per token, sizes the decode batch estimate"
    )
    cost.add_argument("--context", type=int, default=None, help="tokens of context a sequence holds (default 4096)")
    cost.add_argument(
        "--daily-tokens", type=float, default=None, help="generated (output) tokens a day; = --daily-output-tokens"
    )
    cost.add_argument("--daily-input-tokens", type=float, default=None, help="prompt (input) tokens a day")
    cost.add_argument("--daily-output-tokens", type=float, default=None, help="generated (output) tokens a day")
    cost.add_argument("--json", action="store_true", help="print the plan as JSON")
    push = sub.add_parser("push", help="upload a finished stage folder to the Hugging Face Hub")
    push.add_argument("folder", metavar="STAGE_DIR", help="a finished stage folder")
    push.add_argument("--repo-id", required=True, help="the model repo, e.g. me/tiny-sft")
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    srv = sub.add_parser("serve", help="serve an export folder with vLLM's OpenAI-compatible server (foreground)")
    srv.add_argument("folder", metavar="EXPORT_DIR", help="a folder `hfrecipes export` wrote")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--served-model-name", help="the model name clients ask for (default: the folder's name)")
    srv.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server to answer")
    srv.add_argument("--log", help="file for the server's output (default: a temporary file)")
    life = sub.add_parser("lifecycle", help="run or resume a whole lifecycle (default: tiny/lifecycle)")
    life.add_argument("recipe", nargs="?", default="tiny/lifecycle", help="a lifecycle recipe name or path")
    life.add_argument("--run_dir", help="folder of the run (default: the recipe's run_dir, else runs/<name>)")
    life.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="rerun STAGE and everything downstream (repeatable)",
    )
    life.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a recipe key of one stage, or of every stage with '*' (repeatable)",
    )
    life.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="run the lifecycle N times, every stage's seed raised by 0..N-1 (the others in RUN_DIR/seeds/); the "
        "summary reports each stage's mean and min-max",
    )
    _plan_options(life, "every stage's")
    names = "ddp, fsdp2, zero2, zero3 (recipes/accelerate/) or a YAML path"
    acc = sub.add_parser("accelerate-config", help="print the path of a bundled accelerate config")
    acc.add_argument("name", help=names)
    launch = sub.add_parser(
        "launch",
        help="run a stage under `accelerate launch` with a bundled config: launch zero3 [FLAGS] -- dpo --config ...",
    )
    launch.add_argument("name", help=names)
    launch.add_argument("rest", nargs=argparse.REMAINDER, help="accelerate flags, then --, then the stage command")
    for stage in STAGES:
        sp = sub.add_parser(stage, help=describe(stage), add_help=False, allow_abbrev=False)
        sp.add_argument("--config", help="recipe: a bundled name (tiny/pretrain) or a YAML path")
        sp.add_argument("-h", "--help", action="store_true", help="list every recipe key of this stage")
        _plan_options(sp, "the stage's")
    return p


def _plan_options(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument(
        "--plan",
        action="store_true",
        help=f"print {whose} plan (tokens, FLOPs, time on this machine, dollars, energy; estimates) and exit: "
        "no weights loaded, nothing trained or written",
    )
    parser.add_argument(
        "--plan-utilisation",
        type=float,
        metavar="U",
        help="the share of this machine's measured matmul rate training reaches, for the plan's time (default: the "
        "device kind's, see hfrecipes/planning.py)",
    )


def _print_plan(plans: list[dict], total: dict | None = None, control: dict | None = None) -> None:
    from hfrecipes.report.planned import plan_text

    print(plan_text(plans, total, control))


def _check(names: list[str], stage: str | None) -> None:
    from hfrecipes.recipe import recipes_root, resolve_recipe, stage_of_recipe
    from hfrecipes.runner import parse_stage_args

    for name in names:
        path = resolve_recipe(name)
        st = stage
        if st is None:
            try:
                st = stage_of_recipe(path)
            except ValueError:
                st = Path(path).stem.split("_")[0]
        if st == "lifecycle":  # its own keys, its references, and every stage recipe with its overrides
            from hfrecipes.lifecycles.spec import load

            load(path)
        elif st not in STAGES:
            raise UsageError(f"{path}: cannot tell its stage (got '{st}'); pass --stage one of {list(STAGES)}.")
        else:
            parse_stage_args(st, path)
        print(f"ok  {st:<9} {path if not str(path).startswith(str(recipes_root())) else name}")


def accelerate_config(name: str) -> Path:
    """A bundled accelerate config by name (`zero3` -> recipes/accelerate/zero3.yaml), or a YAML path, checked with
    accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    from hfrecipes.recipe import recipes_root

    folder = recipes_root() / "accelerate"
    path = Path(name).expanduser()
    if not path.is_file():
        path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise UsageError(f"accelerate config '{name}' not found: it is neither a file nor one of {known}.")
    try:
        load_config_from_file(str(path))
    except Exception as e:  # accelerate raises bare ValueError/KeyError/TypeError on a bad config
        raise UsageError(f"{path}: not a valid accelerate config ({type(e).__name__}: {e}).") from None
    return path


def _launch(name: str, rest: list[str]) -> int:
    """`accelerate launch --config_file <config> [FLAGS] -m hfrecipes <stage command>`; returns its exit code."""
    import subprocess

    config = accelerate_config(name)
    cut = rest.index("--") if "--" in rest else -1  # argparse drops a '--' that directly follows the name
    flags, command = rest[: max(cut, 0)], rest[cut + 1 :]
    if not command or command[0] not in STAGES:
        raise UsageError(
            f"launch runs a stage after '--' (hfrecipes launch ddp --num_processes 2 -- sft --config tiny/sft): one "
            f"of {', '.join(STAGES)}; got {command[0] if command else 'nothing'}."
        )
    _check_launch(config, flags)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *flags]
    cmd += ["-m", "hfrecipes", *command]
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd).returncode


def _check_launch(config: Path, flags: list[str]) -> None:
    """The launch against this machine before any process starts: DeepSpeed installed for a ZeRO config, and no more
    processes per machine than it has GPUs (or CPU cores, without one)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from hfrecipes import engines

    loaded = load_config_from_file(str(config))

    def value(flag: str, default: int) -> int:
        for i, f in enumerate(flags):
            given = flags[i + 1] if f == flag and i + 1 < len(flags) else f.partition("=")[2]
            if f == flag or f.startswith(flag + "="):
                if not given.isdigit() or int(given) < 1:
                    raise UsageError(f"launch {flag} {given}: expected a whole number of 1 or more.")
                return int(given)
        return default

    if loaded.distributed_type.value == "DEEPSPEED" and not engines.deepspeed_installed():
        raise engines.deepspeed_missing(str(config))
    processes = value("--num_processes", loaded.num_processes or 1)
    machines = value("--num_machines", loaded.num_machines or 1)
    engines.check_processes(-(-processes // max(1, machines)), f"{config} with {processes} process(es)")


def _cost(args: argparse.Namespace) -> None:
    import json

    from hfrecipes.costs import plan
    from hfrecipes.report.format import format_plan

    names = {"price": "price_per_hour", "power": "power_watts", "grid": "grid_gco2_per_kwh"}
    options = {
        names.get(k, k): v
        for k, v in vars(args).items()
        if v is not None and k not in ("command", "debug", "params", "tokens", "device", "json")
    }
    result = plan(args.params, args.tokens, args.device, **options)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def eval_table(block: dict) -> str:
    """`hfrecipes eval`'s printout: one line a task, then the contamination check and the probe."""
    sets = (block.get("contamination") or {}).get("sets") or {}
    lines = [f"{'task':<28} {'metric':<12} {'value':>8} {'stderr':>8} {'n':>5} {'overlap':>8} {'clean':>8}"]
    for name, e in block["tasks"].items():
        c = sets.get(name) or {}

        def cell(x, pattern="{:.4f}"):
            return pattern.format(x) if isinstance(x, (int, float)) else "-"

        lines.append(
            f"{name:<28} {e['metric']:<12} {cell(e['value']):>8} {cell(e['stderr']):>8} "
            f"{cell(e['examples'], '{}'):>5} {cell(c.get('share'), '{:.1%}'):>8} {cell(c.get('clean_score')):>8}"
        )
    contamination = block.get("contamination")
    if contamination:
        for name, c in sets.items():
            if name not in block["tasks"]:
                lines.append(f"{name}: {c['contaminated']}/{c['items']} items overlap the training data")
        skipped = "; ".join(f"{u['stage']}: {u['why']}" for u in contamination.get("not_checked") or [])
        lines.append(
            f"contamination: {contamination['ngram']}-grams against {contamination['documents']} training documents "
            f"({', '.join(contamination['sources']) or 'none'}){f'; not checked: {skipped}' if skipped else ''}"
        )
    probe = block.get("probe")
    if probe:
        lines.append(
            f"knowledge probe ({probe['dataset']}, cutoff {probe['cutoff']}): {probe['before']['known']}/"
            f"{probe['before']['total']} facts known before, {probe['after']['known']}/{probe['after']['total']} after"
        )
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> int:
    """The server in the foreground until SIGTERM, SIGHUP or Ctrl-C, which stop it and everything it started."""
    import signal

    from hfrecipes.api import serve

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    options = {"served_model_name": args.served_model_name, "startup_timeout": args.startup_timeout, "log": args.log}
    try:
        with serve(args.folder, port=args.port, host=args.host, **options) as server:
            print(
                f"serving {args.folder} as '{server.model}' at {server.url} (OpenAI API), pid {server.pid}, log "
                f"{server.log_path}; Ctrl-C or SIGTERM stops it",
                flush=True,
            )
            code = server.wait()
            print(f"hfrecipes: error: {server.failure(f'exited with code {code}')}", file=sys.stderr)
            server.stop(keep_log=True)
            return 1
    except KeyboardInterrupt:
        print("server stopped", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = _parser()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "recipes":
            from hfrecipes.recipe import list_recipes

            print("\n".join(list_recipes()))
            return 0
        if args.command in ("check", "export", "convert", "generate", "cost", "push", "lifecycle", "serve") and rest:
            raise UsageError(f"unknown argument(s) for '{args.command}': {' '.join(rest)}")
        check_options(args)
        if args.command == "export":
            from hfrecipes.api import export

            result = export(
                args.stage_dir,
                args.out_dir,
                dtype=args.dtype,
                force=args.force,
                verify_load=args.verify,
                use_vllm=args.vllm,
                trust_remote_code=args.trust_remote_code,
                format=args.format,
                quant=args.quant,
            )
            verified = result.record["export"].get("verify", {})
            file = (result.record["export"].get("gguf") or {}).get("file")
            where = result.output_dir / file if file else result.output_dir
            print(f"exported {args.stage_dir} -> {where}; verify: {json.dumps(verified)}")
            return 0
        if args.command == "convert":
            from hfrecipes.api import convert

            result = convert(args.gguf, args.out_dir, dtype=args.dtype, base=args.base, force=args.force)
            base = result.record["base"]
            print(
                f"converted {args.gguf} ({result.record['gguf']['quantization']}, sha256 "
                f"{result.record['gguf']['sha256'][:12]}) -> {result.output_dir}; base model {base['name']}"
            )
            return 0
        if args.command == "generate":
            from hfrecipes.api import generate

            _, stats = generate(
                args.model_dir,
                args.prompts,
                args.out,
                engine=args.engine,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                n=args.n,
                seed=args.seed,
                batch_size=args.batch_size,
                price_per_hour=args.price_per_hour,
            )
            cost = stats["dollars_per_million_tokens"]
            print(
                f"{stats['engine']}: {stats['generated_tokens']} tokens for {stats['prompts']} prompts in "
                f"{stats['wall_seconds']:.2f} s = {stats['tokens_per_second']:.1f} tokens/s; "
                f"{stats['flops_per_token']:.3g} FLOPs/token" + (f"; ${cost:.4f} per 1M tokens" if cost else "")
            )
            return 0
        if args.command == "eval":
            from hfrecipes.api import evaluate

            block = evaluate(
                args.model_dir,
                tasks=[t for t in args.tasks.split(",") if t.strip()],
                limit=args.limit,
                num_fewshot=args.num_fewshot,
                engine=args.engine,
                batch_size=args.batch_size,
                include_path=args.include_path,
                chat_template={"auto": None, "yes": True, "no": False}[args.chat_template],
                ngram=args.ngram,
                contamination_check=args.contamination,
                probe=args.probe,
                cutoff=args.cutoff,
                price_per_hour=args.price_per_hour,
            )
            print(eval_table(block))
            return 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "lifecycle":
            from hfrecipes.api import lifecycle
            from hfrecipes.lifecycles.spec import parse_sets

            options = {"run_dir": args.run_dir, "force": args.force, "overrides": parse_sets(args.set)}
            if args.plan:
                planned = lifecycle(args.recipe, **options, plan=True, plan_utilisation=args.plan_utilisation)
                _print_plan(planned["stages"], planned["total"], planned["control"])
                return 0
            summary = lifecycle(args.recipe, **options, seeds=args.seeds, plan_utilisation=args.plan_utilisation)
            print((Path(summary["run_dir"]) / "summary.md").read_text())
            return 0
        if args.command == "accelerate-config":
            print(accelerate_config(args.name))
            return 0
        if args.command == "launch":
            return _launch(args.name, args.rest)
        if args.command == "check":
            _check(args.recipes, args.stage)
            return 0
        if args.command == "cost":
            _cost(args)
            return 0
        if args.command == "push":
            from hfrecipes.api import push

            result = push(args.folder, args.repo_id, private=args.private)
            state = "new commit" if result["changed"] else "unchanged, no new commit"
            print(f"pushed {args.folder} to {result['repo_id']} ({state}): {result['url']}")
            return 0
        if args.help:
            from hfrecipes.recipe import strict_parser
            from hfrecipes.stages import get_stage

            strict_parser(get_stage(args.command).DATACLASSES).print_help()
            print(
                "\n--plan: print the stage's plan (tokens, FLOPs, time on this machine, dollars, energy; estimates) "
                "and exit, loading no weights and writing nothing; --plan-utilisation U: the share of the measured "
                "matmul rate its time assumes."
            )
            return 0
        if args.config is None:
            raise UsageError(
                f"'{args.command}' needs --config: a bundled recipe (see `hfrecipes recipes`) or a YAML path."
            )
        if args.plan:
            from hfrecipes.runner import plan_stage

            _print_plan([plan_stage(args.command, args.config, cli_args=rest, utilisation=args.plan_utilisation)])
            return 0
        if args.plan_utilisation is not None:
            raise UsageError("--plan-utilisation sets the utilisation of a plan: use it with --plan.")
        from hfrecipes.engines import finish
        from hfrecipes.runner import run_stage

        result = run_stage(args.command, args.config, cli_args=rest)
        finish()
        print(f"{args.command} finished: {result.output_dir}")
        return 0
    except UsageError as e:
        if debug:
            raise
        print(f"hfrecipes: error: {e}", file=sys.stderr)
        return EXIT_USAGE
