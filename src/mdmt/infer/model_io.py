"""Load a finished run folder as an inference model, refusing what is not one.

A run folder (``mdmt.runs``) holds ``config.yaml``, ``tasks.json``, ``best.pt`` and ``DONE``. The model is
rebuilt from the config (backbone, heads) and the task list, and the checkpoint's weights are loaded
strictly: an unfinished run, a missing or foreign checkpoint, or a checkpoint whose heads or tensors do not
fit the config is refused with an error naming the folder. A run whose model reads clinical columns also holds
``clinical_encoder.json`` (the encoder fitted on its training fold); the heads with a clinical term are those
with ``clinical.<task>.*`` entries in the checkpoint. ``ood_features.npz`` (``mdmt.train.feature_stats``), when the
run has it, must describe the films as this model does (``descriptor_dim``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdmt.clinical_encoder import ENCODER_FILE, ClinicalEncoder
from mdmt.config import Config, load_run_config
from mdmt.errors import ConfigError, DataError
from mdmt.models.backbones import Stats
from mdmt.models.multitask import MultiTaskModel, build_model
from mdmt.runs import BEST_CHECKPOINT, CONFIG_FILE, DONE_FILE, FAILED_FILE, TASKS_FILE
from mdmt.tasks import Task, get_task, make_task
from mdmt.train.checkpoints import load_checkpoint
from mdmt.train.engine import resolve_device
from mdmt.train.feature_stats import (
    FEATURE_STATS_FILE,
    FeatureStats,
    descriptor_dim,
    read_feature_stats,
)

PROGNOSIS = "prognosis"
SEVERITY_PREFIX = "severity_"
HEADS_PREFIX = "heads."
CLINICAL_PREFIX = "clinical."


@dataclass
class TrainedModel:
    """A finished run's model in eval mode, with the config and tasks it was trained with."""

    run_dir: Path
    config: Config
    tasks: list[Task]
    model: MultiTaskModel
    device: torch.device
    encoder: ClinicalEncoder | None = None
    """The run's clinical encoder when its model reads clinical columns."""
    feature_stats: FeatureStats | None = None
    """The training films' descriptor statistics (``ood_features.npz``); None for a run trained without them."""

    @property
    def normalization(self) -> tuple[Stats, Stats]:
        """The backbone's input ``(mean, std)``."""
        return self.model.normalization

    def task(self, name: str) -> Task | None:
        """The run's task ``name``, or None."""
        return next((t for t in self.tasks if t.name == name), None)

    @property
    def prognosis(self) -> Task | None:
        """The prognosis task when the run has that head."""
        return self.task(PROGNOSIS)

    @property
    def severity(self) -> Task | None:
        """The run's Brixia severity task (``model.severity_task`` first, else any ``severity_*`` head)."""
        preferred = self.task(self.config.model.severity_task)
        return preferred or next((t for t in self.tasks if t.name.startswith(SEVERITY_PREFIX)), None)

    def outputs(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every head's raw outputs for the network input ``x`` and, for a clinical run, the encoded clinical
        features ``(B, D)`` (on CPU)."""
        return self.features_and_outputs(x, clinical)[1]

    @torch.no_grad()
    def features_and_outputs(self, x: torch.Tensor, clinical: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The pooled backbone features ``(B, feature_dim)`` and every head's raw outputs (``outputs``), from one
        backbone pass (on CPU)."""
        features = self.model.features(x.to(self.device))
        extra = None if clinical is None else clinical.to(self.device)
        outputs = self.model.head_outputs(features, extra)
        return features.float().cpu(), {k: v.float().cpu() for k, v in outputs.items()}


def _read_tasks(run_dir: Path, config: Config) -> list[Task]:
    """The run's tasks from ``tasks.json``, each checked against what this mdmt builds under that name."""
    path = run_dir / TASKS_FILE
    try:
        entries: Any = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable task list ({exc})") from None
    if not isinstance(entries, dict) or not entries:
        raise DataError(f"{path}: expected a mapping of task name to task entry")
    extra = {t.name: t for t in config.model.extra_tasks}
    tasks = []
    for name, entry in entries.items():
        spec = extra.get(name)
        try:
            task = make_task(spec.name, spec.column, spec.kind, spec.classes) if spec else get_task(name)
        except ConfigError as exc:
            raise ConfigError(f"{run_dir}: {TASKS_FILE}: {exc}") from None
        try:
            same = isinstance(entry, dict) and task.entry(entry["datasets"], entry["home"]) == entry
        except (KeyError, TypeError, ValueError):
            same = False
        if not same:
            raise ConfigError(f"{run_dir}: task {name!r} in {TASKS_FILE} does not match this mdmt's task of that "
                              f"name (a run from another version); train it again")
        tasks.append(task)
    return tasks


def _read_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state dict of ``best.pt``."""
    path = run_dir / BEST_CHECKPOINT
    state = load_checkpoint(path)["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: the checkpoint's model entry is not a state dict of tensors")
    return state


def _entries(state: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return sorted({k.split(".")[1] for k in state if k.startswith(prefix)})


def _load_weights(run_dir: Path, model: MultiTaskModel, state: dict[str, torch.Tensor], tasks: list[Task]) -> None:
    """``state`` into ``model``: the same heads as the task list and every tensor fitting (strict)."""
    heads = _entries(state, HEADS_PREFIX)
    names = sorted(t.name for t in tasks)
    if heads != names:
        raise ConfigError(f"{run_dir}: {BEST_CHECKPOINT} holds heads {heads} but {TASKS_FILE} lists {names}: the "
                          f"checkpoint belongs to another run or version")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{run_dir}: {BEST_CHECKPOINT} does not fit the model {CONFIG_FILE} describes "
                          f"(another run or version): {reason}") from None


def _read_encoder(run_dir: Path, state: dict[str, torch.Tensor]) -> ClinicalEncoder | None:
    """The run's clinical encoder; ConfigError when it and the checkpoint's clinical terms disagree."""
    path = run_dir / ENCODER_FILE
    fused = _entries(state, CLINICAL_PREFIX)
    if not path.is_file():
        if fused:
            raise ConfigError(f"{run_dir}: {BEST_CHECKPOINT} has clinical terms for {fused} but the folder has no "
                              f"{ENCODER_FILE}")
        return None
    try:
        encoder = ClinicalEncoder.from_dict(json.loads(path.read_text()))
    except (ValueError, OSError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{path}: unreadable clinical encoder ({type(exc).__name__}: {exc})") from None
    if not fused:
        raise ConfigError(f"{run_dir}: {BEST_CHECKPOINT} has no clinical term (a run fusing clinical data from "
                          f"an older mdmt, or another run's checkpoint); train it again")
    return encoder


def check_run_dir(run_dir: Path) -> None:
    """ConfigError unless ``run_dir`` is a finished run folder."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run folder not found")
    missing = [f for f in (CONFIG_FILE, TASKS_FILE) if not (run_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{run_dir}: not a run folder (no {', '.join(missing)}); give a folder "
                          f"<results>/runs/<strategy>/<backbone>/<protocol>/fold<k>/seed<s>")
    if not (run_dir / DONE_FILE).is_file():
        failed = run_dir / FAILED_FILE
        state = "failed (see FAILED)" if failed.is_file() else "unfinished (no DONE)"
        raise ConfigError(f"{run_dir}: the run is {state}; finish it with mdmt train before using its model")
    if (run_dir / ENCODER_FILE).is_file() and not (run_dir / BEST_CHECKPOINT).is_file():
        raise ConfigError(f"{run_dir}: the run trains no network (the clinical-only logistic regression); "
                          f"use a run of a strategy with images")


def load_trained(run_dir: str | Path, device: str = "cpu") -> TrainedModel:
    """The finished run in ``run_dir``: config, tasks, clinical encoder (when its model reads clinical columns)
    and the ``best.pt`` weights on ``device`` (eval mode)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    config = load_run_config(run_dir / CONFIG_FILE)
    tasks = _read_tasks(run_dir, config)
    state = _read_state(run_dir)
    encoder = _read_encoder(run_dir, state)
    fused = _entries(state, CLINICAL_PREFIX)
    # the checkpoint holds every weight: the backbone is built without downloading or reading weights files
    model = build_model(dataclasses.replace(config.model, weights="none"), tasks,
                        encoder.dim if encoder else 0, [t.name for t in tasks if t.name in fused])
    _load_weights(run_dir, model, state, tasks)
    stats = read_feature_stats(run_dir)
    if stats is not None and stats.dim != descriptor_dim(model):
        raise ConfigError(f"{run_dir / FEATURE_STATS_FILE}: statistics of {stats.dim} features, but the model's "
                          f"films are described by {descriptor_dim(model)} (another run's or version's file)")
    target = resolve_device(device)
    return TrainedModel(run_dir, config, tasks, model.to(target).eval(), target, encoder, stats)
