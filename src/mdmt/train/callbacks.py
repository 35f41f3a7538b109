"""Training callbacks: what the engine tells the outside world while it trains, and the experiment trackers that listen.

A callback gets three calls from ``Trainer.fit``: ``on_fit_start(trainer)`` once the run's ``last.pt`` (if any) is
loaded, ``on_epoch_end(epoch, row)`` after each epoch's bookkeeping with the epoch's ``history.csv`` row, and
``on_fit_end(result)`` with the ``FitResult``. The hooks of the base class do nothing; a callback overrides the ones
it needs (the engine's own tests record them, the loggers below write them).

``train.callbacks`` lists ``{name, params}`` entries of ``CALLBACKS``; the engine builds them on the main process
only, as ``factory(params, run_dir=..., spec_key=...)`` with the run folder and the run's key
(``strategy/backbone/protocol/fold/seed``). A callback decides nothing about the run: ``train.callbacks`` is not an
input of the run (a finished run stays finished when a logger is added). Two are built in, each an optional extra:

- ``tensorboard`` (``pip install 'mdmt[tensorboard]'``): ``torch.utils.tensorboard`` event files under
  ``<log_dir>/<run key>``, one scalar per history column and epoch, the run's config as text;
  ``tensorboard --logdir <log_dir>`` shows every run of a grid while it trains.
- ``mlflow`` (``pip install 'mdmt[mlflow]'``, MLflow's client without its server): one MLflow run per run, named by
  its key, the run's config as parameters, one metric per history column and epoch (step = epoch); a resumed run
  goes on logging into the MLflow run it started.

A logger whose package is missing is refused when the callbacks are checked (``check_callbacks``, before any
training) with one line naming the extra. Values that are not finite (the loss of a task with no label in the
validation set) are not logged.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mdmt.config import PluginRef
from mdmt.errors import ConfigError
from mdmt.registry import Registry
from mdmt.runs import CONFIG_FILE


class Callback:
    """Hooks the engine calls during ``fit``; each does nothing unless overridden."""

    def on_fit_start(self, trainer: Any) -> None:
        """The ``Trainer`` is set up and resumed (``trainer.state.epoch`` is the first epoch this call trains)."""

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        """Epoch ``epoch`` is done: ``row`` is its ``history.csv`` row, already written."""

    def on_fit_end(self, result: Any) -> None:
        """Training is over: ``result`` is the ``FitResult`` that ``fit`` returns."""


CALLBACKS: Registry[Callback] = Registry("callback")

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""Callback name → the module it needs, installed by the mdmt extra of the same name."""


def check_callbacks(refs: Sequence[PluginRef | str]) -> None:
    """ConfigError for an unknown callback, bad params, or a logger whose package is not installed."""
    for i, ref in enumerate(refs):
        entry, _ = CALLBACKS.parse(ref, f"train.callbacks[{i}] params")
        module = EXTRAS.get(entry.name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.callbacks[{i}]: {entry.name!r} needs the {module} package, which is not "
                              f"installed: pip install 'mdmt[{module}]'")


def build_callbacks(refs: Sequence[PluginRef | str], run_dir: Path, spec_key: str) -> list[Callback]:
    """The callbacks ``train.callbacks`` names, for the run in ``run_dir`` whose key is ``spec_key``."""
    check_callbacks(refs)
    return [CALLBACKS.build(ref, f"train.callbacks[{i}] params", run_dir=Path(run_dir), spec_key=spec_key)
            for i, ref in enumerate(refs)]


def recorded_config(run_dir: Path) -> dict[str, Any]:
    """The config the run folder records (``config.yaml``, written before training); empty for a folder without one
    (the engine used on its own)."""
    path = run_dir / CONFIG_FILE
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def log_root(log_dir: str | None, run_dir: Path, name: str) -> Path:
    """``log_dir``, or ``<results_dir>/<name>`` of the run's recorded config (``<run_dir>/<name>`` without one)."""
    if log_dir:
        return Path(log_dir)
    results_dir = recorded_config(run_dir).get("results_dir")
    return (Path(results_dir) if results_dir else run_dir) / name


def flat_items(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``("train.lr", "0.001")`` for every leaf of a nested mapping (lists as their text)."""
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)


def scalars(row: Mapping[str, float]) -> Iterator[tuple[str, float]]:
    """The columns of a history row that are logged: every finite value but the epoch (the step)."""
    for key, value in row.items():
        if key != "epoch" and math.isfinite(value):
            yield key, float(value)


# ------------------------------------------------------------------------------------------------ TensorBoard
@dataclass
class TensorBoardParams:
    """``tensorboard``: where the event files go."""

    log_dir: str | None = None
    """The folder ``tensorboard --logdir`` reads; each run writes into ``<log_dir>/<run key>``. None:
    ``<results_dir>/tensorboard``."""


class TensorBoardLogger(Callback):
    """Each history row's columns as scalars (tag = column, step = epoch), the run's config as text."""

    def __init__(self, folder: Path, config: Mapping[str, Any]):
        self.folder = folder
        self.config = config
        self.writer: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        first = trainer.state.epoch
        # a resumed run hides what the interrupted one logged from its resume epoch on (replayed epochs log again)
        self.writer = SummaryWriter(str(self.folder), purge_step=first or None)
        if first == 0 and self.config:
            self.writer.add_text("config", f"```yaml\n{yaml.safe_dump(dict(self.config), sort_keys=False)}```", 0)

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        for key, value in scalars(row):
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()  # a running grid's curves show up epoch by epoch

    def on_fit_end(self, result: Any) -> None:
        self.writer.close()


@CALLBACKS.register("tensorboard", TensorBoardParams,
                    "TensorBoard event files of every history column (extra: tensorboard)")
def _tensorboard(params: TensorBoardParams, run_dir: Path, spec_key: str) -> Callback:
    return TensorBoardLogger(log_root(params.log_dir, run_dir, "tensorboard") / spec_key, recorded_config(run_dir))


# ------------------------------------------------------------------------------------------------ MLflow
ALLOW_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
"""MLflow ≥ 3.13 keeps its folder store (one folder per run: safe for many grid workers on a shared disk) in
maintenance mode behind this switch; the logger sets it for a folder it was given or defaults to."""
RUN_DIR_TAG = "mdmt_run_dir"
"""The MLflow run's tag holding the run folder: a resumed run finds the MLflow run it logged to."""


@dataclass
class MlflowParams:
    """``mlflow``: the tracking store and experiment."""

    tracking_uri: str | None = None
    """Any MLflow tracking URI (``sqlite:///mlflow.db`` with the full ``mlflow`` package, ``http://host:5000``, a
    folder). None: the folder ``<results_dir>/mlruns``."""
    experiment: str = "mdmt"


class MlflowLogger(Callback):
    """One MLflow run per training run: the config as parameters, each history column as a metric per epoch."""

    def __init__(self, tracking_uri: str, experiment: str, run_dir: Path, spec_key: str, config: Mapping[str, Any]):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_dir = str(run_dir.resolve())
        self.spec_key = spec_key
        self.config = config
        self.client: Any = None
        self.run_id = ""

    def on_fit_start(self, trainer: Any) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        if "://" not in self.tracking_uri or self.tracking_uri.startswith("file:"):
            os.environ.setdefault(ALLOW_FILE_STORE_ENV, "true")
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        try:
            experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        except MlflowException:  # another grid worker created it first
            experiment_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        earlier = self.client.search_runs(
            [experiment_id], f"tags.{RUN_DIR_TAG} = '{self.run_dir}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        ) if trainer.state.epoch else []
        if earlier:  # resumed: go on in the MLflow run the interrupted training started
            self.run_id = earlier[0].info.run_id
            return
        run = self.client.create_run(experiment_id, run_name=self.spec_key, tags={RUN_DIR_TAG: self.run_dir})
        self.run_id = run.info.run_id
        params = [Param(key, value) for key, value in flat_items(self.config)]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def on_epoch_end(self, epoch: int, row: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, epoch) for key, value in scalars(row)])

    def on_fit_end(self, result: Any) -> None:
        self.client.set_terminated(self.run_id)


@CALLBACKS.register("mlflow", MlflowParams, "MLflow run per training run: config as params, history as metrics "
                                           "(extra: mlflow)")
def _mlflow(params: MlflowParams, run_dir: Path, spec_key: str) -> Callback:
    uri = params.tracking_uri or log_root(None, run_dir, "mlruns").resolve().as_uri()
    return MlflowLogger(uri, params.experiment, run_dir, spec_key, recorded_config(run_dir))
