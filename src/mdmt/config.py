"""Typed configuration: YAML mapped onto dataclasses. The one place defaults live."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mdmt.errors import ConfigError
from mdmt.validation import validate


@dataclass
class PluginRef:
    """A config entry naming a registered plug-in and its parameters: ``{name, params}`` or just the name.

    In a mapping keyed by name (``data.datasets``, ``strategies``) an empty ``name`` means the key.
    """

    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: PluginRef | str | dict[str, Any]) -> PluginRef:
        """A PluginRef from itself, a bare name or a ``{name, params}`` mapping."""
        if isinstance(value, PluginRef):
            return value
        if isinstance(value, str):
            return cls(value)
        return from_dict(cls, value, "plug-in entry")

    def named(self, key: str) -> PluginRef:
        """This entry with ``key`` as its name when it names none."""
        return self if self.name else PluginRef(key, dict(self.params))


def _ref(name: str, **params: Any) -> Any:
    return field(default_factory=lambda: PluginRef(name, dict(params)))


@dataclass
class DataConfig:
    """Where the datasets are and how images are preprocessed into the cache."""

    datasets: dict[str, PluginRef] = field(default_factory=dict)
    """The study's datasets: id → ``{name: aiforcovid | brixia | table | <plug-in>, params}``."""
    cache_dir: str = ".mdmt-cache"
    image_size: int = 256
    clip_percentiles: tuple[float, float] = (2.0, 98.0)
    crop: Literal["lungs", "lungs_classical", "none", "masks", "boxes"] = "lungs"
    """lungs: the learned lung segmenter (the classical localiser when it finds no plausible lungs);
    lungs_classical: the classical localiser only; none: the whole film; masks or boxes: your own."""
    crop_margin: float = 0.05
    masks_dir: str | None = None
    boxes_file: str | None = None
    skip_unreadable: bool = True
    max_drop_fraction: float = 0.1
    """``prepare`` fails when more than this share of a dataset's images is dropped or unreadable (1.0 allows any)."""
    qc: bool = False
    """``mdmt prepare`` also writes contact sheets (each film with its crop box) into ``<cache>/qc/``."""
    workers: int = 0


@dataclass
class AugmentConfig:
    """Training-time augmentation (shift, zoom, rotation, flip, elastic); each fires with probability ``p``."""

    enabled: bool = True
    p: float = 50 / 101
    shift: float = 0.10
    zoom: float = 0.10
    rotation: float = 10.0
    flip: bool = True
    elastic: bool = True
    elastic_alpha: tuple[float, float] = (20.0, 40.0)
    elastic_sigma: float = 7.0


@dataclass
class TaskConfig:
    """A further task read from a manifest column."""

    name: str = ""
    column: str = ""
    kind: Literal["classification", "regression"] = "classification"
    classes: list[str] = field(default_factory=list)
    dataset: str = ""


@dataclass
class ModelConfig:
    """Backbone, weights and heads."""

    backbone: PluginRef = _ref("resnet18")
    weights: str = "none"
    input_size: int = 256
    head: PluginRef = _ref("linear", dropout=0.5)
    """The head of every task that ``heads`` does not name."""
    heads: dict[str, PluginRef] = field(default_factory=lambda: {"prognosis": PluginRef("mlp", {"dropout": 0.5})})
    """Per-task heads (task name, or ``severity`` for ``severity_task``)."""
    severity_task: str = "severity_global4"
    """The task a strategy's ``severity`` stands for."""
    extra_tasks: list[TaskConfig] = field(default_factory=list)


@dataclass
class LossConfig:
    """Task losses and their weighting."""

    variant: Literal["paper", "clean"] = "clean"
    task_weights: dict[str, float] = field(default_factory=dict)
    weighting: PluginRef = _ref("fixed")


@dataclass
class TrainConfig:
    """Optimiser, schedule, selection and the engine's switches."""

    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 128
    max_epochs: int = 300
    warmup_epochs: int = 40
    early_stopping: int = 65
    scheduler_patience: int = 15
    scheduler_factor: float = 0.65
    min_lr: float = 1e-8
    mix: Literal["natural", "ratio"] = "natural"
    mix_ratio: float = 0.5
    num_workers: int = 0
    threads: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    checkpoint_every_s: float = 0.0
    """``last.pt`` (exact resume) after an epoch only when this many seconds have passed since the last one, and
    always after the last epoch; 0: after every epoch. A crash then replays at most that much training."""


@dataclass
class ProtocolConfig:
    """How the datasets are split into folds."""

    dataset: str = "aiforcovid"
    """The dataset whose folds define each protocol (LOCO's centers, the official split files); a run scores
    its tasks on its own test parts, and the other datasets follow with their CV fold (``paired_cv_fold`` for
    LOCO)."""
    cv_folds: int = 5
    loco_val_fraction: float = 0.1
    loco_centers: list[str] = field(default_factory=lambda: ["A", "D", "E", "F", "B", "C"])
    paired_cv_fold: int = 0
    official_splits_dir: str | None = None


@dataclass
class SlurmConfig:
    """``grid.backend: slurm``: one submitit job per run, with these resources."""

    partition: str | None = None
    time_minutes: int = 240
    """A job's time limit; a run cut off by it is a failed run that the next ``mdmt grid`` resumes."""
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    """CPUs of a job, and the torch threads of its run."""
    mem_gb: int = 32
    folder: str = "slurm"
    """The jobs' logs and submitit files, relative to ``results_dir`` (named by job id)."""
    executor: Literal["slurm", "local"] = "slurm"
    """``local``: each job a process on this machine (submitit's LocalExecutor), to try it without a cluster."""
    additional_parameters: dict[str, str] = field(default_factory=dict)
    """More ``#SBATCH`` options by name (``account``, ``qos``, ``constraint``, ...)."""


@dataclass
class GridConfig:
    """The study: backbones × strategies × protocols × folds × seeds."""

    backbones: list[PluginRef] = field(default_factory=lambda: [PluginRef("resnet18")])
    strategies: list[str] = field(default_factory=lambda: ["stl_prognosis", "stl_severity", "ft", "mdmt"])
    protocols: list[str] = field(default_factory=lambda: ["cv5", "loco"])
    folds: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    workers: int = 1
    backend: Literal["local", "ray", "slurm"] = "local"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class SynthConfig:
    """The built-in synthetic twin (``mdmt synth`` and the demo)."""

    out: str = "synthetic-data"
    preset: Literal["tiny", "small", "medium"] = "small"
    seed: int = 0
    decoupled: bool = False
    opacity: float | None = None
    image_size: int | None = None
    """Image side in px (before each device's size jitter); None: the preset's."""
    workers: int = 0
    """Processes that render the images (0: this one); the files are the same either way."""
    faults: list[str] = field(default_factory=list)
    cohort: bool = False
    """Also write a third dataset: a cohort from hospitals G and H as a manifest, with both labels."""
    overwrite: bool = False
    """``mdmt synth`` may write into a non-empty folder and replace a twin written with other parameters."""


@dataclass
class InferConfig:
    """``mdmt predict``, ``explain`` and ``export``: how new films, and their clinical sheet, are read."""

    batch_size: int = 16
    """Films per forward pass."""
    device: str = "cpu"
    """auto | cpu | cuda | cuda:N | mps."""
    clinical: str | None = None
    """A CSV or Excel sheet with one row per film: the clinical values a run whose model reads clinical columns
    needs (``mdmt.infer.clinical``)."""
    clinical_id: str = "ImageFile"
    """The sheet's column naming each row's film: its file name or stem (AIforCOVID's sheets: ImageFile)."""


@dataclass
class RunConfig:
    """Which single run ``mdmt train`` performs (the backbone is ``model.backbone``)."""

    strategy: str = "mdmt"
    protocol: str = "cv5"
    fold: int = 0
    rerun_changed: bool = False
    """Train again a run whose folder holds a run with other inputs (otherwise that is an error)."""


def _stage(summary: str, datasets: list[str], tasks: list[str], **more: Any) -> PluginRef:
    return PluginRef("train", {"summary": summary, "datasets": datasets, "tasks": tasks, **more})


PAPER_STRATEGIES: dict[str, PluginRef] = {
    "stl_prognosis": _stage("single task: prognosis on AIforCOVID", ["aiforcovid"], ["prognosis"]),
    "stl_severity": _stage("single task: severity on BrixIA", ["brixia"], ["severity"]),
    "ft": _stage("stl_severity's backbone fine-tuned on prognosis (fresh head)", ["aiforcovid"], ["prognosis"],
                 start_from=["stl_severity"]),
    "mdmt": _stage("multi-dataset multi-task: both datasets, both heads, one backbone pass",
                   ["aiforcovid", "brixia"], ["prognosis", "severity"]),
    "mdmt_permuted": _stage("control: MDMT with BrixIA's labels permuted among its training images",
                            ["aiforcovid", "brixia"], ["prognosis", "severity"], permute=["brixia"]),
}
"""The paper's strategies (and the permuted-label control) as data; configs may change or add entries."""


@dataclass
class Config:
    """Everything a run or a study needs."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    run: RunConfig = field(default_factory=RunConfig)
    strategies: dict[str, PluginRef] = field(default_factory=lambda: dict(PAPER_STRATEGIES))
    """Strategy name → ``{name: <strategy plug-in, default train>, params}``; ``grid.strategies`` picks from it."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    results_dir: str = "results"
    seed: int = 0
    plugins: list[str] = field(default_factory=list)
    """Python modules or ``.py`` files imported before anything is built: they register further datasets,
    backbones, heads, weightings or strategies."""


FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""Exponent notation without a dot, which YAML 1.1 leaves a string."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is PluginRef and isinstance(value, str):
        return PluginRef(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples become lists) for YAML."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=0.01`` → ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value: Any = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: the value is not valid YAML: {_yaml_problem(exc)}") from exc
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The short reason of a YAML error (without the file excerpt PyYAML adds)."""
    return (str(getattr(exc, "problem", None) or exc) or type(exc).__name__).splitlines()[0]


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error is a ConfigError ``<file>:<line>:<col>: YAML syntax error: <problem>``."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from exc


def load_config(path: str | Path | None = None, overrides: list[dict[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file, then each override mapping in order.

    ``strategies`` entries merge into the built-in ones (``PAPER_STRATEGIES``), so a config changes or adds
    strategies without restating the others. The result is checked against ``mdmt.validation.RULES``.
    """
    values: dict[str, Any] = {"strategies": {k: dataclasses.asdict(v) for k, v in PAPER_STRATEGIES.items()}}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists() else f"{path}: not a file")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        values = merge(values, loaded)
    for override in overrides or []:
        values = merge(values, override)
    config = from_dict(Config, values)
    validate(config)
    if config.plugins:
        from mdmt.plugins import load_plugins

        load_plugins(config.plugins)
    return config


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)
