"""Task weightings on toy problems: each one's defining behaviour; the registry and a weighting added in one file."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mdmt.config import LossConfig, PluginRef, from_dict
from mdmt.errors import ConfigError
from mdmt.losses import build_weighting
from mdmt.tasks import get_task
from mdmt.weighting import (
    WEIGHTINGS,
    GradNorm,
    Losses,
    PCGrad,
    Weighting,
    project_conflicting,
)

TASKS = [get_task("prognosis"), get_task("severity_regions")]
A, B = (t.name for t in TASKS)


def test_fixed_is_the_weighted_sum():
    weighting = build_weighting("fixed", TASKS, {A: 2.0, B: 0.5})
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    x = torch.tensor([3.0, 1.0])
    la, lb = (w @ x - 1) ** 2, (w.sum() + 4) ** 2
    used = weighting.backward({A: la, B: lb}, [w])
    assert used == {A: 2.0, B: 0.5}
    # d/dw [2 (w·x − 1)² + 0.5 (Σw + 4)²] = 4 (w·x − 1) x + (Σw + 4) 1, with w·x = 1, Σw = −1
    assert torch.allclose(w.grad, 4 * 0.0 * x + 3.0 * torch.ones(2))
    assert build_weighting("fixed", TASKS).weights == {A: 1.0, B: 1.0}  # the paper: all ones


def test_uncertainty_gives_the_noisier_task_the_smaller_weight():
    torch.manual_seed(0)
    weighting = build_weighting("uncertainty", TASKS)
    params = list(weighting.parameters())
    assert len(params) == 1 and params[0].shape == (2,)
    means = nn.Parameter(torch.zeros(2))  # each task estimates a constant from noisy samples
    optimizer = torch.optim.Adam([means, *params], lr=0.05)
    noise = torch.tensor([0.1, 1.0])
    for _ in range(400):
        samples = torch.tensor([1.0, -1.0]) + noise * torch.randn(64, 2)
        errors = ((samples - means) ** 2).mean(dim=0)
        optimizer.zero_grad()
        used = weighting.backward({A: errors[0], B: errors[1]}, [means])
        optimizer.step()
    assert used[A] > 10 * used[B]  # optimum exp(−s_t) = 1 / L_t: about 1/0.01 vs 1/1
    assert math.isclose(used[B], 1.0, rel_tol=0.3)


def test_dwa_upweights_the_task_whose_loss_fell_less():
    weighting = build_weighting(PluginRef("dwa", {"temperature": 2.0}), TASKS)
    dummy = {A: torch.tensor(1.0, requires_grad=True), B: torch.tensor(1.0, requires_grad=True)}
    assert weighting.backward(dummy, []) == {A: 1.0, B: 1.0}
    weighting.epoch_end({A: 1.0, B: 1.0})
    assert weighting.backward(dummy, []) == {A: 1.0, B: 1.0}  # needs two epochs
    weighting.epoch_end({A: 0.5, B: 0.9})  # A fell by half, B by 10%
    used = weighting.backward(dummy, [])
    expected_b = 2 * math.exp(0.9 / 2) / (math.exp(0.5 / 2) + math.exp(0.9 / 2))
    assert used[B] > used[A] and math.isclose(used[B], expected_b, rel_tol=1e-9)
    assert math.isclose(used[A] + used[B], 2.0, rel_tol=1e-9)
    resumed = build_weighting("dwa", TASKS)
    resumed.load_state_dict(weighting.state_dict())  # checkpoints keep the loss history
    assert resumed.backward(dummy, []) == used


def test_gradnorm_brings_the_gradient_norms_together():
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(4, 3))
    x, head_a, head_b = torch.randn(32, 3), torch.randn(4), torch.randn(4)
    y_a, y_b = torch.randn(32), torch.randn(32)
    weighting = build_weighting(PluginRef("gradnorm", {"alpha": 1.5}), TASKS)
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.02)

    def step() -> float:
        features = x @ shared.T
        la = ((features @ head_a - y_a) ** 2).mean()
        lb = 10 * ((features @ head_b - y_b) ** 2).mean()  # a task with ten-fold gradients
        norms = [torch.autograd.grad(loss, shared, retain_graph=True)[0].norm() for loss in (la, lb)]
        used = weighting.backward({A: la, B: lb}, [shared])
        shared.grad = None  # the shared layer stays fixed: only the task weights learn
        return abs(math.log(used[A] * norms[0].item() / (used[B] * norms[1].item())))

    first = step()
    for _ in range(150):
        optimizer.step()
        optimizer.zero_grad()
        last = step()
    assert first > 1.0 and last < 0.2 * first
    assert math.isclose(float(weighting.weights.detach().sum()), 2.0, rel_tol=1e-5)


def test_pcgrad_projection_removes_conflicts():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1·g2 = −1 < 0
    projected = project_conflicting(torch.stack([g1, g2]), [[0, 1], [1, 0]])
    assert torch.allclose(projected[0], torch.tensor([0.5, 0.5]))  # g1 − (−1/2) g2
    assert torch.allclose(projected[1], torch.tensor([0.0, 1.0]))  # g2 − (−1/1) g1
    assert projected[0] @ g2 >= -1e-6 and projected[1] @ g1 >= -1e-6 and projected[0] @ projected[1] >= 0
    agreeing = torch.stack([g1, torch.tensor([1.0, 1.0])])
    assert torch.equal(project_conflicting(agreeing, [[0, 1], [1, 0]]), agreeing)


def test_pcgrad_backward_projects_shared_and_keeps_task_parameters():
    shared = nn.Parameter(torch.tensor([0.0, 0.0]))
    own_a, own_b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(2.0))
    la = own_a * (shared @ torch.tensor([1.0, 0.0]))  # ∇_shared = [1, 0]·own_a
    lb = own_b * (shared @ torch.tensor([-0.5, 0.5]))  # ∇_shared = [−1, 1] with own_b = 2
    weighting = build_weighting("pcgrad", TASKS)
    weighting.backward({A: la, B: lb}, [shared])
    assert torch.allclose(shared.grad, torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0]))
    assert own_a.grad.item() == 0.0 and own_b.grad.item() == 0.0  # shared = 0: their own gradients, unchanged


def test_pcgrad_task_order_is_seeded_and_resumable():
    angles = torch.tensor([0.0, 2.0, 4.0])  # three pairwise-conflicting gradients (about 115° apart)
    directions = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * torch.tensor([[1.0], [2.0], [3.0]])
    names = ["prognosis", "severity_regions", "severity_global4"]

    def grads(weighting: PCGrad, steps: int) -> list[torch.Tensor]:
        shared, out = nn.Parameter(torch.zeros(2)), []
        for _ in range(steps):
            shared.grad = None
            weighting.backward({n: shared @ d for n, d in zip(names, directions)}, [shared])
            out.append(shared.grad.clone())
        return out

    runs = {seed: torch.stack(grads(PCGrad(names, seed=seed), 6)) for seed in (0, 0, 1, 2)}
    assert len({tuple(r.flatten().tolist()) for r in runs.values()}) > 1  # the order matters and follows the seed
    assert torch.equal(torch.stack(grads(PCGrad(names, seed=0), 6)), runs[0])
    first = PCGrad(names, seed=0)
    grads(first, 3)
    resumed = PCGrad(names, seed=0)
    resumed.load_state_dict(first.state_dict())  # the step counter is in the checkpoint
    assert torch.equal(torch.stack(grads(resumed, 3)), runs[0][3:])


def test_build_weighting_errors_and_parameters():
    with pytest.raises(ConfigError, match="unknown weighting 'nash'"):
        build_weighting("nash", TASKS)
    with pytest.raises(ConfigError, match="unknown task"):
        build_weighting("fixed", TASKS, {"progonsis": 2.0})
    with pytest.raises(ConfigError, match="do not apply to weighting 'dwa'"):
        build_weighting("dwa", TASKS, {A: 2.0})
    single = build_weighting("fixed", TASKS[:1], {B: 3.0})  # an STL run of an MTL config
    assert single.weights == {A: 1.0}
    assert isinstance(build_weighting("gradnorm", TASKS), GradNorm)
    assert [len(list(build_weighting(n, TASKS).parameters())) for n in ("fixed", "uncertainty", "dwa", "gradnorm",
                                                                        "pcgrad")] == [0, 1, 0, 1, 0]


def test_params_reach_the_weighting_and_errors_name_the_key():
    assert build_weighting({"name": "dwa", "params": {"temperature": 0.5}}, TASKS).temperature == 0.5
    assert build_weighting(PluginRef("gradnorm", {"alpha": 0}), TASKS).alpha == 0.0
    with pytest.raises(ConfigError, match=r"loss\.weighting 'dwa' params: unknown key\(s\) temprature"):
        build_weighting(PluginRef("dwa", {"temprature": 1.0}), TASKS)
    with pytest.raises(ConfigError, match=r"params\.alpha: expected float, got 'high'"):
        build_weighting(PluginRef("gradnorm", {"alpha": "high"}), TASKS)
    with pytest.raises(ConfigError, match=r"params\.temperature must be positive"):
        build_weighting(PluginRef("dwa", {"temperature": 0.0}), TASKS)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) alpha"):
        build_weighting(PluginRef("fixed", {"alpha": 1.0}), TASKS)


def test_config_entries_build_the_weighting():
    loss = from_dict(LossConfig, {"weighting": {"name": "dwa", "params": {"temperature": 4}}, "task_weights": {}})
    assert build_weighting(loss.weighting, TASKS, loss.task_weights).temperature == 4.0
    assert isinstance(build_weighting(from_dict(LossConfig, {"weighting": "pcgrad"}).weighting, TASKS), PCGrad)


def test_describe_lists_every_weighting_with_its_params():
    rows = {name: params for name, _, params in WEIGHTINGS.describe()}
    assert {"fixed": "", "uncertainty": "", "dwa": "temperature=2.0", "gradnorm": "alpha=1.5",
            "pcgrad": ""}.items() <= rows.items()


# ----------------------------------------------------------------------------------------- one-file extension
@dataclass
class ScaledParams:
    """The test weighting's parameter: one factor for every task."""

    factor: float = 1.0


class ScaledWeighting(Weighting):
    """Σ_t factor·w_t·L_t: a weighting defined outside mdmt, as a user's plug-in file would."""

    uses_task_weights = True

    def __init__(self, task_names: list[str], task_weights: Mapping[str, float], factor: float):
        super().__init__(task_names)
        self.weights = {t: factor * task_weights.get(t, 1.0) for t in self.task_names}

    def loss_weights(self, losses: Losses) -> dict[str, torch.Tensor | float]:
        return dict(self.weights)


@WEIGHTINGS.register("test_scaled", ScaledParams, "a weighting registered by the test suite")
def _scaled(params: ScaledParams, task_names: list[str], task_weights: Mapping[str, float], seed: int) -> Weighting:
    return ScaledWeighting(task_names, task_weights, params.factor)


def test_a_weighting_registered_elsewhere_builds_by_name():
    loss = from_dict(LossConfig, {"weighting": {"name": "test_scaled", "params": {"factor": 3}},
                                  "task_weights": {A: 2.0}})
    weighting = build_weighting(loss.weighting, TASKS, loss.task_weights)
    w = nn.Parameter(torch.tensor(1.0))
    assert weighting.backward({A: w * 1.0, B: w * 2.0}, [w]) == {A: 6.0, B: 3.0}
    assert w.grad.item() == 6.0 + 3.0 * 2.0
    assert "test_scaled" in [name for name, _, _ in WEIGHTINGS.describe()]
    with pytest.raises(ConfigError, match=r"params\.factor: expected float"):
        build_weighting(PluginRef("test_scaled", {"factor": "x"}), TASKS)
