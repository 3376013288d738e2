"""The stage record (`record.json`): what a stage saw, did and cost. Read, written atomically, chained to its parent.

`Record` is its schema: typed blocks (model, data, compute, metrics with one held-out block) that the card, the
lifecycle summary and `read_record` read. `hfrecipes.stagerun.StageRun` owns a record's life in a stage run (check
the folder, new record, mark the run, finish, write record and card, close); this module holds the pieces.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hfrecipes.errors import NonFiniteLoss, UsageError

RECORD = "record.json"
BASE = "base"  # a converted checkpoint's record: it trained nothing here, it describes the model's own past
MARKER = ".hfrecipes-run.json"
SCHEMA_VERSION = 2  # 2: metrics.heldout, one block for the stage's own held-out evaluation

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ schema


def _take(cls, raw: dict[str, Any] | None, where: str):
    """A block dataclass from its JSON dict: known fields by name, the rest kept in `extra` (a stage's own keys)."""
    if raw is not None and not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(raw).__name__}; the stage record is damaged.")
    raw = dict(raw or {})
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: raw.pop(k) for k in list(raw) if k in names}
    for f in fields(cls):
        kind = f.metadata.get("number")
        value = known.get(f.name)
        if kind and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{where}.{f.name}: expected a number, got {value!r}; the stage record is damaged.")
    return cls(**known, extra=raw)


def _number(default=None, summed: bool = False):
    """A numeric field; `summed`: a stage's share of a lineage total (the card and summary add it up over stages)."""
    return field(default=default, metadata={"number": True, "summed": summed})


def summed_fields(cls) -> tuple[str, ...]:
    """The fields of a block that a lineage total adds up over its stages."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("summed"))


@dataclass(frozen=True)
class Heldout:
    """The stage's own held-out evaluation: one named metric before and after training, on `examples` rows the
    stage never trained on. `detail` holds the other numbers of the same evaluation (per-key before/after)."""

    metric: str
    after: float | None = _number()
    before: float | None = _number()
    examples: int | None = _number()
    higher_is_better: bool = True
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[str, Any] | None, where: str) -> Heldout | None:
        if raw is None:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("metric"), str):
            raise UsageError(f"{where}: a held-out block needs a 'metric' name; the stage record is damaged.")
        names = {f.name for f in fields(cls)}
        for key in ("after", "before", "examples"):
            v = raw.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UsageError(f"{where}.{key}: expected a number, got {v!r}; the stage record is damaged.")
        detail = {**(raw.get("detail") or {}), **{k: v for k, v in raw.items() if k not in names}}
        return cls(**{k: v for k, v in raw.items() if k in names and k != "detail"}, detail=detail)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GoldBlock:
    """The gold check (`hfrecipes.gold`): every check's proxy reward and gold accuracy (`history`), the best check,
    a reward-hacking flag, why training stopped and whose weights were kept."""

    metric: str | None = None
    dataset: str | None = None
    split: str | None = None
    examples: int | None = _number()
    every: int | None = _number()
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    hacking: dict[str, Any] | None = None
    stopped: str | None = None
    kept_step: int | None = _number()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelBlock:
    architecture: str | None = None
    head: str | None = None  # a key of `modeling.HEADS`
    model_type: str | None = None
    source: str | None = None
    params_total: int | None = _number()
    params_trainable: int | None = _number()
    params_embedding: int | None = _number()
    dtype: str | None = None
    adapter: dict[str, Any] | None = None
    merged_adapter: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataBlock:
    datasets: list[dict[str, Any]] = field(default_factory=list)
    examples_seen: int | None = _number()
    tokens_seen: int | None = _number()
    epochs: float | None = _number()
    knowledge_cutoff: dict[str, Any] | None = None
    model_cutoff: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComputeBlock:
    """What a stage's training took and cost. The `summed` fields add up over a lineage: a new cost field declared
    so here, computed in `costs.stage_costs` and named in the card's template is on the card and in its totals.
    `flops_6nd` is the stage's FLOPs: 6·N·D, plus a distillation teacher's forward passes, which `flops_teacher`
    states alone."""

    flops_6nd: float | None = _number(summed=True)
    flops_trainer: float | None = _number()
    flops_teacher: float | None = _number()
    wall_seconds: float | None = _number(summed=True)
    device: dict[str, Any] | None = None
    distributed: dict[str, Any] | None = None
    device_hours: float | None = _number(summed=True)
    tokens_per_second: float | None = _number()
    cost_device: str | None = None
    price_per_hour: float | None = _number()
    price_source: str | None = None
    power_watts: float | None = _number()
    pue: float | None = _number()
    grid_gco2_per_kwh: float | None = _number()
    dollars: float | None = _number(summed=True)
    energy_kwh: float | None = _number(summed=True)
    co2_kg: float | None = _number(summed=True)
    co2_source: str | None = None
    mfu: float | None = _number()
    steady: dict[str, Any] | None = None
    precision: str | None = None
    kernels: dict[str, Any] | None = None
    estimate: bool = False  # published figures priced by the cost table (a converted base), not a run of ours
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsBlock:
    """Training counters every trained stage records, the held-out block, and the stage's own keys in `extra`."""

    steps: int | None = _number()
    train_loss: float | None = _number()
    first_logged_loss: float | None = _number()
    last_logged_loss: float | None = _number()
    heldout: Heldout | None = None
    gold: GoldBlock | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceBlock:
    """What `hfrecipes generate` measured on the folder (`inference.generate`): rates, the KV cache, the price and
    the traffic the card states the lifetime cost for. `serving` is `costs.serving`'s answer for those rates, as
    generation priced them; a record without it is priced from the rates by the same function."""

    engine: str | None = None
    prompts: int | None = _number()
    samples_per_prompt: int | None = _number()
    input_tokens: int | None = _number()
    generated_tokens: int | None = _number()
    wall_seconds: float | None = _number()
    tokens_per_second: float | None = _number()
    prefill_seconds: float | None = _number()
    prefill_tokens: int | None = _number()
    prefill_tokens_per_second: float | None = _number()
    decode_seconds: float | None = _number()
    decode_tokens_per_second: float | None = _number()
    params: int | None = _number()
    inference_flops: float | None = _number()
    flops_per_token: float | None = _number()
    device: dict[str, Any] | None = None
    price_per_hour: float | None = _number()
    dollars_per_million_tokens: float | None = _number()
    dollars_per_million_input_tokens: float | None = _number()
    dollars_per_million_output_tokens: float | None = _number()
    output_input_price_ratio: float | None = _number()
    kv_cache: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    traffic: dict[str, Any] | None = None
    serving: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportBlock:
    """What `hfrecipes export` wrote: the format, its dtype or GGUF file, generation settings, KV cache, the check."""

    format: str | None = None
    dtype: str | None = None
    model_name: str | None = None
    generation: dict[str, Any] | None = None
    gguf: dict[str, Any] | None = None
    kv_cache: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HubBlock:
    """Where `hfrecipes push` put the folder."""

    repo_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GGUFBlock:
    """The GGUF file a base record was converted from (`converting.convert`)."""

    file: str | None = None
    sha256: str | None = None
    bytes: int | None = _number()
    quantization: str | None = None
    tensor_types: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BaseBlock:
    """A converted base model's published facts and where each figure of its record came from."""

    name: str | None = None
    hub_id: str | None = None
    estimate: bool = False
    sources: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherBlock:
    """The frozen teacher a distillation stage learned from (`StageRun.describe_teacher`): its path or Hub id, its
    own record's run and stage where it has one, its architecture and size; its forward passes are in the compute
    block (`flops_teacher`)."""

    source: str | None = None
    run_id: str | None = None
    stage: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    params_total: int | None = _number()
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationBlock:
    """A stage's own evaluation of the task before and after training (GRPO's held-out replies)."""

    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationsBlock:
    """Benchmark scores from lm-evaluation-harness (`hfrecipes eval`): `tasks` maps a task (a group's parts too) to
    `metric`, `value`, `stderr`, `examples`, `shots`, `engine` and, on the task asked for, `seconds`, `tokens`,
    `inference_flops`, `dollars`; `contamination` (`harness.check_sets`): per evaluation set the share of items whose
    n-grams occur in the lineage's training data and the score on the clean ones; `probe`: the knowledge probe on
    dated facts, month by month."""

    engine: str | None = None
    model: str | None = None
    device: dict[str, Any] | None = None
    price_per_hour: float | None = _number()
    chat_template: bool | None = None
    tasks: dict[str, Any] = field(default_factory=dict)
    contamination: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistillationBlock:
    """What serving a distilled student costs beside its teacher (`hfrecipes lifecycle` with a `distillation` block,
    on the student's served export): both served by one engine on the same held-out prompts, their accuracy and
    prices, the stages that made the student and what they cost, and `payback` (`costs.distillation_payback`)."""

    teacher: str | None = None
    student: str | None = None
    engine: str | None = None
    teacher_accuracy: float | None = _number()
    student_accuracy: float | None = _number()
    teacher_params: int | None = _number()
    student_params: int | None = _number()
    teacher_serving: dict[str, Any] | None = None
    student_serving: dict[str, Any] | None = None
    cost_of: list[str] | None = None
    cost_flops: float | None = _number()
    payback: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanBlock:
    """The stage's plan, made before it ran with no weights loaded (`hfrecipes.planning`): every number an estimate,
    each beside how it was estimated (the `*_source` keys, kept in `extra`). The card and the lifecycle summary put
    the planned tokens, FLOPs, seconds, dollars and energy beside the record's measured ones."""

    estimate: bool = True
    params: int | None = _number()
    teacher_params: int | None = _number()
    steps: int | None = _number()
    examples_per_step: int | None = _number()
    tokens_per_example: float | None = _number()
    tokens: float | None = _number()
    flops: float | None = _number()
    seconds: float | None = _number()
    device_hours: float | None = _number()
    dollars: float | None = _number()
    energy_kwh: float | None = _number()
    co2_kg: float | None = _number()
    matmul_flops_per_second: float | None = _number()
    utilisation: float | None = _number()
    matmul: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


BLOCKS = {  # the blocks later steps add to a record, each typed
    "inference": InferenceBlock,
    "export": ExportBlock,
    "hub": HubBlock,
    "gguf": GGUFBlock,
    "base": BaseBlock,
    "evaluation": EvaluationBlock,
    "evaluations": EvaluationsBlock,
    "teacher": TeacherBlock,
    "distillation": DistillationBlock,
    "plan": PlanBlock,
}


@dataclass(frozen=True)
class Record:
    """A stage record as typed blocks; `Record.parse(json_dict)` checks it, `record.json` stays plain JSON."""

    stage: str
    run_id: str
    status: str
    schema: int = SCHEMA_VERSION
    started: str | None = None
    finished: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    model: ModelBlock = field(default_factory=ModelBlock)
    data: DataBlock = field(default_factory=DataBlock)
    compute: ComputeBlock = field(default_factory=ComputeBlock)
    metrics: MetricsBlock = field(default_factory=MetricsBlock)
    inference: InferenceBlock | None = None
    export: ExportBlock | None = None
    hub: HubBlock | None = None
    gguf: GGUFBlock | None = None
    base: BaseBlock | None = None
    evaluation: EvaluationBlock | None = None
    evaluations: EvaluationsBlock | None = None
    teacher: TeacherBlock | None = None
    distillation: DistillationBlock | None = None
    plan: PlanBlock | None = None
    parent: Record | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys no block names

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str = RECORD) -> Record:
        if not isinstance(raw, dict):
            raise UsageError(f"{where}: a stage record is a JSON object; this one is damaged.")
        missing = [k for k in ("stage", "run_id", "status") if k not in raw]
        if missing:
            raise UsageError(f"{where}: the stage record lacks {missing}; it is damaged or not an hfrecipes record.")
        if not isinstance(raw.get("schema", 1), int) or raw.get("schema", 1) > SCHEMA_VERSION:
            raise UsageError(
                f"{where}: record schema {raw.get('schema')!r} is newer than this hfrecipes reads "
                f"({SCHEMA_VERSION}); upgrade hfrecipes."
            )
        m = dict(raw.get("metrics") or {})
        heldout = Heldout.parse(m.pop("heldout", None), f"{where}: metrics.heldout")
        gold = m.pop("gold", None)
        gold = _take(GoldBlock, gold, f"{where}: metrics.gold") if gold is not None else None
        metrics = _take(MetricsBlock, m, f"{where}: metrics")
        top = {f.name for f in fields(cls)} - {"extra"}
        parent = raw.get("parent")
        return cls(
            stage=raw["stage"],
            run_id=raw["run_id"],
            status=raw["status"],
            schema=raw.get("schema", 1),
            started=raw.get("started"),
            finished=raw.get("finished"),
            recipe=raw.get("recipe") or {},
            versions=raw.get("versions") or {},
            model=_take(ModelBlock, raw.get("model"), f"{where}: model"),
            data=_take(DataBlock, raw.get("data"), f"{where}: data"),
            compute=_take(ComputeBlock, raw.get("compute"), f"{where}: compute"),
            metrics=MetricsBlock(**{**metrics.__dict__, "heldout": heldout, "gold": gold}),
            **{k: _take(b, raw[k], f"{where}: {k}") if raw.get(k) is not None else None for k, b in BLOCKS.items()},
            parent=cls.parse(parent, f"{where}: parent") if parent else None,
            extra={k: v for k, v in raw.items() if k not in top},
        )

    def lineage(self) -> list[Record]:
        """The chain of records from the first stage to this one."""
        chain, r = [], self
        while r is not None:
            chain.append(r)
            r = r.parent
        return chain[::-1]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_new_folder(out_dir: Path, force: bool, what: str) -> None:
    """A folder about to be written whole (`staged_folder`) must be new or empty, unless `force` replaces it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{what} '{out_dir}' is a file. Choose a folder.")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(
            f"{what} '{out_dir}' exists and holds files. Choose a new folder, or pass --force to replace it."
        )


@contextmanager
def staged_folder(out_dir: Path):
    """A temporary folder beside `out_dir` to write a whole model folder into. On success it takes `out_dir`'s place
    by a rename, so a reader sees the old folder or the complete new one; on any failure it is removed and `out_dir`
    is as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the model folder is not
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(folder: str | Path) -> tuple[dict[str, Any], Record] | None:
    """The record of a stage folder as its JSON dict and as the `Record` that checked it; None where there is none."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); the stage record is damaged.") from None
    return raw, Record.parse(raw, str(path))


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The record of a stage folder as its JSON dict (None where there is none), checked against `Record`."""
    found = _read(folder)
    return found[0] if found else None


def load_record(folder: str | Path) -> Record | None:
    """The record of a stage folder as a typed `Record` (None where there is none)."""
    found = _read(folder)
    return found[1] if found else None


def write_record(folder: str | Path, record: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / RECORD, json.dumps(record, indent=2, default=str) + "\n")


def is_complete(folder: str | Path) -> bool:
    rec = read_record(folder)
    return bool(rec and rec.get("status") == "complete")


def check_output_dir(output_dir: str | Path, stage: str) -> str | None:
    """Refuse a folder that holds anything but an interrupted run of this stage; say which checkpoint to resume.

    Returns the last checkpoint of an interrupted run of the same stage, or None for a new or empty folder. Writes
    nothing, so a refusal leaves the user's files as they were.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output_dir '{out}' is a file. Set output_dir to a new folder.")
    if not out.exists() or not any(out.iterdir()):
        return None
    if is_complete(out):
        raise UsageError(
            f"output_dir '{out}' already holds a finished stage. Set output_dir to a new folder, or delete it "
            "to train again."
        )
    marker = out / MARKER
    if not marker.is_file():
        raise UsageError(
            f"output_dir '{out}' exists and holds other files. Set output_dir to a new or empty folder; "
            "nothing in it was changed."
        )
    try:
        info = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise UsageError(
            f"{marker} is damaged, so '{out}' cannot be told apart from another run's folder. Set output_dir to a "
            "new folder, or delete the marker to resume this stage's checkpoints there."
        )
    if info.get("stage") != stage:
        raise UsageError(
            f"output_dir '{out}' holds an unfinished '{info.get('stage')}' run, not a '{stage}' run. "
            "Set output_dir to another folder."
        )
    return last_checkpoint(out)


def last_checkpoint(out: Path) -> str | None:
    """The newest complete `checkpoint-N` in a stage folder, or None; incomplete ones are named and skipped."""
    checkpoints = sorted(
        (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in checkpoints if checkpoint_is_complete(p)]
    for p in checkpoints:
        if p not in complete:
            logger.warning("%s is incomplete (killed while saving?): it is skipped on resume", p)
    return str(complete[-1]) if complete else None


def checkpoint_is_complete(folder: Path) -> bool:
    """Trainer writes a checkpoint file by file, `trainer_state.json` last: a kill during a save leaves a folder
    without it, or with a weights file cut short (its safetensors header no longer covers the file). Such a folder
    is skipped, so the previous checkpoint is resumed."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    for path in folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except (SafetensorError, OSError):
            return False
    return True


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("hfrecipes", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def device_info(world_size: int) -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        kind, name = "cuda", torch.cuda.get_device_name(0)
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        kind, name = "mps", "Apple MPS"
    else:
        kind, name = "cpu", platform.processor() or platform.machine()
    return {"kind": kind, "name": name, "count": world_size, "torch_threads": torch.get_num_threads()}


ENGINE_LABELS = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2",
                 "zero3": "DeepSpeed ZeRO-3"}  # fmt: skip


def engine_info(accelerator) -> dict[str, Any]:
    """How a stage ran: engine (single, ddp, fsdp1/fsdp2, zero0-zero3), processes, machines, backend and the ZeRO
    offload devices. Machines are the launcher's process groups (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE)."""
    import os

    state = accelerator.state
    world = int(state.num_processes)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ds = state.deepspeed_plugin
    fsdp = getattr(state, "fsdp_plugin", None) if str(state.distributed_type).endswith("FSDP") else None
    out: dict[str, Any] = {}
    if ds is not None:
        engine = f"zero{ds.zero_stage}"
        zero = ds.deepspeed_config.get("zero_optimization", {})
        out["offload_optimizer"] = (zero.get("offload_optimizer") or {}).get("device", "none")
        out["offload_param"] = (zero.get("offload_param") or {}).get("device", "none")
    elif fsdp is not None:
        engine = f"fsdp{fsdp.fsdp_version}"
    else:
        engine = "ddp" if world > 1 else "single"
    return {
        "engine": engine,
        "label": ENGINE_LABELS.get(engine, engine),
        "world_size": world,
        "machines": max(1, world // max(1, local)),
        "processes_per_machine": local,
        "backend": getattr(state, "backend", None),
        **out,
    }


def new_record(stage: str, recipe: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "run_id": uuid.uuid4().hex[:12],
        "status": "running",
        "started": now(),
        "finished": None,
        "recipe": recipe,
        "versions": versions(),
        "model": {},
        "data": {},
        "compute": {},
        "metrics": {},
        "parent": parent,
    }


def _numel(p) -> int:
    # a ZeRO-3 partitioned parameter is an empty placeholder; `ds_numel` is its whole size
    return getattr(p, "ds_numel", None) or p.numel()


def parameter_count(model, trainable_only: bool = False) -> int:
    """Parameters of `model`, whole even where ZeRO-3 holds only a partition on this process."""
    return sum(_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def model_summary(model, source: str, dtype: str | None = None) -> dict[str, Any]:
    total = parameter_count(model)
    trainable = parameter_count(model, trainable_only=True)
    embedding = _numel(model.get_input_embeddings().weight) if hasattr(model, "get_input_embeddings") else 0
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "source": source,
        "params_total": total,
        "params_trainable": trainable,
        "params_embedding": embedding,
        "dtype": dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        "adapter": None,
    }


def compute_summary(
    params: int,
    tokens: int,
    trainer_flos: float,
    wall_seconds: float,
    device: dict[str, Any],
    *,
    script_args: Any = None,
    measured_co2_kg: float | None = None,
    co2_failure: str | None = None,
    distributed: dict[str, Any] | None = None,
    steady: dict[str, Any] | None = None,
    precision: str | None = None,
    kernels: dict[str, Any] | None = None,
    teacher_params: int | None = None,
) -> dict[str, Any]:
    """FLOPs by 6*N*D (N = all parameters) beside the trainer's own count (which leaves out embeddings), then
    price, dollars, energy, CO2 and MFU from `costs.py` (the recipe's overrides in `script_args`, else the table's).
    A distillation teacher of `teacher_params` read the same D tokens, forward only: its 2·N_teacher·D is part of the
    stage's FLOPs (and so of its MFU), and stated alone as `flops_teacher`.

    Two rates: `tokens_per_second` and `mfu` over the whole wall time (what the stage cost), and `steady` (from
    `throughput.steady`: the steps after warm-up; what the hardware does once running), whose MFU scales the wall
    one by the ratio of the two rates, so both share one peak. `precision` and `kernels` say how it trained.
    """
    from hfrecipes.costs import stage_costs, teacher_forward_flops, training_flops

    teacher = teacher_forward_flops(teacher_params, tokens) if teacher_params else None
    flops = training_flops(params, tokens) + (teacher or 0.0)
    rate = tokens / wall_seconds if wall_seconds > 0 and tokens > 0 else None
    costs = stage_costs(flops, wall_seconds, device, script_args, measured_co2_kg, co2_failure)
    if steady is not None and steady.get("tokens_per_second") and rate and costs.get("mfu"):
        steady = {**steady, "mfu": costs["mfu"] * steady["tokens_per_second"] / rate}
    return {
        "flops_6nd": flops,
        "flops_trainer": float(trainer_flos),
        **({"flops_teacher": teacher} if teacher is not None else {}),
        "wall_seconds": round(wall_seconds, 3),
        "device": device,
        "distributed": distributed,
        "tokens_per_second": rate,
        "steady": steady,
        "precision": precision,
        "kernels": kernels,
        **costs,
    }


def lineage(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The chain of records from the first stage to this one."""
    chain = []
    while record:
        chain.append(record)
        record = record.get("parent")
    return chain[::-1]


def metrics_callback(output_dir: str | Path):
    """A trainer callback that appends every log to `metrics.jsonl` (main process only)."""
    from transformers import TrainerCallback

    path = Path(output_dir) / "metrics.jsonl"

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return MetricsCallback()


def finite_loss_callback(output_dir: str | Path):
    """A trainer callback that stops the stage when a logged loss is nan or inf, or, before a checkpoint is saved,
    when a trainable weight is: the last good checkpoint stays the newest, and no final model or record is written.
    Every rank sees the same (gathered) logs, so every rank stops."""
    from transformers import TrainerCallback

    out = Path(output_dir)

    def stop(step: int, what: str):
        good = last_checkpoint(out)
        kept = f"the last good checkpoint, {good}, is kept" if good else "no checkpoint was saved before it"
        raise NonFiniteLoss(
            f"{what} at step {step}: training stopped; {kept}, and no final model or record was written. Lower "
            "learning_rate, set max_grad_norm, or check the data; rerunning the same command resumes from the "
            "last checkpoint."
        )

    class FiniteLossCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    stop(state.global_step, f"the training loss is {value}")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and model is not None:
                import torch

                if any(not torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
                    stop(state.global_step, "a trainable weight is nan or inf")

    return FiniteLossCallback()


def dataset_entry(name: str, split: str, raw, prepared=None) -> dict[str, Any]:
    """One dataset as the record lists it: name, split, fingerprint, rows (and rows after preparation)."""
    entry = {"name": name, "split": split, "fingerprint": getattr(raw, "_fingerprint", None), "rows": len(raw)}
    if prepared is not None:
        entry["rows_prepared"] = len(prepared)
    return entry


def logged(trainer, key: str) -> list[float]:
    """Every training-time value of `key` the trainer logged, in order (evaluation logs left out)."""
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def drop_pickles(folder: str | Path) -> None:
    """Trainer pickles its arguments next to the model; the record holds them as JSON, so a stage folder stays
    pickle-free (loading a pickle can run code)."""
    (Path(folder) / "training_args.bin").unlink(missing_ok=True)
