"""Task heads: pooled features ``(B, F)`` → the task's raw outputs ``(B, task.n_outputs)``.

Two styles, both from the paper (method.md §4.2):

- ``mlp``: Linear(F,128) → ReLU → Dropout → Linear(128,32) → ReLU → Dropout → Linear(32,n), Xavier-uniform
  weights and biases 0.01 (the prognosis head ``Head_Morbidity``);
- ``linear``: ReLU → Dropout → Linear(F,n) with PyTorch's default init (the severity head ``area_Global_output``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mdmt.errors import ConfigError
from mdmt.tasks import Task

MLP_WIDTHS: tuple[int, ...] = (128, 32)
MLP_BIAS = 0.01


def mlp_head(in_features: int, n_outputs: int, dropout: float) -> nn.Sequential:
    """The paper's prognosis MLP."""
    layers: list[nn.Module] = []
    previous = in_features
    for width in MLP_WIDTHS:
        layers += [nn.Linear(previous, width), nn.ReLU(), nn.Dropout(dropout)]
        previous = width
    layers.append(nn.Linear(previous, n_outputs))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, MLP_BIAS)
    return nn.Sequential(*layers)


def linear_head(in_features: int, n_outputs: int, dropout: float) -> nn.Sequential:
    """The paper's severity head: ReLU → Dropout → Linear."""
    return nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(in_features, n_outputs))


HEAD_STYLES: dict[str, Callable[[int, int, float], nn.Sequential]] = {"mlp": mlp_head, "linear": linear_head}


def build_head(task: Task, style: str, in_features: int, dropout: float) -> nn.Module:
    """A head of ``style`` (mlp | linear) giving ``(B, task.n_outputs)`` raw outputs."""
    if style not in HEAD_STYLES:
        raise ConfigError(f"task {task.name!r}: unknown head style {style!r}; choose one of {', '.join(HEAD_STYLES)}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
    return HEAD_STYLES[style](in_features, task.n_outputs, dropout)
