"""The model card of a finished run or an export: ``metadata.json`` (machine-readable, keys after the
``metadata.json`` of MONAI bundles) and ``model_card.md`` (the same for people).
(Over 400 lines on purpose: the JSON and the Markdown are two views of one record, gathered once from the run
folder.)

Everything comes from the run folder (``mdmt.runs``): the mdmt version and source commit, the config fingerprint
(``inputs.json``), the tasks (``tasks.json``), the training data (each dataset's images, patients and centers per
split part, given by the caller that holds the splits or rebuilt from the run's image caches and checked against
the split hashes of ``inputs.json``; whether it is the synthetic twin, found by the ``_synthetic_truth/params.json``
the twin writes beside its datasets; its licence), the test metrics (``metrics.json``) with percentile-bootstrap
95 % intervals of the headline metrics, the calibration and conformal coverage on the test fold when the run holds
``calibration.json``, the intended use and the known limits.

The bootstrap recomputes the headline metrics for all resamples at once (``headline_statistics``; on the test
rows themselves each equals the value ``mdmt.evaluate.scoring`` wrote): scoring one resample through scikit-learn
takes 50-100 ms, 1,000 resamples at the end of every run would take minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import subprocess
from collections.abc import Callable, Mapping
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from mdmt import __version__
from mdmt.config import CalibrationConfig, Config, PluginRef, load_run_config
from mdmt.errors import DataError
from mdmt.evaluate import calibration as calib
from mdmt.evaluate.metrics import region_classes
from mdmt.evaluate.scoring import finished_runs, read_predictions, rescore, run_entries
from mdmt.runs import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    INPUTS_FILE,
    METRICS_FILE,
    SPEC_FILE,
    RunSpec,
    atomic_write_text,
    predictions_file,
    spec_from_dir,
    write_json,
)
from mdmt.sources.tables import SYNTHETIC_MARKER
from mdmt.tasks import REGION_SCORE_RANGE, prediction_column

if TYPE_CHECKING:
    from mdmt.data.splits import Split

CARD_JSON = "metadata.json"
CARD_MD = "model_card.md"
SCHEMA = "mdmt-model-card/1"
INTENDED_USE = "research; not for clinical decisions"
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
LICENCES = {
    "aiforcovid": "AIforCOVID: patient data released for research; use under its providers' terms "
                  "(https://aiforcovid.radiomica.it)",
    "brixia": "BrixIA: research use only (https://brixia.github.io)",
}
OTHER_LICENCE = "not known to mdmt: state the licence of this dataset before sharing the model"
SYNTHETIC_LICENCE = "synthetic films written by mdmt's twin: no patient data"
SEGMENTER_LICENCE = ("the lung segmenter was trained on real films of the COVID-19 image data collection (Cohen et "
                     "al.), each under the licence of its source (per-image licences), with V7 Labs' lung masks, and "
                     "on synthetic twin films")
NOT_FITTED = "not fitted"
Parts = dict[str, dict[str, dict[str, Any]]]
"""dataset → split part (train, val, test) → images, patients, images per center."""
Statistic = Callable[[np.ndarray], np.ndarray]
"""Resampled row indices ``(B, n)`` → one metric value per resample ``(B,)``."""


# --------------------------------------------------------------------------------------------- provenance
@functools.lru_cache(maxsize=1)
def source_commit() -> tuple[str, bool | None]:
    """The git commit of the mdmt source this process runs and whether ``src/`` differs from it; ``("unknown",
    None)`` for an installed package or without git (no network)."""
    package = Path(__file__).resolve().parent

    def git(folder: Path | str, *args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        top, commit = git(package, "rev-parse", "--show-toplevel", "HEAD").split()
        if (Path(top).resolve() / "src" / "mdmt") != package:  # a package installed inside another repository
            return "unknown", None
        return commit, bool(git(top, "status", "--porcelain", "--", "src"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return "unknown", None


def _version(package: str) -> str | None:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        return None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


# --------------------------------------------------------------------------------------------- the data
def data_location(ref: PluginRef) -> Path | None:
    """Where a dataset entry's data is: its ``root`` folder or its manifest ``path``."""
    where = ref.params.get("root") or ref.params.get("path")
    return Path(where) if where else None


def synthetic_twin(location: Path | None) -> Path | None:
    """The synthetic twin folder holding ``location`` (itself or one of its two parents holds the twin's
    ``_synthetic_truth/params.json``), or None for other data."""
    if location is None:
        return None
    location = location.absolute()
    return next((f for f in [location, *location.parents][:3] if (f / SYNTHETIC_MARKER).is_file()), None)


def run_datasets(run_dir: Path, config: Config) -> list[str]:
    """The datasets a run trained on (the caches of its ``inputs.json``; all configured ones without it)."""
    inputs = run_dir / INPUTS_FILE
    return list(_read_json(inputs)["caches"]) if inputs.is_file() else list(config.data.datasets)


def synthetic_datasets(run_dir: str | Path) -> list[str]:
    """The datasets of a run that are the synthetic twin: from its card when it has one, else from its config."""
    run_dir = Path(run_dir)
    card = run_dir / CARD_JSON
    if card.is_file():
        return [d["dataset"] for d in _read_json(card)["training_data"] if d["synthetic"]]
    config = load_run_config(run_dir / CONFIG_FILE)
    return [name for name in run_datasets(run_dir, config)
            if synthetic_twin(data_location(PluginRef.of(config.data.datasets[name]))) is not None]


def synthetic_warning(run_dir: str | Path) -> str | None:
    """The one line ``predict`` and ``explain`` print for a model trained on synthetic data, else None."""
    names = synthetic_datasets(run_dir)
    if not names:
        return None
    return (f"warning: this model was trained on synthetic data ({', '.join(names)}, mdmt's twin): its outputs "
            f"say nothing about real patients")


def _part_summary(records: pd.DataFrame) -> dict[str, Any]:
    return {"images": len(records), "patients": int(records["patient_id"].nunique()),
            "centers": {str(c): int(n) for c, n in records["center"].astype(str).value_counts().sort_index().items()}}


def split_parts(splits: Mapping[str, Split], records: Mapping[str, pd.DataFrame]) -> Parts:
    """Per dataset and split part: images, patients and images per center (``records``: each dataset's records
    table, as its image cache holds it)."""
    out = {}
    for name, split in splits.items():
        table = records[name].set_index(records[name]["image_id"].astype(str))
        out[name] = {part: _part_summary(table.loc[[str(i) for i in ids]]) for part, ids in split.parts().items()}
    return out


def _parts_from_caches(config: Config, spec: RunSpec, inputs: Mapping[str, Any]) -> Parts | None:
    """``split_parts`` of the run's splits rebuilt from its image caches; None when a cache is not on this machine
    or a rebuilt split differs from the one ``inputs.json`` records."""
    # the image stack (torch) is imported only when the splits must be rebuilt
    from mdmt.cache.image_cache import open_cache
    from mdmt.data.datasets import select
    from mdmt.protocols import build_splits, split_ids

    caches = {}
    for name, key in inputs["caches"].items():
        found = sorted(Path(config.data.cache_dir).glob(f"*-{key[:16]}"))
        if not found:
            return None
        caches[name] = open_cache(found[0])
    splits = build_splits(config, select(config, list(caches)), caches, spec.protocol, spec.fold, spec.seed)
    if any(_digest(parts) != inputs["splits"].get(name) for name, parts in split_ids(splits).items()):
        return None
    return split_parts(splits, {name: cache.records for name, cache in caches.items()})


def _test_parts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per dataset: the test part as the prediction files show it (images of every task labelled there)."""
    tables = [read_predictions(run_dir / predictions_file(t)) for t in run_entries(run_dir)
              if (run_dir / predictions_file(t)).is_file()]
    rows = pd.concat(tables).drop_duplicates(["dataset", "image_id"]) if tables else pd.DataFrame()
    return {str(name): {"test": _part_summary(group)} for name, group in rows.groupby("dataset")} if len(rows) else {}


def training_data(run_dir: Path, config: Config, spec: RunSpec, inputs: Mapping[str, Any],
                  parts: Parts | None = None) -> list[dict[str, Any]]:
    """One entry per dataset of the run: plug-in, location, synthetic or not, licence, and the images, patients and
    centers of each split part (``parts_from``: ``splits`` given, ``caches`` rebuilt from the image caches, or
    ``predictions`` with the test part only when the caches are not on this machine)."""
    source = "splits" if parts is not None else "caches"
    parts = parts if parts is not None else _parts_from_caches(config, spec, inputs)
    if parts is None:
        parts, source = _test_parts(run_dir), "predictions"
    entries = []
    for name in inputs["caches"]:
        ref = PluginRef.of(config.data.datasets[name]).named(name)
        location = data_location(ref)
        synthetic = synthetic_twin(location) is not None
        entries.append({
            "dataset": name, "plugin": ref.name, "location": str(location) if location else None,
            "synthetic": synthetic,
            "licence": SYNTHETIC_LICENCE if synthetic else LICENCES.get(ref.name, OTHER_LICENCE),
            "parts": parts.get(name, {}), "parts_from": source,
        })
    return entries


@functools.lru_cache(maxsize=1)
def lung_segmenter() -> dict[str, Any]:
    """The shipped lung segmenter (the crop of ``crop: lungs`` runs, and predict's check for frontal lungs): weights
    fingerprint, what it was trained on, licence."""
    from mdmt.lungs.unet import read_weights, weights_fingerprint

    return {"weights_sha256_16": weights_fingerprint(), "trained_on": read_weights().get("trained_on", {}),
            "licence": SEGMENTER_LICENCE}


# --------------------------------------------------------------------------------------------- metrics
def _ratio(numerator: np.ndarray, denominator: np.ndarray | None = None) -> Statistic:
    """Σ numerator / Σ denominator over the resampled rows (denominator 1: the mean); NaN where it sums to 0."""
    den = np.ones(len(numerator)) if denominator is None else denominator.astype(np.float64)

    def statistic(idx: np.ndarray) -> np.ndarray:
        total = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, numerator[idx].sum(axis=1) / total, np.nan)

    return statistic


def _roc_auc(truth: np.ndarray, score: np.ndarray) -> Statistic:
    """ROC AUC as the Mann-Whitney U of the scores (ties ranked by their average); NaN with one class."""
    positive = truth == 1

    def statistic(idx: np.ndarray) -> np.ndarray:
        pos = positive[idx]
        n1 = pos.sum(axis=1)
        n0 = idx.shape[1] - n1
        ranks = scipy_stats.rankdata(score[idx], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n1 * n0 > 0, ((ranks * pos).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0), np.nan)

    return statistic


def headline_statistics(entry: Mapping[str, Any], table: pd.DataFrame) -> dict[str, Statistic]:
    """The headline metrics of one task's prediction rows as functions of resampled rows; on the rows themselves
    each equals the value ``mdmt.evaluate.scoring`` writes into ``metrics.json`` under the same name."""
    def columns(base: str) -> np.ndarray:
        return table[[prediction_column(base, g) for g in entry["groups"]]].to_numpy(np.float64)

    truth = columns("y_true")
    if entry["scorer"] == "binary":
        label, score = truth[:, 0], table["score"].to_numpy(np.float64)
        correct = ((score >= 0.5) == (label == 1)).astype(np.float64)
        return {"accuracy": _ratio(correct), "sensitivity": _ratio(correct * (label == 1), label == 1),
                "specificity": _ratio(correct * (label == 0), label == 0), "roc_auc": _roc_auc(label, score)}
    predicted = columns("y_pred")
    if entry["scorer"] == "regions":
        predicted = np.clip(predicted, *REGION_SCORE_RANGE)
        return {"mae": _ratio(np.abs(predicted - truth).mean(axis=1)),
                "region_accuracy": _ratio((region_classes(predicted) == truth).mean(axis=1)),
                "global_mae": _ratio(np.abs(predicted.sum(axis=1) - truth.sum(axis=1)))}
    if entry["scorer"] == "regression":
        return {"mae": _ratio(np.abs(predicted - truth).mean(axis=1))}
    return {"accuracy": _ratio((predicted == truth).mean(axis=1))}  # global4, lung4, classification


def bootstrap_intervals(statistics: Mapping[str, Statistic], n: int, resamples: int = BOOTSTRAP_RESAMPLES,
                        confidence: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> dict[str, list[float | None]]:
    """Percentile bootstrap interval of each statistic over ``n`` rows resampled with replacement (seeded; the
    resamples where a metric is undefined, such as one class only for the ROC AUC, are left out)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    tail = 100 * (1 - confidence) / 2
    out: dict[str, list[float | None]] = {}
    for name, statistic in statistics.items():
        values = statistic(idx)
        values = values[np.isfinite(values)]
        out[name] = [float(v) for v in np.percentile(values, [tail, 100 - tail])] if len(values) else [None, None]
    return out


def eval_metrics(run_dir: Path, resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, dict[str, Any]]:
    """``metrics.json`` per key (``task`` on its home dataset, ``task@dataset``) with the dataset, the number of
    test rows and the bootstrap 95 % intervals of the headline metrics."""
    metrics = _read_json(run_dir / METRICS_FILE)
    entries = run_entries(run_dir)
    out = {}
    for key, values in metrics.items():
        task, _, dataset = key.partition("@")
        entry = entries[task]
        dataset = dataset or entry["home"]
        table = read_predictions(run_dir / predictions_file(task))
        rows = table[table["dataset"].astype(str) == dataset].reset_index(drop=True)
        intervals = bootstrap_intervals(headline_statistics(entry, rows), len(rows), resamples)
        out[key] = {"dataset": dataset, "n": len(rows), "values": values, "ci95": intervals, "resamples": resamples}
    return out


def _home_test_rows(run_dir: Path, task: str, entry: Mapping[str, Any]) -> pd.DataFrame:
    table = read_predictions(run_dir / predictions_file(task))
    return table[table["dataset"].astype(str) == entry["home"]].reset_index(drop=True)


def _on_test_fold(fitted: Mapping[str, Any], entry: Mapping[str, Any], rows: pd.DataFrame) -> dict[str, float]:
    """What the maps fitted on the calib or validation part give on the test rows: ECE before and after calibration,
    the ECE a perfectly calibrated model would show on them (``ece_floor``), and the conformal sets' coverage and
    size (binary head), or the conformal intervals' coverage and width of the
    global and regional Brixia scores."""
    truth = rows[[prediction_column("y_true", g) for g in entry["groups"]]].to_numpy(np.float64)
    if "binary" in fitted:
        score = rows["score"].to_numpy(np.float64)
        probability = calib.BinaryCalibration.from_dict(fitted["binary"]).apply(score)
        sets = calib.BinaryConformal.from_dict(fitted["sets"]).predict_set(probability)
        return {"ece_uncalibrated": calib.expected_calibration_error(truth[:, 0], score),
                "ece": calib.expected_calibration_error(truth[:, 0], probability),
                "ece_floor": calib.ece_floor(probability),
                **{f"sets_{k}": v for k, v in calib.coverage_and_size(truth[:, 0], sets).items()}}
    predicted = rows[[prediction_column("y_pred", g) for g in entry["groups"]]].to_numpy(np.float64)
    out = {}
    for part, true, pred in (("global", truth.sum(1), np.clip(predicted, *REGION_SCORE_RANGE).sum(1)),
                             ("regions", truth, predicted)):
        interval = calib.IntervalConformal.from_dict(fitted[part]).predict_interval(pred)
        out |= {f"{part}_{k}": v for k, v in calib.coverage_and_width(true, *interval).items()}
    return out


FITTED_ON = {"val": "validation fold", "calib": "calibration part (held out of model selection)"}
"""How the card names the part ``calibration.json`` was fitted on."""


def calibration(run_dir: Path) -> dict[str, Any]:
    """Per task of the run's ``calibration.json`` (fitted on the calib or validation part by
    ``mdmt.evaluate.scoring``): the fitted maps and what they give on the test fold (``_on_test_fold``), or why it
    was not fitted; ``status`` is ``fitted`` when any task was."""
    path = run_dir / CALIBRATION_FILE
    stored = _read_json(path) if path.is_file() else {}
    entries = run_entries(run_dir)
    tasks: dict[str, Any] = {}
    for task, fitted in stored.items():
        if "error" in fitted:
            tasks[task] = {"status": NOT_FITTED, "reason": fitted["error"]}
            continue
        test = _on_test_fold(fitted, entries[task], _home_test_rows(run_dir, task, entries[task]))
        tasks[task] = {"status": "fitted", "fitted": fitted, "test": test}
    fitted_any = any(t["status"] == "fitted" for t in tasks.values())
    return {"status": "fitted" if fitted_any else NOT_FITTED, "tasks": tasks}


# --------------------------------------------------------------------------------------------- the card
def known_limits(card: Mapping[str, Any]) -> list[str]:
    """What the card's facts say the model cannot be trusted for."""
    synthetic = [d["dataset"] for d in card["training_data"] if d["synthetic"]]
    run = card["run"]
    tested = ", ".join(f"{k} n = {v['n']}" for k, v in card["eval_metrics"].items())
    limits = ["Research software: not a medical device and not validated for any clinical use."]
    if synthetic:
        limits.append(f"Trained on synthetic films ({', '.join(synthetic)}): its outputs say nothing about real "
                      f"patients.")
    limits.append(f"Tested on one fold ({run['protocol']} fold {run['fold']}, seed {run['seed']}; {tested}): "
                  f"small test sets give wide intervals, and hospitals, devices and populations other than the "
                  f"training centers may behave differently.")
    limits.append("Frontal chest films only: predict does not score a film where the lung segmenter finds no "
                  "plausible pair of lungs (lateral views), but films unlike the training films (other devices, "
                  "children, processed images) are scored all the same.")
    fitted = card["calibration"]["tasks"]
    uncalibrated = [task for task, entry in card["tasks"].items()
                    if entry["scorer"] == "binary" and fitted.get(task, {}).get("status") != "fitted"]
    if uncalibrated:
        limits.append(f"{', '.join(uncalibrated)}: not calibrated and without conformal sets: read its score as a "
                      f"score, not as a probability.")
    return limits


def card_metadata(run_dir: str | Path, network: Mapping[str, Any] | None = None, parts: Parts | None = None,
                  resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The card of the finished run in ``run_dir`` (MONAI-like keys); ``network``: the ``preprocessing.json`` of an
    export, for the exact input normalisation and output decoding; ``parts``: the run's ``split_parts`` when the
    caller holds its splits (else they are rebuilt from the image caches)."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir / CONFIG_FILE)
    spec = spec_from_dir(run_dir, run_dir.parents[4])
    if spec is None:
        raise DataError(f"{run_dir}: no readable {SPEC_FILE}")
    inputs = _read_json(run_dir / INPUTS_FILE)
    commit, modified = source_commit()
    tasks = run_entries(run_dir)
    outputs = {o["name"]: o for o in (network or {}).get("outputs", [])}
    size = config.model.input_size
    card: dict[str, Any] = {
        "schema": SCHEMA,
        "name": f"{spec.strategy} {spec.backbone} {spec.protocol} fold {spec.fold} seed {spec.seed}",
        "version": __version__,
        "mdmt_commit": commit,
        "mdmt_source_modified": modified,
        "pytorch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "config_fingerprint": _digest(inputs["config"]),
        "inputs_fingerprint": _digest(inputs),
        "run": {"folder": str(run_dir.resolve()), **dataclasses.asdict(spec)},
        "task": ", ".join(tasks),
        "description": f"{spec.backbone} backbone with one head per task ({', '.join(tasks)}), strategy "
                       f"{spec.strategy}, trained by mdmt on {', '.join(inputs['caches'])}",
        "data_type": "DICOM, PNG or JPEG chest X-ray films",
        "tasks": tasks,
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "xray", "num_channels": 3,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "gray", "1": "gray", "2": "gray"},
                "preprocessing": {"clip_percentiles": list(config.data.clip_percentiles), "crop": config.data.crop,
                                  "crop_margin": config.data.crop_margin, "image_size": config.data.image_size,
                                  "mean": network["mean"] if network else "the backbone's",
                                  "std": network["std"] if network else "the backbone's"},
            }},
            "outputs": {name: {"type": entry["kind"], "format": entry["scorer"], "dtype": "float32",
                               "groups": entry["groups"], "class_names": entry["class_names"],
                               **({"num_channels": outputs[name]["outputs"], "decoding": outputs[name]["decoding"]}
                                  if name in outputs else {})}
                        for name, entry in tasks.items()},
        },
        "training_data": training_data(run_dir, config, spec, inputs, parts),
        "lung_segmenter": lung_segmenter(),
        "eval_metrics": eval_metrics(run_dir, resamples),
        "calibration": calibration(run_dir),
        "intended_use": INTENDED_USE,
    }
    card["known_limits"] = known_limits(card)
    return card


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The scalar leaves of nested mappings as (dotted key, value); lists are left out."""
    if isinstance(value, Mapping):
        return [item for k, v in value.items() for item in _flat(v, f"{prefix}{k}.")]
    return [] if isinstance(value, list) else [(prefix.rstrip("."), value)]


def render_markdown(card: Mapping[str, Any]) -> str:
    """``model_card.md``: the card for people."""
    commit = card["mdmt_commit"] + (" (with uncommitted changes)" if card["mdmt_source_modified"] else "")
    lines = [f"# Model card: {card['name']}", "",
             f"**Intended use: {card['intended_use']}.**", "",
             f"- mdmt {card['version']}, commit {commit}; torch {card['pytorch_version']}",
             f"- config fingerprint `{card['config_fingerprint']}` (inputs `{card['inputs_fingerprint']}`)",
             f"- run folder `{card['run']['folder']}`", f"- {card['description']}", "",
             "## Training data", "",
             "| dataset | synthetic | part | images | patients | centers | licence |", "|---|---|---|---|---|---|---|"]
    for data in card["training_data"]:
        for part, summary in data["parts"].items():
            centers = ", ".join(f"{c} {n}" for c, n in summary["centers"].items())
            lines.append(f"| {data['dataset']} ({data['plugin']}) | {'yes' if data['synthetic'] else 'no'} | {part} | "
                         f"{summary['images']} | {summary['patients']} | {centers} | {data['licence']} |")
    if card["training_data"] and card["training_data"][0]["parts_from"] == "predictions":
        lines += ["", "Training and validation sizes unknown: the run's image caches are not on this machine."]
    segmenter = card["lung_segmenter"]
    lines += ["", f"Lung segmenter (weights `{segmenter['weights_sha256_16']}`): {segmenter['licence']}."]
    resamples = next(iter(card["eval_metrics"].values()), {}).get("resamples", 0)
    lines += ["", "## Test metrics", "",
              f"Percentile bootstrap 95 % intervals over the test rows ({resamples} resamples).", "",
              "| task | dataset | n | metric | value | 95 % interval |", "|---|---|---|---|---|---|"]
    for key, result in card["eval_metrics"].items():
        for metric, (low, high) in result["ci95"].items():
            lines.append(f"| {key} | {result['dataset']} | {result['n']} | {metric} | "
                         f"{_cell(result['values'].get(metric))} | [{_cell(low)}, {_cell(high)}] |")
    lines += ["", "## Calibration and conformal coverage", ""]
    if not card["calibration"]["tasks"]:
        lines.append(f"Not fitted (the run holds no {CALIBRATION_FILE}).")
    for task, result in card["calibration"]["tasks"].items():
        if result["status"] == NOT_FITTED:
            lines.append(f"- {task}: not fitted ({result['reason']})")
            continue
        maps = {key: value for key, value in result["fitted"].items() if key != "part"}
        fitted = ", ".join(f"{key} {_cell(value)}" for key, value in _flat(maps))
        test = ", ".join(f"{key} {_cell(value)}" for key, value in result["test"].items())
        part = FITTED_ON.get(result["fitted"].get("part", "val"), "validation fold")
        lines.append(f"- {task}: fitted on the {part} ({fitted}); on the test fold: {test}")
    lines += ["", "## Known limits", "", *[f"- {limit}" for limit in card["known_limits"]], ""]
    return "\n".join(lines)


def refresh_card_calibration(run_dir: str | Path) -> list[Path]:
    """Rewrite the calibration section of a run's model card (and the known limits that follow from it) from its
    ``calibration.json`` as it is now, after calibration was fitted again with other settings; the rest of the card
    stays as training wrote it. A run without a card stays without one; returns the paths rewritten."""
    path = Path(run_dir) / CARD_JSON
    if not path.is_file():
        return []
    card = json.loads(path.read_text())
    card["calibration"] = calibration(run_dir)
    card["known_limits"] = known_limits(card)
    return _write_card(card, run_dir)


def recalibrate(results_dir: str | Path, settings: CalibrationConfig, progress: bool = False) -> int:
    """``mdmt report --recalibrate``: rescore every finished run with its calibration fitted again with
    ``settings`` (``mdmt.evaluate.scoring.rescore``, which records them in each run's config.yaml; a progress bar
    when ``progress``), then refresh the calibration section of each run's model card; returns the number of runs."""
    count = rescore(results_dir, settings, progress)
    for run_dir in finished_runs(results_dir):
        refresh_card_calibration(run_dir)
    return count


def write_model_card(run_dir: str | Path, out_dir: str | Path | None = None, network: Mapping[str, Any] | None = None,
                     parts: Parts | None = None) -> list[Path]:
    """Write ``metadata.json`` and ``model_card.md`` of the finished run (``card_metadata``) into ``out_dir``
    (default: the run folder), atomically; returns both paths."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_card(card_metadata(run_dir, network, parts), out)


def _write_card(card: Mapping[str, Any], out: Path) -> list[Path]:
    """``metadata.json`` and ``model_card.md`` of ``card`` in ``out``, atomically; returns both paths."""
    paths = [out / CARD_JSON, out / CARD_MD]
    write_json(card, paths[0])
    atomic_write_text(render_markdown(card), paths[1])
    return paths
