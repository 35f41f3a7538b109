"""One run end to end: datasets → splits → loaders → strategy start → ``fit`` → test predictions → scores → DONE.

A run is a pure function of (config, RunSpec) and its inputs. Its folder (``mdmt.runs``) records the inputs
(``inputs.json``: the config that shapes the result, each dataset's cache key, the split ids); a finished or
interrupted run whose inputs differ from the request is never reused: it is refused with what changed, or
trained again from scratch with ``run.rerun_changed``. Metrics are computed by ``mdmt.evaluate.scoring`` from
the prediction files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from mdmt.clinical import ClinicalEncoder, check_columns, fit_logit_term
from mdmt.config import Config, PluginRef, save_config, to_dict
from mdmt.data.augment import BatchAugmenter
from mdmt.data.cache import ImageCache, open_cache
from mdmt.data.dataset import CachedImageDataset, MixedBatchSampler, MultiSourceDataset, make_loader
from mdmt.data.datasets import Dataset, build_splits, empty_parts, prepare, select, split_ids
from mdmt.data.splits import Split
from mdmt.errors import ConfigError, DataError
from mdmt.evaluate.scoring import task_entry, write_metrics
from mdmt.losses import build_weighting, decode
from mdmt.models.multitask import build_model, check_input_size
from mdmt.runs import (
    CONFIG_FILE,
    DONE_FILE,
    FAILED_FILE,
    INPUTS_FILE,
    MISSING_IDS_FILE,
    SPEC_FILE,
    TASKS_FILE,
    RunSpec,
    atomic_write_text,
    predictions_file,
    write_json,
)
from mdmt.tasks import Task, get_task, make_task, prediction_columns
from mdmt.train.checkpoints import load_model_state, seed_everything
from mdmt.train.distributed import (
    SINGLE,
    DistContext,
    ShardedBatchSampler,
    barrier,
    check_weighting,
    init_distributed,
    shutdown,
)
from mdmt.train.engine import BEST_CHECKPOINT, fit, predict, resolve_device
from mdmt.train.strategies import Strategy, get_strategy, permute_labels

RUNTIME_KEYS = {
    "data": ("cache_dir", "workers"),
    "train": ("num_workers", "threads", "device", "compile", "checkpoint_every_s"),
}
"""Keys that may change between a run and its resumption (where things are, machine settings)."""
console = Console()


# --------------------------------------------------------------------------------------------- data
def rows_of(records: pd.DataFrame, ids: Any, what: str) -> np.ndarray:
    """Row numbers of ``ids`` in ``records``; ids missing from the cache are reported by id."""
    index = pd.Index(records["image_id"].astype(str))
    wanted = pd.Index(pd.Series(ids, dtype=str))
    positions = index.get_indexer(wanted)
    missing = wanted[positions < 0]
    if len(missing):
        console.print(f"{what}: {len(missing)} split id(s) not in the image cache (unreadable or dropped), "
                      f"left out: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}", style="yellow",
                      markup=False, highlight=False, soft_wrap=True)
    return np.sort(positions[positions >= 0])


@dataclass
class RunData:
    """The loaders of one run: training (mixed), validation (all datasets), test (one per dataset)."""

    train: DataLoader
    val: DataLoader
    test: dict[str, DataLoader]


def _rows(caches: dict[str, ImageCache], splits: dict[str, Split], part: str) -> dict[str, np.ndarray]:
    out = {name: rows_of(cache.records, getattr(splits[name], part), f"{name} {part}")
           for name, cache in caches.items()}
    empty = [name for name, rows in out.items() if len(rows) == 0]
    if empty:
        raise DataError(f"the {part} part of this fold is empty for dataset(s) {', '.join(empty)}")
    return out


def build_data(
    config: Config, strategy: Strategy, datasets: dict[str, Dataset], caches: dict[str, ImageCache],
    splits: dict[str, Split], tasks: list[Task], seed: int, ctx: DistContext = SINGLE,
    clinical: dict[str, np.ndarray] | None = None,
) -> RunData:
    """Training loader (datasets mixed per ``train.mix``, this rank's shard), validation and test loaders.

    Datasets in the strategy's ``permute`` have their label columns permuted among their training images.
    ``clinical`` (dataset → encoded features of every cache row) adds ``clinical`` to the items.
    """
    features = clinical or {}
    train_rows = _rows(caches, splits, "train")
    train_caches = dict(caches)
    for name in strategy.stage.permute:
        records = permute_labels(caches[name].records, train_rows[name], datasets[name].label_columns, seed)
        train_caches[name] = dataclasses.replace(caches[name], records=records)
    train_sets = [CachedImageDataset(train_caches[name], train_rows[name], tasks, clinical=features.get(name))
                  for name in caches]
    sampler = MixedBatchSampler([len(d) for d in train_sets], config.train.batch_size, config.train.mix,
                                config.train.mix_ratio, seed)
    if ctx.enabled:
        sampler = ShardedBatchSampler(sampler, ctx)
    train = make_loader(MultiSourceDataset(train_sets), config.train, seed=seed, batch_sampler=sampler)
    val_rows = _rows(caches, splits, "val")
    val = make_loader(MultiSourceDataset([CachedImageDataset(caches[n], val_rows[n], tasks, clinical=features.get(n))
                                          for n in caches]), config.train)
    test = {name: make_loader(CachedImageDataset(caches[name], rows, tasks, clinical=features.get(name)), config.train)
            for name, rows in _rows(caches, splits, "test").items()}
    return RunData(train, val, test)


# --------------------------------------------------------------------------------------------- tasks
def run_tasks(strategy: Strategy, config: Config, datasets: dict[str, Dataset]) -> list[Task]:
    """The strategy's tasks, then each ``model.extra_tasks`` head whose dataset the strategy trains on."""
    unknown = [t.name for t in config.model.extra_tasks if t.dataset not in config.data.datasets]
    if unknown:
        raise ConfigError(f"model.extra_tasks {unknown}: dataset must be one of data.datasets "
                          f"({', '.join(config.data.datasets)})")
    extra = [make_task(t.name, t.column, t.kind, t.classes) for t in config.model.extra_tasks if t.dataset in datasets]
    tasks = [get_task(name) for name in strategy.task_names(config)] + extra
    for task in tasks:
        if not any(d.labels_task(task.columns) or task in extra for d in datasets.values()):
            raise ConfigError(f"strategies.{strategy.name}: no dataset of {list(datasets)} labels task "
                              f"{task.name!r} (it reads {list(task.columns)})")
    return tasks


def labelling(task: Task, datasets: dict[str, Dataset], config: Config) -> tuple[list[str], str]:
    """The run's datasets labelling ``task`` and its home dataset (the first of them in ``data.datasets`` order)."""
    extra = {t.name: t.dataset for t in config.model.extra_tasks}
    names = [n for n in config.data.datasets if n in datasets
             and (extra.get(task.name) == n or (task.name not in extra and datasets[n].labels_task(task.columns)))]
    return names, names[0]


# --------------------------------------------------------------------------------------------- clinical data
@dataclass
class ClinicalInputs:
    """A run's fitted clinical encoder, its features per dataset (zeros where a dataset has no clinical sheet), and
    per fused task (a two-class task of the first dataset) the logistic regression's logit term ``(weight, bias)``,
    all fitted on the training fold."""

    home: str
    encoder: ClinicalEncoder
    features: dict[str, np.ndarray]
    terms: dict[str, tuple[np.ndarray, np.ndarray]]


def _two_class(task: Task) -> bool:
    return task.kind == "classification" and task.n_classes == 2 and task.groups == 1


def clinical_inputs(
    strategy: Strategy, datasets: dict[str, Dataset], caches: Mapping[str, ImageCache], splits: dict[str, Split],
    tasks: list[Task], seed: int,
) -> ClinicalInputs | None:
    """The strategy's clinical columns encoded with an encoder fitted on the training fold of its first dataset, and
    a logistic regression on them per two-class task that dataset labels, fitted on the same fold."""
    if not strategy.stage.clinical:
        return None
    home = strategy.datasets[0]
    records = caches[home].records
    check_columns(records, strategy.stage.clinical, home)
    train = rows_of(records, splits[home].train, f"{home} train")
    encoder = ClinicalEncoder(list(strategy.stage.clinical)).fit(records.iloc[train])
    features = {name: encoder.transform(cache.records) if name == home
                else np.zeros((len(cache.records), encoder.dim), dtype=np.float32) for name, cache in caches.items()}
    fused = [t for t in tasks if datasets[home].labels_task(t.columns) and _two_class(t)]
    if not fused:
        raise ConfigError(f"strategies.{strategy.name}.params.clinical: the clinical term is added to two-class "
                          f"heads of {home}'s tasks, and {[t.name for t in tasks]} has none")
    terms = {}
    for task in fused:
        targets, present = task.encode(records.iloc[train])
        terms[task.name] = fit_logit_term(features[home][train][present], targets[present, 0].astype(int), seed)
    return ClinicalInputs(home, encoder, features, terms)


def write_clinical_only(
    clinical: ClinicalInputs, task: Task, caches: Mapping[str, ImageCache], splits: dict[str, Split], spec: RunSpec,
    run_dir: Path,
) -> None:
    """The clinical-only baseline: the logistic regression fitted on the training fold, its test predictions."""
    if task.name not in clinical.terms:
        raise ConfigError(f"strategies.{spec.strategy}: the clinical-only baseline predicts one two-class task, "
                          f"not {task.name!r}")
    weight, bias = clinical.terms[task.name]
    records = caches[clinical.home].records
    test = rows_of(records, splits[clinical.home].test, f"{clinical.home} test")
    test_records = records.iloc[test].reset_index(drop=True)
    targets, present = task.encode(test_records)
    outputs = torch.from_numpy(clinical.features[clinical.home][test][present].astype(np.float64) @ weight.T + bias)
    table = prediction_table(task, test_records[present], targets[present], decode(task, outputs), spec.fold)
    atomic_write_text(table.to_csv(index=False), run_dir / predictions_file(task.name))


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


def write_predictions(
    model: torch.nn.Module, tasks: list[Task], data: RunData, caches: dict[str, ImageCache], config: Config,
    spec: RunSpec, run_dir: Path,
) -> None:
    """``predictions_<task>.csv``: every test image of every dataset that labels the task."""
    device = resolve_device(config.train.device)
    tables: dict[str, list[pd.DataFrame]] = {task.name: [] for task in tasks}
    for source, loader in data.test.items():
        outputs, rows = predict(model, loader, device, config.model.input_size)
        records = caches[source].records.iloc[rows].reset_index(drop=True)
        for task in tasks:
            targets, present = task.encode(records)
            if present.any():
                decoded = decode(task, outputs[task.name][torch.from_numpy(present)])
                tables[task.name].append(prediction_table(task, records[present], targets[present], decoded,
                                                          spec.fold))
    for name, parts in tables.items():
        if parts:
            atomic_write_text(pd.concat(parts, ignore_index=True).to_csv(index=False), run_dir / predictions_file(name))


def missing_split_ids(splits: dict[str, Split]) -> pd.DataFrame:
    """dataset, part, image_id of every id a split file lists that the cache does not hold."""
    rows = [(name, part, image_id) for name, split in splits.items()
            for part, ids in split.missing.items() for image_id in ids]
    return pd.DataFrame(rows, columns=["dataset", "part", "image_id"])


# --------------------------------------------------------------------------------------------- inputs
def resolved_config(config: Config, spec: RunSpec) -> Config:
    """``config`` with the spec written into it (backbone, run section, seed): what the run folder records."""
    backbone = next((b for b in map(PluginRef.of, config.grid.backbones) if b.name == spec.backbone),
                    PluginRef.of(config.model.backbone))
    if backbone.name != spec.backbone:
        backbone = PluginRef(spec.backbone)
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, backbone=backbone),
        run=dataclasses.replace(config.run, strategy=spec.strategy, protocol=spec.protocol, fold=spec.fold),
        seed=spec.seed,
    )


def fingerprint(config: Config) -> dict[str, Any]:
    """The config keys a run's result depends on (not where things are, not machine settings)."""
    values = to_dict(config)
    for section in ("grid", "synth", "infer", "results_dir", "plugins"):
        values.pop(section, None)
    values["run"].pop("rerun_changed", None)
    values["data"].pop("datasets", None)  # the data enter through the cache keys and split ids
    for section, keys in RUNTIME_KEYS.items():
        for key in keys:
            values[section].pop(key, None)
    return values


def run_inputs(config: Config, caches: dict[str, ImageCache], splits: dict[str, Split]) -> dict[str, Any]:
    """What the run's result depends on: the config fingerprint, each cache key, a hash of each split's ids."""
    ids = split_ids(splits)
    return {
        "config": fingerprint(config),
        "caches": {name: cache.key for name, cache in caches.items()},
        "splits": {name: hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
                   for name, parts in ids.items()},
    }


def changed_inputs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of what differs between two ``run_inputs`` (config keys, ``caches.<dataset>``, ``splits.…``)."""

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in walk(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return walk(saved, current, "")


def _saved_inputs(run_dir: Path) -> dict[str, Any] | str | None:
    """The inputs a run folder records; None without ``inputs.json``, the reason when it cannot be read."""
    path = run_dir / INPUTS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return saved if isinstance(saved, dict) else f"not a JSON object: {type(saved).__name__}"


def check_inputs(run_dir: Path, inputs: dict[str, Any], rerun: bool) -> bool:
    """Whether ``run_dir`` is finished with the same inputs. A run folder with other inputs is refused (ConfigError
    naming what changed) or, with ``rerun``, emptied so the run trains again from scratch."""
    saved = _saved_inputs(run_dir)
    if saved is None:
        if (run_dir / DONE_FILE).is_file():
            raise ConfigError(f"{run_dir} is finished but records no {INPUTS_FILE} (made by an older mdmt): delete "
                              f"it or use another results_dir")
        return False
    changed = [] if isinstance(saved, str) else changed_inputs(saved, inputs)
    if not changed and not isinstance(saved, str):
        return (run_dir / DONE_FILE).is_file()
    state = "a finished" if (run_dir / DONE_FILE).is_file() else "an unfinished"
    if not rerun:
        again = "use --rerun-changed (run.rerun_changed) to train it again, or another results_dir"
        if isinstance(saved, str):
            raise ConfigError(f"{run_dir / INPUTS_FILE}: unreadable ({saved}), so {state} run's inputs are unknown; "
                              f"{again}")
        shown = ", ".join(changed[:8]) + (" …" if len(changed) > 8 else "")
        raise ConfigError(f"{run_dir} holds {state} run with other inputs ({shown} changed); {again}")
    shutil.rmtree(run_dir)
    return False


# --------------------------------------------------------------------------------------------- the run
@functools.lru_cache(maxsize=16)
def open_cache_once(path: str) -> ImageCache:
    """``open_cache`` once per process (a cache folder's name holds its key, so its content never changes)."""
    return open_cache(path)


def train_run(config: Config, spec: RunSpec, progress: bool = True, caches: Mapping[str, str] | None = None) -> Path:
    """Run ``spec`` end to end under ``config.results_dir`` and return its run folder.

    ``caches`` (dataset → cache folder, as the grid built them) skips preparing the datasets again; a process
    opens each cache folder once. Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; training is
    data-parallel and rank 0 writes.
    A run that raises once it has written its folder leaves ``FAILED`` with the error there; a run refused before
    (bad config, changed inputs, unreadable starting checkpoint) writes nothing.
    """
    results_dir = Path(config.results_dir)
    run_dir = spec.run_dir(results_dir)
    strategy = get_strategy(spec.strategy, config)
    strategy.check(spec, config)
    missing = [d.key for d in strategy.dependencies(spec, config)
               if not (d.run_dir(results_dir) / DONE_FILE).is_file()]
    if missing:
        raise ConfigError(f"run {spec.key} starts from run(s) that are not finished: {', '.join(missing)}")
    config = resolved_config(config, spec)
    ctx, device = init_distributed(config.train.device)
    try:
        check_weighting(PluginRef.of(config.loss.weighting).name, ctx)
        _train(config, spec, strategy, run_dir, ctx, device, progress and ctx.is_main, caches)
    finally:
        shutdown(ctx)
    return run_dir


@contextlib.contextmanager
def _failure_recorded(run_dir: Path, ctx: DistContext) -> Iterator[None]:
    """Write ``FAILED`` with the error when the block raises (a refused run, stopped before, leaves the folder be)."""
    try:
        yield
    except Exception as exc:
        if ctx.is_main and run_dir.is_dir() and not (run_dir / DONE_FILE).is_file():
            with contextlib.suppress(OSError):  # a full or read-only disk: the error itself is what to report
                atomic_write_text("".join(traceback.format_exception(exc)), run_dir / FAILED_FILE)
        raise


def _train(
    config: Config, spec: RunSpec, strategy: Strategy, run_dir: Path, ctx: DistContext, device: torch.device | None,
    progress: bool, built: Mapping[str, str] | None,
) -> None:
    """Caches → splits → inputs check → loaders → model → start → fit → predictions, metrics, DONE."""
    datasets = select(config, strategy.datasets)
    if built is not None:
        caches = {name: open_cache_once(built[name]) for name in strategy.datasets}
    else:
        if ctx.is_main:
            caches = prepare(config, strategy.datasets, progress=progress)  # rank 0 builds; the others then open
        barrier(ctx)
        if not ctx.is_main:
            caches = prepare(config, strategy.datasets, progress=False)
    splits = build_splits(config, datasets, caches, spec.protocol, spec.fold, spec.seed)
    empty = empty_parts(splits)
    if empty:
        raise DataError(f"run {spec.key}: empty split part(s) {', '.join(empty)}")
    inputs = run_inputs(config, caches, splits)
    if ctx.is_main:
        check_inputs(run_dir, inputs, config.run.rerun_changed)
    barrier(ctx)
    if (run_dir / DONE_FILE).is_file():  # finished with the same inputs
        return
    # Everything a bad config or a bad starting checkpoint can stop happens before the run folder is written.
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    seed_everything(spec.seed)
    tasks = run_tasks(strategy, config, datasets)
    clinical = clinical_inputs(strategy, datasets, caches, splits, tasks, spec.seed)
    if clinical is not None and not strategy.stage.image:
        with _failure_recorded(run_dir, ctx):
            if ctx.is_main:
                _open_run_folder(config, spec, run_dir, inputs, splits, tasks, datasets)
                clinical.encoder.save(run_dir)
                write_clinical_only(clinical, tasks[0], caches, splits, spec, run_dir)
                write_metrics(run_dir)
                atomic_write_text("done\n", run_dir / DONE_FILE)
            barrier(ctx)
        return
    model = build_model(config.model, tasks, clinical.encoder.dim if clinical else 0,
                        list(clinical.terms) if clinical else (), strategy.stage.clinical_trainable)
    for name, (weight, bias) in (clinical.terms if clinical else {}).items():  # start from the logistic regression
        model.set_clinical_term(name, torch.from_numpy(weight), torch.from_numpy(bias))
    check_input_size(model, config.model.input_size)
    strategy.init(model, spec, config, Path(config.results_dir))
    weighting = build_weighting(config.loss.weighting, tasks, config.loss.task_weights, seed=spec.seed)
    with _failure_recorded(run_dir, ctx):  # from here on this call owns the run folder
        if ctx.is_main:
            _open_run_folder(config, spec, run_dir, inputs, splits, tasks, datasets)
            if clinical is not None:
                clinical.encoder.save(run_dir)
        data = build_data(config, strategy, datasets, caches, splits, tasks, spec.seed, ctx,
                          clinical.features if clinical else None)
        fit(
            model, tasks, data.train, data.val,
            dataclasses.replace(config.train, max_epochs=strategy.max_epochs(config)),
            BatchAugmenter(config.augment, tasks) if config.augment.enabled else None,
            weighting, run_dir, strategy.select_task(config), progress,
            loss_variant=config.loss.variant, seed=spec.seed, input_size=config.model.input_size, description=spec.key,
            dist=ctx, device=device,
        )
        if ctx.is_main:
            model.load_state_dict(load_model_state(run_dir, BEST_CHECKPOINT))
            write_predictions(model, tasks, data, caches, config, spec, run_dir)
            write_metrics(run_dir)
            atomic_write_text("done\n", run_dir / DONE_FILE)
        barrier(ctx)


def _open_run_folder(
    config: Config, spec: RunSpec, run_dir: Path, inputs: dict[str, Any], splits: dict[str, Split], tasks: list[Task],
    datasets: dict[str, Dataset],
) -> None:
    """Create (or clean) the run folder and write its config, spec, inputs, missing split ids and tasks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    for leftover in run_dir.glob("*.tmp-*"):  # a write cut short by a kill
        leftover.unlink(missing_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    atomic_write_text(spec.to_json(), run_dir / SPEC_FILE)
    write_json(inputs, run_dir / INPUTS_FILE)
    missing = missing_split_ids(splits)
    if len(missing):
        atomic_write_text(missing.to_csv(index=False), run_dir / MISSING_IDS_FILE)
        console.print(f"{spec.key}: {len(missing)} id(s) of the split files are not in the image cache "
                      f"(listed in {run_dir / MISSING_IDS_FILE})", style="yellow", markup=False,
                      highlight=False, soft_wrap=True)
    entries = {}
    for task in tasks:
        names, home = labelling(task, datasets, config)
        entries[task.name] = task_entry(task, names, home)
    write_json(entries, run_dir / TASKS_FILE)


def finished_run(config: Config, spec: RunSpec, caches: dict[str, ImageCache]) -> bool:
    """Whether ``spec`` is finished with the inputs ``config`` and ``caches`` give now (``check_inputs``' rules:
    a finished run with other inputs is refused, or removed with ``run.rerun_changed``)."""
    run_dir = spec.run_dir(config.results_dir)
    if not (run_dir / DONE_FILE).is_file():
        return False
    config = resolved_config(config, spec)
    strategy = get_strategy(spec.strategy, config)
    datasets = select(config, strategy.datasets)
    used = {name: caches[name] for name in datasets}
    splits = build_splits(config, datasets, used, spec.protocol, spec.fold, spec.seed)
    return check_inputs(run_dir, run_inputs(config, used, splits), config.run.rerun_changed)
