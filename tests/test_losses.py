"""Indicator-masked task losses against hand-computed values, their gradients, logging means and decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdmt.config import ModelConfig, PluginRef
from mdmt.errors import ConfigError
from mdmt.losses import task_losses, task_means
from mdmt.models.multitask import build_model
from mdmt.tasks import get_task

PROGNOSIS, GLOBAL4 = get_task("prognosis"), get_task("severity_global4")
NAN = float("nan")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def mixed_batch() -> tuple[dict, dict, dict]:
    """4 samples: 0-1 from AIforCOVID (prognosis), 2-3 from BrixIA (global severity); absent targets are NaN."""
    outputs = {
        "prognosis": torch.tensor([[2.0, 0.0], [0.5, 1.5], [100.0, -100.0], [-50.0, 50.0]], requires_grad=True),
        "severity_global4": torch.tensor([[9.0, -9, 9, -9], [1, 2, 3, 4], [0.0, 0, 0, 0], [1.0, 0, 0, 0]],
                                         requires_grad=True),
    }
    targets = {"prognosis": torch.tensor([[0.0], [1.0], [NAN], [NAN]]),
               "severity_global4": torch.tensor([[NAN], [NAN], [2.0], [0.0]])}
    present = {"prognosis": torch.tensor([True, True, False, False]),
               "severity_global4": torch.tensor([False, False, True, True])}
    return outputs, targets, present


# hand-computed per-sample losses of the labelled samples
CE_PROGNOSIS = [softplus(-2.0), softplus(-1.0)]  # -log softmax: [2,0]→class 0, [0.5,1.5]→class 1
MSE_PROGNOSIS = [((2 - 1) ** 2 + (0 - 0) ** 2) / 2, ((0.5 - 0) ** 2 + (1.5 - 1) ** 2) / 2]  # = 0.5, 0.25
CE_SEVERITY = [math.log(4.0), -1.0 + math.log(math.e + 3.0)]


@pytest.mark.parametrize("variant, prognosis", [("clean", CE_PROGNOSIS), ("paper", MSE_PROGNOSIS)])
def test_masked_loss_equals_hand_computed_sum_over_batch_size(variant, prognosis):
    outputs, targets, present = mixed_batch()
    losses = task_losses(outputs, targets, present, [PROGNOSIS, GLOBAL4], variant)
    assert math.isclose(losses["prognosis"].item(), sum(prognosis) / 4, rel_tol=1e-6)
    assert math.isclose(losses["severity_global4"].item(), sum(CE_SEVERITY) / 4, rel_tol=1e-6)
    means = task_means(outputs, targets, present, [PROGNOSIS, GLOBAL4], variant)
    assert math.isclose(means["prognosis"], sum(prognosis) / 2, rel_tol=1e-6)
    assert math.isclose(means["severity_global4"], sum(CE_SEVERITY) / 2, rel_tol=1e-6)


def test_absent_samples_get_exactly_zero_gradient():
    outputs, targets, present = mixed_batch()
    losses = task_losses(outputs, targets, present, [PROGNOSIS, GLOBAL4], "clean")
    (losses["prognosis"] + losses["severity_global4"]).backward()
    grad_p, grad_s = outputs["prognosis"].grad, outputs["severity_global4"].grad
    assert torch.all(grad_p[2:] == 0) and torch.all(grad_s[:2] == 0)
    assert torch.isfinite(grad_p).all() and torch.isfinite(grad_s).all()
    # d/dz of CE/B for the labelled rows: (softmax − onehot) / 4
    expected = (torch.softmax(torch.tensor([2.0, 0.0]), 0) - torch.tensor([1.0, 0.0])) / 4
    assert torch.allclose(grad_p[0], expected)


def test_head_without_labels_in_the_batch_gets_no_gradient():
    torch.manual_seed(0)
    no_dropout = {"dropout": 0.0}
    config = ModelConfig(backbone=PluginRef("tiny_cnn"), head=PluginRef("linear", no_dropout),
                         heads={"prognosis": PluginRef("mlp", no_dropout)})
    model = build_model(config, [PROGNOSIS, GLOBAL4])
    outputs = model(torch.randn(4, 3, 32, 32))
    targets = {"prognosis": torch.tensor([[0.0], [1.0], [1.0], [0.0]]), "severity_global4": torch.full((4, 1), NAN)}
    present = {"prognosis": torch.ones(4, dtype=torch.bool), "severity_global4": torch.zeros(4, dtype=torch.bool)}
    losses = task_losses(outputs, targets, present, [PROGNOSIS, GLOBAL4], "clean")
    assert losses["severity_global4"].item() == 0.0
    sum(losses.values()).backward()
    severity_grads = [p.grad for p in model.heads["severity_global4"].parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in severity_grads)
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.heads["prognosis"].parameters())
    assert math.isnan(task_means(outputs, targets, present, [PROGNOSIS, GLOBAL4])["severity_global4"])


def test_regression_and_ordinal_losses_by_hand():
    regions, ordinal = get_task("severity_regions"), get_task("severity_ordinal")
    outputs = torch.tensor([[1.0, 2, 3, 0, 0, 0]])
    targets = torch.tensor([[1.0, 0, 0, 0, 0, 3]])
    assert math.isclose(regions.loss(outputs, targets).item(), (0 + 4 + 9 + 0 + 0 + 9) / 6, rel_tol=1e-6)
    logits = torch.zeros(1, 18)
    logits[0, :3] = torch.tensor([2.0, 0.0, -1.0])  # region A's three thresholds
    targets = torch.tensor([[2.0, 0, 1, 3, 0, 0]])  # region A: score 2 → [t>0, t>1, t>2] = [1, 1, 0]
    region_a = softplus(-2.0) + softplus(0.0) + softplus(-1.0)
    expected = (region_a + 15 * math.log(2.0)) / 18  # zero logits: log 2 for every other threshold
    assert math.isclose(ordinal.loss(logits, targets).item(), expected, rel_tol=1e-6)


def test_paper_variant_only_changes_the_prognosis_loss():
    outputs, targets, present = mixed_batch()
    clean = task_losses(outputs, targets, present, [PROGNOSIS, GLOBAL4], "clean")
    paper = task_losses(outputs, targets, present, [PROGNOSIS, GLOBAL4], "paper")
    assert paper["severity_global4"].item() == clean["severity_global4"].item()
    assert paper["prognosis"].item() != clean["prognosis"].item()
    with pytest.raises(ConfigError, match="variant"):
        task_losses(outputs, targets, present, [PROGNOSIS], "fancy")


def test_per_group_classification_is_the_mean_over_groups():
    lungs = get_task("severity_lung4")
    outputs = torch.tensor([[0.0, 0, 0, 0, 3, 0, 0, 0]])  # right lung: uniform; left lung: class 0 favoured
    targets = torch.tensor([[1.0, 0.0]])
    expected = (math.log(4.0) + (-3.0 + math.log(math.exp(3.0) + 3.0))) / 2
    assert math.isclose(lungs.loss(outputs, targets).item(), expected, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------- decoding
def test_decode_prognosis_gives_softmax_score_and_argmax():
    decoded = PROGNOSIS.decode(torch.tensor([[2.0, 0.0], [0.5, 1.5], [0.3, 0.3]]))
    assert set(decoded) == {"score", "y_pred"}
    np.testing.assert_allclose(decoded["score"], [1 / (1 + math.e**2), 1 / (1 + math.e**-1), 0.5], rtol=1e-6)
    assert decoded["y_pred"].tolist() == [0, 1, 0]


def test_decode_multiclass_groups_regression_and_ordinal():
    global4 = GLOBAL4.decode(torch.tensor([[0.0, 3.0, 1.0, 0.0]]))
    assert global4["y_pred"].tolist() == [1]
    probs = np.array([global4[f"prob_{c}"][0] for c in range(4)])
    np.testing.assert_allclose(probs, np.exp([0, 3, 1, 0]) / np.exp([0, 3, 1, 0]).sum(), rtol=1e-6)

    lungs = get_task("severity_lung4").decode(torch.tensor([[0.0, 0, 5, 0, 5, 0, 0, 0]]))
    assert lungs["y_pred_0"].tolist() == [2] and lungs["y_pred_1"].tolist() == [0]
    assert math.isclose(sum(lungs[f"prob_1_{c}"][0] for c in range(4)), 1.0, rel_tol=1e-6)

    values = torch.tensor([[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]])
    regions = get_task("severity_regions").decode(values)
    assert [regions[f"y_pred_{r}"][0] for r in "ABCDEF"] == values[0].tolist()

    logits = torch.full((1, 18), -20.0)
    logits[0, :2] = 20.0  # region A: P(t>0) = P(t>1) = 1, P(t>2) = 0 → score 2
    logits[0, 3:6] = torch.tensor([0.0, -20.0, -20.0])  # region B: P(t>0) = 0.5 → expected 0.5, class 0
    ordinal = get_task("severity_ordinal").decode(logits)
    assert ordinal["y_pred_A"].tolist() == [2] and math.isclose(ordinal["expected_A"][0], 2.0, abs_tol=1e-6)
    assert ordinal["y_pred_B"].tolist() == [0] and math.isclose(ordinal["expected_B"][0], 0.5, abs_tol=1e-6)
