"""Lung crop on real films: box IoU against human lung masks, crop-window coverage, fallbacks.

Default: patient-grouped 5-fold cross-validation on the real films. For each fold the segmenter is trained
(as ``scripts/train_lung_segmenter.py`` does) on the other folds' real films and the synthetic twin, and
scored on the held-out fold; then the classical localiser on all films, the shipped weights (on their
held-out fold, and in-sample on the films they were trained on), the synthetic twin (seed 0, shipped
weights) and the inference time. Films whose mask is empty (lateral views) are counted apart: the right
answer for them is a fallback.

    python benchmarks/lung_real.py [--folds 0,1,2,3,4] [--steps 450] [--quick] [--data DIR]

``--data DIR`` scores the shipped localiser on any folder of the same layout instead (``manifest.csv`` with
``id, image, mask, patient``; ``images/``, ``masks/``). ``--quick`` skips the cross-validation. The last
line is machine-readable: ``iou=<mean> keep95=<share of films> fallback=<share of films>``.
Targets on real films, out of sample: mean IoU >= 0.85, keep95 >= 0.97, fallback <= 0.05; twin IoU >= 0.90.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from mdmt.images import normalize_intensity, read_image
from mdmt.lungs.locate import localiser_iou, locate_lungs, locate_lungs_classical
from mdmt.lungs.training import (
    FOLD_SEED,
    FOLDS,
    film_summary,
    fit_segmenter,
    patient_folds,
    read_film_folder,
    read_holdout,
    score_films,
)
from mdmt.lungs.unet import TrainSettings, read_weights, save_weights, segment
from mdmt.synth import generate
from mdmt.synth.lung_films import TWIN_FILMS, TWIN_SEED, twin_training_films

REAL_FILMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr-lungs"
TARGETS = {"iou": 0.85, "keep95": 0.97, "fallback": 0.05, "twin": 0.90}
console = Console(width=120)


def summary_row(label: str, scores: pd.DataFrame) -> dict[str, object]:
    return {"films": label, **film_summary(scores)}


def print_table(title: str, rows: list[dict[str, object]]) -> None:
    table = Table(title=title)
    for column in ("films", "n", "mean IoU", "p10 IoU", "keep95", "fallback", "full image", "no-lung flagged"):
        table.add_column(column, justify="left" if column == "films" else "right")
    for row in rows:
        flagged = f"{row['no_lungs_flagged']:.0%} of {row['n_no_lungs']}" if row["n_no_lungs"] else "-"
        table.add_row(str(row["films"]), str(row["n"]), f"{row['iou']:.3f}", f"{row['iou_p10']:.3f}",
                      f"{row['keep95']:.1%}", f"{row['fallback']:.1%}", f"{row['full_image']:.1%}", flagged)
    console.print(table)


def print_problems(scores: pd.DataFrame) -> None:
    """Each film that fell back, or whose crop window loses more than 5 % of the true lung box."""
    bad = scores[scores["has_lungs"] & (~scores["ok"].astype(bool) | (scores["keep"] < 0.95))]
    for row in bad.itertuples():
        console.print(f"  {row.image_id}: IoU {row.iou:.2f}, keeps {row.keep:.0%}, {row.method}"
                      f"{' ok' if row.ok else ''} {row.note}")


def machine_line(summary: dict[str, float]) -> str:
    return f"iou={summary['iou']:.4f} keep95={summary['keep95']:.4f} fallback={summary['fallback']:.4f}"


def verdict(summary: dict[str, float]) -> str:
    met = (summary["iou"] >= TARGETS["iou"] and summary["keep95"] >= TARGETS["keep95"]
           and summary["fallback"] <= TARGETS["fallback"])
    return "[green]met" if met else "[red]missed"


def cross_validate(films: pd.DataFrame, folds: list[int], settings: TrainSettings, scratch: Path,
                   shipped_fold: int) -> pd.DataFrame:
    """Scores of each held-out fold under a segmenter trained without it (column ``fold`` added); the model
    of ``shipped_fold`` is compared with the shipped weights."""
    fold_of = patient_folds(films["patient"], FOLDS, FOLD_SEED)
    twin = twin_training_films(scratch / "twin-train", TWIN_FILMS, TWIN_SEED)
    scores, rows = [], []
    for fold in folds:
        start = time.perf_counter()
        state = fit_segmenter(films[fold_of != fold], twin, settings)
        weights = scratch / f"fold{fold}.pt"
        save_weights(state, weights, settings, {"fold": fold})
        if fold == shipped_fold:
            same = all(torch.equal(state[k], v) for k, v in read_weights()["state_dict"].items())
            console.print(f"fold {fold} segmenter is {'bit-identical to' if same else 'NOT the same as'} the shipped "
                          "weights (trained without the same fold, same seed)")
        fold_scores = score_films(films[fold_of == fold], functools.partial(locate_lungs, weights=weights))
        scores.append(fold_scores.assign(fold=fold))
        rows.append(summary_row(f"fold {fold}", fold_scores))
        console.print(f"fold {fold}: trained and scored in {time.perf_counter() - start:.0f} s")
        print_problems(fold_scores)
    overall = pd.concat(scores, ignore_index=True)
    print_table(f"real films, patient-grouped {FOLDS}-fold CV (out of sample)",
                [*rows, summary_row("all folds", overall)])
    return overall


def twin_line(scratch: Path) -> None:
    """The shipped localiser on the synthetic twin of seed 0 (the segmenter trained on the twin of seed 1)."""
    root = scratch / "twin-0"
    generate(root, preset="small", seed=0, progress=False)
    parts = []
    for dataset in ("brixia", "aiforcovid"):
        truth = pd.read_csv(root / "_synthetic_truth" / f"{dataset}.csv", dtype={"image_id": str})
        parts.append(localiser_iou(truth.assign(path=[str(root / p) for p in truth["path"]], dataset=dataset)))
    results = pd.concat(parts, ignore_index=True)
    readable = results[results["method"] != "unreadable"]
    mean = readable["iou"].mean()
    console.print(f"synthetic twin (small, seed 0), shipped weights: n={len(readable)} mean IoU {mean:.3f}, "
                  f"p10 {readable['iou'].quantile(0.1):.3f}, fallback {1 - readable['ok'].mean():.1%} "
                  f"(target >= {TARGETS['twin']}: {'[green]met' if mean >= TARGETS['twin'] else '[red]missed'}[/])")


def timing_line(films: pd.DataFrame, count: int = 20) -> None:
    """Median segmenter time (squash + U-Net) per film, after a warm-up."""
    images = [normalize_intensity(read_image(p)) for p in films["path"].head(count)]
    segment(images[0])
    times = []
    for img in images:
        start = time.perf_counter()
        segment(img)
        times.append(1000 * (time.perf_counter() - start))
    console.print(f"segmenter inference: median {np.median(times):.1f} ms per film (max {max(times):.1f}) "
                  f"on the CPU, {len(images)} films up to {max(max(i.shape) for i in images)} px")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="score the shipped localiser on this film folder only")
    parser.add_argument("--folds", default=",".join(map(str, range(FOLDS))), help="CV folds to run")
    parser.add_argument("--steps", type=int, default=TrainSettings().steps)
    parser.add_argument("--threads", type=int, default=TrainSettings().threads)
    parser.add_argument("--quick", action="store_true", help="skip the cross-validation")
    args = parser.parse_args()

    if args.data is not None:
        scores = score_films(read_film_folder(args.data))
        summary = film_summary(scores)
        print_table(f"shipped localiser on {args.data}", [summary_row("all", scores)])
        print_problems(scores)
        console.print(f"targets (mean IoU >= 0.85, keep95 >= 0.97, fallback <= 0.05): {verdict(summary)}")
        print(machine_line(summary))
        return

    films = read_film_folder(REAL_FILMS)
    record = read_holdout()
    holdout = set(record["image_ids"])
    shipped = score_films(films)
    held_out = shipped[shipped["image_id"].isin(holdout)]
    classical = score_films(films, locate_lungs_classical)
    print_table("real films: shipped weights and the classical localiser", [
        summary_row("shipped, held-out fold (out of sample)", held_out),
        summary_row("shipped, training films (IN-SAMPLE)", shipped[~shipped["image_id"].isin(holdout)]),
        summary_row("classical localiser, all films", classical),
    ])
    last = film_summary(held_out)
    with tempfile.TemporaryDirectory(prefix="mdmt-lung-real-") as scratch:
        twin_line(Path(scratch))
        timing_line(films)
        if not args.quick:
            settings = replace(TrainSettings(), steps=args.steps, threads=args.threads)
            folds = [int(f) for f in args.folds.split(",") if f.strip()]
            last = film_summary(cross_validate(films, folds, settings, Path(scratch), record["fold"]))
    console.print(f"classical localiser: {machine_line(film_summary(classical))}")
    console.print(f"targets (mean IoU >= 0.85, keep95 >= 0.97, fallback <= 0.05), "
                  f"{'shipped held-out fold' if args.quick else 'cross-validation'}: {verdict(last)}")
    print(machine_line(last))


if __name__ == "__main__":
    main()
