"""Allowed values of config keys: one table of rules, checked once when a config is loaded.

A rule names a dotted key (``train.lr``; ``grid.seeds[]`` checks every item of a list or mapping) and what
its value may be. ``validate`` reports every value that breaks its rule in one ``ConfigError`` naming the
key, the value and what is allowed. Unset optional values (``None``) are not checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mdmt.errors import ConfigError

EACH = "[]"
"""Suffix of a rule key whose rule applies to each item of a list or mapping."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass(frozen=True)
class Rule:
    """What the value of ``key`` may be: ``test(value, config)`` holds; ``allowed`` says it in words."""

    key: str
    test: Callable[[Any, Any], bool]
    allowed: str


@dataclass(frozen=True)
class Interval:
    """Finite numbers between ``low`` and ``high``, each end included unless open (NaN and inf never are)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        high = f"{'<' if self.high_open else '<='} {self.high:g}"
        if math.isinf(self.high):
            return low
        if math.isinf(self.low):
            return high
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def within(interval: Interval, *keys: str) -> tuple[Rule, ...]:
    """One rule per key: the value lies in ``interval``."""
    return tuple(Rule(key, lambda value, config: value in interval, str(interval)) for key in keys)


def ordered_pair(key: str, interval: Interval, strict: bool) -> Rule:
    """A (low, high) pair inside ``interval`` with low < high (``strict``) or low <= high."""

    def test(pair: Any, config: Any) -> bool:
        low, high = pair
        return low in interval and high in interval and (low < high if strict else low <= high)

    return Rule(key, test, f"two values low {'<' if strict else '<='} high, each {interval}")


POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_ONE = Interval(1)
FRACTION = Interval(0, 1)

RULES: tuple[Rule, ...] = (
    *within(AT_LEAST_ONE, "data.image_size", "model.input_size", "train.batch_size", "train.max_epochs",
            "grid.workers", "grid.slurm.time_minutes", "grid.slurm.cpus_per_run", "grid.slurm.mem_gb"),
    *within(POSITIVE, "train.lr", "augment.elastic_sigma"),
    *within(NON_NEGATIVE, "data.workers", "train.weight_decay", "train.min_lr", "train.warmup_epochs",
            "train.early_stopping", "train.scheduler_patience", "train.checkpoint_every_s", "train.num_workers", "train.threads",
            "augment.shift", "loss.task_weights[]", "grid.seeds[]", "grid.folds[]", "run.fold", "seed",
            "synth.seed", "synth.opacity", "synth.workers", "grid.slurm.gpus_per_run"),
    *within(FRACTION, "data.max_drop_fraction", "augment.p", "train.mix_ratio"),
    *within(Interval(0, 0.5, high_open=True), "data.crop_margin"),
    *within(Interval(0, 1, high_open=True), "augment.zoom"),
    *within(Interval(0, 180), "augment.rotation"),
    *within(Interval(0, 1, low_open=True, high_open=True), "train.scheduler_factor", "protocol.loco_val_fraction"),
    *within(Interval(3), "protocol.cv_folds"),
    *within(Interval(32), "synth.image_size"),
    ordered_pair("data.clip_percentiles", Interval(0, 100), strict=True),
    ordered_pair("augment.elastic_alpha", NON_NEGATIVE, strict=False),
    Rule("protocol.paired_cv_fold", lambda fold, config: 0 <= fold < config.protocol.cv_folds,
         "a fold index >= 0 and < protocol.cv_folds"),
    Rule("train.device", lambda name, config: DEVICE_PATTERN.fullmatch(name) is not None,
         "auto, cpu, cuda, cuda:N or mps"),
)
"""Every checked key. A float key of the config without a rule here would accept NaN (a test checks all have one)."""


def values_at(config: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of ``key`` in ``config``; one pair per item for a key ending in ``[]``."""
    path = key.removesuffix(EACH)
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    if not key.endswith(EACH):
        yield path, value
    elif isinstance(value, dict):
        yield from ((f"{path}.{name}", item) for name, item in value.items())
    else:
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(value or ()))


def validate(config: Any, rules: tuple[Rule, ...] = RULES) -> None:
    """Raise one ConfigError naming every key whose value breaks its rule (the value and what is allowed)."""
    problems = [f"{name} = {value!r} is not allowed: must be {rule.allowed}"
                for rule in rules for name, value in values_at(config, rule.key)
                if value is not None and not rule.test(value, config)]
    if problems:
        raise ConfigError("; ".join(problems))
