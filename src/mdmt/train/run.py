"""One run end to end: splits → loaders → strategy init → ``fit`` → test predictions and metrics → DONE.

A run is a pure function of (config, RunSpec). Its directory holds ``config.yaml``, ``spec.json``,
``history.csv``, ``best.pt``, ``last.pt``, ``predictions_<task>.csv``, ``metrics.json`` and, written last,
``DONE``. Running it again returns at once when DONE exists and resumes from ``last.pt`` otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from mdmt.config import Config, RunConfig, load_config, save_config, to_dict
from mdmt.data import splits as split_files
from mdmt.data.augment import BatchAugmenter
from mdmt.data.cache import ImageCache, prepare
from mdmt.data.dataset import CachedImageDataset, MixedBatchSampler, MultiSourceDataset, make_loader
from mdmt.data.splits import Split
from mdmt.errors import ConfigError, DataError
from mdmt.evaluate import metrics as evaluation
from mdmt.losses import build_weighting, decode, prediction_columns
from mdmt.models.multitask import build_model
from mdmt.tasks import GLOBAL_BIN_EDGES, Task, bin_scores, get_task, make_task
from mdmt.train.distributed import (
    SINGLE,
    DistContext,
    ShardedBatchSampler,
    barrier,
    check_weighting,
    init_distributed,
    shutdown,
)
from mdmt.train.engine import (
    BEST_CHECKPOINT,
    atomic_write_text,
    fit,
    load_model_state,
    predict,
    resolve_device,
    seed_everything,
)
from mdmt.train.strategies import (
    AIFORCOVID,
    BRIXIA,
    SEVERITY_CV_PROTOCOLS,
    Strategy,
    get_strategy,
    permute_severity_labels,
    severity_pairing,
)

DONE_FILE = "DONE"
CONFIG_FILE = "config.yaml"
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
SEVERITY_STRATUM = "severity_global4"
"""Column added to the BrixIA records to stratify its folds (the paper's 4 bins of the global score)."""
RUNTIME_KEYS = {
    "data": ("aiforcovid_root", "brixia_root", "cache_dir", "workers", "manifests"),
    "train": ("num_workers", "threads", "device", "compile"),
}
"""Keys that may change between a run and its resumption (paths and machine settings)."""

console = Console()


@dataclass(frozen=True)
class RunSpec:
    """Which run: strategy × backbone × protocol × fold × seed."""

    strategy: str
    backbone: str
    protocol: str
    fold: int
    seed: int

    @property
    def key(self) -> str:
        """``strategy/backbone/protocol/fold/seed``."""
        return f"{self.strategy}/{self.backbone}/{self.protocol}/{self.fold}/{self.seed}"

    def run_dir(self, results_dir: str | Path) -> Path:
        """``<results_dir>/runs/<strategy>/<backbone>/<protocol>/fold<fold>/seed<seed>``."""
        runs = Path(results_dir) / "runs"
        return runs / self.strategy / self.backbone / self.protocol / f"fold{self.fold}" / f"seed{self.seed}"


# --------------------------------------------------------------------------------------------- splits
def loco_centers(config: Config, records: pd.DataFrame) -> list[str]:
    """LOCO fold order: the configured centers present in ``records``, then any other center, sorted."""
    present = set(records["center"].astype(str))
    listed = [c for c in config.protocol.loco_centers if c in present]
    return listed + sorted(present - set(listed))


def _official_dir(config: Config) -> Path:
    if not config.protocol.official_splits_dir:
        raise ConfigError("protocol.official_splits_dir must be set for the official-cv5 / official-loco protocols")
    return Path(config.protocol.official_splits_dir)


def folds_for(protocol: str, config: Config, records: pd.DataFrame) -> list[int]:
    """The fold indices of ``protocol`` (``records``: the AIforCOVID records, for LOCO's centers)."""
    if protocol == "cv5":
        return list(range(config.protocol.cv_folds))
    if protocol == "loco":
        return list(range(len(loco_centers(config, records))))
    if protocol in ("official-cv5", "official-loco"):
        return list(range(len(split_files.official_splits(_official_dir(config), protocol, AIFORCOVID))))
    raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(SEVERITY_CV_PROTOCOLS)}")


def _pick(folds: list[Split], fold: int, what: str) -> Split:
    if not 0 <= fold < len(folds):
        raise ConfigError(f"{what}: fold {fold} does not exist (folds 0..{len(folds) - 1})")
    return folds[fold]


def _aiforcovid_split(config: Config, records: pd.DataFrame, protocol: str, fold: int, seed: int) -> Split:
    if protocol == "cv5":
        folds = split_files.kfold_splits(records, k=config.protocol.cv_folds, seed=seed, label="prognosis")
    elif protocol == "loco":
        folds = split_files.loco_splits(records, centers=loco_centers(config, records),
                                   val_fraction=config.protocol.loco_val_fraction, seed=seed)
    else:
        folds = split_files.official_splits(_official_dir(config), protocol, AIFORCOVID)
    return _pick(folds, fold, f"AIforCOVID {protocol}")


def _brixia_split(config: Config, records: pd.DataFrame, protocol: str, fold: int, seed: int) -> Split:
    if protocol == "cv5":
        stratum = bin_scores(records["brixia_global"].to_numpy(), GLOBAL_BIN_EDGES)
        labelled = records.assign(**{SEVERITY_STRATUM: stratum})
        folds = split_files.kfold_splits(labelled, k=config.protocol.cv_folds, seed=seed, label=SEVERITY_STRATUM,
                                    group="patient_id")
    else:
        folds = split_files.official_splits(_official_dir(config), protocol, BRIXIA)
    split = _pick(folds, fold, f"BrixIA {protocol}")
    split.check(records)  # patient level (Subject): the official files are image-level
    return split


def build_splits(
    config: Config, caches: dict[str, ImageCache], protocol: str, fold: int, seed: int | None = None
) -> dict[str, Split]:
    """The AIforCOVID split of (protocol, fold) and its paired BrixIA CV split, for the datasets in ``caches``.

    ``seed`` (default ``config.seed``) shuffles the generated folds; official split files ignore it.
    """
    seed = config.seed if seed is None else seed
    out: dict[str, Split] = {}
    if AIFORCOVID in caches:
        out[AIFORCOVID] = _aiforcovid_split(config, caches[AIFORCOVID].records, protocol, fold, seed)
    if BRIXIA in caches:
        brixia_protocol, brixia_fold = severity_pairing(protocol, fold, config)
        out[BRIXIA] = _brixia_split(config, caches[BRIXIA].records, brixia_protocol, brixia_fold, seed)
    return out


# --------------------------------------------------------------------------------------------- data
def rows_of(records: pd.DataFrame, ids: Any, what: str) -> np.ndarray:
    """Row numbers of ``ids`` in ``records``; ids missing from the cache are reported by id."""
    index = pd.Index(records["image_id"].astype(str))
    wanted = pd.Index(pd.Series(ids, dtype=str))
    positions = index.get_indexer(wanted)
    missing = wanted[positions < 0]
    if len(missing):
        console.print(f"[yellow]{what}: {len(missing)} split id(s) not in the image cache (unreadable or dropped), "
                      f"left out: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}")
    return np.sort(positions[positions >= 0])


@dataclass
class RunData:
    """The loaders of one run: training (mixed), validation (all sources), test (one per source)."""

    train: DataLoader
    val: DataLoader
    test: dict[str, DataLoader]


def _source_rows(
    caches: dict[str, ImageCache], splits: dict[str, Split], sources: tuple[str, ...], part: str
) -> dict[str, np.ndarray]:
    out = {}
    for source in sources:
        if source not in caches:
            raise ConfigError(f"dataset {source!r} is not configured (set data.{source}_root)")
        out[source] = rows_of(caches[source].records, getattr(splits[source], part), f"{source} {part}")
        if len(out[source]) == 0:
            raise DataError(f"{source}: the {part} split of this fold is empty")
    return out


def build_data(
    config: Config, strategy: Strategy, caches: dict[str, ImageCache], splits: dict[str, Split], tasks: list[Task],
    seed: int, ctx: DistContext = SINGLE,
) -> RunData:
    """Training loader (datasets mixed per ``train.mix``, this rank's shard), validation and test loaders.

    With ``train.permute_severity_labels`` the BrixIA training images carry each other's labels (the negative
    control of shared/docs/synthetic-calibration.md); validation and test keep the true ones.
    """
    sources = strategy.sources
    train_rows = _source_rows(caches, splits, sources, "train")
    train_caches = dict(caches)
    if config.train.permute_severity_labels and BRIXIA in sources:
        brixia = caches[BRIXIA]
        train_caches[BRIXIA] = dataclasses.replace(
            brixia, records=permute_severity_labels(brixia.records, train_rows[BRIXIA], seed)
        )
    train_sets = [CachedImageDataset(train_caches[s], train_rows[s], tasks) for s in sources]
    sampler = MixedBatchSampler([len(d) for d in train_sets], config.train.batch_size, config.train.mix,
                                config.train.mix_ratio, seed)
    if ctx.enabled:
        sampler = ShardedBatchSampler(sampler, ctx)
    train = make_loader(MultiSourceDataset(train_sets), config.train, seed=seed, batch_sampler=sampler)
    val_rows = _source_rows(caches, splits, sources, "val")
    val = make_loader(MultiSourceDataset([CachedImageDataset(caches[s], val_rows[s], tasks) for s in sources]),
                      config.train)
    test = {source: make_loader(CachedImageDataset(caches[source], rows, tasks), config.train)
            for source, rows in _source_rows(caches, splits, sources, "test").items()}
    return RunData(train, val, test)


# --------------------------------------------------------------------------------------------- evaluation
def prediction_table(
    task: Task, records: pd.DataFrame, targets: np.ndarray, decoded: dict[str, np.ndarray], fold: int
) -> pd.DataFrame:
    """One row per image: ids, center, dataset, ``fold`` (the run's), ``y_true`` column(s), ``decode``'s columns."""
    table = records[["image_id", "patient_id", "center", "dataset"]].reset_index(drop=True).assign(fold=fold)
    for j, name in enumerate(prediction_columns("y_true", task)):
        table[name] = targets[:, j] if task.kind == "regression" else targets[:, j].astype(np.int64)
    for name, values in decoded.items():
        table[name] = np.asarray(values)
    return table


def metrics_of(task: Task, table: pd.DataFrame) -> dict[str, float]:
    """``mdmt.evaluate.metrics`` on one task's prediction table (binary tasks from their scores)."""
    truth = table[prediction_columns("y_true", task)].to_numpy()
    predicted = table[prediction_columns("y_pred", task)].to_numpy()
    if task.kind == "classification" and task.n_classes == 2 and task.target_dim == 1:
        return evaluation.prognosis_metrics(truth[:, 0], table["score"].to_numpy())
    if task.name in evaluation.SEVERITY_KIND_OF_TASK:
        return evaluation.severity_metrics(evaluation.SEVERITY_KIND_OF_TASK[task.name], truth, predicted)
    if task.kind == "regression":
        return evaluation.regression_metrics(truth.ravel(), predicted.ravel())
    return evaluation.classification_metrics(truth.ravel(), predicted.ravel(), task.n_classes)


def evaluate_test(
    model: torch.nn.Module, tasks: list[Task], data: RunData, caches: dict[str, ImageCache], config: Config,
    spec: RunSpec, run_dir: Path,
) -> dict[str, dict[str, float]]:
    """Predictions on each test set for the tasks its dataset labels → ``predictions_<task>.csv``; the metrics."""
    device = resolve_device(config.train.device)
    metrics: dict[str, dict[str, float]] = {}
    for source, loader in data.test.items():
        outputs, rows = predict(model, loader, device, config.model.input_size)
        records = caches[source].records.iloc[rows].reset_index(drop=True)
        for task in tasks:
            targets, present = task.encode(records)
            if not present.any():
                continue
            decoded = decode(task, outputs[task.name][torch.from_numpy(present)])
            table = prediction_table(task, records[present], targets[present], decoded, spec.fold)
            atomic_write_text(table.to_csv(index=False), run_dir / f"predictions_{task.name}.csv")
            metrics[task.name] = metrics_of(task, table)
    return metrics


# --------------------------------------------------------------------------------------------- the run
def run_tasks(strategy: Strategy, config: Config) -> list[Task]:
    """The strategy's tasks, then each ``model.extra_tasks`` head whose dataset the strategy trains on."""
    unknown = [t.name for t in config.model.extra_tasks if t.dataset not in (AIFORCOVID, BRIXIA)]
    if unknown:
        raise ConfigError(f"model.extra_tasks {unknown}: dataset must be {AIFORCOVID!r} or {BRIXIA!r}")
    extra = [
        make_task(t.name, t.column, t.kind, t.classes) for t in config.model.extra_tasks if t.dataset in strategy.sources
    ]
    return [get_task(name) for name in strategy.task_names(config)] + extra


def resolved_config(config: Config, spec: RunSpec) -> Config:
    """``config`` with the spec written into it (backbone, run section, seed): what the run directory records."""
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, backbone=spec.backbone),
        run=RunConfig(strategy=spec.strategy, protocol=spec.protocol, fold=spec.fold),
        seed=spec.seed,
    )


def _fingerprint(config: Config) -> dict[str, Any]:
    values = to_dict(config)
    for section in ("grid", "synth"):
        values.pop(section, None)
    values.pop("results_dir", None)
    for section, keys in RUNTIME_KEYS.items():
        for key in keys:
            values[section].pop(key, None)
    return values


def _check_same_run(config: Config, run_dir: Path) -> None:
    """Refuse to resume a run directory trained under a different config."""
    saved = run_dir / CONFIG_FILE
    if saved.is_file() and _fingerprint(load_config(saved)) != _fingerprint(config):
        raise ConfigError(f"{run_dir} holds an unfinished run with a different config ({saved}); "
                          f"delete the folder or use another results_dir")


def _check_spec(spec: RunSpec, strategy: Strategy, config: Config) -> None:
    if config.train.curriculum:
        raise ConfigError("train.curriculum is not implemented (method.md §11 is not part of the paper)")
    if BRIXIA in strategy.sources and AIFORCOVID not in strategy.sources:
        paired = severity_pairing(spec.protocol, spec.fold, config)
        if paired != (spec.protocol, spec.fold):
            raise ConfigError(f"{spec.strategy} runs on BrixIA CV folds only: use protocol {paired[0]} "
                              f"(run {spec.key} would duplicate fold {paired[1]})")


def train_run(config: Config, spec: RunSpec, progress: bool = True) -> Path:
    """Run ``spec`` end to end under ``config.results_dir`` and return its run directory.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; training is data-parallel and rank 0 writes.
    """
    results_dir = Path(config.results_dir)
    run_dir = spec.run_dir(results_dir)
    if (run_dir / DONE_FILE).is_file():
        return run_dir
    strategy = get_strategy(spec.strategy)
    _check_spec(spec, strategy, config)
    missing = [d.key for d in strategy.dependencies(spec, config) if not (d.run_dir(results_dir) / DONE_FILE).is_file()]
    if missing:
        raise ConfigError(f"run {spec.key} starts from run(s) that are not finished: {', '.join(missing)}")
    config = resolved_config(config, spec)
    ctx, device = init_distributed(config.train.device)
    try:
        check_weighting(config.loss.weighting, ctx)
        _train(config, spec, strategy, run_dir, ctx, device, progress and ctx.is_main)
    finally:
        shutdown(ctx)
    return run_dir


def _train(
    config: Config, spec: RunSpec, strategy: Strategy, run_dir: Path, ctx: DistContext, device: torch.device | None,
    progress: bool,
) -> None:
    """Caches → splits → loaders → model → strategy init → fit → test predictions, metrics, DONE."""
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_same_run(config, run_dir)
        save_config(config, run_dir / CONFIG_FILE)
        atomic_write_text(json.dumps(dataclasses.asdict(spec), indent=2), run_dir / SPEC_FILE)
        caches = prepare(config, progress=progress)  # rank 0 builds the caches; the others then open them
    barrier(ctx)
    if not ctx.is_main:
        caches = prepare(config, progress=False)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    seed_everything(spec.seed)
    splits = build_splits(config, caches, spec.protocol, spec.fold, spec.seed)
    tasks = run_tasks(strategy, config)
    data = build_data(config, strategy, caches, splits, tasks, spec.seed, ctx)
    model = build_model(config.model, tasks)
    strategy.init(model, spec, config, Path(config.results_dir))
    fit(
        model, tasks, data.train, data.val, dataclasses.replace(config.train, max_epochs=strategy.max_epochs(config)),
        BatchAugmenter(config.augment, tasks) if config.augment.enabled else None,
        build_weighting(config.loss.weighting, tasks, config.loss, seed=spec.seed),
        run_dir, strategy.select_task(config), progress,
        loss_variant=config.loss.variant, seed=spec.seed, input_size=config.model.input_size, description=spec.key,
        dist=ctx, device=device,
    )
    if ctx.is_main:
        model.load_state_dict(load_model_state(run_dir, BEST_CHECKPOINT))
        metrics = evaluate_test(model, tasks, data, caches, config, spec, run_dir)
        atomic_write_text(json.dumps(metrics, indent=2, sort_keys=True), run_dir / METRICS_FILE)
        atomic_write_text("done\n", run_dir / DONE_FILE)
    barrier(ctx)
