"""The paper's indicator-masked multi-task loss, and per-task logging means.

The paper's loss is L = Σ_i Σ_τ I(X_i, τ) · L^τ(O_i^τ, Y_i^τ); as the official code, each task's
sum is divided by the batch size B, so a sample without a task's label adds exactly 0 to that task's loss and
nothing to its gradient. Each task's per-sample loss L^τ, with its ``clean`` and ``paper`` variants, is the
task's own (``mdmt.tasks``: ``Task.loss``).

The task weighting strategies live in ``mdmt.weighting``; ``build_weighting`` is re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mdmt.tasks import LOSS_VARIANTS, Task
from mdmt.weighting import Weighting, build_weighting

__all__ = ["LOSS_VARIANTS", "Weighting", "build_weighting", "task_losses", "task_means"]


def _masked_per_sample(
    task: Task, outputs: torch.Tensor, targets: torch.Tensor, present: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss with 0 where the label is absent, the boolean mask); absent targets never enter."""
    mask = present.to(device=outputs.device, dtype=torch.bool).reshape(-1)
    safe_targets = torch.where(mask.unsqueeze(1), targets.to(outputs.dtype), 0.0)
    losses = task.loss(outputs, safe_targets, variant)
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
