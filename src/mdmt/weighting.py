"""Task weighting: how the per-task losses of a step become gradients.

Every strategy is a small ``nn.Module`` (so its learnable parameters go to the optimiser through
``parameters()`` and its state into checkpoints through ``state_dict()``) with
``backward(losses, shared_params) -> weights used`` and an ``epoch_end(mean_losses)`` hook:

- ``fixed``: Σ_t w_t·L_t with constant weights (the paper: all 1);
- ``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018): learnable log-variances s_t, Σ_t exp(−s_t)·L_t + s_t;
- ``dwa`` (Liu, Johns & Davison, CVPR 2019): w_t = K·softmax_t(r_t / T), r_t = L_t(e−1) / L_t(e−2);
- ``gradnorm`` (Chen et al., ICML 2018): learnable weights moved to equalise the tasks' gradient norms on the
  last shared layer, scaled by their relative inverse training rates to the power α;
- ``pcgrad`` (Yu et al., NeurIPS 2020): per-task gradients on the shared parameters; a gradient that conflicts
  with another task's (negative dot product) is projected onto that gradient's normal plane; then summed.

``loss.task_weights`` (constant factors) apply to the strategies with ``uses_task_weights`` (``fixed`` and
``pcgrad``); the others set their own. ``loss.weighting`` is a ``{name, params}`` entry of ``WEIGHTINGS``; a new
strategy is one ``@WEIGHTINGS.register(name, Params)`` factory ``(params, task_names=..., task_weights=...,
seed=...) -> Weighting`` in any imported module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mdmt.config import PluginRef
from mdmt.errors import ConfigError
from mdmt.registry import NoParams, Registry
from mdmt.tasks import TASKS, Task

Losses = Mapping[str, torch.Tensor]


class Weighting(nn.Module):
    """Base: ``backward`` combines the task losses with ``loss_weights`` (plus ``regulariser``) and backpropagates."""

    uses_task_weights = False
    """Whether ``loss.task_weights`` apply (else they are a config error)."""

    def __init__(self, task_names: Sequence[str]):
        super().__init__()
        self.task_names = list(task_names)

    def loss_weights(self, losses: Losses) -> dict[str, torch.Tensor | float]:
        """The weight of each task's loss in this step."""
        raise NotImplementedError

    def regulariser(self) -> torch.Tensor | float:
        """A term added to the weighted sum (0 unless the weights are learned through the loss)."""
        return 0.0

    def backward(self, losses: Losses, shared_params: Sequence[nn.Parameter]) -> dict[str, float]:
        """Backpropagate the combined loss; returns the weights used."""
        weights = self.loss_weights(losses)
        total = sum(weights[t] * losses[t] for t in self.task_names) + self.regulariser()
        total.backward()  # type: ignore[union-attr]
        return {t: float(w.detach()) if isinstance(w, torch.Tensor) else w for t, w in weights.items()}

    def epoch_end(self, mean_losses: Mapping[str, float]) -> None:
        """Called once per epoch with each task's mean training loss (only DWA uses it)."""


def _static_weights(task_names: Sequence[str], task_weights: Mapping[str, float] | None) -> dict[str, float]:
    """Constant weight per task: ``task_weights[t]``, 1 for a task not named there."""
    return {t: float((task_weights or {}).get(t, 1.0)) for t in task_names}


class FixedWeighting(Weighting):
    """Σ_t w_t·L_t with constant weights (1 for a task not in ``task_weights``)."""

    uses_task_weights = True

    def __init__(self, task_names: Sequence[str], task_weights: Mapping[str, float] | None = None):
        super().__init__(task_names)
        self.weights = _static_weights(self.task_names, task_weights)

    def loss_weights(self, losses: Losses) -> dict[str, torch.Tensor | float]:
        return dict(self.weights)


class UncertaintyWeighting(Weighting):
    """Σ_t exp(−s_t)·L_t + s_t with learnable s_t = log σ_t² (initialised at 0: weight 1); a noisier task gets
    a larger s_t, i.e. a smaller weight (the optimum is exp(−s_t) = 1 / L_t). As the task losses are sums over
    the labelled samples / B, a batch without a task's labels still moves s_t: the optimum is over batches,
    exp(−s_t) = 1 / E[L_t]."""

    def __init__(self, task_names: Sequence[str]):
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))

    def loss_weights(self, losses: Losses) -> dict[str, torch.Tensor | float]:
        precisions = torch.exp(-self.log_vars)
        return {t: precisions[i] for i, t in enumerate(self.task_names)}

    def regulariser(self) -> torch.Tensor:
        return self.log_vars.sum()


class DynamicWeightAverage(Weighting):
    """w_t = K·softmax(r_t / T) with r_t the ratio of the last two epochs' mean losses; 1 for the first two."""

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0):
        super().__init__(task_names)
        if temperature <= 0:
            raise ConfigError(f"loss.weighting dwa params.temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.history: list[dict[str, float]] = []

    def epoch_end(self, mean_losses: Mapping[str, float]) -> None:
        self.history = (self.history + [{t: float(mean_losses[t]) for t in self.task_names}])[-2:]

    def loss_weights(self, losses: Losses) -> dict[str, torch.Tensor | float]:
        if len(self.history) < 2:
            return {t: 1.0 for t in self.task_names}
        before, last = self.history
        ratios = [last[t] / before[t] if before[t] > 0 else math.nan for t in self.task_names]
        ratios = [r if math.isfinite(r) else 1.0 for r in ratios]  # a task without labels in an epoch
        weights = len(self.task_names) * torch.softmax(torch.tensor(ratios, dtype=torch.float64) / self.temperature, 0)
        return {t: float(w) for t, w in zip(self.task_names, weights)}

    def get_extra_state(self) -> Any:
        return {"history": self.history}

    def set_extra_state(self, state: Any) -> None:
        self.history = list(state["history"])


def _last_shared_layer(shared_params: Sequence[nn.Parameter]) -> nn.Parameter:
    weights = [p for p in shared_params if p.requires_grad and p.dim() >= 2]
    if not weights:
        raise ConfigError("gradnorm needs a shared weight matrix or convolution kernel; none was given")
    return weights[-1]


def _gradient_norm(loss: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, [param], retain_graph=True, allow_unused=True)
    return torch.zeros((), device=param.device) if grad is None else grad.norm()


class GradNorm(Weighting):
    """Learnable weights w_t (sum = K) moved by |G_t − mean(G)·(r̃_t)^α| on the last shared layer, where
    G_t = w_t·‖∇_W L_t‖ and r̃_t = (L_t / L_t(0)) / mean_u(L_u / L_u(0)). The model receives Σ_t w_t·L_t."""

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5):
        super().__init__(task_names)
        self.alpha = alpha
        self.weights = nn.Parameter(torch.ones(len(self.task_names)))
        self.initial_losses: dict[str, float] = {}

    def _renormalise(self) -> None:
        """Positive weights summing to K (applied before each step, i.e. after the optimiser's last update)."""
        with torch.no_grad():
            self.weights.clamp_(min=1e-6)
            self.weights.mul_(len(self.task_names) / self.weights.sum())

    def backward(self, losses: Losses, shared_params: Sequence[nn.Parameter]) -> dict[str, float]:
        self._renormalise()
        layer = _last_shared_layer(shared_params)
        stacked = torch.stack([losses[t] for t in self.task_names])
        norms = torch.stack([_gradient_norm(losses[t], layer) for t in self.task_names])
        values = stacked.detach().tolist()
        for t, value in zip(self.task_names, values):
            if t not in self.initial_losses and value > 0:
                self.initial_losses[t] = value
        (self.weights.detach() * stacked).sum().backward()
        active = [i for i, t in enumerate(self.task_names) if t in self.initial_losses and values[i] > 0]
        if len(active) >= 2:  # a task without labels in this batch sits the update out
            index = torch.tensor(active, device=self.weights.device)
            grad_norms = self.weights[index] * norms[index]
            rates = torch.tensor([values[i] / self.initial_losses[self.task_names[i]] for i in active],
                                 device=grad_norms.device)
            targets = (grad_norms.mean() * (rates / rates.mean()) ** self.alpha).detach()
            (grad_norms - targets).abs().sum().backward()
        return {t: float(w) for t, w in zip(self.task_names, self.weights.detach())}

    def get_extra_state(self) -> Any:
        return {"initial_losses": self.initial_losses}

    def set_extra_state(self, state: Any) -> None:
        self.initial_losses = dict(state["initial_losses"])


def project_conflicting(grads: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """PCGrad's projection of task gradients ``(T, P)``: for task i, for j in ``orders[i]`` (j ≠ i), when
    g_i'·g_j < 0 then g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²)·g_j."""
    projected = grads.clone()
    for i in range(grads.shape[0]):
        for j in orders[i]:
            if j == i:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / grads[j].pow(2).sum() * grads[j]
    return projected


def _flat_grads(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _set_flat_grads(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


class PCGrad(Weighting):
    """Projected conflicting gradients on the shared parameters; task-specific parameters get their own
    gradients unchanged. The order in which other tasks are projected out is drawn from (seed, step)."""

    uses_task_weights = True

    def __init__(self, task_names: Sequence[str], task_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(task_names)
        self.weights = _static_weights(self.task_names, task_weights)
        self.seed = seed
        self.step = 0

    def backward(self, losses: Losses, shared_params: Sequence[nn.Parameter]) -> dict[str, float]:
        params = [p for p in shared_params if p.requires_grad]
        weights = self.weights
        start = previous = _flat_grads(params)
        per_task = []
        for k, t in enumerate(self.task_names):
            (weights[t] * losses[t]).backward(retain_graph=k < len(self.task_names) - 1)
            current = _flat_grads(params)
            per_task.append(current - previous)
            previous = current
        rng = np.random.default_rng([self.seed, self.step])
        orders = [rng.permutation(len(self.task_names)).tolist() for _ in self.task_names]
        _set_flat_grads(params, start + project_conflicting(torch.stack(per_task), orders).sum(dim=0))
        self.step += 1
        return dict(weights)

    def get_extra_state(self) -> Any:
        return {"step": self.step}

    def set_extra_state(self, state: Any) -> None:
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------- registry
WEIGHTINGS: Registry[Weighting] = Registry("weighting")


@dataclass
class DWAParams:
    """``dwa``: the softmax temperature T."""

    temperature: float = 2.0


@dataclass
class GradNormParams:
    """``gradnorm``: the restoring-force exponent α."""

    alpha: float = 1.5


@WEIGHTINGS.register("fixed", NoParams, "Σ w_t·L_t with constant loss.task_weights (the paper: all 1)")
def _fixed(params: NoParams, task_names: list[str], task_weights: Mapping[str, float], seed: int) -> Weighting:
    return FixedWeighting(task_names, task_weights)


@WEIGHTINGS.register("uncertainty", NoParams, "learned homoscedastic uncertainty (Kendall et al., 2018)")
def _uncertainty(params: NoParams, task_names: list[str], task_weights: Mapping[str, float], seed: int) -> Weighting:
    return UncertaintyWeighting(task_names)


@WEIGHTINGS.register("dwa", DWAParams, "dynamic weight average (Liu et al., 2019)")
def _dwa(params: DWAParams, task_names: list[str], task_weights: Mapping[str, float], seed: int) -> Weighting:
    return DynamicWeightAverage(task_names, params.temperature)


@WEIGHTINGS.register("gradnorm", GradNormParams, "gradient normalisation (Chen et al., 2018)")
def _gradnorm(params: GradNormParams, task_names: list[str], task_weights: Mapping[str, float], seed: int) -> Weighting:
    return GradNorm(task_names, params.alpha)


@WEIGHTINGS.register("pcgrad", NoParams, "projected conflicting gradients (Yu et al., 2020), loss.task_weights apply")
def _pcgrad(params: NoParams, task_names: list[str], task_weights: Mapping[str, float], seed: int) -> Weighting:
    return PCGrad(task_names, task_weights, seed)


def build_weighting(
    ref: PluginRef | str, tasks: Sequence[Task], task_weights: Mapping[str, float] | None = None, seed: int = 0
) -> Weighting:
    """The weighting a ``loss.weighting`` entry names, for ``tasks``. ``task_weights`` (``loss.task_weights``) of
    built-in tasks this run does not train (a single-task run of a multi-task config) are not used."""
    ref = PluginRef.of(ref)
    names = [t.name for t in tasks]
    task_weights = dict(task_weights or {})
    unknown = sorted(t for t in task_weights if t not in names and t not in TASKS)
    if unknown:
        raise ConfigError(f"loss.task_weights names unknown task(s) {unknown}; this run's tasks are {names}")
    weights = {t: w for t, w in task_weights.items() if t in names}
    weighting = WEIGHTINGS.build(ref, f"loss.weighting {ref.name!r} params", task_names=names, task_weights=weights,
                                 seed=seed)
    if task_weights and not weighting.uses_task_weights:
        raise ConfigError(f"loss.task_weights do not apply to weighting {ref.name!r}, which sets its own weights")
    return weighting
