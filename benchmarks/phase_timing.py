"""What ``train.phase_timing`` costs: the demo's training with the engine's per-phase clock on and off.

  (a) one ``PhaseClock.lap`` on and off (ns per call, median of --repeats runs of 200,000 laps): the clock's price;
  (b) a short MDMT training of the demo's network (the shipped ``demo`` config: tiny_cnn at half width, 48 px,
      batch 32, one thread; prognosis and the 6 regional scores) on random images, ``fit`` with timing on against
      off in fresh folders: CPU seconds (``time.process_time``), median over --repeats interleaved pairs (the order
      alternates), and the median of the pairs' ratios on/off with their range (the noise the A/B cannot resolve);
  (c) the estimate from (a): the laps an epoch makes × (on − off) ÷ the epoch's CPU time with timing off.
The demo's network is the smallest the project trains, so it is where the clock weighs most.

    python benchmarks/phase_timing.py [--epochs 3] [--train 640] [--val 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from train_step import synthetic_cache

from mdmt.cli import config_path
from mdmt.config import Config, load_config
from mdmt.data.batches import (
    CachedImageDataset,
    MixedBatchSampler,
    MultiSourceDataset,
    make_loader,
)
from mdmt.losses import build_weighting
from mdmt.models.multitask import build_model
from mdmt.tasks import get_task
from mdmt.train.engine import TRAIN_PHASES, PhaseClock, fit

LAPS = 200_000


def lap_ns(enabled: bool) -> float:
    """Nanoseconds per ``lap`` of a CPU clock."""
    clock = PhaseClock(TRAIN_PHASES, torch.device("cpu"), enabled=enabled)
    start = time.perf_counter_ns()
    for _ in range(LAPS):
        clock.lap("data")
    return (time.perf_counter_ns() - start) / LAPS


def datasets(config: Config, n_train: int, n_val: int) -> tuple[MultiSourceDataset, MultiSourceDataset]:
    """Training and validation sets of random ``data.image_size`` images, half AIforCOVID-style, half BrixIA-style."""
    tasks = [get_task("prognosis"), get_task(config.model.severity_task)]
    half_train, half_val = n_train // 2, n_val // 2
    sources = [synthetic_cache(half_train + half_val, config.data.image_size, name, seed)
               for seed, name in enumerate(("aiforcovid", "brixia"))]

    def part(rows: np.ndarray) -> MultiSourceDataset:
        return MultiSourceDataset([CachedImageDataset(cache, rows, tasks, i) for i, cache in enumerate(sources)])

    return part(np.arange(half_train)), part(np.arange(half_train, half_train + half_val))


def fit_seconds(config: Config, train: MultiSourceDataset, val: MultiSourceDataset, timing: bool) -> float:
    """CPU seconds of ``fit`` in a fresh folder, with ``train.phase_timing`` = ``timing``."""
    cfg = dataclasses.replace(config.train, phase_timing=timing)
    tasks = [get_task("prognosis"), get_task(config.model.severity_task)]
    sampler = MixedBatchSampler(train.source_sizes, cfg.batch_size, cfg.mix, cfg.mix_ratio, seed=0)
    train_loader = make_loader(train, cfg, batch_sampler=sampler)
    val_loader = make_loader(val, cfg)
    torch.manual_seed(0)
    model = build_model(config.model, tasks)
    with tempfile.TemporaryDirectory(prefix="phase-timing-") as run_dir:
        start = time.process_time()
        fit(model, tasks, train_loader, val_loader, cfg, None, build_weighting("fixed", tasks), Path(run_dir),
            "prognosis", progress=False, input_size=config.model.input_size,
            device=torch.device(config.runtime.device))
        return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=640, help="training images (half per dataset)")
    parser.add_argument("--val", type=int, default=128, help="validation images (half per dataset)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved on/off pairs (the median is kept)")
    args = parser.parse_args()
    config = load_config(config_path("demo"))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_epochs=args.epochs,
                                                                    warmup_epochs=0))
    torch.set_num_threads(config.runtime.threads)
    laps = {on: statistics.median(lap_ns(on) for _ in range(args.repeats)) for on in (True, False)}
    train, val = datasets(config, args.train, args.val)
    fit_seconds(config, train, val, True)  # warm-up
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats):
        for on in (True, False) if i % 2 == 0 else (False, True):
            seconds[on].append(fit_seconds(config, train, val, on))
    on, off = (statistics.median(seconds[flag]) for flag in (True, False))
    ratios = [a / b for a, b in zip(seconds[True], seconds[False], strict=True)]
    batch = config.train.batch_size
    laps_per_epoch = 4 * math.ceil(args.train / batch) + 2 * math.ceil(args.val / batch) + 3
    estimate = laps_per_epoch * (laps[True] - laps[False]) * 1e-9 / (off / args.epochs)
    table = Table(title=f"train.phase_timing: demo network, {args.epochs} epochs of {args.train} + {args.val} images, "
                        f"batch {batch}, medians of {args.repeats}")
    for column in ("measure", "timing on", "timing off", "on / off"):
        table.add_column(column, justify="right")
    table.add_row("(a) one lap, ns", f"{laps[True]:.0f}", f"{laps[False]:.0f}", f"{laps[True] / laps[False]:.1f}")
    table.add_row("(b) fit, CPU-s", f"{on:.3f}", f"{off:.3f}", f"{statistics.median(ratios):.4f}")
    table.add_row("(c) laps × (a) ÷ epoch CPU-s", f"{estimate:.2e}", "", "")
    Console().print(table)
    Console().print(f"(b) the {args.repeats} pairs' ratios on/off range from {min(ratios):.4f} to {max(ratios):.4f}")


if __name__ == "__main__":
    main()
