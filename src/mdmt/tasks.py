"""Tasks: everything one head's supervision means, in one class per kind. (Over 400 lines on purpose: this is the
one place that says what a task is, and the three kinds share most of it.)

A task is the project's unit of supervision. Its kind (``ClassificationTask``, ``OrdinalTask``,
``RegressionTask``, ``SegmentationTask``) owns, for that head:

- the targets: ``encode`` turns a records table into a target matrix and a label-present mask, the indicator
  function of the paper's loss (``mdmt.losses`` sums the masked per-sample losses);
- the loss of each sample (``loss``, with the ``clean`` and ``paper`` variants);
- the decoding of raw outputs into prediction columns (``decode``), the ``y_true`` columns (``truth_columns``),
  and the columns ``mdmt predict`` writes per film (``film_columns``);
- how its predictions are scored (``scorer``, the ``tasks.json`` entry) and the scalar Grad-CAM explains;
- the Brixia global bins (``global_bins``), the one binning used by targets, metrics and ``predict``.

Tasks are plug-ins of ``TASKS`` (``mdmt.registry``; the built-in ones take no parameters, a plug-in file may
register more); ``make_task`` builds a task read from one manifest column (``model.extra_tasks``). Importing this module does not import torch: the losses and
decoding import it when they run, so the results side (scoring, the report) stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pandas as pd

from mdmt.errors import ConfigError, DataError
from mdmt.registry import NoParams, Registry

if TYPE_CHECKING:
    import torch

TaskKind = Literal["classification", "regression", "ordinal", "segmentation"]
LOSS_VARIANTS: tuple[str, ...] = ("clean", "paper")

REGIONS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")
REGION_COLUMNS: tuple[str, ...] = tuple(f"brixia_{r}" for r in REGIONS)
# A horizontal flip swaps the right lung (A-C, image left) with the left lung (D-F).
REGION_FLIP: tuple[int, ...] = (3, 4, 5, 0, 1, 2)
REGION_SCORE_RANGE: tuple[float, float] = (0.0, 3.0)
"""The range of a regional Brixia score; regional predictions are clipped to it before scoring and in ``predict``."""
GLOBAL_BIN_EDGES: tuple[float, ...] = (5.0, 10.0, 15.0)  # 0-4, 5-9, 10-14, 15-18 (the paper)
GLOBAL_BIN_NAMES: tuple[str, ...] = ("0-4", "5-9", "10-14", "15-18")
LUNG_BIN_EDGES: tuple[float, ...] = (2.0, 5.0, 8.0)  # 0-1, 2-4, 5-7, 8-9 (official brixia_Lung)
MASK_PRESENT = "mask_present"
"""Records column of an image cache built with masks: the row has a usable mask in ``masks.u8`` (else its mask is
all zero): the segmentation indicator."""
SCORERS: tuple[str, ...] = ("binary", "global4", "lung4", "regions", "regression", "classification")
"""How a task's predictions are scored (``mdmt.evaluate.scoring``): ``binary`` from the ``score`` of class 1,
a Brixia variant (``global4``, ``lung4``, ``regions``), or plain regression / classification metrics."""


def bin_scores(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin integer scores by right-open edges: value < edges[0] -> 0, ... (NaN stays NaN)."""
    values = np.asarray(values, dtype=np.float64)
    binned = np.digitize(values, np.asarray(edges, dtype=np.float64)).astype(np.float32)
    binned[np.isnan(values)] = np.nan
    return binned


def global_bins(score: Any) -> np.ndarray:
    """Brixia global score (0–18, may be a continuous prediction) → the paper's 4 bins 0–4, 5–9, 10–14, 15–18.

    A continuous score goes to the bin of its nearest integer (4.4 → 0, 4.6 → 1, 14.99 → 3); values are not
    clipped. Targets, metrics and ``mdmt predict`` all bin with this function. NaN raises."""
    values = np.asarray(score, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError(f"global_bins: {int(np.isnan(values).sum())} NaN scores")
    return np.digitize(values, np.asarray(GLOBAL_BIN_EDGES) - 0.5).astype(np.int64)


def _bin_columns(bins: np.ndarray) -> dict[str, np.ndarray]:
    """``brixia_bin`` (0–3) and its range text ``brixia_bin_range``."""
    bins = np.asarray(bins).astype(np.int64)
    return {"brixia_bin": bins, "brixia_bin_range": np.array([GLOBAL_BIN_NAMES[b] for b in bins], dtype=object)}


def prediction_column(base: str, group: str) -> str:
    """``base`` for a one-group task, else ``base_<group>``."""
    return f"{base}_{group}" if group else base


Encoder = Callable[[pd.DataFrame], np.ndarray]


@dataclass(frozen=True)
class Task:
    """One supervised output of the network; subclasses are the kinds."""

    name: str
    columns: tuple[str, ...]
    groups: int
    n_classes: int
    raw_targets: Encoder = field(repr=False, compare=False)
    flip_perm: tuple[int, ...] | None = None
    class_names: tuple[str, ...] = ()
    scorer: str = ""
    """How the predictions are scored (one of ``SCORERS``); empty: the kind's default."""

    kind: ClassVar[TaskKind]
    decoding: ClassVar[str]
    """How a consumer of the raw outputs decodes them (``mdmt export`` writes it)."""
    pixel_targets: ClassVar[bool] = False
    """True: the targets are per-pixel masks the batches gather from the image cache (``encode`` gives only the
    indicator); False: ``encode`` reads them from the records table."""
    head: ClassVar[str] = ""
    """The head this kind needs whatever ``model.head`` says (empty: any pooled head)."""

    def __post_init__(self) -> None:
        if not self.scorer:
            object.__setattr__(self, "scorer", self.default_scorer())
        if self.scorer not in SCORERS:
            raise ConfigError(f"task {self.name!r}: scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")

    def default_scorer(self) -> str:
        """The scorer of a task that names none."""
        return self.kind

    # ------------------------------------------------------------------------------------------- shape
    @property
    def n_outputs(self) -> int:
        """Width of the head's output layer."""
        return self.groups

    @property
    def target_dim(self) -> int:
        """Columns of the target matrix (class index per group, or a value per output)."""
        return self.groups

    def group_names(self) -> list[str]:
        """Suffixes of the per-group columns: ``[""]`` for one group, else the region letters or indices."""
        if self.target_dim == 1:
            return [""]
        if len(self.columns) == self.target_dim:
            return [c.removeprefix("brixia_") for c in self.columns]
        return [str(i) for i in range(self.target_dim)]

    def prediction_columns(self, base: str) -> list[str]:
        """The per-group column names for ``base`` (``y_true`` → ``y_true`` or ``y_true_A`` …)."""
        return [prediction_column(base, g) for g in self.group_names()]

    # ------------------------------------------------------------------------------------------- targets
    def encode(self, records: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Targets ``(N, target_dim)`` float32 (0 where absent) and the label-present mask ``(N,)``."""
        missing = [c for c in self.columns if c not in records.columns]
        if missing:
            present = np.zeros(len(records), dtype=bool)
            return np.zeros((len(records), self.target_dim), dtype=np.float32), present
        raw = np.asarray(self.raw_targets(records), dtype=np.float32).reshape(len(records), self.target_dim)
        present = ~np.isnan(raw).any(axis=1)
        self.check_targets(records, raw, present)
        return np.where(present[:, None], raw, 0.0).astype(np.float32), present

    def check_targets(self, records: pd.DataFrame, raw: np.ndarray, present: np.ndarray) -> None:
        """DataError naming the ids of labels this kind cannot take (class indices outside 0..n_classes-1)."""
        bad = present & ((raw < 0) | (raw >= self.n_classes) | (raw != np.round(raw))).any(axis=1)
        if bad.any():
            ids = records.loc[bad, "image_id"].astype(str).tolist()[:5] if "image_id" in records else []
            raise DataError(f"task {self.name!r}: labels outside 0..{self.n_classes - 1} for ids {ids}")

    def truth_columns(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """The ``y_true`` column(s) of encoded targets (class indices as integers)."""
        return {name: targets[:, j].astype(np.int64) for j, name in enumerate(self.prediction_columns("y_true"))}

    # ------------------------------------------------------------------------------------------- outputs
    def _grouped(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, n_outputs)`` → ``(B, groups, outputs per group)``."""
        return outputs.reshape(outputs.shape[0], self.groups, -1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
        """The loss of every sample ``(B,)`` from raw outputs ``(B, n_outputs)`` and targets ``(B, target_dim)``
        (class indices as floats). Every row is computed: ``mdmt.losses`` masks afterwards."""
        raise NotImplementedError

    def decode(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """Raw outputs ``(B, n_outputs)`` → prediction columns, each a 1-D array of length B."""
        raise NotImplementedError

    def cam_scalar(self, raw: torch.Tensor) -> torch.Tensor:
        """One scalar per image from raw outputs ``(B, n_outputs)``: the quantity Grad-CAM explains."""
        raise NotImplementedError

    def film_columns(self, raw: torch.Tensor, named: bool = True) -> dict[str, np.ndarray]:
        """The columns ``mdmt predict`` writes for this head: ``<task>_<decode column>``; with ``named``, the binary
        and Brixia scorers name theirs (``p_<class 1>``, ``brixia_*``)."""
        decoded = self.decode(raw)
        own = self.named_columns(decoded) if named else {}
        return own or {f"{self.name}_{k}": v for k, v in decoded.items()}

    def named_columns(self, decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The columns this task's scorer names from ``decode``'s: the Brixia columns for ``regions``; else none."""
        return _brixia_columns(self, decoded) if self.scorer == "regions" else {}

    # ------------------------------------------------------------------------------------------- records
    def entry(self, datasets: Sequence[str], home: str) -> dict[str, Any]:
        """The ``tasks.json`` entry: kind, scorer, group suffixes, classes, the run's datasets labelling the task
        and its home dataset (whose rows give the task's metrics)."""
        if home not in datasets:
            raise ValueError(f"task {self.name!r}: home dataset {home!r} is not one of its datasets {list(datasets)}")
        return {"kind": self.kind, "scorer": self.scorer, "groups": self.group_names(), "n_classes": self.n_classes,
                "class_names": list(self.class_names), "datasets": list(datasets), "home": home}

    def export_info(self) -> dict[str, object]:
        """What ``mdmt export`` says of this head's output."""
        return {"name": self.name, "kind": self.kind, "outputs": self.n_outputs, "groups": self.group_names(),
                "n_classes": self.n_classes, "class_names": list(self.class_names), "decoding": self.decoding}


def _check_variant(variant: str) -> None:
    if variant not in LOSS_VARIANTS:
        raise ConfigError(f"loss.variant must be one of {', '.join(LOSS_VARIANTS)}, got {variant!r}")


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Classes per group: cross-entropy (mean over groups), softmax decoding."""

    paper_mse: bool = False
    """The ``paper`` loss variant trains this head as the official code trains prognosis: the MSE between the raw
    outputs and the one-hot target (mean over outputs)."""

    kind: ClassVar[TaskKind] = "classification"
    decoding: ClassVar[str] = "softmax over each group's n_classes logits; the predicted class is the argmax"

    def default_scorer(self) -> str:
        """``binary`` for one two-class output, else ``classification``."""
        return "binary" if self.n_classes == 2 and self.groups == 1 else "classification"

    @property
    def n_outputs(self) -> int:
        """``groups × n_classes`` logits."""
        return self.groups * self.n_classes

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
        """Cross-entropy per group, averaged; MSE against the one-hot target for ``paper_mse`` heads under ``paper``."""
        import torch.nn.functional as F

        _check_variant(variant)
        classes = targets.round().long()
        logits = self._grouped(outputs)
        if variant == "paper" and self.paper_mse:
            one_hot = F.one_hot(classes, self.n_classes).to(logits.dtype)
            return (logits - one_hot).pow(2).mean(dim=(1, 2))
        ce = F.cross_entropy(logits.reshape(-1, self.n_classes), classes.reshape(-1), reduction="none")
        return ce.reshape(outputs.shape[0], self.groups).mean(dim=1)

    def decode(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """``y_pred[_g]`` (argmax) and, for 2 classes, ``score[_g]`` = the softmax probability of class 1 (for
        prognosis P(SEVERE), also for MSE-trained outputs), else ``prob[_g]_<c>`` per class."""
        import torch

        logits = self._grouped(outputs.detach().float().cpu())
        probabilities = torch.softmax(logits, dim=-1)
        columns: dict[str, np.ndarray] = {}
        for j, g in enumerate(self.group_names()):
            columns[prediction_column("y_pred", g)] = logits[:, j].argmax(dim=1).numpy()
            if self.n_classes == 2:
                columns[prediction_column("score", g)] = probabilities[:, j, 1].numpy()
            else:
                for c in range(self.n_classes):
                    columns[f"{prediction_column('prob', g)}_{c}"] = probabilities[:, j, c].numpy()
        return columns

    def cam_scalar(self, raw: torch.Tensor) -> torch.Tensor:
        """Two classes: the log-odds of class 1; more: the expected class index; summed over groups."""
        import torch

        grouped = self._grouped(raw)
        if self.n_classes == 2:
            return (grouped[..., 1] - grouped[..., 0]).sum(dim=1)
        classes = torch.arange(self.n_classes, dtype=raw.dtype, device=raw.device)
        return (torch.softmax(grouped, dim=-1) * classes).sum(dim=(1, 2))

    def named_columns(self, decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``binary``: ``p_<class 1>`` and the more probable class name under the task's name; ``global4``: the
        Brixia bin, its range and ``p_bin_<c>``; else none."""
        if self.scorer == "binary":
            names = np.array([self.class_names[int(c)] for c in decoded["y_pred"]], dtype=object)
            return {f"p_{self.class_names[1].lower()}": decoded["score"].astype(np.float64), self.name: names}
        if self.scorer == "global4":
            return {**_bin_columns(decoded["y_pred"]), **{f"p_bin_{c}": decoded[f"prob_{c}"]
                                                           for c in range(self.n_classes)}}
        return {}


@dataclass(frozen=True)
class OrdinalTask(Task):
    """Ordered classes per group with a cumulative link: ``n_classes - 1`` logits P(t > k)."""

    kind: ClassVar[TaskKind] = "ordinal"
    decoding: ClassVar[str] = ("sigmoid of each group's n_classes - 1 logits (P(score > k)); the score is how many "
                               "exceed 0.5")

    def default_scorer(self) -> str:
        """``classification`` of the decoded classes."""
        return "classification"

    @property
    def n_outputs(self) -> int:
        """``groups × (n_classes - 1)`` logits."""
        return self.groups * (self.n_classes - 1)

    def _exceed(self, outputs: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(self._grouped(outputs))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
        """Binary cross-entropy of each threshold t > k, averaged over thresholds and groups."""
        import torch
        import torch.nn.functional as F

        _check_variant(variant)
        classes = targets.round().long()
        logits = self._grouped(outputs)
        thresholds = torch.arange(self.n_classes - 1, device=outputs.device)
        exceeded = (classes.unsqueeze(-1) > thresholds).to(logits.dtype)  # t → [t>0, t>1, ..., t>K-2]
        return F.binary_cross_entropy_with_logits(logits, exceeded, reduction="none").mean(dim=(1, 2))

    def decode(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """``expected[_g]`` = Σ_k P(t > k) (the expected score) and ``y_pred[_g]`` = #{k: P(t > k) > 0.5}."""
        exceed = self._exceed(outputs.detach().float().cpu())
        columns: dict[str, np.ndarray] = {}
        for j, g in enumerate(self.group_names()):
            columns[prediction_column("expected", g)] = exceed[:, j].sum(dim=1).numpy()
            columns[prediction_column("y_pred", g)] = (exceed[:, j] > 0.5).sum(dim=1).numpy()
        return columns

    def cam_scalar(self, raw: torch.Tensor) -> torch.Tensor:
        """The expected score summed over groups (for the regional Brixia head: the global score)."""
        return self._exceed(raw).sum(dim=(1, 2))


@dataclass(frozen=True)
class RegressionTask(Task):
    """A value per group: mean squared error."""

    kind: ClassVar[TaskKind] = "regression"
    decoding: ClassVar[str] = "one value per group (regional Brixia scores: clip to 0-3)"

    def check_targets(self, records: pd.DataFrame, raw: np.ndarray, present: np.ndarray) -> None:
        """Any finite value is a target."""

    def truth_columns(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """The ``y_true`` column(s) as values."""
        return {name: targets[:, j] for j, name in enumerate(self.prediction_columns("y_true"))}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
        """Squared error, averaged over groups."""
        _check_variant(variant)
        return (outputs - targets).pow(2).mean(dim=1)

    def decode(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """``y_pred[_g]`` values."""
        outputs = outputs.detach().float().cpu()
        return {prediction_column("y_pred", g): outputs[:, j].numpy() for j, g in enumerate(self.group_names())}

    def cam_scalar(self, raw: torch.Tensor) -> torch.Tensor:
        """The sum of the outputs (for the regional Brixia head: the predicted global score)."""
        return raw.sum(dim=1)


@dataclass(frozen=True)
class SegmentationTask(Task):
    """A per-pixel mask (the lungs) at a ``size`` × ``size`` grid, from the decoder head (``mask_decoder``).

    Its pixel targets are not a records column: the image cache built with masks holds each film's mask cropped
    and resized like the film (``masks.u8``), the batches gather them (area-downsampled to ``size``, so soft at
    the mask's edge, flattened row-major to ``(B, size²)``) and the augmentation moves them with the image.
    ``encode`` gives the indicator, the cache's ``mask_present`` column, so the masked loss applies unchanged.
    Per sample: binary cross-entropy with logits (mean over pixels) + soft Dice loss. Decoded, and scored as a
    ``regression``: each film's foreground share (``y_pred``, the mean probability; ``y_true``, the target's).
    """

    size: int = 16
    kind: ClassVar[TaskKind] = "segmentation"
    decoding: ClassVar[str] = "sigmoid of each of size × size logits (row-major): P(the pixel is in the mask)"
    pixel_targets: ClassVar[bool] = True
    head: ClassVar[str] = "mask_decoder"
    DICE_EPS: ClassVar[float] = 1.0

    def default_scorer(self) -> str:
        """``regression`` of the foreground share (scoring stays per film and torch-free)."""
        return "regression"

    @property
    def n_outputs(self) -> int:
        """One logit per mask pixel."""
        return self.size * self.size

    @property
    def target_dim(self) -> int:
        """One target per mask pixel."""
        return self.size * self.size

    def group_names(self) -> list[str]:
        """One group: the per-film columns are ``y_true`` and ``y_pred``."""
        return [""]

    def encode(self, records: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """No targets (``(N, 0)``: the batches gather the pixels from the cache) and the ``mask_present`` indicator
        (all False for records without the column, e.g. a cache built without masks)."""
        present = (np.array(records[MASK_PRESENT], dtype=bool) if MASK_PRESENT in records
                   else np.zeros(len(records), dtype=bool))
        return np.zeros((len(records), 0), dtype=np.float32), present

    def truth_columns(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """``y_true``: the target mask's foreground share."""
        return {"y_true": np.asarray(targets, dtype=np.float64).mean(axis=1)}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
        """BCE with logits averaged over pixels + 1 − soft Dice, per sample (both variants)."""
        import torch
        import torch.nn.functional as F

        _check_variant(variant)
        bce = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(dim=1)
        probabilities = torch.sigmoid(outputs)
        overlap = (probabilities * targets).sum(dim=1)
        dice = (2 * overlap + self.DICE_EPS) / (probabilities.sum(dim=1) + targets.sum(dim=1) + self.DICE_EPS)
        return bce + 1.0 - dice

    def decode(self, outputs: torch.Tensor) -> dict[str, np.ndarray]:
        """``y_pred``: the predicted foreground share (the mean pixel probability)."""
        import torch

        return {"y_pred": torch.sigmoid(outputs.detach().float().cpu()).mean(dim=1).numpy()}

    def cam_scalar(self, raw: torch.Tensor) -> torch.Tensor:
        """The summed logits (the mask's evidence)."""
        return raw.sum(dim=1)


def dice_scores(probabilities: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Dice of each thresholded predicted mask against its target (``(N, P)`` each; targets thresholded at 0.5);
    1 where both are empty."""
    predicted, truth = np.asarray(probabilities) >= threshold, np.asarray(masks) >= 0.5
    overlap = (predicted & truth).sum(axis=1)
    total = predicted.sum(axis=1) + truth.sum(axis=1)
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


@dataclass
class SegmentationParams:
    """``lung_mask``: the side of the predicted mask grid (the targets are downsampled to it)."""

    size: int = 16

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"task lung_mask: params.size must be positive, got {self.size}")


def _brixia_columns(task: Task, decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``brixia_A`` … ``brixia_F`` clipped to 0–3, ``brixia_global`` (their sum) and its bin."""
    scores = {f"brixia_{r}": np.clip(decoded[prediction_column("y_pred", r)].astype(np.float64), *REGION_SCORE_RANGE)
              for r in task.group_names()}
    total = np.sum(list(scores.values()), axis=0)
    return {**scores, "brixia_global": total, **_bin_columns(global_bins(total))}


# ----------------------------------------------------------------------------------------- target encoders
def _numeric(records: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(records[name], errors="coerce").to_numpy(np.float64)


def _column(name: str) -> Encoder:
    return partial(_numeric, name=name)


def _regions(records: pd.DataFrame) -> np.ndarray:
    return records[list(REGION_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)


def global4_targets(records: pd.DataFrame) -> np.ndarray:
    """The 4-bin class of each record's integer ``brixia_global`` (NaN where absent)."""
    return bin_scores(_column("brixia_global")(records), GLOBAL_BIN_EDGES)


def _lung4(records: pd.DataFrame) -> np.ndarray:
    regions = _regions(records)
    lungs = np.stack([regions[:, :3].sum(axis=1), regions[:, 3:].sum(axis=1)], axis=1)
    return bin_scores(lungs, LUNG_BIN_EDGES)


# ----------------------------------------------------------------------------------------- the registry
TASKS: Registry[Task] = Registry("task")
"""Task plug-ins: ``factory(params, name=...) -> Task``."""

_BUILTIN: dict[str, Task] = {task.name: task for task in (
    ClassificationTask("prognosis", ("prognosis",), 1, 2, _column("prognosis"), None, ("MILD", "SEVERE"),
                       paper_mse=True),
    ClassificationTask("severity_global4", ("brixia_global",), 1, 4, global4_targets, None, GLOBAL_BIN_NAMES,
                       "global4"),
    ClassificationTask("severity_lung4", REGION_COLUMNS, 2, 4, _lung4, (1, 0), ("0-1", "2-4", "5-7", "8-9"), "lung4"),
    RegressionTask("severity_regions", REGION_COLUMNS, 6, 0, _regions, REGION_FLIP, REGIONS, "regions"),
    OrdinalTask("severity_ordinal", REGION_COLUMNS, 6, 4, _regions, REGION_FLIP, ("0", "1", "2", "3"), "regions"),
)}
_SUMMARIES = {
    "prognosis": "MILD vs SEVERE (AIforCOVID); the paper variant trains it with MSE",
    "severity_global4": "the global Brixia score's 4 bins 0-4, 5-9, 10-14, 15-18 (the paper)",
    "severity_lung4": "each lung's Brixia sum in 4 bins (the official brixia_Lung)",
    "severity_regions": "the 6 regional Brixia scores 0-3 as values",
    "severity_ordinal": "the 6 regional Brixia scores 0-3 as ordered classes",
}
for _name, _task in _BUILTIN.items():
    TASKS.add(_name, lambda params, name, task=_task: task, NoParams, _SUMMARIES[_name])
TASKS.add("lung_mask", lambda params, name: SegmentationTask(name, (MASK_PRESENT,), 1, 0, _column(MASK_PRESENT),
                                                             size=params.size),
          SegmentationParams, "the lung mask per pixel (image caches built with masks)")

TASK_NAMES: tuple[str, ...] = tuple(_BUILTIN)
"""The built-in tasks."""


def get_task(name: str) -> Task:
    """The registered task ``name`` (built-in or a plug-in's)."""
    return TASKS.build(name, name=name)


def _class_key(value: object) -> str:
    """Upper-cased text of a class value; integral numbers as integers (a 0/1 sheet column reads as 1.0)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip().upper()


def _class_indices(records: pd.DataFrame, task: str, column: str, classes: tuple[str, ...]) -> np.ndarray:
    lookup = {_class_key(c): i for i, c in enumerate(classes)}
    out = np.full(len(records), np.nan)
    for i, value in enumerate(records[column]):
        if pd.isna(value) or str(value).strip() == "":
            continue
        key = _class_key(value)
        if key not in lookup:
            raise DataError(f"task {task!r}: column {column!r} has value {value!r}; expected one of {list(classes)}")
        out[i] = lookup[key]
    return out


def make_task(name: str, column: str, kind: TaskKind = "classification", classes: Sequence[str] = ()) -> Task:
    """A task read from one manifest column (class names map to indices in the given order)."""
    if kind == "classification":
        if len(classes) < 2:
            raise ConfigError(f"task {name!r}: a classification task needs at least 2 classes")
        encode = partial(_class_indices, task=name, column=column, classes=tuple(map(str, classes)))
        return ClassificationTask(name, (column,), 1, len(classes), encode, None, tuple(map(str, classes)))
    if kind == "regression":
        return RegressionTask(name, (column,), 1, 0, _column(column))
    raise ConfigError(f"task {name!r}: kind must be classification or regression, not {kind!r}")
