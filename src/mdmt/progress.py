"""Progress bars shared by every long step (rich; quiet when not wanted)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def make_progress(transient: bool = False) -> Progress:
    """A rich Progress with the project's columns (description, bar, n/N, elapsed, remaining)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        transient=transient,
    )


def progress_bar(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a progress bar (a plain iteration when ``enabled`` is False)."""
    if not enabled:
        yield from items
        return
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


class RunningLosses(Protocol):
    """What a run's step bar reads: the running mean loss of each task."""

    def task_means(self) -> dict[str, float]: ...


class EpochState(Protocol):
    """What a run's epoch bar reads after an epoch."""

    epoch: int
    best_score: float
    best_epoch: int


def loss_status(means: Mapping[str, float]) -> str:
    """``task=loss`` pairs of the tasks that have a value."""
    return " ".join(f"{t}={v:.4f}" for t, v in means.items() if not math.isnan(v))


class RunProgress:
    """Rich bars of a run: one over the epochs (validation losses, best so far) and, while an epoch runs, one
    over its steps with the running training losses (refreshed every ``status_every`` steps)."""

    def __init__(self, enabled: bool, description: str, max_epochs: int, status_every: int):
        self.enabled = enabled
        self.status_every = status_every
        self.bars = make_progress() if enabled else None
        self.run_bar = self.bars.add_task(description, total=max_epochs, status="") if self.bars else None
        self.epoch_bar: Any = None
        self.steps = 0

    def __enter__(self) -> RunProgress:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def resume(self, epochs_done: int) -> None:
        """Show the epochs a resumed run already has."""
        if self.bars is not None:
            self.bars.update(self.run_bar, completed=epochs_done)

    def start_epoch(self, epoch: int, n_steps: int | None) -> None:
        """A fresh step bar for ``epoch``."""
        if self.bars is not None:
            self.epoch_bar = self.bars.add_task(f"epoch {epoch}", total=n_steps, status="")
            self.steps = 0

    def step(self, meter: RunningLosses) -> None:
        """Advance the step bar (with the running task losses every ``status_every`` steps)."""
        if self.bars is None:
            return
        self.steps += 1
        status = {"status": loss_status(meter.task_means())} if self.steps % self.status_every == 0 else {}
        self.bars.update(self.epoch_bar, advance=1, **status)

    def end_epoch(self, state: EpochState, val_means: Mapping[str, float]) -> None:
        """Drop the step bar; the run bar shows the validation losses and the best epoch."""
        if self.bars is None:
            return
        self.bars.remove_task(self.epoch_bar)
        best = f" best {state.best_score:.4f}@{state.best_epoch}" if state.best_epoch >= 0 else ""
        self.bars.update(self.run_bar, completed=state.epoch, status=f"val {loss_status(val_means)}{best}")
