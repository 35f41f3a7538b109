"""Estimators: what a run fits on its training fold and predicts on its test fold, behind one interface.

A strategy names its estimator (``estimator`` in its params, a plug-in of ``ESTIMATORS``):

- ``network`` (the default): the multi-task CNN: built and started from the strategy's parents, trained by the
  engine (``mdmt.train.engine.fit``), its best checkpoint predicting every test image of every dataset;
- ``clinical_logistic``: the clinical-only baseline, the logistic regression on the strategy's ``clinical``
  columns fitted on the training fold (``mdmt.clinical_encoder``), predicting its dataset's test images.

Each implements ``build`` (everything a bad config or a bad starting checkpoint can stop, before the run folder is
written), ``fit`` and ``predict`` (raw head outputs of one dataset's test rows). ``mdmt.train.run`` writes the
prediction files, metrics and ``DONE`` the same way for both. The clinical inputs a run fuses or regresses on
(``clinical_inputs``) are fitted here too, on the training fold only.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdmt.cache.image_cache import ImageCache
from mdmt.clinical_encoder import ClinicalEncoder, check_columns, fit_logit_term
from mdmt.config import Config
from mdmt.data.augment import BatchAugmenter
from mdmt.data.datasets import Dataset
from mdmt.data.loaders import RunData, build_data, rows_of, split_rows
from mdmt.data.splits import Split
from mdmt.errors import ConfigError
from mdmt.losses import build_weighting
from mdmt.models.multitask import MultiTaskModel, build_model, check_input_size
from mdmt.registry import NoParams, Registry
from mdmt.runs import RunSpec
from mdmt.tasks import Task
from mdmt.train.checkpoints import load_model_state
from mdmt.train.distributed import DistContext, ShardedBatchSampler
from mdmt.train.engine import BEST_CHECKPOINT, fit, predict, resolve_device
from mdmt.train.feature_stats import write_feature_stats
from mdmt.train.strategies import Strategy
from mdmt.weighting import Weighting


@dataclass
class ClinicalInputs:
    """A run's fitted clinical encoder, its features per dataset (zeros where a dataset has no clinical sheet), and
    per fused task (a two-class task of the first dataset) the logistic regression's logit term ``(weight, bias)``,
    all fitted on the training fold."""

    home: str
    encoder: ClinicalEncoder
    features: dict[str, np.ndarray]
    terms: dict[str, tuple[np.ndarray, np.ndarray]]


def clinical_inputs(
    strategy: Strategy, datasets: Mapping[str, Dataset], caches: Mapping[str, ImageCache],
    splits: Mapping[str, Split], tasks: list[Task], seed: int,
) -> ClinicalInputs | None:
    """The strategy's clinical columns encoded with an encoder fitted on the training fold of its first dataset, and
    a logistic regression on them per two-class task that dataset labels, fitted on the same fold."""
    if not strategy.stage.clinical:
        return None
    home = strategy.datasets[0]
    records = caches[home].records
    check_columns(records, strategy.stage.clinical, home)
    train = rows_of(records, splits[home].train, f"{home} train")
    encoder = ClinicalEncoder(list(strategy.stage.clinical)).fit(records.iloc[train])
    features = {name: encoder.transform(cache.records) if name == home
                else np.zeros((len(cache.records), encoder.dim), dtype=np.float32) for name, cache in caches.items()}
    fused = [t for t in tasks if datasets[home].labels_task(t.columns) and t.scorer == "binary"]
    if not fused:
        raise ConfigError(f"strategies.{strategy.name}.params.clinical: the clinical term is added to two-class "
                          f"heads of {home}'s tasks, and {[t.name for t in tasks]} has none")
    terms = {}
    for task in fused:
        targets, present = task.encode(records.iloc[train])
        terms[task.name] = fit_logit_term(features[home][train][present], targets[present, 0].astype(int), seed)
    return ClinicalInputs(home, encoder, features, terms)


@dataclass
class RunContext:
    """What one run's estimator reads: the resolved config and spec, the strategy, its datasets with their caches and
    splits, the tasks, the clinical inputs, the run folder, and the process's place in a distributed run."""

    config: Config
    spec: RunSpec
    strategy: Strategy
    datasets: dict[str, Dataset]
    caches: dict[str, ImageCache]
    splits: dict[str, Split]
    tasks: list[Task]
    clinical: ClinicalInputs | None
    run_dir: Path
    dist: DistContext
    device: torch.device | None
    progress: bool


class Estimator:
    """Fitted on a run's training fold, predicting raw head outputs for its test rows."""

    def build(self, run: RunContext) -> None:
        """Everything that can refuse the run, before its folder is written."""

    def fit(self, run: RunContext) -> None:
        """Fit on the training fold (every rank of a distributed run calls it)."""
        raise NotImplementedError

    def predict(self, run: RunContext, dataset: str, part: str = "test"
                ) -> tuple[dict[str, torch.Tensor], np.ndarray] | None:
        """Raw outputs ``{task: (N, n_outputs)}`` for the rows of ``dataset`` in split ``part`` (``val``,
        ``calib`` or ``test``) and those cache rows (sorted); None where the estimator predicts nothing."""
        raise NotImplementedError


class NetworkEstimator(Estimator):
    """The multi-task CNN (``mdmt.models``) trained by the engine."""

    def build(self, run: RunContext) -> None:
        """The model (with the clinical terms set to the logistic regression's), started from the parents."""
        config, clinical = run.config, run.clinical
        self.model: MultiTaskModel = build_model(
            config.model, run.tasks, clinical.encoder.dim if clinical else 0, list(clinical.terms) if clinical else (),
            run.strategy.stage.clinical_trainable)
        for name, (weight, bias) in (clinical.terms if clinical else {}).items():
            self.model.set_clinical_term(name, torch.from_numpy(weight), torch.from_numpy(bias))
        check_input_size(self.model, config.model.input_size)
        run.strategy.init(self.model, run.spec, config, Path(config.results_dir))
        self.weighting: Weighting = build_weighting(config.loss.weighting, run.tasks, config.loss.task_weights,
                                                    seed=run.spec.seed)

    def fit(self, run: RunContext) -> None:
        """The engine's training with model selection on the validation fold; the best weights loaded after."""
        config, strategy, seed = run.config, run.strategy, run.spec.seed
        permute = {name: run.datasets[name].label_columns for name in strategy.stage.permute}
        shard = (lambda sampler: ShardedBatchSampler(sampler, run.dist)) if run.dist.enabled else None
        self.data: RunData = build_data(config, run.caches, run.splits, run.tasks, seed, permute,
                                        run.clinical.features if run.clinical else None, shard)
        fit(
            self.model, run.tasks, self.data.train, self.data.val,
            dataclasses.replace(config.train, max_epochs=strategy.max_epochs(config)),
            BatchAugmenter(config.augment, run.tasks) if config.augment.enabled else None,
            self.weighting, run.run_dir, strategy.select_task(config), run.progress,
            loss_variant=config.loss.variant, seed=seed, input_size=config.model.input_size,
            description=run.spec.key, dist=run.dist, device=run.device,
        )
        if run.dist.is_main:
            self.model.load_state_dict(load_model_state(run.run_dir, BEST_CHECKPOINT))
            training_films = itertools.chain.from_iterable(self.data.parts["train"].values())
            write_feature_stats(self.model, training_films, self._device(run), run.run_dir, config.model.input_size)

    def predict(self, run: RunContext, dataset: str, part: str = "test"
                ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The best checkpoint's outputs on ``dataset``'s images of ``part``."""
        return predict(self.model, self.data.parts[part][dataset], self._device(run), run.config.model.input_size)

    @staticmethod
    def _device(run: RunContext) -> torch.device:
        return resolve_device(run.config.runtime.device)


class ClinicalLogisticEstimator(Estimator):
    """The clinical-only baseline: the logistic regression ``clinical_inputs`` fitted on the training fold."""

    def build(self, run: RunContext) -> None:
        """ConfigError unless the strategy regresses one two-class task on clinical columns, from no parent."""
        stage, where = run.strategy.stage, f"strategies.{run.strategy.name}.params"
        if run.clinical is None or len(stage.tasks) != 1 or stage.start_from:
            raise ConfigError(f"{where}.estimator: clinical_logistic (a clinical-only logistic regression) needs "
                              f"clinical columns, exactly one two-class task and no start_from")
        if run.tasks[0].name not in run.clinical.terms:
            raise ConfigError(f"strategies.{run.spec.strategy}: the clinical-only baseline predicts one two-class "
                              f"task, not {run.tasks[0].name!r}")

    def fit(self, run: RunContext) -> None:
        """Nothing more: the regression was fitted on the training fold with the encoder."""

    def predict(self, run: RunContext, dataset: str, part: str = "test"
                ) -> tuple[dict[str, torch.Tensor], np.ndarray] | None:
        """The regression's logits for the rows of its dataset in ``part`` (None for the other datasets)."""
        clinical = run.clinical
        assert clinical is not None  # build refused a run without clinical inputs
        if dataset != clinical.home:
            return None
        rows = split_rows({dataset: run.caches[dataset]}, {dataset: run.splits[dataset]}, part)[dataset]
        features = clinical.features[dataset][rows].astype(np.float64)
        outputs = {name: torch.from_numpy(features @ weight.T + bias)
                   for name, (weight, bias) in clinical.terms.items()}
        return outputs, rows


ESTIMATORS: Registry[Estimator] = Registry("estimator")
"""Estimator plug-ins: ``factory(params) -> Estimator``, named by a strategy's ``estimator``."""
ESTIMATORS.add("network", lambda params: NetworkEstimator(), NoParams,
               "the multi-task CNN trained by the engine (the default)")
ESTIMATORS.add("clinical_logistic", lambda params: ClinicalLogisticEstimator(), NoParams,
               "a logistic regression on the strategy's clinical columns (the clinical-only baseline)")
