"""The guard against the wrong film and the out-of-distribution flag, measured with a twin-trained run.

For each finished run (default: the MDMT run of ``mdmt demo``, cv5 fold 0, seed 0) ``mdmt predict`` is applied to

- the real films of ``../shared/data/real-cxr-lungs`` (126: the 115 frontal films whose human mask holds lungs,
  and 11 lateral views with an empty mask): how many laterals and how many frontal films the guard refuses, and
  how many scored frontal films are flagged out of distribution (the twin-trained model has never seen a real film);
- the run's own test fold of the synthetic twin (every dataset of the run): how many are refused and flagged.

The last column is the ablation: the same statistics of the pooled backbone features alone, without the input
thumbnail (``mdmt.train.feature_stats``).

A run folder without ``ood_features.npz`` (trained before runs wrote it) is copied to a scratch folder and gets the
file there, from its training fold's cached films through ``write_feature_stats`` (what a run writes at its end);
the run folder itself is never written to.

    python benchmarks/guard_real.py [--run RUN_DIR ...] [--data DIR]

Targets: all 11 laterals refused, at most 2 of the 115 frontal films; >= 90 % of the scored real frontal films
flagged, <= 5 % of the twin's test films.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from mdmt.data.datasets import prepare, select
from mdmt.infer.films import load_film
from mdmt.infer.guard import NOT_FRONTAL
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.infer.predict import predict_files
from mdmt.lungs.training import read_film_folder
from mdmt.protocols import build_splits
from mdmt.runs import SPEC_FILE, RunSpec
from mdmt.train.feature_stats import (
    FEATURE_STATS_FILE,
    film_descriptors,
    fit_feature_stats,
    write_feature_stats,
)
from mdmt.train.strategies import get_strategy

REAL_FILMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr-lungs"
DEMO_RUN = Path("demo-output/results/runs/mdmt/tiny_cnn/cv5/fold0/seed0")
TARGETS = {"laterals": 1.0, "frontal_refused": 2, "real_flagged": 0.90, "twin_flagged": 0.05}
BATCH = 64
console = Console(width=200)


def real_films(root: Path) -> pd.DataFrame:
    """``image_id, path, lateral`` of the film folder (a lateral view: its human lung mask is empty)."""
    films = read_film_folder(root)
    lateral = [not (np.asarray(Image.open(mask)) > 0).any() for mask in films["mask_path"]]
    return films.assign(lateral=lateral)[["image_id", "path", "lateral"]]


def run_spec(run_dir: Path) -> RunSpec:
    values = json.loads((run_dir / SPEC_FILE).read_text())
    return RunSpec(values["strategy"], values["backbone"], values["protocol"], int(values["fold"]),
                   int(values["seed"]))


def cached_batches(images: np.ndarray, rows: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of cached uint8 films ``(B, 1, S, S)`` of ``rows``."""
    for start in range(0, len(rows), BATCH):
        yield {"image": torch.from_numpy(np.ascontiguousarray(images[rows[start:start + BATCH]]))[:, None]}


def run_folds(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, pd.DataFrame], dict[str, np.ndarray]]:
    """Each dataset's cached images, records and the run's split (train and test rows), as the run built them."""
    trained = load_trained(run_dir)
    spec = run_spec(run_dir)
    config = trained.config
    datasets = select(config, get_strategy(spec.strategy, config).datasets)
    caches = prepare(config, list(datasets), progress=False)
    splits = build_splits(config, datasets, caches, spec.protocol, spec.fold, spec.seed)
    images, records, parts = {}, {}, {}
    for name, cache in caches.items():
        ids = cache.records["image_id"].astype(str)
        images[name], records[name] = cache.images, cache.records
        parts[name] = {part: np.flatnonzero(ids.isin(set(map(str, getattr(splits[name], part)))).to_numpy())
                       for part in ("train", "test")}
    return images, records, parts


def scratch_run(run_dir: Path, scratch: Path, images: dict, parts: dict) -> tuple[Path, str]:
    """A copy of the run folder holding ``ood_features.npz`` (the run's own, or fitted on its training fold)."""
    copy = Path(shutil.copytree(run_dir, scratch / "run", ignore=shutil.ignore_patterns("last.pt")))
    if (copy / FEATURE_STATS_FILE).is_file():
        return copy, "the run's own"
    trained = load_trained(copy)
    batches = (b for name in images for b in cached_batches(images[name], parts[name]["train"]))
    write_feature_stats(trained.model, batches, trained.device, copy, trained.config.model.input_size)
    return copy, "fitted here on its training fold"


def pooled_only(trained: TrainedModel, images: dict, parts: dict, real_paths: list[str]) -> tuple[float, float]:
    """The share of ``real_paths`` and of the twin test films flagged by statistics of the pooled features alone
    (the descriptors without the thumbnail), fitted on the training fold the same way."""
    def describe(part: str) -> np.ndarray:
        batches = (b for name in images for b in cached_batches(images[name], parts[name][part]))
        return film_descriptors(trained.model, batches, trained.device, trained.config.model.input_size)

    real_images = np.stack([load_film(p, trained.config.data).image for p in real_paths])
    real = film_descriptors(trained.model, cached_batches(real_images, np.arange(len(real_images))), trained.device,
                            trained.config.model.input_size)
    pooled = slice(0, trained.model.feature_dim)
    stats = fit_feature_stats(describe("train")[:, pooled])
    flagged = [float(np.mean(stats.distance(d[:, pooled]) > stats.threshold)) for d in (real, describe("test"))]
    return flagged[0], flagged[1]


def measure(run_dir: Path, films: pd.DataFrame) -> dict[str, object]:
    """The guard's and the OOD flag's counts on the real films and the run's twin test fold."""
    start = time.perf_counter()
    images, records, parts = run_folds(run_dir)
    with tempfile.TemporaryDirectory(prefix="mdmt-guard-") as tmp:
        copy, origin = scratch_run(run_dir, Path(tmp), images, parts)
        real = predict_files(copy, films["path"], Path(tmp) / "real", batch_size=BATCH, progress=False)
        twin_paths = [p for name in records for p in records[name]["path"].iloc[parts[name]["test"]]]
        twin = predict_files(copy, twin_paths, Path(tmp) / "twin", batch_size=BATCH, progress=False)
        trained = load_trained(copy)
    stats = trained.feature_stats
    lateral = films.set_index("path")["lateral"]
    refused = real.skipped[real.skipped["reason"].str.startswith(NOT_FRONTAL)]
    refused_lateral = refused["path"].map(lateral).astype(bool).to_numpy()
    frontal_scored = real.table[~real.table["path"].map(lateral).astype(bool)]
    twin_refused = twin.skipped[twin.skipped["reason"].str.startswith(NOT_FRONTAL)]
    for what, rows in (("real frontal", refused[~refused_lateral]), ("twin test", twin_refused)):
        for row in rows.itertuples():
            console.print(f"  {what} film refused: {Path(row.path).name}: {row.reason}", markup=False,
                          highlight=False, soft_wrap=True)
    real_pooled, twin_pooled = pooled_only(trained, images, parts, list(frontal_scored["path"]))
    return {
        "run": str(run_dir), "stats": origin, "train films": stats.n_films, "threshold": stats.threshold,
        "laterals": int(refused_lateral.sum()), "n_laterals": int(lateral.sum()),
        "frontal_refused": int((~refused_lateral).sum()), "n_frontal": int((~lateral).sum()),
        "real_flagged": int(frontal_scored["ood_flag"].sum()), "real_scored": len(frontal_scored),
        "real_median": float(frontal_scored["ood_distance"].median()),
        "twin_refused": len(twin_refused), "twin_flagged": int(twin.table["ood_flag"].sum()),
        "twin_scored": len(twin.table), "n_twin": len(twin_paths),
        "twin_median": float(twin.table["ood_distance"].median()), "real_pooled": real_pooled,
        "twin_pooled": twin_pooled, "seconds": time.perf_counter() - start,
    }


def verdict(row: dict) -> str:
    met = (row["laterals"] >= TARGETS["laterals"] * row["n_laterals"]
           and row["frontal_refused"] <= TARGETS["frontal_refused"]
           and row["real_flagged"] >= TARGETS["real_flagged"] * row["real_scored"]
           and row["twin_flagged"] <= TARGETS["twin_flagged"] * row["twin_scored"])
    return "met" if met else "MISSED"


def print_table(rows: list[dict]) -> None:
    table = Table(title="guard and out-of-distribution flag (mdmt predict)")
    for column in ("run", "OOD statistics", "laterals refused", "frontal refused", "real frontal flagged OOD",
                   "twin test refused", "twin test flagged OOD", "median distance real / twin (threshold)",
                   "pooled features only: real / twin flagged", "targets"):
        table.add_column(column, justify="left" if column in ("run", "OOD statistics") else "right")
    for number, r in enumerate(rows, start=1):
        console.print(f"run {number}: {r['run']}", markup=False, highlight=False, soft_wrap=True)
        table.add_row(
            str(number), f"{r['stats']} ({r['train films']} films)", f"{r['laterals']} of {r['n_laterals']}",
            f"{r['frontal_refused']} of {r['n_frontal']}",
            f"{r['real_flagged']} of {r['real_scored']} ({r['real_flagged'] / r['real_scored']:.1%})",
            f"{r['twin_refused']} of {r['n_twin']}",
            f"{r['twin_flagged']} of {r['twin_scored']} ({r['twin_flagged'] / r['twin_scored']:.1%})",
            f"{r['real_median']:.1f} / {r['twin_median']:.1f} ({r['threshold']:.1f})",
            f"{r['real_pooled']:.1%} / {r['twin_pooled']:.1%}", verdict(r))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append", help=f"a finished run folder (default {DEMO_RUN})")
    parser.add_argument("--data", type=Path, default=REAL_FILMS, help="film folder (manifest.csv, images/, masks/)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    films = real_films(args.data)
    rows = []
    for run_dir in args.run or [DEMO_RUN]:
        rows.append(measure(run_dir, films))
        console.print(f"{run_dir}: {rows[-1]['seconds']:.0f} s")
    print_table(rows)


if __name__ == "__main__":
    main()
