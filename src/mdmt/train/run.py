"""One run end to end: caches → splits → inputs check → the strategy's estimator fitted → test predictions →
scores → DONE.

A run is a pure function of (config, RunSpec) and its inputs. Its folder (``mdmt.runs``) records the inputs
(``inputs.json``: the config that shapes the result, each dataset's cache key, the split ids, the checkpoints of
the runs it starts from); a finished or interrupted run whose inputs differ from the request (a parent trained
again included) is never reused: it is refused with what changed, or trained again from scratch with
``run.rerun_changed``. What is fitted is the estimator's business (``mdmt.train.estimators``: the network or the
clinical-only regression); the prediction files are written here the same way for every estimator, and the
metrics are computed from them by ``mdmt.evaluate.scoring``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console

from mdmt.cache.image_cache import ImageCache, open_cache, verify_images
from mdmt.config import Config, PluginRef, save_config, to_dict
from mdmt.data.batches import mask_targets
from mdmt.data.datasets import Dataset, prepare, select
from mdmt.data.splits import CALIB, Split
from mdmt.errors import ConfigError, DataError
from mdmt.evaluate.scoring import write_metrics
from mdmt.model_card import split_parts, write_model_card
from mdmt.protocols import build_splits, empty_parts, split_ids
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
    check_inputs,
    predictions_file,
    run_inputs,
    write_json,
)
from mdmt.tasks import Task, get_task, make_task
from mdmt.train.checkpoints import seed_everything
from mdmt.train.distributed import (
    DistContext,
    barrier,
    check_weighting,
    init_distributed,
    shutdown,
)
from mdmt.train.estimators import ESTIMATORS, Estimator, RunContext, clinical_inputs
from mdmt.train.strategies import Strategy, get_strategy

console = Console()


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


# --------------------------------------------------------------------------------------------- evaluation
def prediction_table(
    task: Task, records: pd.DataFrame, targets: np.ndarray, decoded: dict[str, np.ndarray], fold: int
) -> pd.DataFrame:
    """One row per image: ids, center, dataset, ``fold`` (the run's), the task's ``y_true`` and decoded columns."""
    table = records[["image_id", "patient_id", "center", "dataset"]].reset_index(drop=True).assign(fold=fold)
    for name, values in {**task.truth_columns(targets), **decoded}.items():
        table[name] = np.asarray(values)
    return table


def write_predictions(estimator: Estimator, run: RunContext, part: str = "test") -> None:
    """``predictions_<task>.csv`` (``val_``/``calib_predictions_<task>.csv``): every test (validation, calibration)
    image the estimator predicts, of every dataset that labels the task and has that part (no file when none has)."""
    tables: dict[str, list[pd.DataFrame]] = {task.name: [] for task in run.tasks}
    for source in run.caches:
        if part not in run.splits[source].parts():
            continue
        predicted = estimator.predict(run, source, part)
        if predicted is None:
            continue
        outputs, rows = predicted
        records = run.caches[source].records.iloc[rows].reset_index(drop=True)
        for task in run.tasks:
            targets, present = task.encode(records)
            if task.pixel_targets:  # the truth is the cached mask, as the batches gather it
                targets = mask_targets(run.caches[source].masks, rows, task.size).numpy()
            if present.any() and task.name in outputs:
                decoded = task.decode(outputs[task.name][torch.from_numpy(present)])
                tables[task.name].append(prediction_table(task, records[present], targets[present], decoded,
                                                          run.spec.fold))
    for name, parts in tables.items():
        if parts:
            atomic_write_text(pd.concat(parts, ignore_index=True).to_csv(index=False),
                              run.run_dir / predictions_file(name, part))


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


def inputs_of(config: Config, caches: Mapping[str, ImageCache], splits: dict[str, Split],
              parents: Mapping[str, str | None] | None) -> dict[str, Any]:
    """The run's ``inputs.json`` (``mdmt.runs.run_inputs``) from its resolved config, caches and splits."""
    return run_inputs(to_dict(config), {name: cache.key for name, cache in caches.items()}, split_ids(splits), parents)


# --------------------------------------------------------------------------------------------- the run
@functools.lru_cache(maxsize=16)
def open_cache_once(path: str) -> ImageCache:
    """``open_cache`` once per process (a cache folder's name holds its key; ``verify_images`` checks its bytes)."""
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
    ctx, device = init_distributed(config.runtime.device)
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
        caches = {name: verify_images(open_cache_once(built[name])) for name in strategy.datasets}  # hashed once
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
    inputs = inputs_of(config, caches, splits, strategy.parent_checkpoints(spec, config, Path(config.results_dir)))
    if ctx.is_main:
        check_inputs(run_dir, inputs, config.run.rerun_changed)
    barrier(ctx)
    if (run_dir / DONE_FILE).is_file():  # finished with the same inputs
        return
    # Everything a bad config or a bad starting checkpoint can stop happens before the run folder is written.
    if config.runtime.threads > 0:
        torch.set_num_threads(config.runtime.threads)
    seed_everything(spec.seed)
    tasks = run_tasks(strategy, config, datasets)
    clinical = clinical_inputs(strategy, datasets, caches, splits, tasks, spec.seed)
    run = RunContext(config, spec, strategy, datasets, caches, splits, tasks, clinical, run_dir, ctx, device, progress)
    estimator = ESTIMATORS.build(strategy.stage.estimator, f"strategies.{strategy.name}.params.estimator")
    estimator.build(run)
    with _failure_recorded(run_dir, ctx):  # from here on this call owns the run folder
        if ctx.is_main:
            _open_run_folder(config, spec, run_dir, inputs, splits, tasks, datasets)
            if clinical is not None:
                clinical.encoder.save(run_dir)
        estimator.fit(run)
        if ctx.is_main:
            for part in ("val", CALIB, "test"):
                write_predictions(estimator, run, part)
            write_metrics(run_dir)
            write_model_card(run_dir, parts=split_parts(splits, {n: c.records for n, c in caches.items()}))
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
        entries[task.name] = task.entry(names, home)
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
    parents = strategy.parent_checkpoints(spec, config, Path(config.results_dir))
    return check_inputs(run_dir, inputs_of(config, used, splits, parents), config.run.rerun_changed)
