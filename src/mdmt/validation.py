"""Allowed values of config keys, declared on each field of ``mdmt.config`` and checked once when a config is loaded.

A field declares what its value may be with ``metadata={"check": Check}`` (``mdmt.config.setting(check=...)``);
``validate`` walks the config's dataclasses and reports every value that breaks its field's check in one
``ConfigError`` naming the key, the value and what is allowed. A check marked ``each`` applies to every item of a
list or mapping; a check's test also sees the whole config (``protocol.paired_cv_fold < protocol.cv_folds``).
Unset optional values (``None``) are not checked. ``check_device`` asks torch whether the machine has the device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mdmt.errors import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass(frozen=True)
class Check:
    """What a field's value may be: ``test(value, config)`` holds; ``allowed`` says it in words; ``each``: the test
    applies to every item of a list or mapping."""

    test: Callable[[Any, Any], bool]
    allowed: str
    each: bool = False


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


def within(interval: Interval) -> Check:
    """The value lies in ``interval``."""
    return Check(lambda value, config: value in interval, str(interval))


def each(check: Check) -> Check:
    """``check`` on every item of a list or mapping."""
    return dataclasses.replace(check, each=True)


def ordered_pair(interval: Interval, strict: bool) -> Check:
    """A (low, high) pair inside ``interval`` with low < high (``strict``) or low <= high."""

    def test(pair: Any, config: Any) -> bool:
        low, high = pair
        return low in interval and high in interval and (low < high if strict else low <= high)

    return Check(test, f"two values low {'<' if strict else '<='} high, each {interval}")


POSITIVE = within(Interval(0, low_open=True))
NON_NEGATIVE = within(Interval(0))
AT_LEAST_ONE = within(Interval(1))
FRACTION = within(Interval(0, 1))
OPEN_FRACTION = within(Interval(0, 1, low_open=True, high_open=True))
DEVICE = Check(lambda name, config: DEVICE_PATTERN.fullmatch(name) is not None, "auto, cpu, cuda, cuda:N or mps")


def checked_values(config: Any, prefix: str = "") -> Iterator[tuple[str, Any, Check]]:
    """``(dotted key, value, check)`` of every checked field of ``config`` and its sections; one triple per item
    for a check marked ``each``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from checked_values(value, f"{key}.")
        check = f.metadata.get("check")
        if check is None:
            continue
        if not check.each:
            yield key, value, check
        elif isinstance(value, dict):
            yield from ((f"{key}.{name}", item, check) for name, item in value.items())
        else:
            yield from ((f"{key}[{i}]", item, check) for i, item in enumerate(value or ()))


def validate(config: Any) -> None:
    """Raise one ConfigError naming every key whose value breaks its field's check (the value and what is allowed)."""
    problems = [f"{key} = {value!r} is not allowed: must be {check.allowed}"
                for key, value, check in checked_values(config)
                if value is not None and not check.test(value, config)]
    if problems:
        raise ConfigError("; ".join(problems))


def check_device(name: str, key: str = "runtime.device") -> None:
    """ConfigError (one line) unless this machine has device ``name``: ``cuda`` without CUDA, ``cuda:N`` past the
    last GPU, ``mps`` without MPS, or a name that is none of these. ``auto`` and ``cpu`` always pass. Imports
    torch."""
    import torch

    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"{key} = {name!r} is not allowed: must be {DEVICE.allowed}")
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} {name}: no CUDA device on this machine (torch.cuda.is_available() is False)")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ConfigError(f"{key} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} {name}: no MPS device on this machine (torch.backends.mps.is_available() is False)")
