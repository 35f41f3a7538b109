"""Per-task losses with the paper's indicator mask, logging means, and decoding outputs into predictions.

The paper's loss is L = Σ_i Σ_τ I(X_i, τ) · L^τ(O_i^τ, Y_i^τ); as the official code, each task's
sum is divided by the batch size B, so a sample without a task's label adds exactly 0 to that task's loss and
nothing to its gradient. Two variants:

- ``clean``: cross-entropy for classification tasks (mean over groups), MSE for regression, cumulative-link
  binary cross-entropy for ordinal tasks;
- ``paper``: as ``clean`` except the prognosis task, trained as in the official code with the MSE between its
  two raw outputs and the one-hot target (mean over the 2 outputs). Severity classification stays CE.

The task weighting strategies live in ``mdmt.weighting``; ``build_weighting`` is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mdmt.errors import ConfigError
from mdmt.tasks import Task, group_names, prediction_column, prediction_columns
from mdmt.weighting import Weighting, build_weighting

__all__ = ["LOSS_VARIANTS", "Weighting", "build_weighting", "decode", "group_names", "per_sample_loss",
           "prediction_columns", "task_losses", "task_means"]

LOSS_VARIANTS: tuple[str, ...] = ("clean", "paper")
PAPER_MSE_TASKS: tuple[str, ...] = ("prognosis",)
"""Classification tasks the ``paper`` variant trains with MSE against the one-hot target."""


def _check_variant(variant: str) -> None:
    if variant not in LOSS_VARIANTS:
        raise ConfigError(f"loss.variant must be one of {', '.join(LOSS_VARIANTS)}, got {variant!r}")


def _grouped(task: Task, outputs: torch.Tensor) -> torch.Tensor:
    """``(B, n_outputs)`` → ``(B, groups, outputs per group)``."""
    return outputs.reshape(outputs.shape[0], task.groups, -1)


def per_sample_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor, variant: str = "clean") -> torch.Tensor:
    """The loss of every sample ``(B,)`` from raw outputs ``(B, n_outputs)`` and targets ``(B, target_dim)``
    (class indices as floats for classification and ordinal tasks). Every row is computed: mask afterwards."""
    _check_variant(variant)
    if task.kind == "regression":
        return (outputs - targets).pow(2).mean(dim=1)
    classes = targets.round().long()
    logits = _grouped(task, outputs)
    if task.kind == "ordinal":
        thresholds = torch.arange(task.n_classes - 1, device=outputs.device)
        exceeded = (classes.unsqueeze(-1) > thresholds).to(logits.dtype)  # t → [t>0, t>1, ..., t>K-2]
        return F.binary_cross_entropy_with_logits(logits, exceeded, reduction="none").mean(dim=(1, 2))
    if variant == "paper" and task.name in PAPER_MSE_TASKS:
        one_hot = F.one_hot(classes, task.n_classes).to(logits.dtype)
        return (logits - one_hot).pow(2).mean(dim=(1, 2))
    ce = F.cross_entropy(logits.reshape(-1, task.n_classes), classes.reshape(-1), reduction="none")
    return ce.reshape(outputs.shape[0], task.groups).mean(dim=1)


def _masked_per_sample(
    task: Task, outputs: torch.Tensor, targets: torch.Tensor, present: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss with 0 where the label is absent, the boolean mask); absent targets never enter."""
    mask = present.to(device=outputs.device, dtype=torch.bool).reshape(-1)
    safe_targets = torch.where(mask.unsqueeze(1), targets.to(outputs.dtype), 0.0)
    losses = per_sample_loss(task, outputs, safe_targets, variant)
    return torch.where(mask, losses, 0.0), mask


def task_losses(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    variant: str = "clean",
) -> dict[str, torch.Tensor]:
    """Each task's Σ over samples with its label of the per-sample loss, divided by the batch size."""
    result: dict[str, torch.Tensor] = {}
    for task in tasks:
        out = outputs[task.name]
        losses, _ = _masked_per_sample(task, out, targets[task.name], present[task.name], variant)
        result[task.name] = losses.sum() / out.shape[0]
    return result


def task_means(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    variant: str = "clean",
) -> dict[str, float]:
    """Each task's mean loss over the samples with its label (NaN, to be skipped, when there are none)."""
    means: dict[str, float] = {}
    with torch.no_grad():
        for task in tasks:
            losses, mask = _masked_per_sample(task, outputs[task.name], targets[task.name], present[task.name], variant)
            count = int(mask.sum())
            means[task.name] = float(losses.sum()) / count if count else math.nan
    return means


# ----------------------------------------------------------------------------------------- predictions
def decode(task: Task, outputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Raw outputs ``(B, n_outputs)`` → prediction columns, each a 1-D array of length B.

    - classification: ``y_pred[_g]`` (argmax) and, for 2 classes, ``score[_g]`` = softmax probability of class
      1 (for prognosis: P(SEVERE), also for the MSE-trained ``paper`` outputs), else ``prob[_g]_<c>`` per class;
    - regression: ``y_pred[_g]`` values;
    - ordinal: ``expected[_g]`` = Σ_k P(t > k) (the expected score) and ``y_pred[_g]`` = #{k: P(t > k) > 0.5}.
    """
    outputs = outputs.detach().float().cpu()
    groups = group_names(task)
    columns: dict[str, np.ndarray] = {}
    if task.kind == "regression":
        for j, g in enumerate(groups):
            columns[prediction_column("y_pred", g)] = outputs[:, j].numpy()
        return columns
    logits = _grouped(task, outputs)
    if task.kind == "ordinal":
        exceed = torch.sigmoid(logits)
        for j, g in enumerate(groups):
            columns[prediction_column("expected", g)] = exceed[:, j].sum(dim=1).numpy()
            columns[prediction_column("y_pred", g)] = (exceed[:, j] > 0.5).sum(dim=1).numpy()
        return columns
    probabilities = torch.softmax(logits, dim=-1)
    for j, g in enumerate(groups):
        columns[prediction_column("y_pred", g)] = logits[:, j].argmax(dim=1).numpy()
        if task.n_classes == 2:
            columns[prediction_column("score", g)] = probabilities[:, j, 1].numpy()
        else:
            for c in range(task.n_classes):
                columns[f"{prediction_column('prob', g)}_{c}"] = probabilities[:, j, c].numpy()
    return columns
