"""The four training strategies: which tasks and datasets a run uses, what it depends on, how it starts.

- ``stl_prognosis``: AIforCOVID only, the prognosis head.
- ``stl_severity``: BrixIA only, the severity head (``config.model.severity_task``); BrixIA has CV splits only.
- ``ft``: the ``stl_severity`` backbone of the paired BrixIA fold, fine-tuned on prognosis with a fresh head.
- ``mdmt``: both datasets and both heads in one loop; starts from ``config.train.mdmt_init``
  (``imagenet`` = whatever ``config.model.weights`` gives, or ``stl_average`` = β·STL-prognosis + (1−β)·STL-severity
  backbones, method.md §4.3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mdmt.config import Config
from mdmt.errors import ConfigError
from mdmt.models.multitask import MultiTaskModel, average_backbones, load_backbone_state
from mdmt.tasks import REGION_COLUMNS
from mdmt.train.engine import BEST_CHECKPOINT, load_model_state

if TYPE_CHECKING:
    import pandas as pd

    from mdmt.train.run import RunSpec

AIFORCOVID = "aiforcovid"
BRIXIA = "brixia"
SEVERITY_CV_PROTOCOLS = {"cv5": "cv5", "loco": "cv5", "official-cv5": "official-cv5", "official-loco": "official-cv5"}
"""The BrixIA protocol a run of each AIforCOVID protocol pairs with (BrixIA has CV splits only)."""
SEVERITY_LABEL_COLUMNS: tuple[str, ...] = (*REGION_COLUMNS, "brixia_global")

InitFn = Callable[[MultiTaskModel, "RunSpec", Config, Path], None]
DepsFn = Callable[["RunSpec", Config], list["RunSpec"]]


@dataclass(frozen=True)
class Strategy:
    """A way of training: tasks, datasets, the task that selects the model, dependencies and initialisation."""

    name: str
    summary: str
    task_names: Callable[[Config], tuple[str, ...]]
    sources: tuple[str, ...]
    select_task: Callable[[Config], str]
    dependencies: DepsFn
    init: InitFn
    max_epochs: Callable[[Config], int]


def severity_pairing(protocol: str, fold: int, config: Config) -> tuple[str, int]:
    """The BrixIA (protocol, fold) paired with an AIforCOVID (protocol, fold).

    CV fold i pairs with BrixIA fold i; every LOCO fold pairs with BrixIA CV fold
    ``config.protocol.severity_loco_fold`` (explicit, unlike the official ``os.listdir`` pairing).
    """
    if protocol not in SEVERITY_CV_PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(SEVERITY_CV_PROTOCOLS)}")
    paired = SEVERITY_CV_PROTOCOLS[protocol]
    return paired, fold if paired == protocol else config.protocol.severity_loco_fold


def _severity_spec(spec: RunSpec, config: Config) -> RunSpec:
    protocol, fold = severity_pairing(spec.protocol, spec.fold, config)
    return dataclasses.replace(spec, strategy="stl_severity", protocol=protocol, fold=fold)


def _no_dependencies(spec: RunSpec, config: Config) -> list[RunSpec]:
    return []


def _ft_dependencies(spec: RunSpec, config: Config) -> list[RunSpec]:
    return [_severity_spec(spec, config)]


def _mdmt_dependencies(spec: RunSpec, config: Config) -> list[RunSpec]:
    if config.train.mdmt_init == "imagenet":
        return []
    if config.train.mdmt_init == "stl_average":
        return [dataclasses.replace(spec, strategy="stl_prognosis"), _severity_spec(spec, config)]
    raise ConfigError(f"train.mdmt_init: {config.train.mdmt_init!r} is not one of 'imagenet', 'stl_average'")


def _dependency_state(dependency: RunSpec, results_dir: Path) -> dict[str, Any]:
    run_dir = dependency.run_dir(results_dir)
    if not (run_dir / BEST_CHECKPOINT).is_file():
        raise ConfigError(f"run {dependency.key} has no {BEST_CHECKPOINT} in {run_dir}; train it first")
    return load_model_state(run_dir)


def _init_nothing(model: MultiTaskModel, spec: RunSpec, config: Config, results_dir: Path) -> None:
    """Keep the backbone as built (``config.model.weights``) and fresh heads."""


def _init_from_severity(model: MultiTaskModel, spec: RunSpec, config: Config, results_dir: Path) -> None:
    """Load the paired ``stl_severity`` backbone; the prognosis head stays fresh."""
    load_backbone_state(model, _dependency_state(_severity_spec(spec, config), results_dir))


def _init_mdmt(model: MultiTaskModel, spec: RunSpec, config: Config, results_dir: Path) -> None:
    """``stl_average``: β·θ_prognosis + (1−β)·θ_severity over the backbone parameters, paired by name;
    ``imagenet``: nothing (the backbone as ``config.model.weights`` built it)."""
    needed = _mdmt_dependencies(spec, config)
    if needed:
        prognosis, severity = (_dependency_state(d, results_dir) for d in needed)
        load_backbone_state(model, average_backbones(prognosis, severity, config.train.stl_beta))


def _prognosis(config: Config) -> str:
    return "prognosis"


def _severity(config: Config) -> str:
    return config.model.severity_task


def _max_epochs(config: Config) -> int:
    return config.train.max_epochs


def _ft_max_epochs(config: Config) -> int:
    return config.train.ft_epochs if config.train.ft_epochs is not None else config.train.max_epochs


STRATEGIES: dict[str, Strategy] = {
    "stl_prognosis": Strategy(
        "stl_prognosis", "single task: prognosis on AIforCOVID",
        lambda c: (_prognosis(c),), (AIFORCOVID,), _prognosis, _no_dependencies, _init_nothing, _max_epochs,
    ),
    "stl_severity": Strategy(
        "stl_severity", "single task: severity on BrixIA",
        lambda c: (_severity(c),), (BRIXIA,), _severity, _no_dependencies, _init_nothing, _max_epochs,
    ),
    "ft": Strategy(
        "ft", "stl_severity backbone fine-tuned on prognosis (fresh head)",
        lambda c: (_prognosis(c),), (AIFORCOVID,), _prognosis, _ft_dependencies, _init_from_severity, _ft_max_epochs,
    ),
    "mdmt": Strategy(
        "mdmt", "multi-dataset multi-task: both datasets, both heads, one backbone pass",
        lambda c: (_prognosis(c), _severity(c)), (AIFORCOVID, BRIXIA), _prognosis, _mdmt_dependencies, _init_mdmt,
        _max_epochs,
    ),
}


def get_strategy(name: str) -> Strategy:
    """A strategy by name (ConfigError listing the valid ones otherwise)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def dependencies(spec: RunSpec, config: Config) -> list[RunSpec]:
    """The runs whose ``best.pt`` this run starts from (they must be DONE first)."""
    return get_strategy(spec.strategy).dependencies(spec, config)


def permute_severity_labels(records: pd.DataFrame, rows: np.ndarray, seed: int) -> pd.DataFrame:
    """Negative control: a copy of ``records`` whose BrixIA label columns are permuted across ``rows``.

    Each image of ``rows`` gets the complete label set (six regions and the global score) of another image of
    ``rows``, drawn with ``seed``; images outside ``rows`` (validation, test) keep their own labels.
    """
    rows = np.asarray(rows)
    columns = [c for c in SEVERITY_LABEL_COLUMNS if c in records.columns]
    out = records.copy()
    order = np.random.default_rng(seed).permutation(len(rows))
    out.loc[out.index[rows], columns] = records.iloc[rows[order]][columns].to_numpy()
    return out
