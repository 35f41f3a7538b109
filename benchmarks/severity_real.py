"""Severity on real films: what a model learns of the Brixia score from real radiographs.

Default: patient-grouped k-fold cross-validation on the scored films of ``../shared/data/real-cxr-lungs``
(84 films of 74 patients, scored by a senior radiologist, the label, and a junior). For every seed the folds are
drawn with that seed (scikit-learn's ``StratifiedGroupKFold``, stratified by the 4 bins of the global score,
grouped by patient, patients sharing a byte-identical film merged), and one model is trained per fold with mdmt's
own parts: the ``scored_films`` dataset reader, the image cache (lung crop, square resize), ``build_model`` with
one ``severity_regions`` head, the masked loss, the augmentation and the engine's epoch loop (Adam, plateau
schedule, selection and early stopping on the validation loss of a patient-grouped fifth of the training fold).
``--train DIR --test DIR`` trains on every scored film of DIR instead (with the same inner validation split) and
scores the films of another folder in the same layout, once per seed.

Per seed, pooled over its folds, and averaged over seeds it prints: the global MAE (sum of the six regional
predictions, each clipped to 0–3, against the senior's global score), the regional MAE, the constant baseline
(each film predicted by its training fold's mean global score), the spread (sd) of the predicted and of the true
global scores, and the junior radiologist's global MAE against the senior on the same films where the scores
file has it. The last line is machine-readable: ``mae=<global MAE, mean over seeds> const=<constant> n=<films>``.

    python benchmarks/severity_real.py [--seeds 0 1 2] [--folds 5] [--size 64] [--epochs 200] [--backbone tiny_cnn]
                                       [--crop lungs|none] [--set KEY=VALUE ...] [--workers 2] [--json OUT]
    python benchmarks/severity_real.py --train DIR --test DIR [same options]

``--set`` overrides any other config key (``--set train.lr=3e-4``, ``--set model.weights=imagenet``), so a later
lever is measured on the same folds and seeds. The image caches go to ``--cache`` (default ``.mdmt-cache``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import StratifiedGroupKFold

from mdmt.cache.image_cache import ImageCache, build_cache
from mdmt.config import Config, PluginRef, load_config, parse_override
from mdmt.data.augment import BatchAugmenter
from mdmt.data.batches import CachedImageDataset, make_loader
from mdmt.data.datasets import DATASETS
from mdmt.evaluate.metrics import severity_metrics
from mdmt.models.multitask import build_model, check_input_size
from mdmt.parallel import ordered_map
from mdmt.protocols import split_groups
from mdmt.runs import write_json
from mdmt.sources import SourceTable
from mdmt.sources.scored_films import JUNIOR_COLUMNS
from mdmt.tasks import REGION_COLUMNS, REGION_SCORE_RANGE, get_task, global4_targets
from mdmt.train.checkpoints import load_model_state, seed_everything
from mdmt.train.engine import BEST_CHECKPOINT, fit, predict, resolve_device
from mdmt.weighting import build_weighting

REAL_FILMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr-lungs"
TASK = "severity_regions"
VAL_PARTS = 5
"""The inner validation split: one of this many patient-grouped, stratified parts of the training films."""
YARDSTICK = [
    "model.backbone=tiny_cnn", "model.weights=none",
    "train.batch_size=16", "train.warmup_epochs=20", "train.early_stopping=40", "train.scheduler_patience=10",
    "train.checkpoint_every_s=3600", "runtime.threads=1",
]
"""The baseline's settings (a from-scratch tiny CNN); ``--size``, ``--epochs``, ``--backbone``, ``--crop`` and
``--set`` come after them. Everything else is mdmt's default config. One torch thread per process (``--workers``
processes train folds side by side): the same figures on any core count, and a 64 px epoch on 2 busy shared cores
took 0.19 CPU-s on one thread against 2.2 on two."""
console = Console(width=120)


@dataclass
class Films:
    """The scored films of one folder, preprocessed into the image cache."""

    name: str
    cache: ImageCache
    left_out: int


def read_films(root: Path, config: Config) -> Films:
    """The ``scored_films`` dataset of ``root``: its drops named with their reasons, its labelled films cached."""
    name = root.name
    dataset = DATASETS.build(PluginRef("scored_films", {"root": str(root)}), str(root), dataset_id=name)
    source = dataset.read()
    console.print(source.report(), markup=False, highlight=False, soft_wrap=True)
    for row in source.dropped.itertuples():
        console.print(f"  left out {row.image_id or '(blank id)'}: {row.reason}", markup=False, highlight=False,
                      soft_wrap=True)
    labelled = source.records[source.records["brixia_global"].notna()]
    cache = build_cache(SourceTable(labelled, source.dropped), config.data, config.data.cache_dir, progress=False)
    for row in cache.failed.itertuples():
        console.print(f"  unreadable {row.image_id}: {row.reason}", markup=False, highlight=False, soft_wrap=True)
    left_out = len(source.dropped) + len(cache.failed)
    console.print(f"{name}: {len(cache)} scored films used, {left_out} row(s) left out", markup=False)
    return Films(name, cache, left_out)


def grouped_parts(records: pd.DataFrame, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rest, part) row positions of ``k`` patient-grouped parts stratified by the global score's bin."""
    groups = split_groups(records)["patient_id"].to_numpy()
    with warnings.catch_warnings():  # a bin with fewer films than parts is expected on a small set
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(records)), global4_targets(records), groups))


def fit_and_predict(config: Config, train: Films, rows: np.ndarray, test: Films, test_rows: np.ndarray, seed: int
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Train on ``train``'s ``rows`` (a patient-grouped fifth of them validates), predict ``test_rows``' regions."""
    records = train.cache.records.iloc[rows].reset_index(drop=True)
    # a handful of films (a smoke run) has fewer patients, or films in its largest bin, than VAL_PARTS
    parts = min(VAL_PARTS, records["patient_id"].nunique(), pd.Series(global4_targets(records)).value_counts().max())
    fit_part, val_part = grouped_parts(records, parts, seed)[0]
    tasks = [get_task(TASK)]
    device = resolve_device(config.runtime.device)
    torch.set_num_threads(config.runtime.threads)
    seed_everything(seed)
    model = build_model(config.model, tasks)
    check_input_size(model, config.model.input_size)
    train_loader = make_loader(CachedImageDataset(train.cache, rows[fit_part], tasks), config.train, shuffle=True,
                               seed=seed, runtime=config.runtime)
    val_loader = make_loader(CachedImageDataset(train.cache, rows[val_part], tasks), config.train,
                             runtime=config.runtime)
    augmenter = BatchAugmenter(config.augment, tasks) if config.augment.enabled else None
    weighting = build_weighting(config.loss.weighting, tasks, config.loss.task_weights, seed=seed)
    with tempfile.TemporaryDirectory(prefix="severity-real-") as run_dir:
        result = fit(model, tasks, train_loader, val_loader, config.train, augmenter, weighting, run_dir, TASK,
                     progress=False, loss_variant=config.loss.variant, seed=seed, input_size=config.model.input_size,
                     device=device)
        model.load_state_dict(load_model_state(Path(run_dir), BEST_CHECKPOINT))
    loader = make_loader(CachedImageDataset(test.cache, test_rows, tasks), config.train, runtime=config.runtime)
    outputs, predicted_rows = predict(model, loader, device, config.model.input_size)
    assert np.array_equal(predicted_rows, test_rows), "the test loader must keep the rows' order"
    regions = np.clip(outputs[TASK].numpy().astype(np.float64), *REGION_SCORE_RANGE)
    info = {"fit": len(fit_part), "val": len(val_part), "best_epoch": result.best_epoch,
            "epochs": result.epochs_run, "stopped_early": result.stopped_early}
    return regions, info


def film_table(films: Films, rows: np.ndarray, regions: np.ndarray, const: float, seed: int, fold: int
               ) -> pd.DataFrame:
    """One row per scored film: ids, true and predicted regions and global score, the constant, the junior's."""
    records = films.cache.records.iloc[rows].reset_index(drop=True)
    table = records[["image_id", "patient_id"]].assign(seed=seed, fold=fold)
    table[[f"true_{c}" for c in REGION_COLUMNS]] = records[list(REGION_COLUMNS)].to_numpy(float)
    table[[f"pred_{c}" for c in REGION_COLUMNS]] = regions
    table["true_global"] = records["brixia_global"].to_numpy(float)
    table["pred_global"] = regions.sum(axis=1)
    table["const"] = const
    table["junior_global"] = records["junior_global"].to_numpy(float) if JUNIOR_COLUMNS[-1] in records else np.nan
    return table


def summary(table: pd.DataFrame) -> dict[str, float]:
    """The yardstick's figures over the films of ``table`` (one seed, pooled over its folds)."""
    true = table[[f"true_{c}" for c in REGION_COLUMNS]].to_numpy()
    pred = table[[f"pred_{c}" for c in REGION_COLUMNS]].to_numpy()
    metrics = severity_metrics("regions", true, pred)
    junior = table["junior_global"].notna()
    return {
        "global_mae": metrics["global_mae"],
        "regional_mae": metrics["mae"],
        "global_r": metrics["global_pearson_r"],
        "const_mae": float((table["true_global"] - table["const"]).abs().mean()),
        "pred_sd": float(table["pred_global"].std(ddof=0)),
        "true_sd": float(table["true_global"].std(ddof=0)),
        "rater_mae": float((table.loc[junior, "junior_global"] - table.loc[junior, "true_global"]).abs().mean())
        if junior.any() else float("nan"),
        "n": len(table),
        "n_rated": int(junior.sum()),
    }


@dataclass(frozen=True)
class Fold:
    """One model of the run: trained on ``rows`` of the training films, scoring ``test_rows`` of ``scored``."""

    seed: int
    index: int
    count: int
    rows: np.ndarray
    scored: Films
    test_rows: np.ndarray


def folds_of(train: Films, test: Films | None, k: int, seeds: list[int]) -> list[Fold]:
    """Every model of the run, per seed: k-fold CV on ``train`` (``test`` None), or ``train`` → ``test``."""
    records = train.cache.records
    folds = []
    for seed in seeds:
        if test is None:
            parts = [(rest, train, part) for rest, part in grouped_parts(records, k, seed)]
        else:
            parts = [(np.arange(len(records)), test, np.arange(len(test.cache)))]
        folds += [Fold(seed, index, len(parts), *part) for index, part in enumerate(parts)]
    return folds


def run_fold(config: Config, train: Films, fold: Fold) -> tuple[pd.DataFrame, str]:
    """Train and score one fold: a row per scored film, and the progress line."""
    started, cpu = time.perf_counter(), time.process_time()
    regions, info = fit_and_predict(config, train, fold.rows, fold.scored, fold.test_rows, fold.seed)
    const = float(train.cache.records["brixia_global"].iloc[fold.rows].mean())
    table = film_table(fold.scored, fold.test_rows, regions, const, fold.seed, fold.index)
    figures = summary(table)
    cpu = time.process_time() - cpu
    line = (f"seed {fold.seed} fold {fold.index + 1}/{fold.count}: {info['fit']} train, {info['val']} val, "
            f"{len(fold.test_rows)} test; best epoch {info['best_epoch'] + 1} of {info['epochs']}"
            f"{' (stopped early)' if info['stopped_early'] else ''}; global MAE {figures['global_mae']:.2f} "
            f"(constant {figures['const_mae']:.2f}); {time.perf_counter() - started:.1f} s ({cpu:.1f} CPU-s)")
    return table, line


def print_figures(rows: dict[str, dict[str, float]], title: str) -> None:
    """The figures of each seed and their mean, one row each."""
    table = Table(title=title)
    columns = ["", "films", "global MAE", "regional MAE", "constant MAE", "global r", "sd pred / true",
               "junior MAE (films)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "" else "right")
    for label, f in rows.items():
        table.add_row(label, str(f["n"]), f"{f['global_mae']:.3f}", f"{f['regional_mae']:.3f}", f"{f['const_mae']:.3f}",
                      f"{f['global_r']:.3f}", f"{f['pred_sd']:.2f} / {f['true_sd']:.2f}",
                      f"{f['rater_mae']:.3f} ({f['n_rated']})" if f["n_rated"] else "-")
    console.print(table)


def cpu_time() -> float:
    """CPU seconds of this process and of its finished worker processes."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def make_config(args: argparse.Namespace) -> Config:
    """mdmt's default config with the yardstick's settings, the options and ``--set`` on top."""
    overrides = [*YARDSTICK, f"model.backbone={args.backbone}", f"data.image_size={args.size}",
                 f"model.input_size={args.size}", f"data.crop={args.crop}", f"train.max_epochs={args.epochs}",
                 f"data.cache_dir={args.cache}", *args.set]
    return load_config(None, [parse_override(o) for o in overrides])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="image side in px (cache and network input)")
    parser.add_argument("--epochs", type=int, default=200, help="train.max_epochs")
    parser.add_argument("--backbone", default="tiny_cnn")
    parser.add_argument("--crop", choices=["lungs", "none"], default="lungs")
    parser.add_argument("--train", type=Path, help="train on every scored film of this folder ...")
    parser.add_argument("--test", type=Path, help="... and score the films of this one (both or neither)")
    parser.add_argument("--data", type=Path, default=REAL_FILMS, help="the folder of the cross-validation")
    parser.add_argument("--cache", default=".mdmt-cache", help="image cache folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    parser.add_argument("--workers", type=int, default=2, help="folds trained at once, each in its own process "
                        "on one thread (0: one after the other in this process); the figures do not depend on it")
    parser.add_argument("--json", type=Path, help="write the figures and every film's prediction here")
    args = parser.parse_args(argv)
    if (args.train is None) != (args.test is None):
        parser.error("--train and --test go together")
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    config = make_config(args)
    started = time.perf_counter()
    train = read_films(args.train or args.data, config)
    test = read_films(args.test, config) if args.test is not None else None
    mode = f"trained on {train.name}, scored on {test.name}" if test else f"{args.folds}-fold CV on {train.name}"
    tables = []
    for table, line in ordered_map(partial(run_fold, config, train), folds_of(train, test, args.folds, args.seeds),
                                   args.workers):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        tables.append(table)
    predictions = pd.concat(tables, ignore_index=True)
    per_seed = {f"seed {seed}": summary(table) for seed, table in predictions.groupby("seed")}
    mean = {key: float(np.mean([f[key] for f in per_seed.values()])) for key in next(iter(per_seed.values()))}
    mean["n"], mean["n_rated"] = int(mean["n"]), int(mean["n_rated"])
    print_figures({**per_seed, "mean over seeds": mean},
                  f"Brixia score on real films, {mode}: {config.model.backbone.name} "
                  f"({'from scratch' if config.model.weights == 'none' else config.model.weights}), {args.size} px, "
                  f"crop {args.crop}")
    spread = {key: float(np.std([f[key] for f in per_seed.values()])) for key in ("global_mae", "const_mae")}
    console.print(f"global MAE over seeds {mean['global_mae']:.3f} ± {spread['global_mae']:.3f} (sd), constant "
                  f"{mean['const_mae']:.3f} ± {spread['const_mae']:.3f}", markup=False)
    seconds, cpu_seconds = time.perf_counter() - started, cpu_time()
    console.print(f"{len(args.seeds)} seed(s): {seconds:.0f} s wall, {cpu_seconds:.0f} CPU-s; device "
                  f"{resolve_device(config.runtime.device)}, {max(args.workers, 1)} process(es) of "
                  f"{config.runtime.threads} thread(s)", markup=False)
    if args.json:
        write_json({"mode": mode, "args": {k: str(v) for k, v in vars(args).items()}, "per_seed": per_seed,
                    "mean": mean, "sd_over_seeds": spread, "seconds": seconds, "cpu_seconds": cpu_seconds,
                    "left_out": train.left_out + (test.left_out if test else 0),
                    "predictions": predictions.to_dict(orient="records")}, args.json)
    print(f"mae={mean['global_mae']:.4f} const={mean['const_mae']:.4f} n={mean['n']}")


if __name__ == "__main__":
    main()
