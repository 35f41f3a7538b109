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

``--pretrain twin`` adds a first stage: the synthetic twin (``--twin-preset``, generator seed ``TWIN_SEED``) is
written once into ``--cache`` and reused, its BrixIA films are cached with the same preprocessing (crop, size), and
per seed the same network trains on their exact regional scores for at most ``--pretrain-epochs`` (a fifth of the
twin validates, same selection and early stopping); every real-film model of that seed then starts from its
backbone with a fresh head, as a strategy's ``start_from`` does (the shipped config ``real_severity`` chains the
same two stages in the grid). The twin shares no film with the real folds, so one twin stage serves every fold.

The defaults are the configuration measured best (benchmarks/RESULTS.md, "Severity on real films"): ``--pretrain
blend --tasks severity+masks`` averages, per fold, the MDMT model (severity with the lung masks as a second task,
from scratch; 2.928 alone) and a severity model started from the twin trained for 60 epochs (2.979 alone): CV global
MAE 2.873 ± 0.063 over seeds against 3.228 for the from-scratch baseline (lower in 14 of 15 folds, p = 0.0001), not
significantly below either arm alone (p = 0.17 and 0.076). A folder without lung masks still runs (the mask task
then has no films). 96 px, ``--members 3``, the junior's scores as a head, ``--tta``, ``--refit``, ``--loss l1``,
``--twin-preset medium`` and ``--set augment.gamma=0.4 --set augment.contrast=0.3`` did not go reliably lower than
the arm they were added to. ``--epochs 1000`` is a cap that early stopping on the validation curve always reached first
(the old cap of 200 ended one run of 15, with the same result). ``--pretrain none --tasks severity --epochs 200``
is the from-scratch baseline. With ``--train DIR --test DIR`` three seeds cost three twin stages and six models,
less than the CV's three twin stages and thirty models.

Per seed, pooled over its folds, and averaged over seeds it prints: the global MAE (sum of the six regional
predictions, each clipped to 0–3, against the senior's global score), the regional MAE, the constant baseline
(each film predicted by its training fold's mean global score), the spread (sd) of the predicted and of the true
global scores, and the junior radiologist's global MAE against the senior on the same films where the scores
file has it. The last line is machine-readable: ``mae=<global MAE, mean over seeds> const=<constant> n=<films>``.

    python benchmarks/severity_real.py [--seeds 0 1 2] [--folds 5] [--size 64] [--epochs 1000] [--backbone tiny_cnn]
                                       [--crop lungs|none] [--set KEY=VALUE ...] [--workers 2] [--json OUT]
    python benchmarks/severity_real.py --train DIR --test DIR [same options]
    python benchmarks/severity_real.py [...] [--pretrain twin|none|blend] [--pretrain-epochs 60] [--twin-preset small]
                                       [--finetune-lr LR] [--tasks severity[+masks][+junior]] [--permute-masks]
                                       [--members K] [--tta] [--refit] [--loss mse|l1]
    python benchmarks/severity_real.py --compare RUN.json BASELINE.json

``--tasks`` adds second heads under the indicator-masked loss: ``+masks`` the human lung masks of every training
film that has one (scored or not), ``+junior`` the junior radiologist's regional scores; the label, the selection
and every figure stay the senior's. ``--members K`` trains K models per fold, each with its own seed and inner
validation split, and averages their regional predictions. ``--pretrain blend`` trains two models per fold and
averages their regional predictions: the ``--tasks`` model from scratch and a severity model started from the
twin's backbone. ``--tta`` also scores every test film mirrored left/right, swaps its regions back (A–C with D–F)
and averages the two. ``--refit`` uses each model's run only to choose its schedule: a second network, from the same
start and seed, trains on all of the fold's training films (the validation fifth too) for the first run's best epoch
count at its learning rate of each epoch, and is scored after its last epoch. ``--loss l1`` trains the severity head
(and selects its epoch) on the absolute error instead of mdmt's squared error.

``--set`` overrides any other config key (``--set train.lr=3e-4``, ``--set model.weights=imagenet``), so a later
lever is measured on the same folds and seeds. The image caches go to ``--cache`` (default ``.mdmt-cache``).
``--compare`` trains nothing: it prints the paired one-tailed Wilcoxon signed-rank test of two ``--json`` runs'
(seed, fold) global MAEs (RUN below BASELINE), refusing runs that did not score the same films in the same folds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import wilcoxon
from sklearn.model_selection import StratifiedGroupKFold

from mdmt.cache.image_cache import ImageCache, build_cache
from mdmt.config import Config, PluginRef, load_config, parse_override
from mdmt.data.augment import BatchAugmenter
from mdmt.data.batches import CachedImageDataset, ImageArrays, ImageSource, make_loader
from mdmt.data.datasets import DATASETS
from mdmt.evaluate.metrics import severity_metrics
from mdmt.models.multitask import build_model, check_input_size, load_backbone_state
from mdmt.parallel import ordered_map
from mdmt.protocols import split_groups
from mdmt.runs import BEST_CHECKPOINT, LAST_CHECKPOINT, atomic_target, write_json
from mdmt.sources import SourceTable
from mdmt.sources.scored_films import JUNIOR_COLUMNS
from mdmt.sources.tables import SYNTHETIC_MARKER
from mdmt.synth import generate
from mdmt.synth.layout import BRIXIA_DIR
from mdmt.tasks import (
    MASK_PRESENT,
    REGION_COLUMNS,
    REGION_FLIP,
    REGION_SCORE_RANGE,
    REGIONS,
    TASKS,
    RegressionTask,
    get_task,
    global4_targets,
)
from mdmt.train.callbacks import Callback
from mdmt.train.checkpoints import load_model_state, seed_everything
from mdmt.train.engine import fit, predict, resolve_device
from mdmt.weighting import build_weighting

REAL_FILMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr-lungs"
TASK = "severity_regions"
MASK_TASK = "lung_mask"
"""``--tasks severity+masks``: the second task (the selection stays the severity task's validation loss)."""
JUNIOR_TASK = RegressionTask("junior_regions", JUNIOR_COLUMNS[:6], 6, 0,
                             lambda records: records[list(JUNIOR_COLUMNS[:6])].to_numpy(np.float64), REGION_FLIP,
                             REGIONS, "regions")
"""``--tasks severity+junior``: the junior radiologist's six regional scores as a second head (training films
only; the label and every figure stay the senior's)."""


@dataclass(frozen=True)
class AbsoluteErrorTask(RegressionTask):
    """The regional scores with the absolute error as their loss (``--loss l1``): the median's loss, the one the
    yardstick scores, where mdmt's regression task trains the mean (squared error)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
        """Absolute error, averaged over the six regions."""
        return (outputs - targets).abs().mean(dim=1)


def severity_task(loss: str) -> RegressionTask:
    """The ``severity_regions`` task trained with ``loss`` (``LOSSES``)."""
    task = get_task(TASK)
    assert isinstance(task, RegressionTask)
    return task if loss == "mse" else AbsoluteErrorTask(**{f.name: getattr(task, f.name) for f in fields(task)})


LOSSES = ("mse", "l1")
"""``--loss``: mdmt's squared error, or the absolute error (``AbsoluteErrorTask``)."""
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
MEMBER_SEED_STRIDE = 1000
"""``--members K``: member k of seed s trains with seed s + 1000 k (no clash with the seeds of a run)."""
TWIN_SEED = 0
PRETRAINED = {"twin": "twin-pretrained", "blend": "averaged with a twin-pretrained severity model"}
"""``--pretrain``'s words in the table's title."""
"""The twin's generator seed: one twin serves every training seed."""
console = Console(width=120)


@dataclass
class Films:
    """The scored films of one folder, preprocessed into the image cache."""

    name: str
    cache: ImageCache
    left_out: int
    masks: ImageCache | None = None
    """``--tasks severity+masks``: every film of the folder (scored or not) cached with its lung mask."""
    permute_masks: bool = False
    """``--permute-masks``: the control, masks shuffled among each fold's training films."""
    junior: bool = False
    """``--tasks severity+junior``: the junior's scores train a second head."""
    severity_loss: str = "mse"
    """``--loss``: the severity head's loss (``LOSSES``), which also selects the epoch."""


def mask_cache(root: Path, config: Config) -> ImageCache:
    """Every film of ``root`` (scored or not) in an image cache with its lung mask aligned to the crop."""
    dataset = DATASETS.build(PluginRef("scored_films", {"root": str(root)}), str(root), dataset_id=root.name)
    cache = build_cache(dataset.read(), config.data, config.data.cache_dir, progress=False, masks=True)
    console.print(f"{root.name}: {len(cache)} films, {int(cache.records[MASK_PRESENT].sum())} with a lung mask "
                  f"(the mask task)", markup=False)
    return cache


def with_masks(train: Films, rows: np.ndarray, fit_part: np.ndarray, val_part: np.ndarray, seed: int
               ) -> tuple[Any, np.ndarray, np.ndarray]:
    """The mask cache's rows for the fold: training = the fit part's scored films and every unscored film of a
    patient without a scored film outside the fit part; validation = the validation part's films. With
    ``permute_masks`` the masks of the training rows that have one are shuffled among them (seeded)."""
    cache, scored = train.masks, train.cache.records
    where = pd.Series(np.arange(len(cache)), index=cache.records["image_id"].astype(str))
    held_out = set(scored["patient_id"].astype(str)) - set(scored["patient_id"].iloc[rows[fit_part]].astype(str))
    unscored = ~cache.records["image_id"].astype(str).isin(scored["image_id"].astype(str))
    extra = np.flatnonzero(unscored & ~cache.records["patient_id"].astype(str).isin(held_out))
    fit_rows = np.concatenate([where[scored["image_id"].iloc[rows[fit_part]].astype(str)].to_numpy(), extra])
    val_rows = where[scored["image_id"].iloc[rows[val_part]].astype(str)].to_numpy()
    if not train.permute_masks:
        return cache, fit_rows, val_rows
    masked = fit_rows[cache.records[MASK_PRESENT].to_numpy(bool)[fit_rows]]
    masks = np.array(cache.masks)
    masks[masked] = masks[np.random.default_rng(seed).permutation(masked)]
    return PermutedMasks(cache.images, cache.records, masks), fit_rows, val_rows


@dataclass(frozen=True)
class PermutedMasks:
    """An image source whose masks were shuffled among films (the permuted-mask control)."""

    images: np.ndarray
    records: pd.DataFrame
    masks: np.ndarray


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


class ReplayLR(Callback):
    """Sets the learning rate of each epoch to a first run's (``--refit``): the refit follows the schedule that the
    first run's plateau scheduler drew from its validation curve, not one drawn from training films."""

    def __init__(self, lrs: list[float]) -> None:
        self.lrs = lrs
        self.trainer: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        """Keep the trainer, whose optimizer the next epochs' rates go to."""
        self.trainer = trainer

    def on_epoch_end(self, epoch: int, row: Any) -> None:
        """Epoch ``epoch + 1`` trains at the first run's rate of that epoch."""
        if epoch + 1 < len(self.lrs):
            for group in self.trainer.optimizer.param_groups:
                group["lr"] = self.lrs[epoch + 1]


def train_network(config: Config, tasks: list[Any], source: Any, rows: np.ndarray, val_rows: np.ndarray, seed: int,
                  start: dict[str, torch.Tensor] | None, checkpoint: str = BEST_CHECKPOINT,
                  callbacks: tuple[Callback, ...] = ()) -> tuple[torch.nn.Module, Any]:
    """A network with ``tasks`` trained on ``source``'s ``rows`` (``val_rows`` validate), from the backbone of
    ``start`` when given (the head starts fresh, as a strategy's ``start_from`` does), with the weights of
    ``checkpoint`` (the best epoch's, or ``LAST_CHECKPOINT``), and the engine's result."""
    device = resolve_device(config.runtime.device)
    torch.set_num_threads(config.runtime.threads)
    seed_everything(seed)
    model = build_model(config.model, tasks)
    check_input_size(model, config.model.input_size)
    if start is not None:
        load_backbone_state(model, start)
    train_loader = make_loader(CachedImageDataset(source, rows, tasks), config.train, shuffle=True,
                               seed=seed, runtime=config.runtime)
    val_loader = make_loader(CachedImageDataset(source, val_rows, tasks), config.train, runtime=config.runtime)
    augmenter = BatchAugmenter(config.augment, tasks) if config.augment.enabled else None
    weighting = build_weighting(config.loss.weighting, tasks, config.loss.task_weights, seed=seed)
    with tempfile.TemporaryDirectory(prefix="severity-real-") as run_dir:
        result = fit(model, tasks, train_loader, val_loader, config.train, augmenter, weighting, run_dir, TASK,
                     progress=False, loss_variant=config.loss.variant, seed=seed, input_size=config.model.input_size,
                     device=device, callbacks=callbacks)
        model.load_state_dict(load_model_state(Path(run_dir), checkpoint))
    return model, result


def train_model(config: Config, train: Films, rows: np.ndarray, seed: int, start: dict[str, torch.Tensor] | None = None,
                refit: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The best epoch's model trained on ``train``'s ``rows`` (a patient-grouped fifth of them validates), from the
    backbone of ``start`` when given (a twin-pretrained network), and the run's counts. With ``refit`` that model
    only chooses the schedule: a second one, from the same start and seed, trains on every row (the validation fifth
    too) for as many epochs, at the first run's learning rate of each epoch (``ReplayLR``), and is returned after
    its last epoch."""
    records = train.cache.records.iloc[rows].reset_index(drop=True)
    # a handful of films (a smoke run) has fewer patients, or films in its largest bin, than VAL_PARTS
    parts = min(VAL_PARTS, records["patient_id"].nunique(), pd.Series(global4_targets(records)).value_counts().max())
    fit_part, val_part = grouped_parts(records, parts, seed)[0]
    tasks = [severity_task(train.severity_loss), *([JUNIOR_TASK] if train.junior else [])]
    if train.masks is not None:
        tasks.append(TASKS.build(MASK_TASK, name=MASK_TASK))

    def part(fit: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        """(source, training rows, validation rows) of training on the ``fit`` positions of ``rows``."""
        return (with_masks(train, rows, fit, val_part, seed) if train.masks is not None
                else (train.cache, rows[fit], rows[val_part]))

    source, train_rows, val_rows = part(fit_part)
    model, result = train_network(config, tasks, source, train_rows, val_rows, seed, start)
    info = {"fit": len(train_rows), "val": len(val_part), "best_epoch": result.best_epoch,
            "epochs": result.epochs_run, "stopped_early": result.stopped_early, "refit": 0}
    if refit:
        epochs = result.best_epoch + 1
        schedule = replace(config, train=replace(config.train, max_epochs=epochs, early_stopping=epochs + 1))
        source, train_rows, _ = part(np.arange(len(rows)))
        model, _ = train_network(schedule, tasks, source, train_rows, val_rows, seed, start, LAST_CHECKPOINT,
                                 (ReplayLR(result.history["lr"].tolist()),))
        info["refit"] = len(train_rows)
    return model, info


def mirrored(films: Films) -> ImageArrays:
    """``films``' image cache mirrored left/right (``--tta``)."""
    return ImageArrays(np.ascontiguousarray(np.asarray(films.cache.images)[..., ::-1]), films.cache.records)


def predict_regions(model: torch.nn.Module, config: Config, source: ImageSource, rows: np.ndarray) -> np.ndarray:
    """The model's raw regional scores of ``source``'s ``rows``, in order."""
    loader = make_loader(CachedImageDataset(source, rows, [get_task(TASK)]), config.train, runtime=config.runtime)
    outputs, predicted_rows = predict(model, loader, resolve_device(config.runtime.device), config.model.input_size)
    assert np.array_equal(predicted_rows, rows), "the test loader must keep the rows' order"
    return outputs[TASK].numpy().astype(np.float64)


def regions_with_mirror(model: torch.nn.Module, config: Config, films: Films, rows: np.ndarray,
                        mirror: ImageSource | None) -> tuple[np.ndarray, np.ndarray]:
    """(regions, plain regions) of ``films``' ``rows``, each clipped to 0–3: with ``mirror`` (``films`` mirrored) the
    mean of the model's raw scores of each film and of its mirror image with the regions swapped back
    (``REGION_FLIP``), else the plain scores themselves."""
    raw = predict_regions(model, config, films.cache, rows)
    plain = np.clip(raw, *REGION_SCORE_RANGE)
    if mirror is None:
        return plain, plain
    both = (raw + predict_regions(model, config, mirror, rows)[:, list(REGION_FLIP)]) / 2
    return np.clip(both, *REGION_SCORE_RANGE), plain


def fit_and_predict(config: Config, train: Films, rows: np.ndarray, test: Films, test_rows: np.ndarray, seed: int,
                    start: dict[str, torch.Tensor] | None = None, members: int = 1, tta: bool = False,
                    refit: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Train ``members`` models on ``train``'s ``rows`` (``train_model``) and predict ``test_rows``' regions, each
    clipped to 0–3, averaged over the members. Member k > 0 trains with seed ``seed + MEMBER_SEED_STRIDE * k``: its
    own inner validation split, initialisation and batches; member 0 is the single model of ``seed``. With ``tta``
    each model's regions are ``regions_with_mirror`` of the films and their mirror images; ``info["plain"]`` keeps
    the members' mean without them. ``refit``: each model is ``train_model``'s refit on every row."""
    mirror = mirrored(test) if tta else None
    regions, plain, infos = [], [], []
    for k in range(members):
        model, info = train_model(config, train, rows, seed + MEMBER_SEED_STRIDE * k, start, refit)
        both, alone = regions_with_mirror(model, config, test, test_rows, mirror)
        regions.append(both)
        plain.append(alone)
        infos.append(info)
    info = {**infos[0], "best_epochs": [i["best_epoch"] for i in infos], "plain": np.mean(plain, axis=0)}
    return np.mean(regions, axis=0), info


def twin_films(config: Config, preset: str) -> Films:
    """The twin's BrixIA films (``preset``, seed ``TWIN_SEED``), written once under ``data.cache_dir`` and reused,
    preprocessed into the image cache as the real films are (same crop and size)."""
    root = Path(config.data.cache_dir) / f"twin-{preset}-seed{TWIN_SEED}"
    if not (root / SYNTHETIC_MARKER).is_file():  # the marker is written last: a twin cut short is written again
        summary = generate(root, preset=preset, seed=TWIN_SEED, progress=False, workers=config.runtime.workers)
        console.print(f"twin {preset} (seed {TWIN_SEED}) written to {root} in {summary.seconds:.0f} s", markup=False)
    cache = DATASETS.build(PluginRef("brixia", {"root": str(root / BRIXIA_DIR)}), "twin", dataset_id="twin").cache(
        config, progress=False)
    console.print(f"twin: {len(cache)} films with exact regional scores", markup=False)
    return Films(root.name, cache, len(cache.dropped) + len(cache.failed))


def pretrain(config: Config, twin: Films, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """The network of seed ``seed`` trained on every twin film (a patient-grouped fifth validates): the start of
    that seed's real-film folds (the twin shares no film with them), and the progress line. Kept in
    ``data.cache_dir/twin-pretrained/`` under a hash of the settings that shape it, and reused by a later lever
    that changes only the real-film stage (delete the folder after changing the training code)."""
    started = time.perf_counter()
    settings = (config.data, config.model, config.train, config.augment, config.loss, twin.name, seed)
    path = (Path(config.data.cache_dir) / "twin-pretrained" /
            f"{hashlib.sha256(repr(settings).encode()).hexdigest()[:16]}-seed{seed}.pt")
    if path.is_file():
        return torch.load(path, weights_only=True), f"seed {seed} twin pretraining: reused {path}"
    model, info = train_model(config, twin, np.arange(len(twin.cache)), seed)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        torch.save(state, tmp)
    line = (f"seed {seed} twin pretraining: {info['fit']} train, {info['val']} val; best epoch "
            f"{info['best_epoch'] + 1} of {info['epochs']}; {time.perf_counter() - started:.1f} s")
    return state, line


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


@dataclass(frozen=True)
class Arm:
    """One model of every fold: its training films (with their second tasks), its config, and per seed the backbone it
    starts from (``starts``; a seed without one trains from scratch)."""

    films: Films
    config: Config
    starts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def run_fold(arms: list[Arm], members: int, tta: bool, refit: bool, fold: Fold) -> tuple[pd.DataFrame, str]:
    """Train and score one fold: every arm (``members`` models each, mirrored films averaged in with ``tta``), their
    regional predictions averaged; a row per scored film, and the progress line. ``refit``: every model is trained again
    on all of the fold's training films for its best epoch count (``train_model``)."""
    started, cpu = time.perf_counter(), time.process_time()
    results = [fit_and_predict(arm.config, arm.films, fold.rows, fold.scored, fold.test_rows, fold.seed,
                               arm.starts.get(fold.seed), members, tta, refit) for arm in arms]
    regions = np.mean([r for r, _ in results], axis=0)
    info = results[0][1]
    const = float(arms[0].films.cache.records["brixia_global"].iloc[fold.rows].mean())
    table = film_table(fold.scored, fold.test_rows, regions, const, fold.seed, fold.index)
    figures = summary(table)
    cpu = time.process_time() - cpu
    epochs = [e for _, i in results for e in i["best_epochs"]]
    member_epochs = f" (models' best epochs {', '.join(str(e + 1) for e in epochs)})" if len(epochs) > 1 else ""
    unmirrored = np.mean([i["plain"] for _, i in results], axis=0).sum(axis=1)
    refit_words = f", then refit on {info['refit']} films" if refit else ""
    plain = f", without the mirrored films {np.abs(unmirrored - table['true_global']).mean():.2f}" if tta else ""
    line = (f"seed {fold.seed} fold {fold.index + 1}/{fold.count}: {info['fit']} train, {info['val']} val, "
            f"{len(fold.test_rows)} test; best epoch {info['best_epoch'] + 1} of {info['epochs']}"
            f"{' (stopped early)' if info['stopped_early'] else ''}{member_epochs}"
            f"{refit_words}; "
            f"global MAE {figures['global_mae']:.2f}{plain} (constant {figures['const_mae']:.2f}); "
            f"{time.perf_counter() - started:.1f} s ({cpu:.1f} CPU-s)")
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


def fold_maes(predictions: pd.DataFrame) -> pd.Series:
    """The global MAE of each (seed, fold) model."""
    errors = (predictions["pred_global"] - predictions["true_global"]).abs()
    return errors.groupby([predictions["seed"], predictions["fold"]]).mean()


def compare(run: Path, baseline: Path) -> str:
    """The paired one-tailed Wilcoxon signed-rank test of ``run``'s (seed, fold) global MAEs below ``baseline``'s
    (two ``--json`` files of the same films, folds and seeds)."""
    tables = [pd.DataFrame(json.loads(path.read_text())["predictions"]) for path in (run, baseline)]
    keys = [set(zip(t["seed"], t["fold"], t["image_id"])) for t in tables]
    if keys[0] != keys[1]:
        raise SystemExit(f"{run} and {baseline} did not score the same films in the same seeds and folds")
    ours, theirs = (fold_maes(t) for t in tables)
    test = wilcoxon(ours.to_numpy(), theirs.loc[ours.index].to_numpy(), alternative="less")
    difference = ours - theirs.loc[ours.index]
    return (f"{run.name} against {baseline.name}: paired one-tailed Wilcoxon over {len(ours)} (seed, fold) global "
            f"MAEs: W={test.statistic:.1f}, p={test.pvalue:.4f}; median difference {difference.median():+.3f}, "
            f"lower in {int((difference < 0).sum())} of {len(ours)}")


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
    parser.add_argument("--epochs", type=int, default=1000, help="train.max_epochs (a cap that early stopping "
                        "reaches first)")
    parser.add_argument("--backbone", default="tiny_cnn")
    parser.add_argument("--crop", choices=["lungs", "none"], default="lungs")
    parser.add_argument("--train", type=Path, help="train on every scored film of this folder ...")
    parser.add_argument("--test", type=Path, help="... and score the films of this one (both or neither)")
    parser.add_argument("--data", type=Path, default=REAL_FILMS, help="the folder of the cross-validation")
    parser.add_argument("--cache", default=".mdmt-cache", help="image cache folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    parser.add_argument("--workers", type=int, default=2, help="folds trained at once, each in its own process "
                        "on one thread (0: one after the other in this process); the figures do not depend on it")
    parser.add_argument("--pretrain", choices=["none", "twin", "blend"], default="blend",
                        help="twin: start every fold from the network trained on the synthetic twin's films (per "
                        "seed); blend: average the --tasks model trained from scratch with a severity model started "
                        "there")
    parser.add_argument("--pretrain-epochs", type=int, default=60, help="train.max_epochs of the twin stage")
    parser.add_argument("--twin-preset", default="small", help="the twin's preset (mdmt.synth.PRESETS)")
    parser.add_argument("--finetune-lr", type=float, help="train.lr of the real-film stage after pretraining "
                        "(default: train.lr, as the twin stage)")
    parser.add_argument("--tasks", choices=["severity", "severity+masks", "severity+junior", "severity+masks+junior"],
                        default="severity+masks", help="+masks: also train the lung-mask task on every training-fold "
                        "film with a mask; +junior: the junior radiologist's regional scores as a second head")
    parser.add_argument("--permute-masks", action="store_true", help="the control: masks shuffled among the "
                        "training films (with --tasks severity+masks)")
    parser.add_argument("--members", type=int, default=1, help="models trained per fold (each with its own seed and "
                        "inner validation split), their regional predictions averaged")
    parser.add_argument("--tta", action="store_true", help="also score every test film mirrored left/right (regions "
                        "A-C and D-F swapped back) and average the two")
    parser.add_argument("--loss", choices=LOSSES, default="mse", help="the severity head's loss, which also "
                        "selects the epoch: squared error (mdmt's) or absolute error (the yardstick's)")
    parser.add_argument("--refit", action="store_true", help="train every model again on all of its training films "
                        "(the inner validation fifth too) for the first run's best epoch count, at its learning rates")
    parser.add_argument("--json", type=Path, help="write the figures and every film's prediction here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("RUN", "BASELINE"), help="train nothing: the "
                        "paired one-tailed Wilcoxon test of two --json files' (seed, fold) MAEs, RUN below BASELINE")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return
    if (args.train is None) != (args.test is None):
        parser.error("--train and --test go together")
    if args.members < 1:
        parser.error("--members must be at least 1")
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    if args.finetune_lr is not None and args.pretrain == "none":
        parser.error("--finetune-lr goes with --pretrain twin or blend")
    if args.permute_masks and "masks" not in args.tasks:
        parser.error("--permute-masks goes with --tasks severity+masks")
    config = make_config(args)
    started = time.perf_counter()
    train = read_films(args.train or args.data, config)
    test = read_films(args.test, config) if args.test is not None else None
    if "masks" in args.tasks:
        train = replace(train, masks=mask_cache(args.train or args.data, config), permute_masks=args.permute_masks)
    train = replace(train, junior="junior" in args.tasks, severity_loss=args.loss)
    mode = f"trained on {train.name}, scored on {test.name}" if test else f"{args.folds}-fold CV on {train.name}"
    mode += f", tasks {args.tasks}{' (permuted masks)' if args.permute_masks else ''}"
    mode += f", {args.members} models per fold (mean)" if args.members > 1 else ""
    mode += ", mirrored films averaged in" if args.tta else ""
    mode += ", refit on every training film" if args.refit else ""
    mode += f", severity loss {args.loss}" if args.loss != "mse" else ""
    arms = [Arm(train, config)]
    if args.pretrain != "none":
        twin_config = replace(config, train=replace(config.train, max_epochs=args.pretrain_epochs))
        twin = twin_films(config, args.twin_preset)
        starts = {}
        for seed, (state, line) in zip(args.seeds, ordered_map(partial(pretrain, twin_config, twin), args.seeds,
                                                               args.workers)):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
            starts[seed] = state
        finetune = config if args.finetune_lr is None else replace(config, train=replace(config.train,
                                                                                           lr=args.finetune_lr))
        pretrained = Arm(train if args.pretrain == "twin" else replace(train, masks=None, junior=False), finetune,
                         starts)
        arms = [pretrained] if args.pretrain == "twin" else [*arms, pretrained]
    pretrained_words = (f", {PRETRAINED[args.pretrain]} ({args.twin_preset}, {args.pretrain_epochs} epochs)"
                        if args.pretrain != "none" else "")
    tables = []
    for table, line in ordered_map(partial(run_fold, arms, args.members, args.tta, args.refit),
                                   folds_of(train, test, args.folds, args.seeds), args.workers):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        tables.append(table)
    predictions = pd.concat(tables, ignore_index=True)
    per_seed = {f"seed {seed}": summary(table) for seed, table in predictions.groupby("seed")}
    mean = {key: float(np.mean([f[key] for f in per_seed.values()])) for key in next(iter(per_seed.values()))}
    mean["n"], mean["n_rated"] = int(mean["n"]), int(mean["n_rated"])
    print_figures({**per_seed, "mean over seeds": mean},
                  f"Brixia score on real films, {mode}: {config.model.backbone.name} "
                  f"({'from scratch' if config.model.weights == 'none' else config.model.weights}"
                  f"{pretrained_words}"
                  f"{f', fine-tuned at lr {args.finetune_lr:g}' if args.finetune_lr is not None else ''}), "
                  f"{args.size} px, "
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
