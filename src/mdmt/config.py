"""Typed configuration: YAML mapped onto dataclasses. The one place defaults live, with each field's check and flag.

(Over 400 lines on purpose: every section, with its defaults, checks and flags, is here so that a default lives in
one place.)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mdmt.errors import ConfigError
from mdmt.validation import (
    AT_LEAST_ONE,
    DEVICE,
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    Check,
    Interval,
    each,
    ordered_pair,
    validate,
    within,
)


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            check: Check | None = None, flag: str | None = None, help: str = "") -> Any:
    """A config field that declares what its value may be (``check``, read by ``mdmt.validation.validate``) and,
    for the commands that expose it, its command-line ``flag`` and ``help`` (``mdmt.cli`` builds the option)."""
    metadata = {name: value for name, value in (("check", check), ("flag", flag), ("help", help)) if value}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
    cache_dir: str = setting(".mdmt-cache", flag="--cache-dir", help="where preprocessed image caches live")
    image_size: int = setting(256, check=AT_LEAST_ONE, flag="--image-size",
                              help="side of the cached square images (px)")
    clip_percentiles: tuple[float, float] = setting((2.0, 98.0), check=ordered_pair(Interval(0, 100), strict=True))
    crop: Literal["lungs", "lungs_classical", "none", "masks", "boxes"] = setting(
        "lungs", flag="--crop", help="lungs: the learned lung segmenter (the classical localiser when it finds no "
        "plausible lungs); lungs_classical: the classical localiser only; none: the whole film; masks or boxes: "
        "your own (data.masks_dir, data.boxes_file)")
    crop_margin: float = setting(0.05, check=within(Interval(0, 0.5, high_open=True)))
    masks_dir: str | None = None
    boxes_file: str | None = None
    skip_unreadable: bool = True
    max_drop_fraction: float = setting(0.1, check=FRACTION)
    """``prepare`` fails when more than this share of a dataset's images is dropped or unreadable (1.0 allows any)."""
    qc: bool = setting(False, flag="--qc", help="also write contact sheets (each film with its crop box) into "
                       "<cache>/qc/")


@dataclass
class AugmentConfig:
    """Training-time augmentation (shift, zoom, rotation, flip, elastic; gamma and contrast, off by default); each fires
    with probability ``p``."""

    enabled: bool = True
    p: float = setting(50 / 101, check=FRACTION)
    shift: float = setting(0.10, check=NON_NEGATIVE)
    zoom: float = setting(0.10, check=within(Interval(0, 1, high_open=True)))
    rotation: float = setting(10.0, check=within(Interval(0, 180)))
    flip: bool = True
    elastic: bool = True
    elastic_alpha: tuple[float, float] = setting((20.0, 40.0), check=ordered_pair(Interval(0), strict=False))
    elastic_sigma: float = setting(7.0, check=POSITIVE)
    gamma: float = setting(0.0, check=NON_NEGATIVE)
    """Intensity: ``x ** g`` with ``log g ~ U(-log(1 + gamma), log(1 + gamma))``; 0: off (the paper has none)."""
    contrast: float = setting(0.0, check=within(Interval(0, 1, high_open=True)))
    """Intensity: ``m + c (x - m)`` about the image's mean ``m``, ``c ~ U(1 - contrast, 1 + contrast)``, clipped to
    [0, 1]; 0: off."""


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

    backbone: PluginRef = setting(factory=lambda: PluginRef("resnet18"), flag="--backbone",
                                  help="backbone name (mdmt info lists them)")
    weights: str = setting("none", flag="--weights", help="none | imagenet | path to a local state_dict")
    input_size: int = setting(256, check=AT_LEAST_ONE)
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
    task_weights: dict[str, float] = setting(factory=dict, check=each(NON_NEGATIVE))
    weighting: PluginRef = _ref("fixed")


@dataclass
class TrainConfig:
    """Optimiser, schedule, selection and the engine's switches."""

    lr: float = setting(1e-3, check=POSITIVE)
    weight_decay: float = setting(1e-5, check=NON_NEGATIVE)
    batch_size: int = setting(128, check=AT_LEAST_ONE, flag="--batch-size", help="images per training batch")
    max_epochs: int = setting(300, check=AT_LEAST_ONE, flag="--epochs", help="maximum epochs")
    warmup_epochs: int = setting(40, check=NON_NEGATIVE)
    early_stopping: int = setting(65, check=NON_NEGATIVE)
    scheduler_patience: int = setting(15, check=NON_NEGATIVE)
    scheduler_factor: float = setting(0.65, check=OPEN_FRACTION)
    min_lr: float = setting(1e-8, check=NON_NEGATIVE)
    mix: Literal["natural", "ratio"] = "natural"
    mix_ratio: float = setting(0.5, check=FRACTION)
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    checkpoint_every_s: float = setting(0.0, check=NON_NEGATIVE)
    """``last.pt`` (exact resume) after an epoch only when this many seconds have passed since the last one, and
    always after the last epoch; 0: after every epoch. A crash then replays at most that much training."""
    phase_timing: bool = True
    """Split each epoch's time into phases in ``history.csv`` (``data_s``, ``forward_s``, ...); off: those columns are
    left out (``seconds`` stays). The results are the same either way."""
    callbacks: list[PluginRef] = setting(factory=list, check=each(Check(lambda ref, config: bool(ref.name),
                                                                         "a {name, params} entry naming a callback")))
    """Callbacks of ``mdmt.train.callbacks.CALLBACKS`` the engine calls during training: ``[{name: tensorboard}]``,
    ``[{name: mlflow, params: {tracking_uri: ...}}]``, or a plug-in's."""


@dataclass
class ProtocolConfig:
    """How the datasets are split into folds."""

    dataset: str = "aiforcovid"
    """The dataset whose folds define each protocol (LOCO's centers, the official split files); a run scores
    its tasks on its own test parts, and the other datasets follow with their CV fold (``paired_cv_fold`` for
    LOCO)."""
    cv_folds: int = setting(5, check=within(Interval(3)))
    loco_val_fraction: float = setting(0.1, check=OPEN_FRACTION)
    loco_centers: list[str] = field(default_factory=lambda: ["A", "D", "E", "F", "B", "C"])
    paired_cv_fold: int = setting(0, check=Check(lambda fold, config: 0 <= fold < config.protocol.cv_folds,
                                                 "a fold index >= 0 and < protocol.cv_folds"))
    official_splits_dir: str | None = None
    calibration_fraction: float = setting(0.0, check=within(Interval(0, 1, high_open=True)))
    """Share of each fold's validation patients (seeded, stratified as the split, duplicates kept together) moved
    into a ``calib`` part that never trains or selects the epoch: calibration, the decision threshold and the
    conformal sets are fitted on it. 0: no such part, and they are fitted on the validation part that chose the
    epoch (whose scores are optimistically low, so the sets under-cover a little)."""


@dataclass
class SlurmConfig:
    """``grid.backend: slurm``: one submitit job per run, with these resources."""

    partition: str | None = None
    time_minutes: int = setting(240, check=AT_LEAST_ONE)
    """A job's time limit; a run cut off by it is a failed run that the next ``mdmt grid`` resumes."""
    gpus_per_run: int = setting(1, check=NON_NEGATIVE)
    cpus_per_run: int = setting(8, check=AT_LEAST_ONE)
    """CPUs of a job, and the torch threads of its run."""
    mem_gb: int = setting(32, check=AT_LEAST_ONE)
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
    folds: list[int] | None = setting(None, check=each(NON_NEGATIVE))
    seeds: list[int] = setting(factory=lambda: [0], check=each(NON_NEGATIVE))
    workers: int = setting(1, check=AT_LEAST_ONE, flag="--workers",
                           help="runs at once (local processes; Ray tasks or SLURM jobs in flight)")
    backend: Literal["local", "ray", "slurm"] = setting("local", flag="--backend", help="where the runs train")
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class SynthConfig:
    """The built-in synthetic twin (``mdmt synth`` and the demo)."""

    out: str = "synthetic-data"
    preset: Literal["tiny", "small", "medium"] = setting("small", flag="--preset", help="the twin's size")
    seed: int | None = setting(None, check=NON_NEGATIVE, flag="--synth-seed",
                               help="the twin's generator seed (unset: the config's seed)")
    decoupled: bool = setting(False, flag="--decoupled",
                              help="prognosis independent of severity (negative control)")
    opacity: float | None = setting(None, check=NON_NEGATIVE, flag="--opacity",
                                    help="opacity strength (unset: the preset's)")
    image_size: int | None = setting(None, check=within(Interval(32)))
    """Image side in px (before each device's size jitter); None: the preset's."""
    faults: list[str] = setting(factory=list, flag="--fault", help="inject a fault (repeatable)")
    cohort: bool = False
    """Also write a third dataset: a cohort from hospitals G and H as a manifest, with both labels."""
    overwrite: bool = setting(False, flag="--overwrite",
                              help="write into a non-empty folder, or replace a twin written with other parameters")


@dataclass
class CalibrationConfig:
    """What each run fits on its validation rows after training (``mdmt.evaluate.calibration``); changing it
    needs no retraining: ``mdmt report --recalibrate`` fits every finished run again from its prediction files with
    the section given (``--rescore`` alone keeps each run's own)."""

    method: Literal["temperature", "platt"] = "temperature"
    """How P(class 1) of a two-class head is calibrated: one temperature, or Platt's temperature and bias."""
    threshold: Literal["prevalence", "youden", "sensitivity"] = "prevalence"
    """The decision threshold on the calibrated probability: ``prevalence`` (where a logistic fit on the validation
    rows puts P(class 1) at their share of class 1: Youden's J's maximiser for a calibrated model, estimated from
    every row), ``youden`` (the empirical ROC's best J), or ``sensitivity`` (the highest reaching
    ``target_sensitivity``)."""
    target_sensitivity: float = setting(0.9, check=within(Interval(0, 1, low_open=True)))
    alpha: float = setting(0.1, check=OPEN_FRACTION)
    """Split-conformal miscoverage: prediction sets and intervals cover the truth with probability >= 1 - alpha."""


@dataclass
class InferConfig:
    """``mdmt predict``, ``explain`` and ``export``: how new films, and their clinical sheet, are read."""

    batch_size: int = setting(16, check=AT_LEAST_ONE, flag="--batch-size", help="films per forward pass")
    clinical: str | None = setting(None, flag="--clinical", help="a CSV or Excel sheet with one row per film: the "
                                   "clinical values a run whose model reads clinical columns needs")
    clinical_id: str = setting("ImageFile", flag="--clinical-id", help="the sheet's column naming each row's film "
                               "by file name or stem (AIforCOVID's sheets: ImageFile)")
    explain_map: Literal["gradcam", "gradcam++", "hirescam", "layercam", "xgradcam", "occlusion"] = setting(
        "gradcam", flag="--map", help="explain's evidence map: gradcam (Grad-CAM), gradcam++, hirescam, layercam or "
        "xgradcam (the grad-cam package's variants, of the layer --cam-layer names), or occlusion (how far the head "
        "falls when a patch is blurred; 225 forward passes per batch; benchmarks/RESULTS.md compares them on real "
        "films)")
    cam_layer: str = setting("", flag="--cam-layer", help="the backbone module a Grad-CAM map weighs, as a dotted "
                             "name (tiny_cnn's first block: features.2); empty: the last convolutional stage")


@dataclass
class RunConfig:
    """Which single run ``mdmt train`` performs (the backbone is ``model.backbone``)."""

    strategy: str = setting("mdmt", flag="--strategy", help="a strategy of the config (mdmt info lists them)")
    protocol: str = setting("cv5", flag="--protocol", help="cv5 | loco | official-cv5 | official-loco")
    fold: int = setting(0, check=NON_NEGATIVE, flag="--fold", help="fold index")
    rerun_changed: bool = setting(False, flag="--rerun-changed", help="train again a run whose folder holds one "
                                  "with other inputs (otherwise that is an error)")


@dataclass
class RuntimeConfig:
    """How this machine works, for every command: the device, and the processes and threads it uses. None of it
    is a run input (``mdmt.runs.RUNTIME_KEYS``): a run may resume with other values."""

    device: str = setting("auto", check=DEVICE, flag="--device",
                          help="where networks train and infer (auto: CUDA when available, else the CPU)")
    workers: int = setting(0, check=NON_NEGATIVE, flag="--data-workers",
                           help="processes that decode and crop the films into the image cache and render the "
                           "synthetic twin (0: this one); the files are the same either way")
    loader_workers: int = setting(0, check=NON_NEGATIVE, flag="--loader-workers",
                                  help="DataLoader processes of each training run (0: the run's own)")
    threads: int = setting(0, check=NON_NEGATIVE, flag="--threads",
                           help="torch threads of each process (0: the grid gives each run cores / grid.workers, "
                           "a single process keeps torch's default)")


@dataclass
class ReportConfig:
    """``mdmt report``: the task its tables and tests are about and where it writes (its results folder:
    ``results_dir``)."""

    task: str = setting("prognosis", flag="--task", help="the task the tables and tests are about")
    out: str | None = setting(None, flag="--out", help="report folder (unset: <results_dir>/report)")
    rescore: bool = setting(False, flag="--rescore",
                            help="recompute every run's metrics from its prediction files first")
    recalibrate: bool = setting(False, flag="--recalibrate",
                                help="rescore (--rescore) with every finished run's calibration fitted again with "
                                "this config's calibration section (no retraining), and record that section in the "
                                "run's config.yaml and model card (--rescore alone keeps each run's own)")


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
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    results_dir: str = setting("results", flag="--results-dir", help="where run folders are written")
    seed: int = setting(0, check=NON_NEGATIVE, flag="--seed", help="the seed of the run mdmt train trains, and "
                        "of the synthetic twin unless synth.seed is set")
    plugins: list[str] = field(default_factory=list)
    """Python modules or ``.py`` files imported before anything is built: they register further datasets,
    backbones, heads, weightings or strategies."""


RENAMED: dict[str, str] = {
    "data.workers": "runtime.workers",
    "synth.workers": "runtime.workers",
    "train.num_workers": "runtime.loader_workers",
    "train.threads": "runtime.threads",
    "train.device": "runtime.device",
    "infer.device": "runtime.device",
}
"""Keys that moved into the ``runtime`` section: a config that still uses one is an error naming its new key."""


def config_fields(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """``(dotted key, field, type)`` of every field of ``cls``, descending into its sections (a ``PluginRef`` is
    one value)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp) and tp is not PluginRef:
            yield from config_fields(tp, f"{key}.")
        else:
            yield key, f, tp


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


def check_layer(values: dict[str, Any], source: str) -> None:
    """ConfigError naming ``source`` when one layer of a config (a file, a ``--set``) uses a renamed key or holds a
    value of the wrong type. Each layer is checked before the layers merge: a later layer that replaces a section
    (``--set train=5`` then ``--epochs 3``) would otherwise hide the bad value."""
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(values.get(section), dict) and key in values[section]:
            raise ConfigError(f"{source}: {old} is now {new} (the runtime section holds the machine's settings)")
    try:
        from_dict(Config, values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=0.01`` → ``{"train": {"lr": 0.01}}`` (the value is parsed as YAML and checked: ``check_layer``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value: Any = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: the value is not valid YAML: {_yaml_problem(exc)}") from exc
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    check_layer(value, f"--set {text}")
    return value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The short reason of a YAML error (without the file excerpt PyYAML adds)."""
    return (str(getattr(exc, "problem", None) or exc) or type(exc).__name__).splitlines()[0]


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML was built with it: the same documents, parsed about 10× faster (a run reads
its config.yaml three times)."""


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error is a ConfigError ``<file>:<line>:<col>: YAML syntax error: <problem>``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from exc
    try:
        return yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError:
        pass  # parsed again below by the pure-Python loader, whose messages are the ones users and tests know
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from exc


def load_run_config(path: str | Path) -> Config:
    """The ``config.yaml`` of a run folder, as any mdmt since the run contract wrote it: keys that moved into
    ``runtime`` are dropped (they were the training machine's settings, not the run's), and a strategy's
    ``image: false`` is read as ``estimator: clinical_logistic``."""
    path = Path(path)
    values = read_yaml(path) if path.is_file() else None
    if not isinstance(values, dict):
        return load_config(path)  # the usual errors: missing, not a file, not a mapping
    for old in RENAMED:
        section, key = old.split(".")
        if isinstance(values.get(section), dict):
            values[section].pop(key, None)
    for entry in (values.get("strategies") or {}).values():
        params = entry.get("params") if isinstance(entry, dict) else None
        if isinstance(params, dict) and "image" in params:
            params.setdefault("estimator", "network" if params.pop("image") else "clinical_logistic")
    return load_config(None, [values])


def load_config(path: str | Path | None = None, overrides: list[dict[str, Any]] | None = None) -> Config:
    """Defaults, then the YAML file, then each override mapping in order, each checked before it merges
    (``check_layer``).

    ``strategies`` entries merge into the built-in ones (``PAPER_STRATEGIES``), so a config changes or adds
    strategies without restating the others. An unset ``synth.seed`` becomes ``seed``. The result is checked
    against the checks its fields declare (``mdmt.validation.validate``).
    """
    values: dict[str, Any] = {"strategies": {k: dataclasses.asdict(v) for k, v in PAPER_STRATEGIES.items()}}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" if not path.exists() else f"{path}: not a file")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        check_layer(loaded, str(path))
        values = merge(values, loaded)
    for number, override in enumerate(overrides or [], 1):
        check_layer(override, f"override {number}")
        values = merge(values, override)
    config = from_dict(Config, values)
    if config.synth.seed is None:
        config.synth.seed = config.seed
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
