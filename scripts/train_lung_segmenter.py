"""Retrain the shipped lung segmenter weights (deterministic: same films, seed and threads → same weights).

Trains the compact U-Net of ``mdmt.lungs.unet`` on the real films of ``--data`` (the folder layout of
``mdmt.lungs.training``: manifest.csv, images/, masks/) and on films of the synthetic twin (generated
here in a temporary folder). One patient-grouped fold of the real films is left out of training and listed
beside the weights, so the tests can score the shipped weights out of sample; ``--holdout-fold none``
trains on every film.

    python scripts/train_lung_segmenter.py [--data DIR] [--out FILE] [--seed 0] [--steps 450] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mdmt.lungs.training import (
    FOLD_SEED,
    FOLDS,
    HOLDOUT_FOLD,
    fit_segmenter,
    patient_folds,
    read_film_folder,
    write_holdout,
)
from mdmt.lungs.unet import HOLDOUT_FILE, WEIGHTS_FILE, TrainSettings, save_weights
from mdmt.synth.lung_films import (
    TWIN_FILMS,
    TWIN_PRESET,
    TWIN_SEED,
    twin_training_films,
)

REAL_FILMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr-lungs"


def main() -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REAL_FILMS, help=f"real films with lung masks ({REAL_FILMS})")
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE,
                        help="weights file (the held-out list goes beside it)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--holdout-fold", default=str(HOLDOUT_FOLD),
                        help=f"patient-grouped fold 0..{FOLDS - 1} left out of training, or 'none'")
    args = parser.parse_args()

    settings = replace(defaults, seed=args.seed, steps=args.steps, threads=args.threads)
    films = read_film_folder(args.data)
    holdout = None if args.holdout_fold == "none" else int(args.holdout_fold)
    folds = patient_folds(films["patient"], FOLDS, FOLD_SEED)
    train = films[folds != holdout]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mdmt-lung-twin-") as scratch:
        twin = twin_training_films(Path(scratch) / "twin", TWIN_FILMS, TWIN_SEED)
        print(f"training on {len(train)} real films of {train['patient'].nunique()} patients "
              f"(held out: fold {holdout}, {len(films) - len(train)} films) and {len(twin)} twin films", flush=True)
        state = fit_segmenter(train, twin, settings, progress=True)
    trained_on = {
        "real_films": str(args.data.name), "real_count": len(train), "holdout_fold": holdout,
        "folds": FOLDS, "fold_seed": FOLD_SEED,
        "twin": {"preset": TWIN_PRESET, "seed": TWIN_SEED, "films": TWIN_FILMS},
    }
    save_weights(state, args.out, settings, trained_on)
    holdout_file = args.out.with_name(HOLDOUT_FILE.name)
    write_holdout(holdout_file, films[folds == holdout], holdout if holdout is not None else -1, FOLDS, FOLD_SEED)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {holdout_file} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
