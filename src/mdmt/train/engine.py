"""One training loop for every strategy: epochs, AMP, plateau schedule, selection, checkpoint and exact resume.
(Over 400 lines on purpose: the one training loop with its resume and phase timing; split up, the loop's state would
cross modules.)

The loop knows nothing about strategies: it gets a model, its tasks, two loaders, a task weighting and the
task whose validation loss selects the model. Every epoch ends with ``last.pt`` (everything needed to go on,
RNG states included) written atomically, or, with ``train.checkpoint_every_s``, the first epoch that many seconds
after the last one and the last epoch; a run killed at any point and started again with the same inputs
finishes with the same weights and history as one that was never interrupted. ``history.csv`` (every epoch) and
``best.pt`` (every new best) are replaced atomically and fsynced with ``last.pt``. Each history row also says where
the epoch's time went (``TIMING_COLUMNS``: data, forward, backward, step, validation) unless
``train.phase_timing`` is off. Callbacks (``mdmt.train.callbacks``: the ``train.callbacks`` of the config and those
given to ``fit``) hear of the start, every epoch's row and the end.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mdmt.config import TrainConfig
from mdmt.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_network_input
from mdmt.errors import ConfigError, DataError
from mdmt.losses import Weighting, task_losses
from mdmt.progress import RunProgress
from mdmt.runs import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    atomic_write_text,
    fsync_file,
)
from mdmt.tasks import Task
from mdmt.train.callbacks import Callback, build_callbacks
from mdmt.train.checkpoints import (
    derived_seed,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from mdmt.train.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sum,
    average_gradients,
    loss_scale,
    resolve_device,
    wrap_model,
)

STATUS_EVERY = 20
"""Steps between running-loss updates of the progress bar on a GPU (each costs a device sync)."""

TRAIN_PHASES = ("data", "forward", "backward", "step")
"""Where a training epoch's time goes (history columns ``<phase>_s``): waiting for the next batch, host → device
and augmentation; model forward and the losses; the weighting's backward; gradient averaging, optimizer step and
bookkeeping. They add up to the training pass."""

EVAL_PHASES = ("eval_data", "eval_forward")
"""The validation pass's time: waiting for the next batch and host → device; model forward and the losses."""

TIMING_COLUMNS = ("seconds", *(f"{phase}_s" for phase in (*TRAIN_PHASES, *EVAL_PHASES)))
"""History columns that measure time (the ones that differ between two otherwise identical runs)."""

FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")
"""Devices where Adam runs torch's fused kernel (one kernel per parameter instead of a dozen elementwise ops; on
the demo's CPU its step phase took 8 core-s instead of 12). Its numbers differ from the loop implementation's in the
last bits, so a run's results are those of the implementation it was trained with."""

SYNC_TIMING_ENV = "MDMT_SYNC_TIMING"
"""``MDMT_SYNC_TIMING=1`` synchronises a CUDA device at every phase boundary: exact phase times at some cost in
speed. Off by default, so on a GPU the queued kernels' time lands in whichever phase next waits for them."""


@dataclass
class FitResult:
    """What a finished ``fit`` reports."""

    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    history: pd.DataFrame
    best_path: Path


def is_eligible(epoch: int, cfg: TrainConfig) -> bool:
    """Whether epoch ``epoch`` (0-based) may be selected and counts for early stopping.

    As the official code: only when ``epoch > warmup_epochs``. The last epoch is always eligible, so a run
    whose ``max_epochs`` does not exceed the warm-up still ends with a best checkpoint.
    """
    return epoch > min(cfg.warmup_epochs, cfg.max_epochs - 2)


@dataclass
class LoopState:
    """The mutable bookkeeping of the loop that a checkpoint must restore."""

    epoch: int = 0
    best_score: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    finished: bool = False
    stopped_early: bool = False

    def observe(self, epoch: int, score: float, cfg: TrainConfig) -> bool:
        """Record epoch ``epoch``'s selection score; returns whether it is the new best.

        Only eligible epochs (after the warm-up) are selected and count towards early stopping, which ends
        the run after ``cfg.early_stopping`` eligible epochs in a row without a lower score.
        """
        eligible = is_eligible(epoch, cfg)
        selected = eligible and score < self.best_score
        if selected:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
        elif eligible:
            self.bad_epochs += 1
        self.epoch = epoch + 1
        self.stopped_early = eligible and self.bad_epochs >= cfg.early_stopping
        self.finished = self.stopped_early or self.epoch >= cfg.max_epochs
        return selected


def history_csv(rows: list[dict[str, float]]) -> str:
    """``rows`` as the CSV text ``pandas.DataFrame(rows).to_csv(index=False)`` writes (columns in order of first
    appearance, NaN as an empty field) at a quarter of its cost: the engine rewrites it after every epoch."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = [row.get(column, math.nan) for column in columns]
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in values])
    return text.getvalue()


def make_optimizer(params: Iterable[Any], device: torch.device, lr: float, weight_decay: float = 0.0
                   ) -> torch.optim.Adam:
    """The engine's Adam over ``params`` (tensors or parameter groups): torch's fused kernel on the devices that have
    one (``FUSED_ADAM_DEVICES``). The benchmarks' bare steps use it too, so they time the same step."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=device.type in FUSED_ADAM_DEVICES)


def _set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    for holder in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)
            return


class Batches:
    """Moves collated batches to the device and turns images into network input."""

    def __init__(self, device: torch.device, input_size: int | None, channels_last: bool, model: nn.Module):
        self.device = device
        self.input_size = input_size
        self.channels_last = channels_last
        # the backbone's own normalisation statistics (a bare module without them gets ImageNet's)
        self.normalization = getattr(model, "normalization", (IMAGENET_MEAN, IMAGENET_STD))

    def __call__(
        self,
        batch: Mapping[str, Any],
        augmenter: Callable[..., Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(network input, targets, present) on the device; the augmenter runs when given."""
        images = batch["image"].to(self.device, non_blocking=True)
        targets = {t: v.to(self.device, non_blocking=True) for t, v in batch["targets"].items()}
        present = {t: v.to(self.device, non_blocking=True) for t, v in batch["present"].items()}
        if augmenter is not None:
            images, targets = augmenter(images.float().div_(255.0), targets, generator)
        x = to_network_input(images, self.input_size, *self.normalization)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets, present

    def clinical(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The batch's clinical features on the device (None for a run without them)."""
        values = batch.get("clinical")
        return None if values is None else values.to(self.device, non_blocking=True)


class PhaseClock:
    """Splits wall time into phases: ``lap(phase)`` adds the seconds since the previous lap (or the start) to it.

    Laps are contiguous, so the phases add up to the time from the start to the last lap. ``sync`` waits for a
    CUDA device at each lap (a no-op elsewhere: CPU work is done when the call returns). A clock that is not
    ``enabled`` (``train.phase_timing: false``) measures nothing and its ``seconds`` is empty. A lap costs about
    0.8 µs more than a disabled one: 0.014 % of an epoch of the demo's network, the smallest the project trains
    (``benchmarks/phase_timing.py``; on loaded cores the whole-fit A/B only bounds it by its 10 % noise).

    The laps stay in the loop rather than in a callback: they mark the boundaries between the loop's own
    statements, so a callback would need a hook per boundary, called for every batch.
    """

    def __init__(self, phases: Iterable[str], device: torch.device, sync: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.seconds = dict.fromkeys(phases, 0.0) if enabled else {}
        self.device = device
        self.sync = sync and device.type == "cuda"
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


class LossMeter:
    """Sums of each task's loss over an epoch; per-task means per labelled sample and the total per sample.

    ``seconds`` holds the pass's time per phase (filled by the epoch that owns the meter)."""

    def __init__(self, tasks: Iterable[str], device: torch.device):
        self.tasks = list(tasks)
        self.sums = {t: torch.zeros((), dtype=torch.float64, device=device) for t in self.tasks}
        self.labelled = {t: torch.zeros((), dtype=torch.float64, device=device) for t in self.tasks}
        self.samples = 0
        self.seconds: dict[str, float] = {}

    def add(self, losses: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor], batch_size: int) -> None:
        """Add one batch: each loss is a sum over labelled samples divided by the batch size."""
        for t in self.tasks:
            self.sums[t] += losses[t].detach().double() * batch_size
            self.labelled[t] += present[t].sum()
        self.samples += batch_size

    def all_reduce(self, ctx: DistContext) -> None:
        """Sum the epoch's sums over the ranks (each rank saw its own shard)."""
        if not ctx.enabled:
            return
        for t in self.tasks:
            all_reduce_sum(self.sums[t], ctx)
            all_reduce_sum(self.labelled[t], ctx)
        samples = torch.tensor(float(self.samples), dtype=torch.float64, device=self.sums[self.tasks[0]].device)
        self.samples = int(all_reduce_sum(samples, ctx).item())

    def task_means(self) -> dict[str, float]:
        """Mean loss per labelled sample of each task (NaN for a task without labels)."""
        return {t: float(self.sums[t] / self.labelled[t]) if self.labelled[t] > 0 else math.nan for t in self.tasks}

    def total(self) -> float:
        """Sum of all task losses per sample (the paper's L = Σ_i Σ_τ I·L^τ over the epoch, / N)."""
        return float(sum(self.sums.values()) / max(1, self.samples))


def _forward_losses(
    forward: Callable[..., dict[str, torch.Tensor]],
    x: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    present: Mapping[str, torch.Tensor],
    tasks: list[Task],
    variant: str,
    amp: bool,
    clinical: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = forward(x) if clinical is None else forward(x, clinical)
    outputs = {name: out.float() for name, out in outputs.items()}
    return task_losses(outputs, targets, present, tasks, variant)


@dataclass
class Trainer:
    """The epoch loop. ``fit`` runs it; attributes are fixed for the whole run."""

    model: nn.Module
    tasks: list[Task]
    cfg: TrainConfig
    weighting: Weighting
    run_dir: Path
    select_task: str
    loss_variant: str = "clean"
    seed: int = 0
    input_size: int | None = None
    shared_params: list[nn.Parameter] | None = None
    dist: DistContext = SINGLE
    device: torch.device | None = None
    sync_timing: bool = field(default_factory=lambda: os.environ.get(SYNC_TIMING_ENV) == "1")
    callbacks: Sequence[Callback] = ()
    """Called on every process, after the ``train.callbacks`` of the config (built on the main process only)."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.last_checkpoint = time.perf_counter()
        self.best_unsynced = False
        self.task_names = [t.name for t in self.tasks]
        if self.select_task not in self.task_names:
            raise ConfigError(f"select_task {self.select_task!r} is not one of the model's tasks {self.task_names}")
        self.device = self.device or resolve_device("auto")
        on_cuda = self.device.type == "cuda"
        self.amp = self.cfg.amp and on_cuda
        channels_last = self.cfg.channels_last  # faster on CPU too (tiny_cnn 1.6×, densenet121 1.2×, resnet18 equal)
        self.model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.batches = Batches(self.device, self.input_size, channels_last, self.model)
        network = wrap_model(self.model, self.dist, self.device)
        self.forward: Callable[..., dict[str, torch.Tensor]] = (
            torch.compile(network) if self.cfg.compile else network  # type: ignore[assignment]
        )
        self.weighting.to(self.device)
        self.weighting_params = [p for p in self.weighting.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.weighting_params:  # learned task weights: no weight decay
            groups.append({"params": self.weighting_params, "weight_decay": 0.0})
        self.optimizer = make_optimizer(groups, self.device, self.cfg.lr, self.cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", patience=self.cfg.scheduler_patience, factor=self.cfg.scheduler_factor,
            min_lr=self.cfg.min_lr,
        )
        if self.shared_params is None:
            backbone = getattr(self.model, "backbone", self.model)
            self.shared_params = [p for p in backbone.parameters() if p.requires_grad]
        self.state = LoopState()
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "loop": vars(self.state).copy(),
            "history": list(self.history),
            "rng": rng_states(),
            "sampler_epoch": self.state.epoch,
            "tasks": self.task_names,
        }

    def resume(self) -> bool:
        """Load ``last.pt`` when it exists; returns whether it did."""
        path = self.run_dir / LAST_CHECKPOINT
        if not path.is_file():
            return False
        ckpt = load_checkpoint(path)
        if ckpt["tasks"] != self.task_names:
            raise ConfigError(f"{path}: checkpoint tasks {ckpt['tasks']} differ from this run's {self.task_names}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.weighting.load_state_dict(ckpt["weighting"])
        self.state = LoopState(**ckpt["loop"])
        self.history = list(ckpt["history"])
        set_rng_states(ckpt["rng"])
        return True

    def _save_best(self, epoch: int, score: float) -> None:
        """``best.pt``, made durable with the next ``last.pt`` (``_end_epoch``)."""
        save_checkpoint(
            {"model": self.model.state_dict(), "epoch": epoch, "score": score, "select_task": self.select_task,
             "tasks": self.task_names},
            self.run_dir / BEST_CHECKPOINT, durable=False,
        )
        self.best_unsynced = True

    def _write_history(self, durable: bool) -> None:
        atomic_write_text(history_csv(self.history), self.run_dir / HISTORY_FILE, durable)

    # ----------------------------------------------------------------- epochs
    def train_epoch(
        self, loader: Iterable[Any], augmenter: Any, epoch: int, on_step: Callable[[LossMeter], None] | None = None
    ) -> LossMeter:
        """One pass over ``loader`` with gradient steps; ``on_step`` sees the running meter after each step.

        The meter's ``seconds`` splits the pass into ``TRAIN_PHASES``."""
        self.model.train()
        clock = PhaseClock(TRAIN_PHASES, self.device, self.sync_timing, self.cfg.phase_timing)
        _set_sampler_epoch(loader, epoch)
        generator = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, epoch, self.dist.rank))
        meter = LossMeter(self.task_names, self.device)
        for batch in loader:
            x, targets, present = self.batches(batch, augmenter, generator)
            clinical = self.batches.clinical(batch)
            clock.lap("data")
            losses = _forward_losses(self.forward, x, targets, present, self.tasks, self.loss_variant, self.amp,
                                     clinical)
            clock.lap("forward")
            self.optimizer.zero_grad(set_to_none=True)
            scale = loss_scale(x.shape[0], self.dist, self.device)
            self.weighting.backward({t: v * scale for t, v in losses.items()} if scale != 1.0 else losses,
                                    self.shared_params)
            clock.lap("backward")
            average_gradients(self.weighting_params, self.dist)
            self.optimizer.step()
            meter.add(losses, present, x.shape[0])
            if on_step is not None:
                on_step(meter)
            clock.lap("step")
        clock.lap("data")  # the loader's end
        meter.all_reduce(self.dist)
        self.weighting.epoch_end(meter.task_means())
        clock.lap("step")
        meter.seconds = clock.seconds
        return meter

    @torch.no_grad()
    def evaluate_epoch(self, loader: Iterable[Any]) -> LossMeter:
        """Losses on ``loader`` without augmentation or gradients; the meter's ``seconds`` splits the pass into
        ``EVAL_PHASES``."""
        self.model.eval()
        clock = PhaseClock(EVAL_PHASES, self.device, self.sync_timing, self.cfg.phase_timing)
        meter = LossMeter(self.task_names, self.device)
        for batch in loader:
            x, targets, present = self.batches(batch)
            clinical = self.batches.clinical(batch)
            clock.lap("eval_data")
            losses = _forward_losses(self.forward, x, targets, present, self.tasks, self.loss_variant, self.amp,
                                     clinical)
            meter.add(losses, present, x.shape[0])
            clock.lap("eval_forward")
        clock.lap("eval_data")  # the loader's end
        meter.seconds = clock.seconds
        return meter

    def _end_epoch(self, epoch: int, train: LossMeter, val: LossMeter, lr: float, seconds: float) -> dict[str, float]:
        """Schedule, select, early-stop, log and checkpoint after ``epoch``."""
        val_total = val.total()
        self.scheduler.step(val_total)
        val_means = val.task_means()
        score = val_means[self.select_task]
        if math.isnan(score):
            raise DataError(f"epoch {epoch}: the validation set has no {self.select_task!r} label to select on")
        selected = self.state.observe(epoch, score, self.cfg)
        if selected and self.dist.is_main:
            self._save_best(epoch, score)
        row: dict[str, float] = {"epoch": epoch, "lr": lr, "seconds": round(seconds, 3)}
        row.update({f"{phase}_s": round(value, 4) for phase, value in {**train.seconds, **val.seconds}.items()})
        row.update({"train_loss": train.total(), "val_loss": val_total})
        row.update({f"train_{t}_loss": v for t, v in train.task_means().items()})
        row.update({f"val_{t}_loss": v for t, v in val_means.items()})
        row["selected"] = int(selected)
        self.history.append(row)
        if self.dist.is_main:  # every file is replaced atomically; fsynced (durable) only with last.pt
            now = time.perf_counter()
            checkpoint = self.state.finished or now - self.last_checkpoint >= self.cfg.checkpoint_every_s
            self._write_history(durable=checkpoint)
            if checkpoint:
                if self.best_unsynced:
                    fsync_file(self.run_dir / BEST_CHECKPOINT)
                    self.best_unsynced = False
                save_checkpoint(self._checkpoint(), self.run_dir / LAST_CHECKPOINT)
                self.last_checkpoint = now
        return row

    def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        augmenter: Any = None,
        progress: bool = True,
        description: str = "train",
    ) -> FitResult:
        """Train until ``max_epochs`` or early stopping, resuming from ``last.pt`` when present.

        ``description`` names the run on the progress bar and to the callbacks (a run of the grid passes its key)."""
        configured = build_callbacks(self.cfg.callbacks, self.run_dir, description) if self.dist.is_main else []
        callbacks = [*configured, *self.callbacks]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        for callback in callbacks:
            callback.on_fit_start(self)
        # running losses need a device sync: on a GPU the bar shows them every STATUS_EVERY steps only
        bars = RunProgress(progress and self.dist.is_main, description, self.cfg.max_epochs,
                           1 if self.device.type == "cpu" else STATUS_EVERY)
        with bars:
            bars.resume(self.state.epoch)
            while not self.state.finished:
                epoch = self.state.epoch
                started = time.perf_counter()
                lr = float(self.optimizer.param_groups[0]["lr"])
                bars.start_epoch(epoch, len(train_loader) if hasattr(train_loader, "__len__") else None)
                train = self.train_epoch(train_loader, augmenter, epoch, bars.step if bars.enabled else None)
                val = self.evaluate_epoch(val_loader)
                row = self._end_epoch(epoch, train, val, lr, time.perf_counter() - started)
                bars.end_epoch(self.state, val.task_means())
                for callback in callbacks:
                    callback.on_epoch_end(epoch, row)
        result = FitResult(
            best_epoch=self.state.best_epoch,
            best_score=self.state.best_score,
            epochs_run=self.state.epoch,
            stopped_early=self.state.stopped_early,
            history=pd.DataFrame(self.history),
            best_path=self.run_dir / BEST_CHECKPOINT,
        )
        for callback in callbacks:
            callback.on_fit_end(result)
        return result


def fit(
    model: nn.Module,
    tasks: list[Task],
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    cfg: TrainConfig,
    augmenter: Any,
    weighting: Weighting,
    run_dir: str | Path,
    select_task: str,
    progress: bool = True,
    *,
    loss_variant: str = "clean",
    seed: int = 0,
    input_size: int | None = None,
    callbacks: Sequence[Callback] = (),
    description: str = "train",
    dist: DistContext = SINGLE,
    device: torch.device | None = None,
) -> FitResult:
    """Train ``model`` on its ``tasks`` (resuming from ``run_dir/last.pt``); best weights go to ``best.pt``.

    ``callbacks`` are called besides the config's ``train.callbacks``. ``device`` None: ``auto``; the caller sets
    torch's threads (``runtime.threads``)."""
    trainer = Trainer(model, tasks, cfg, weighting, Path(run_dir), select_task, loss_variant, seed, input_size,
                      dist=dist, device=device, callbacks=callbacks)
    return trainer.fit(train_loader, val_loader, augmenter, progress, description)


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[Any], device: torch.device, input_size: int | None = None, amp: bool = False
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Raw head outputs on CPU for every sample of ``loader`` ({task: (N, n_outputs)}) and their ``row`` indices."""
    model.eval()
    model.to(device)
    batches = Batches(device, input_size, channels_last=False, model=model)
    outputs: dict[str, list[torch.Tensor]] = {}
    rows: list[np.ndarray] = []
    for batch in loader:
        x, _, _ = batches(batch)
        clinical = batches.clinical(batch)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x) if clinical is None else model(x, clinical)
        for name, value in out.items():
            outputs.setdefault(name, []).append(value.float().cpu())
        rows.append(np.asarray(batch["row"]))
    return {k: torch.cat(v) for k, v in outputs.items()}, np.concatenate(rows) if rows else np.zeros(0, dtype=int)
