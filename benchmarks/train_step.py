"""Training-step throughput on CPU.

For each backbone (default resnet18 and densenet121 at 128 px, batch 16) and each thread count (default 1 and 2):
  (a) bare model at its best: forward + loss + backward + Adam step on a random network-ready tensor already in
      memory, with the engine's settings (channels_last model and input, the same thread count), no data loading
      and no input preprocessing (images/s);
  (b) mdmt end to end: the engine's training epoch reading uint8 images from an in-memory cache through
      the dataset, sampler and loader, ``to_network_input``, masked losses, weighting and Adam (images/s);
      target b/a >= 0.95 (the pipeline costs at most 5 %); b/a cannot honestly exceed 1 beyond noise, since
      (b) does all of (a)'s work and more;
  (c) an MDMT step (both heads, a mixed batch): the official double forward (backbone once per head)
      against mdmt's single pass; target time ratio ours/official <= 0.55.
Prints one table. Times are CPU seconds of this process (``time.process_time``, summed over its threads), so cores
shared with other work distort them less than wall time; after ``--warmup`` untimed calls, every measurement is the
median over ``--repeats`` interleaved calls. A few minutes with the defaults.

    python benchmarks/train_step.py [--backbones resnet18 densenet121] [--size 128] [--steps 2] [--repeats 5]
                                    [--threads 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from mdmt.config import Config
from mdmt.data.batches import (
    CachedImageDataset,
    ImageArrays,
    MixedBatchSampler,
    MultiSourceDataset,
    make_loader,
)
from mdmt.losses import build_weighting, task_losses
from mdmt.models.multitask import build_model
from mdmt.tasks import REGION_COLUMNS, Task, get_task
from mdmt.train.engine import Trainer, make_optimizer


def random_records(n: int, dataset: str, rng: np.random.Generator) -> pd.DataFrame:
    """AIforCOVID-style (random prognosis) or BrixIA-style (random regional scores) records of ``n`` images."""
    records = pd.DataFrame({"image_id": [f"{dataset}{i}" for i in range(n)], "dataset": dataset})
    records["patient_id"] = records["image_id"]
    records["center"] = "A"
    if dataset == "aiforcovid":
        records["prognosis"] = rng.integers(0, 2, n).astype(float)
    else:
        regions = rng.integers(0, 4, (n, 6)).astype(float)
        records[list(REGION_COLUMNS)] = regions
        records["brixia_global"] = regions.sum(axis=1)
    return records


def memmap_source(path: Path, n: int, size: int, dataset: str, seed: int) -> ImageArrays:
    """A uint8 ``(n, size, size)`` ``.npy`` memmap of random images with AIforCOVID- or BrixIA-style records."""
    rng = np.random.default_rng(seed)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size))
    for start in range(0, n, 512):
        stop = min(n, start + 512)
        images[start:stop] = rng.integers(0, 256, (stop - start, size, size), dtype=np.uint8)
    images.flush()
    del images
    return ImageArrays(np.load(path, mmap_mode="r"), random_records(n, dataset, rng))


def synthetic_cache(n: int, size: int, dataset: str, seed: int) -> ImageArrays:
    """Random uint8 images with ``random_records``."""
    rng = np.random.default_rng(seed)
    records = random_records(n, dataset, rng)
    return ImageArrays(rng.integers(0, 256, (n, size, size), dtype=np.uint8), records)


def random_batch(tasks: list[Task], batch: int, size: int) -> tuple[torch.Tensor, dict, dict]:
    """Network-ready channels_last input and targets; the first half of the batch labels the first task, the rest
    the second."""
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    first = torch.arange(batch) < (batch + 1) // 2 if len(tasks) > 1 else torch.ones(batch, dtype=torch.bool)
    targets, present = {}, {}
    for i, task in enumerate(tasks):
        high = task.n_classes if task.n_classes else 4
        targets[task.name] = torch.randint(0, high, (batch, task.target_dim)).float()
        present[task.name] = first if i == 0 else ~first
    return x, targets, present


def cpu_seconds(run: Callable[[], None]) -> float:
    """CPU time of one call of ``run`` (robust to other processes sharing the cores, unlike wall time)."""
    start = time.process_time()
    run()
    return time.process_time() - start


def repeated_steps(make_step: Callable[[], None], steps: int) -> Callable[[], None]:
    """A call running ``steps`` optimisation steps."""

    def run() -> None:
        for _ in range(steps):
            make_step()

    return run


def bare_step(model: torch.nn.Module, tasks: list[Task], batch: int, size: int) -> Callable[[], None]:
    """(a) and mdmt's MDMT step: the model's own work (one backbone pass) on tensors already in memory, with the
    engine's memory format."""
    model.to(memory_format=torch.channels_last)
    x, targets, present = random_batch(tasks, batch, size)
    weighting = build_weighting("fixed", tasks)
    optimizer = make_optimizer(model.parameters(), torch.device("cpu"), lr=1e-3)

    def step() -> None:
        losses = task_losses(model(x), targets, present, tasks, "clean")
        optimizer.zero_grad(set_to_none=True)
        weighting.backward(losses, list(model.backbone.parameters()))
        optimizer.step()

    model.train()
    return step


def official_mdmt_step(model: torch.nn.Module, tasks: list[Task], batch: int, size: int) -> Callable[[], None]:
    """(c) official: ``ParallelMultiObjective.forward`` runs the backbone once per head (same memory format)."""
    model.to(memory_format=torch.channels_last)
    x, targets, present = random_batch(tasks, batch, size)
    optimizer = make_optimizer(model.parameters(), torch.device("cpu"), lr=1e-3)

    def step() -> None:
        outputs = {name: head(model.backbone(x)) for name, head in model.heads.items()}
        losses = task_losses(outputs, targets, present, tasks, "clean")
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    model.train()
    return step


def engine_epoch(config: Config, backbone: str, size: int, batch: int, steps: int, run_dir: Path) -> Callable[[], None]:
    """(b): a call runs ``Trainer.train_epoch`` over ``steps`` batches of a synthetic uint8 cache."""
    tasks = [get_task("prognosis")]
    cache = synthetic_cache(batch * steps, size, "aiforcovid", 0)
    dataset = MultiSourceDataset([CachedImageDataset(cache, np.arange(batch * steps), tasks)])
    train = dataclasses.replace(config.train, batch_size=batch)
    loader = make_loader(dataset, train, batch_sampler=MixedBatchSampler(dataset.source_sizes, batch, seed=0))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config.model, backbone=backbone, input_size=size), tasks)
    trainer = Trainer(model, tasks, train, build_weighting("fixed", tasks), run_dir, "prognosis",
                      input_size=size, device=torch.device("cpu"))
    epochs = itertools.count()

    def run() -> None:
        trainer.train_epoch(loader, None, next(epochs))

    return run


def measure(backbone: str, args: argparse.Namespace, config: Config, run_dir: Path) -> dict[str, float]:
    """CPU seconds per image of (a), (b) and both MDMT steps: median over interleaved repeats after warm-up calls."""
    model_cfg = dataclasses.replace(config.model, backbone=backbone, input_size=args.size)
    single, both = [get_task("prognosis")], [get_task("prognosis"), get_task(config.model.severity_task)]
    torch.manual_seed(0)
    mdmt_model = build_model(model_cfg, both)
    calls = {
        "bare": repeated_steps(bare_step(build_model(model_cfg, single), single, args.batch, args.size), args.steps),
        "engine": engine_epoch(config, backbone, args.size, args.batch, args.steps, run_dir),
        "two_pass": repeated_steps(official_mdmt_step(mdmt_model, both, args.batch, args.size), args.steps),
        "one_pass": repeated_steps(bare_step(mdmt_model, both, args.batch, args.size), args.steps),
    }
    for _ in range(args.warmup):
        for run in calls.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, run in calls.items():
            times[name].append(cpu_seconds(run) / (args.steps * args.batch))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="optimisation steps per timed call")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each measurement first")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the median is kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    config = Config()
    table = Table(
        title=f"training step, CPU time, {args.size} px, batch {args.batch}, medians of {args.repeats}",
        caption="a: bare model img/CPU-s; b: mdmt engine from the cache img/CPU-s (target b/a >= 0.95); "
                "MDMT step CPU-s: official 2-pass vs mdmt 1-pass (target 1/2 <= 0.55)",
    )
    for column in ("backbone", "threads", "a", "b", "b/a", "2-pass", "1-pass", "1/2"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as run_dir:
        for threads, backbone in itertools.product(args.threads, args.backbones):
            torch.set_num_threads(threads)
            t = measure(backbone, args, config, Path(run_dir))
            table.add_row(backbone, str(threads), f"{1 / t['bare']:.1f}", f"{1 / t['engine']:.1f}", f"{t['bare'] / t['engine']:.2f}",
                          f"{t['two_pass'] * args.batch:.2f}", f"{t['one_pass'] * args.batch:.2f}",
                          f"{t['one_pass'] / t['two_pass']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
