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

``--models real`` measures models trained on the real films themselves, out of sample: the scored films of
``../shared/data/real-cxr-lungs`` in patient-grouped 5-fold CV (mdmt's ``cv5`` protocol, ``--seeds``), lung crop
at ``--real-size`` px, the schedule of ``benchmarks/severity_real.py`` (batch 16, early stopping after 40 epochs
on the validation loss). Two arms: severity alone (``stl``), and severity with the human lung masks as a second
task (``mdmt``: the ``lung_mask`` segmentation task, whose unscored films join the folds). Each fold's model is
explained on its own test fold's scored films only, so every map is of a film the model never trained on.

``--maps`` chooses the explanations measured: ``gradcam`` (what the columns call CAM) and the grad-cam package's
variants ``gradcam++``, ``hirescam``, ``layercam``, ``xgradcam`` (``NAME@LAYER`` weighs the backbone module
``LAYER`` instead of the last convolutional stage, e.g. ``layercam@features.2``, ``tiny_cnn``'s first block), and
``occlusion`` / ``occlusion-fine`` (``mdmt.infer.cam.occlusion_maps``: how far the predicted global score falls when
a patch of a quarter / an eighth of the input's side is blurred), which read the same model with no gradient and no
layer.

    python benchmarks/explain_real.py [--models twin real] [--maps gradcam ...] [--data TWIN_DIR] [--preset small]
                                      [--twin-seed 0] [--crops none lungs] [--epochs 30]
                                      [--real-size 128] [--seeds 0] [--untrained] [--workers 2] [--work DIR]

CPU only: the twin models about twenty minutes on two cores, the real CV about as long per seed (a finished run in
``--work`` is reused). Prints one table with the runs' regional MAE (and that of predicting the test films'
mean), the Pearson r of the global score, and the commit (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table

import mdmt
from mdmt.config import load_config, parse_override
from mdmt.infer.cam import GRAD_CAM_METHODS, grad_cams, occlusion_maps
from mdmt.infer.films import Film, load_film, network_input
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.lungs.locate import read_mask
from mdmt.lungs.training import read_film_folder
from mdmt.model_card import source_commit
from mdmt.parallel import ordered_map
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


REAL_ARMS = {"stl": ["severity"], "mdmt": ["severity", "lung_mask"]}
"""The real-film models: severity alone, and severity with the lung masks as the second task."""


def real_config(work: Path, size: int) -> Path:
    """The config of the real-film CV runs (severity_real.py's schedule), written into ``work``."""
    config = {
        "data": {"datasets": {"real": {"name": "scored_films", "params": {"root": str(REAL_FILMS)}}},
                 "image_size": size, "crop": "lungs", "cache_dir": str(work / "cache")},
        "model": {"backbone": "tiny_cnn", "weights": "none", "input_size": size, "severity_task": "severity_regions"},
        "train": {"batch_size": 16, "max_epochs": 1000, "warmup_epochs": 20, "early_stopping": 40,
                  "scheduler_patience": 10, "checkpoint_every_s": 3600},
        "protocol": {"dataset": "real", "cv_folds": 5},
        "strategies": {arm: {"params": {"datasets": ["real"], "tasks": tasks}} for arm, tasks in REAL_ARMS.items()},
        "results_dir": str(work / f"results-real-{size}"),
        "runtime": {"device": "cpu", "threads": 1},
    }
    path = work / f"real-{size}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def train_real(config_path: Path, spec: RunSpec) -> Path:
    """One real-film CV run (one process; ``ordered_map`` runs folds side by side)."""
    return train_run(load_config(config_path), spec, progress=False)


def pooled_metrics(runs: list[Path]) -> tuple[float, float, float]:
    """(regional MAE, MAE of predicting the pooled test films' mean, Pearson r of the global score) of the runs'
    test predictions pooled, the predictions clipped to 0–3 as the metrics clip them."""
    table = pd.concat([pd.read_csv(r / "predictions_severity_regions.csv") for r in runs])
    truth = table.filter(like="y_true_").to_numpy()
    predicted = table.filter(like="y_pred_").to_numpy().clip(0, 3)
    r = float(np.corrcoef(truth.sum(axis=1), predicted.sum(axis=1))[0, 1])
    return float(np.abs(predicted - truth).mean()), float(np.abs(truth - truth.mean(axis=0)).mean()), r


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


MAPS = {**{name: partial(grad_cams, method=name) for name in GRAD_CAM_METHODS},
        "occlusion": partial(occlusion_maps, share=0.25), "occlusion-fine": occlusion_maps}
"""The explanations measured (``--maps``): Grad-CAM and its variants (``mdmt explain --map``; ``NAME@LAYER`` weighs
the backbone module ``LAYER``, as ``--cam-layer`` does), and occlusion with patches of a quarter and (``mdmt explain
--map occlusion``) an eighth of the input's side."""


def map_name(text: str) -> str:
    """A ``--maps`` entry: a name of ``MAPS``, a Grad-CAM one optionally with ``@LAYER``."""
    method, at, layer = text.partition("@")
    if method not in MAPS or (at and (method not in GRAD_CAM_METHODS or not layer)):
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(MAPS)}; a Grad-CAM one may add @LAYER")
    return text


def batch_maps(trained: TrainedModel, paths: list[Path], methods: list[str]
               ) -> Iterator[tuple[list[Film], dict[str, list[np.ndarray]]]]:
    """Per batch of ``paths``: its films (each read and cropped once for every method) and, per method of
    ``methods`` (``MAPS[method]``, ``method@layer`` at that layer), the severity head's map of each film in the
    film's pixels."""
    explain = {}
    for method in methods:
        name, _, layer = method.partition("@")
        explain[method] = partial(MAPS[name], layer=layer) if layer else MAPS[name]
    margin = trained.config.data.crop_margin
    for start in range(0, len(paths), BATCH):
        films = [load_film(p, trained.config.data) for p in paths[start : start + BATCH]]
        x = network_input([f.image for f in films], trained)
        yield films, {method: [film_cam(f, c, margin) for f, c in zip(films, fn(trained.model, trained.severity, x),
                                                                       strict=True)]
                      for method, fn in explain.items()}


def even_map(film: Film, margin: float) -> np.ndarray:
    """A map spread evenly over the network's input, in the film's pixels."""
    return film_cam(film, np.ones((1, 1), dtype=np.float32), margin)


def shares(cam: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """(share of the CAM mass in ``region``, ``region``'s share of the pixels)."""
    return float(cam[region].sum() / cam.sum()), float(region.mean())


Rows = dict[str, tuple[list[tuple[float, ...]], int]]
"""Per map: the rows of its films and the number of its all-zero maps (``real_rows``, ``twin_rows``)."""


def tally(out: Rows, maps: dict[str, list[np.ndarray]], i: int, regions: tuple[np.ndarray, ...], even: float
          ) -> None:
    """Film ``i`` of a batch into ``out``: for each map that is not all zero, a row of its ``shares`` of each of
    ``regions`` and ``even`` (an even map's share); for each all-zero map, one more of them."""
    for method, cams in maps.items():
        rows, zero = out[method]
        if cams[i].sum() > 0:
            rows.append((*(value for region in regions for value in shares(cams[i], region)), even))
        out[method] = rows, zero + int(cams[i].sum() == 0)


def real_rows(trained: TrainedModel, films: pd.DataFrame, methods: list[str]) -> Rows:
    """Per method: (CAM in lungs, lung share, an even map's share in the lungs) of every real film with lungs in its
    mask and a non-zero map, and the number of films with lungs whose map is all zero."""
    out: Rows = {method: ([], 0) for method in methods}
    masks = iter(films["mask_path"])
    for batch, maps in batch_maps(trained, [Path(p) for p in films["path"]], methods):
        for i, film in enumerate(batch):
            lungs = fitted(read_mask(next(masks)), film) > 0
            if not lungs.any():
                continue
            even = shares(even_map(film, trained.config.data.crop_margin), lungs)[0]
            tally(out, maps, i, (lungs,), even)
    return out


def twin_rows(trained: TrainedModel, twin: Path, methods: list[str]) -> Rows:
    """Per method: (CAM in lungs, lung share, CAM in opacified zones, their share, an even map's share in the lungs)
    of the run's BrixIA test films with an opacified zone and a non-zero map, and the number of those films whose
    map is all zero."""
    tested = pd.read_csv(trained.run_dir / "predictions_severity_regions.csv", dtype={"image_id": str})
    truth = pd.read_csv(twin / "_synthetic_truth" / "brixia.csv", dtype={"image_id": str}).set_index("image_id")
    truth = truth.loc[tested["image_id"]]
    out: Rows = {method: ([], 0) for method in methods}
    ids = iter(truth.index)
    for batch, maps in batch_maps(trained, [twin / p for p in truth["path"]], methods):
        for i, film in enumerate(batch):
            image_id = next(ids)
            opacified = [k + 1 for k, r in enumerate("ABCDEF") if truth.loc[image_id, f"true_{r}"] >= 1]
            if not opacified:
                continue
            zones = fitted(read_mask(twin / "_synthetic_truth" / "masks" / "brixia" / f"{image_id}.png"), film) // 40
            even = shares(even_map(film, trained.config.data.crop_margin), zones > 0)[0]
            tally(out, maps, i, (zones > 0, np.isin(zones, opacified)), even)
    return out


def table_row(model: str, method: str, name: str, rows: list[tuple[float, ...]], zero: int,
              metrics: tuple[float, float, float]) -> list[str]:
    """One table row: the mean shares of ``rows`` (``real_rows`` or ``twin_rows``) and the model's metrics."""
    values = np.asarray(rows, dtype=np.float64).mean(axis=0)
    zones = [f"{values[2]:.3f}", f"{values[3]:.3f}", f"{values[2] / values[3]:.2f}"] if values.size == 5 else ["–"] * 3
    mae, constant, r = metrics
    return [model, method, name, str(len(rows)), str(zero), f"{values[0]:.3f}", f"{values[1]:.3f}",
            f"{values[0] / values[1]:.2f}", f"{values[-1] / values[1]:.2f}", *zones, f"{mae:.3f}", f"{constant:.3f}",
            f"{r:.2f}"]


def twin_models(args: argparse.Namespace, work: Path, films: pd.DataFrame | None) -> list[list[str]]:
    """The rows of the two twin-trained models (whole film, lung crop) on the real films and the twin's test films."""
    twin = args.data or work / "twin"
    if args.data is None and not (twin / "BRIXIA").is_dir():
        generate(twin, preset=args.preset, seed=args.twin_seed, progress=False)
    out = []
    for crop in args.crops:
        started = time.perf_counter()
        trained = load_trained(train(twin, work, crop, args.epochs))
        metrics = json.loads((trained.run_dir / "metrics.json").read_text())["severity_regions"]
        tested = pd.read_csv(trained.run_dir / "predictions_severity_regions.csv").filter(like="y_true_")
        constant = float((tested - tested.mean()).abs().to_numpy().mean())
        console.print(f"crop {crop}: trained in {time.perf_counter() - started:.0f} s, "
                      f"regional MAE {metrics['mae']:.3f}")
        model = f"twin seed {args.twin_seed}, crop: {crop}" if args.data is None else f"twin, crop: {crop}"
        parts = {"twin test": twin_rows(trained, twin, args.maps)}
        if films is not None:
            parts = {"real": real_rows(trained, films, args.maps), **parts}
        scores = (metrics["mae"], constant, metrics["global_pearson_r"])
        out += [table_row(model, method, name, *found[method], scores) for method in args.maps
                for name, found in parts.items()]
    return out


def untrained(trained: TrainedModel, seed: int) -> TrainedModel:
    """The same network with fresh random weights (seeded): the ``--untrained`` control, what a map finds in a
    network that learned nothing (its BatchNorm statistics reset too)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(trained.model)
    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return replace(trained, model=model.eval())


def real_models(args: argparse.Namespace, work: Path, films: pd.DataFrame) -> list[list[str]]:
    """The rows of the real-film CV models, each fold's model explained on its own test fold's scored films (and,
    with ``--untrained``, the same networks with fresh random weights)."""
    config = real_config(work, args.real_size)
    specs = [RunSpec(arm, "tiny_cnn", "cv5", fold, seed) for arm in REAL_ARMS for seed in args.seeds
             for fold in range(5)]
    started = time.perf_counter()
    runs = dict(zip(specs, ordered_map(partial(train_real, config), specs, args.workers), strict=True))
    console.print(f"real-film CV: {len(specs)} runs trained in {time.perf_counter() - started:.0f} s")
    by_id = films.set_index("image_id")
    variants = ["", ", untrained"] if args.untrained else [""]
    out = []
    for arm, tasks in REAL_ARMS.items():
        arm_runs = [(spec, run) for spec, run in runs.items() if spec.strategy == arm]
        rows = {(v, m): [] for v in variants for m in args.maps}
        zero = dict.fromkeys(rows, 0)
        for spec, run in arm_runs:
            trained = load_trained(run)
            tested = pd.read_csv(run / "predictions_severity_regions.csv", dtype={"image_id": str})["image_id"]
            for variant in variants:
                model = untrained(trained, spec.seed * 10 + spec.fold) if variant else trained
                for method, (fold_rows, fold_zero) in real_rows(model, by_id.loc[tested].reset_index(),
                                                                args.maps).items():
                    rows[variant, method] += fold_rows
                    zero[variant, method] += fold_zero
        metrics = pooled_metrics([run for _, run in arm_runs])
        for (variant, method), found in rows.items():
            name = f"real CV, {' + '.join(tasks)}{variant}, crop: lungs, {args.real_size} px"
            out.append(table_row(name, method, "real test folds", found, zero[variant, method], metrics))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["twin", "real"], default=["twin", "real"])
    parser.add_argument("--data", type=Path, default=None, help="an existing twin (default: write one)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--twin-seed", type=int, default=0, help="the generator seed of the twin written here")
    parser.add_argument("--crops", nargs="+", choices=CROPS, default=list(CROPS), help="the twin models' crops")
    parser.add_argument("--epochs", type=int, default=30, help="the twin models' epochs")
    parser.add_argument("--real-size", type=int, default=128, help="the real-film models' input side in px")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the real-film CV's seeds")
    parser.add_argument("--workers", type=int, default=2, help="real-film runs trained at once (processes)")
    parser.add_argument("--maps", nargs="+", type=map_name, default=["gradcam"], help="the explanations measured: "
                        f"{', '.join(MAPS)}; a Grad-CAM one may add @LAYER (layercam@features.2)")
    parser.add_argument("--untrained", action="store_true", help="also read every real-film fold's network with fresh "
                        "random weights (a control: what each map finds with nothing learned)")
    parser.add_argument("--work", type=Path, default=None, help="caches and runs (default: a temporary folder; one "
                        "folder per twin: its finished runs are reused)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    films = read_film_folder(REAL_FILMS) if REAL_FILMS.is_dir() else None
    if "real" in args.models and films is None:
        parser.error(f"--models real needs the real films at {REAL_FILMS}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = twin_models(args, work, films) if "twin" in args.models else []
        rows += real_models(args, work, films) if "real" in args.models else []
    table = Table(title="Grad-CAM of the severity head: share of CAM mass in the lungs")
    for column in ("model", "map", "films", "n", "all-zero maps", "CAM in lungs", "lung share", "ratio", "even in crop",
                   "CAM in opacified zones", "their share", "ratio ", "regional MAE", "MAE of the mean", "global r"):
        table.add_column(column, justify="left" if column in ("model", "map", "films") else "right",
                         no_wrap=column == "map", min_width=max(map(len, args.maps)) if column == "map" else None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    commit, dirty = source_commit()
    console.print(f"mdmt at {commit[:7]}{' + uncommitted changes in src/' if dirty else ''}")
    if films is None:
        console.print(f"[yellow]real films not found at {REAL_FILMS}: twin rows only")


if __name__ == "__main__":
    main()
