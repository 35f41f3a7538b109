"""Strategies described by data: which datasets and tasks a run trains, and which runs it starts from.

A strategy is an entry of ``config.strategies`` (name → ``{name: <plug-in>, params}``); the built-in plug-in
``train`` takes ``StageParams``. The paper's strategies are entries (``mdmt.config.PAPER_STRATEGIES``):

- ``stl_prognosis``: AIforCOVID, the prognosis head; ``stl_severity``: BrixIA, the severity head;
- ``ft``: a chain of stages: prognosis on AIforCOVID starting from ``stl_severity``'s backbone (fresh head);
- ``mdmt``: both datasets and both heads in one loop, from the configured weights or, with
  ``start_from: [stl_prognosis, stl_severity]``, from the weighted average of their backbones;
- ``mdmt_permuted``: the control: as ``mdmt`` with BrixIA's labels permuted among its training images.

Any number of datasets works the same way: a sample adds the loss of each task its dataset labels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdmt.config import Config, PluginRef
from mdmt.errors import ConfigError
from mdmt.models.multitask import MultiTaskModel, average_backbones, load_backbone_state
from mdmt.protocols import run_fold
from mdmt.registry import Registry
from mdmt.runs import BEST_CHECKPOINT, RunSpec
from mdmt.train.checkpoints import checkpoint_sha256, load_model_state

SEVERITY_ALIAS = "severity"
"""In a strategy's task list, the task ``model.severity_task`` names."""


@dataclass
class StageParams:
    """One training stage: its datasets and tasks, and the runs it starts from."""

    datasets: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    """Task names; ``severity`` stands for ``model.severity_task``."""
    start_from: list[str] = field(default_factory=list)
    """Strategies whose best backbones (same backbone, fold and seed) this one starts from: one is loaded, several
    are averaged with ``start_weights``. Empty: the backbone as ``model.weights`` builds it."""
    start_weights: list[float] | None = None
    """Weights of the averaged backbones (default equal); they must sum to 1."""
    permute: list[str] = field(default_factory=list)
    """Datasets whose label columns are permuted among their training images (validation and test keep theirs)."""
    select: str | None = None
    """The task whose validation loss selects the model (default: the first task)."""
    max_epochs: int | None = None
    """Epochs of this stage (default ``train.max_epochs``)."""
    clinical: list[str] = field(default_factory=list)
    """Clinical columns of the first dataset's records, fused at the logits (late fusion) with the heads of the
    two-class tasks that dataset labels: head logits + a linear term of the encoded columns that starts as the
    logistic regression fitted on the training fold; empty: images only (``mdmt.clinical_encoder``)."""
    clinical_trainable: bool = False
    """False: the clinical term stays the logistic regression's and the image branch learns the residual; True:
    the term is trained with the network from there."""
    estimator: str = "network"
    """What the run fits (``mdmt.train.estimators``): ``network`` (the multi-task CNN) or ``clinical_logistic`` (no
    network; a logistic regression on the ``clinical`` columns, the clinical-only baseline)."""
    summary: str = ""


@dataclass(frozen=True)
class Strategy:
    """A resolved strategy: its name and stage."""

    name: str
    stage: StageParams

    @property
    def datasets(self) -> tuple[str, ...]:
        """The datasets the run trains on, in order (the order of the mixed batches)."""
        return tuple(self.stage.datasets)

    def task_names(self, config: Config) -> tuple[str, ...]:
        """The tasks, with ``severity`` resolved."""
        return tuple(config.model.severity_task if t == SEVERITY_ALIAS else t for t in self.stage.tasks)

    def select_task(self, config: Config) -> str:
        """The task that selects the model."""
        if self.stage.select is None:
            return self.task_names(config)[0]
        return config.model.severity_task if self.stage.select == SEVERITY_ALIAS else self.stage.select

    def max_epochs(self, config: Config) -> int:
        """Epochs of this stage."""
        return config.train.max_epochs if self.stage.max_epochs is None else self.stage.max_epochs

    def dependencies(self, spec: RunSpec, config: Config) -> list[RunSpec]:
        """The runs whose ``best.pt`` this run starts from (each on the fold its datasets use)."""
        out = []
        for name in self.stage.start_from:
            other = get_strategy(name, config)
            protocol, fold = run_fold(spec.protocol, spec.fold, other.datasets, config)
            out.append(dataclasses.replace(spec, strategy=name, protocol=protocol, fold=fold))
        return out

    def parent_checkpoints(self, spec: RunSpec, config: Config, results_dir: Path) -> dict[str, str | None]:
        """Each strategy this run starts from → the sha256 of its run's ``best.pt`` (None when absent): a run
        records them among its inputs, so a parent trained again makes it stale."""
        return {d.strategy: checkpoint_sha256(d.run_dir(results_dir) / BEST_CHECKPOINT)
                for d in self.dependencies(spec, config)}

    def start_weights(self) -> list[float]:
        """The averaging weights of ``start_from``."""
        n = len(self.stage.start_from)
        return list(self.stage.start_weights) if self.stage.start_weights is not None else [1.0 / n] * n

    def init(self, model: MultiTaskModel, spec: RunSpec, config: Config, results_dir: Path) -> None:
        """Load the starting backbone: one dependency's, or the weighted average of several (paired by name)."""
        needed = self.dependencies(spec, config)
        if not needed:
            return
        states = []
        for dependency in needed:
            run_dir = dependency.run_dir(results_dir)
            if not (run_dir / BEST_CHECKPOINT).is_file():
                raise ConfigError(f"run {dependency.key} has no {BEST_CHECKPOINT} in {run_dir}; train it first")
            states.append(load_model_state(run_dir))
        load_backbone_state(model, states[0] if len(states) == 1 else average_backbones(states, self.start_weights()))

    def check(self, spec: RunSpec, config: Config) -> None:
        """Errors naming the key for a strategy that cannot run as configured."""
        where = f"strategies.{self.name}.params"
        if not self.stage.datasets or not self.stage.tasks:
            raise ConfigError(f"{where}: a strategy needs at least one dataset and one task")
        for key, names in (("datasets", self.stage.datasets), ("permute", self.stage.permute)):
            unknown = [d for d in names if d not in config.data.datasets]
            if unknown:
                raise ConfigError(f"{where}.{key}: dataset(s) {unknown} are not in data.datasets "
                                  f"({', '.join(config.data.datasets) or 'none configured'})")
        stray = [d for d in self.stage.permute if d not in self.stage.datasets]
        if stray:
            raise ConfigError(f"{where}.permute: {stray} are not datasets of this strategy")
        if self.stage.start_weights is not None:
            weights = self.stage.start_weights
            if len(weights) != len(self.stage.start_from) or abs(sum(weights) - 1.0) > 1e-6:
                raise ConfigError(f"{where}.start_weights: {weights} must give one weight per start_from entry "
                                  f"and sum to 1")
        select = self.select_task(config)
        if select not in self.task_names(config):
            raise ConfigError(f"{where}.select: {select!r} is not one of its tasks {list(self.task_names(config))}")
        paired = run_fold(spec.protocol, spec.fold, self.datasets, config)
        if paired != (spec.protocol, spec.fold):
            raise ConfigError(f"{self.name} does not train on {config.protocol.dataset}, so it runs on the "
                                  f"folds its datasets follow: use protocol {paired[0]} fold {paired[1]} "
                                  f"(run {spec.key} would duplicate that run)")


STRATEGIES: Registry[Strategy] = Registry("strategy")


@STRATEGIES.register("train", StageParams, "train a stage: datasets, tasks, optional start from other strategies")
def train_stage(params: StageParams, name: str) -> Strategy:
    """A strategy of one training stage (chains through ``start_from``)."""
    return Strategy(name, params)


def get_strategy(name: str, config: Config) -> Strategy:
    """The strategy ``name`` of ``config.strategies`` (ConfigError listing the configured ones otherwise)."""
    if name not in config.strategies:
        raise ConfigError(f"unknown strategy {name!r}; configured strategies: {', '.join(config.strategies)}")
    ref = PluginRef.of(config.strategies[name])
    return STRATEGIES.build(ref.named("train") if not ref.name else ref, f"strategies.{name}.params", name=name)


def dependencies(spec: RunSpec, config: Config) -> list[RunSpec]:
    """The runs ``spec`` starts from (they must be DONE first)."""
    return get_strategy(spec.strategy, config).dependencies(spec, config)


def describe(config: Config) -> list[tuple[str, str]]:
    """(name, summary) of every configured strategy, for ``mdmt info``."""
    out: list[tuple[str, str]] = []
    for name in config.strategies:
        strategy = get_strategy(name, config)
        detail: Any = strategy.stage.summary or f"{list(strategy.datasets)} × {strategy.stage.tasks}"
        out.append((name, str(detail)))
    return out
