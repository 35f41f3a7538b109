"""Where Grad-CAM of a severity model looks: the share of CAM mass inside the lungs against the lungs' share of
the film, on the real films (human lung masks) and on the synthetic twin (true lung zones and true scores).

A small severity model (``stl_severity``, ``tiny_cnn`` at 128 px, the 6 regional scores, the demo's schedule
for ``--epochs`` epochs without early stopping: stopped early, it kept a model from epoch 5 that had not learned
severity) is trained on the synthetic twin's BrixIA twice, with ``data.crop: none`` and with ``data.crop: lungs``.
Each model's severity head (its predicted global score) is explained with ``mdmt.infer.cam`` on every real film of
``../shared/data/real-cxr-lungs`` and on the twin's held-out test films. The map, computed on the network's
input (the crop), is pasted back into the film's pixels (zero outside the crop window), so both models are
measured against the same film:

- ``CAM in lungs``: Σ CAM over the lung mask / Σ CAM over the film (films whose map is all zero are left out);
- ``lung share``: the lung mask's share of the film's pixels (what a map spread evenly would score);
- ``ratio``: their quotient (1 = no preference for the lungs);
- ``even in crop``: the ratio of a map spread evenly over the network's input (the crop window): what the crop
  alone earns, with no preference for the lungs inside it;
- twin only, ``CAM in opacified zones`` against ``their share``: the zones whose true score is 1–3. The twin
  writes the true lung zones (``_synthetic_truth/masks``: 40·k in zone k) and per-zone true scores, not
  pixel masks of the opacities, so the opacified zones stand for the opacity masks.

    python benchmarks/explain_real.py [--data TWIN_DIR] [--preset small] [--epochs 30] [--work DIR]

CPU only, about twenty minutes on two cores (a finished run in ``--work`` is reused). Prints one table with the
runs' regional MAE (and that of predicting the test films' mean), the Pearson r of the global score, and the
commit (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import mdmt
from mdmt.config import load_config, parse_override
from mdmt.infer.cam import grad_cams
from mdmt.infer.films import Film, load_film, network_input
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.lungs.locate import read_mask
from mdmt.lungs.training import read_film_folder
from mdmt.model_card import source_commit
from mdmt.runs import RunSpec
from mdmt.synth import generate
from mdmt.train.run import train_run

REAL_FILMS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-cxr-lungs"
DEMO_CONFIG = Path(mdmt.__file__).resolve().parent / "configs" / "demo.yaml"
CROPS = ("none", "lungs")
BATCH = 16
console = Console(width=190)


def train(twin: Path, work: Path, crop: str, epochs: int) -> Path:
    """The ``stl_severity`` run on the twin's BrixIA with ``data.crop: crop``."""
    overrides = [
        f"data.datasets.aiforcovid.params.root={twin / 'AIforCOVID'}",
        f"data.datasets.brixia.params.root={twin / 'BRIXIA'}",
        f"data.cache_dir={work / 'cache'}",
        f"results_dir={work / f'results-{crop}'}",
        f"data.crop={crop}",
        "data.image_size=128",
        "model.input_size=128",
        f"train.max_epochs={epochs}",
        f"train.early_stopping={epochs}",
        "runtime.threads=2",
    ]
    config = load_config(DEMO_CONFIG, [parse_override(o) for o in overrides])
    return train_run(config, RunSpec("stl_severity", "tiny_cnn", "cv5", 0, 0))


def film_cam(film: Film, cam: np.ndarray, margin: float) -> np.ndarray:
    """The map of one film's crop pasted into the film's pixels (zero outside the crop window)."""
    x0, y0, x1, y1 = film.window(margin)
    full = np.zeros((film.height, film.width), dtype=np.float64)
    full[y0:y1, x0:x1] = np.asarray(Image.fromarray(cam, mode="F").resize((x1 - x0, y1 - y0), Image.BILINEAR))
    return full


def fitted(mask: np.ndarray, film: Film) -> np.ndarray:
    """``mask`` at the film's size (nearest neighbour when they differ)."""
    if mask.shape == (film.height, film.width):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((film.width, film.height), Image.NEAREST))


def film_maps(trained: TrainedModel, paths: list[Path]) -> list[tuple[Film, np.ndarray]]:
    """Each film with the severity head's Grad-CAM in the film's pixels."""
    out = []
    for start in range(0, len(paths), BATCH):
        films = [load_film(p, trained.config.data) for p in paths[start : start + BATCH]]
        cams = grad_cams(trained.model, trained.severity, network_input([f.image for f in films], trained))
        out += [(f, film_cam(f, c, trained.config.data.crop_margin)) for f, c in zip(films, cams, strict=True)]
    return out


def even_map(film: Film, margin: float) -> np.ndarray:
    """A map spread evenly over the network's input, in the film's pixels."""
    return film_cam(film, np.ones((1, 1), dtype=np.float32), margin)


def shares(cam: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """(share of the CAM mass in ``region``, ``region``'s share of the pixels)."""
    return float(cam[region].sum() / cam.sum()), float(region.mean())


def real_rows(trained: TrainedModel, films: pd.DataFrame) -> tuple[list[tuple[float, ...]], int]:
    """(CAM in lungs, lung share, an even map's share in the lungs) of every real film with lungs in its mask and
    a non-zero map, and the number of films with lungs whose map is all zero."""
    rows, zero = [], 0
    for (film, cam), mask_path in zip(film_maps(trained, [Path(p) for p in films["path"]]), films["mask_path"],
                                      strict=True):
        lungs = fitted(read_mask(mask_path), film) > 0
        if lungs.any() and cam.sum() > 0:
            rows.append((*shares(cam, lungs), shares(even_map(film, trained.config.data.crop_margin), lungs)[0]))
        zero += int(lungs.any() and cam.sum() == 0)
    return rows, zero


def twin_rows(trained: TrainedModel, twin: Path) -> tuple[list[tuple[float, ...]], int]:
    """(CAM in lungs, lung share, CAM in opacified zones, their share, an even map's share in the lungs) of the
    run's BrixIA test films with an opacified zone and a non-zero map, and the number of those films whose map is
    all zero."""
    tested = pd.read_csv(trained.run_dir / "predictions_severity_regions.csv", dtype={"image_id": str})
    truth = pd.read_csv(twin / "_synthetic_truth" / "brixia.csv", dtype={"image_id": str}).set_index("image_id")
    truth = truth.loc[tested["image_id"]]
    rows, zero = [], 0
    maps = film_maps(trained, [twin / p for p in truth["path"]])
    for image_id, (film, cam) in zip(truth.index, maps, strict=True):
        zones = fitted(read_mask(twin / "_synthetic_truth" / "masks" / "brixia" / f"{image_id}.png"), film) // 40
        opacified = [k + 1 for k, r in enumerate("ABCDEF") if truth.loc[image_id, f"true_{r}"] >= 1]
        if cam.sum() > 0 and opacified:
            even = shares(even_map(film, trained.config.data.crop_margin), zones > 0)[0]
            rows.append((*shares(cam, zones > 0), *shares(cam, np.isin(zones, opacified)), even))
        zero += int(cam.sum() == 0 and bool(opacified))
    return rows, zero


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="an existing twin (default: write one)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None, help="caches and runs (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        twin = args.data or work / "twin"
        if args.data is None:
            generate(twin, preset=args.preset, seed=0, progress=False)
        films = read_film_folder(REAL_FILMS) if REAL_FILMS.is_dir() else None
        table = Table(title="Grad-CAM of the severity head: share of CAM mass in the lungs")
        for column in ("model", "films", "n", "all-zero maps", "CAM in lungs", "lung share", "ratio", "even in crop",
                       "CAM in opacified zones", "their share", "ratio ", "regional MAE", "MAE of the mean",
                       "global r"):
            table.add_column(column, justify="left" if column in ("model", "films") else "right")
        for crop in CROPS:
            started = time.perf_counter()
            trained = load_trained(train(twin, work, crop, args.epochs))
            metrics = json.loads((trained.run_dir / "metrics.json").read_text())["severity_regions"]
            mae, r = metrics["mae"], metrics["global_pearson_r"]
            tested = pd.read_csv(trained.run_dir / "predictions_severity_regions.csv").filter(like="y_true_")
            constant = float((tested - tested.mean()).abs().to_numpy().mean())
            console.print(f"crop {crop}: trained in {time.perf_counter() - started:.0f} s, regional MAE {mae:.3f}")
            parts = [("twin test", twin_rows(trained, twin))]
            if films is not None:
                parts.insert(0, ("real", real_rows(trained, films)))
            for name, (rows, zero) in parts:
                values = np.asarray(rows, dtype=np.float64).mean(axis=0)
                zones = ([f"{values[2]:.3f}", f"{values[3]:.3f}", f"{values[2] / values[3]:.2f}"] if values.size == 5
                         else ["–"] * 3)
                table.add_row(f"crop: {crop}", name, str(len(rows)), str(zero), f"{values[0]:.3f}", f"{values[1]:.3f}",
                              f"{values[0] / values[1]:.2f}", f"{values[-1] / values[1]:.2f}", *zones, f"{mae:.3f}",
                              f"{constant:.3f}", f"{r:.2f}")
        console.print(table)
        commit, dirty = source_commit()
        console.print(f"mdmt at {commit[:7]}{' + uncommitted changes in src/' if dirty else ''}")
        if films is None:
            console.print(f"[yellow]real films not found at {REAL_FILMS}: twin rows only")


if __name__ == "__main__":
    main()
