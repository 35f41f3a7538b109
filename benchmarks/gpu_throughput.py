"""GPU throughput: bare model against mdmt end to end, and runs per hour with several runs sharing one GPU.

(1) For each backbone (default resnet50 and densenet121 at 256 px, batch 128):
    bare: forward + loss + backward + Adam on a network-ready channels_last tensor already on the GPU, bf16 autocast;
    end to end: ``Trainer.train_epoch`` reading a uint8 memory-mapped cache through the dataset, sampler and a
    loader with worker processes and pinned memory, augmentation on the GPU (``BatchAugmenter``), bf16 autocast,
    channels_last, masked losses and Adam. Target end-to-end ÷ bare ≥ 0.9. Wall time, after ``--warmup`` steps,
    with ``torch.cuda.synchronize``; images/s over ``--steps`` steps.
(2) For small backbones (default tiny_cnn and shufflenet_v2_x0_5): 1, 2 and 4 processes train end to end on the
    same GPU at once; their summed images/s give runs per hour for a run of ``--run-images`` images (default: the
    paper grid's mean run, see grid_cost.py).
The cache is written by this script: random uint8 images of the right shape in a ``np.memmap`` file.
Without a CUDA device it prints the plan and "no CUDA device: nothing measured" and exits 0. ``--device cpu
--smoke`` runs every path for 2 steps on tiny inputs (a test, not a measurement).

    python benchmarks/gpu_throughput.py [--backbones resnet50 densenet121] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from train_step import memmap_source

from mdmt.config import AugmentConfig, Config, RuntimeConfig
from mdmt.data.augment import BatchAugmenter
from mdmt.data.batches import (
    CachedImageDataset,
    ImageArrays,
    MixedBatchSampler,
    MultiSourceDataset,
    make_loader,
)
from mdmt.losses import task_losses
from mdmt.models.multitask import build_model
from mdmt.tasks import get_task
from mdmt.train.engine import Trainer, make_optimizer
from mdmt.weighting import build_weighting

NO_CUDA = "no CUDA device: nothing measured"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_images_per_s(backbone: str, size: int, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    """Bare model at its best: bf16 autocast (CUDA), channels_last, input already on the device."""
    task = get_task("prognosis")
    model_cfg = dataclasses.replace(Config().model, backbone=backbone, input_size=size)
    torch.manual_seed(0)
    model = build_model(model_cfg, [task]).to(device).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = {task.name: torch.randint(0, 2, (batch, 1), device=device).float()}
    present = {task.name: torch.ones(batch, dtype=torch.bool, device=device)}
    optimizer = make_optimizer(model.parameters(), device, lr=1e-3)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = model(x)
        losses = task_losses({k: v.float() for k, v in outputs.items()}, targets, present, [task], "clean")
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def end_to_end_images_per_s(backbone: str, cache: ImageArrays, size: int, batch: int, warmup: int, steps: int,
                            device: torch.device, workers: int, run_dir: Path) -> float:
    """mdmt's training epoch from the memory-mapped cache: loader workers, pinned memory, GPU augmentation, bf16."""
    task = get_task("prognosis")
    config = Config()
    train = dataclasses.replace(config.train, batch_size=batch, amp=True, channels_last=True)
    runtime = RuntimeConfig(device=device.type, loader_workers=workers)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config.model, backbone=backbone, input_size=size), [task])
    trainer = Trainer(model, [task], train, build_weighting("fixed", [task]), run_dir, "prognosis",
                      input_size=size, device=device)
    augmenter = BatchAugmenter(AugmentConfig(), [task])
    warm = MultiSourceDataset([CachedImageDataset(cache, np.arange(batch * warmup) % len(cache.records), [task])])
    trainer.train_epoch(make_loader(warm, train, batch_sampler=MixedBatchSampler(warm.source_sizes, batch, seed=0),
                                    runtime=runtime), augmenter, 0)
    timed = MultiSourceDataset([CachedImageDataset(cache, np.arange(batch * steps) % len(cache.records), [task])])
    loader = make_loader(timed, train, batch_sampler=MixedBatchSampler(timed.source_sizes, batch, seed=1),
                         runtime=runtime)
    sync(device)
    start = time.perf_counter()
    trainer.train_epoch(loader, augmenter, 1)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def _shared_worker(args: tuple[str, str, int, int, int, int, str, int, str], queue: Any) -> None:
    """One of several concurrent runs: report its end-to-end images/s."""
    backbone, cache_path, size, batch, warmup, steps, device, workers, run_dir = args
    images = np.load(cache_path, mmap_mode="r")
    rng = np.random.default_rng(0)
    records = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(images))], "dataset": "aiforcovid",
                            "center": "A"})
    records["patient_id"] = records["image_id"]
    records["prognosis"] = rng.integers(0, 2, len(images)).astype(float)
    torch.set_num_threads(1)
    queue.put(end_to_end_images_per_s(backbone, ImageArrays(images, records), size, batch, warmup, steps,
                                      torch.device(device), workers, Path(run_dir)))


def shared_images_per_s(backbone: str, cache_path: Path, n_runs: int, size: int, batch: int, warmup: int,
                        steps: int, device: torch.device, workers: int, run_dir: Path) -> float:
    """Summed images/s of ``n_runs`` processes training at once on one device."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = []
    for i in range(n_runs):
        child_dir = run_dir / f"{backbone}-{n_runs}-{i}"
        child_dir.mkdir(parents=True, exist_ok=True)
        args = (backbone, str(cache_path), size, batch, warmup, steps, str(device), workers, str(child_dir))
        procs.append(ctx.Process(target=_shared_worker, args=(args, queue)))
    for p in procs:
        p.start()
    rates = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a concurrent run exited with {p.exitcode}")
    return float(sum(rates))


def plan(args: argparse.Namespace) -> str:
    """What the script measures with these arguments."""
    return (f"plan: (1) bare vs end to end images/s for {', '.join(args.backbones)} at {args.size} px, batch "
            f"{args.batch}, {args.steps} timed steps after {args.warmup} (target >= 0.9); (2) runs per hour with "
            f"{', '.join(map(str, args.shared_runs))} concurrent runs per GPU for {', '.join(args.small)} at "
            f"{args.small_size} px, batch {args.small_batch}, a run = {args.run_images:,.0f} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "densenet121"])
    parser.add_argument("--small", nargs="+", default=["tiny_cnn", "shufflenet_v2_x0_5"])
    parser.add_argument("--shared-runs", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--small-size", type=int, default=256)
    parser.add_argument("--small-batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4, help="loader worker processes per run")
    parser.add_argument("--run-images", type=float, default=224 * (1585 + 4695) * 0.75,
                        help="images one run processes (default: the grid's mean run of about 224 epochs over the "
                             "mean of the strategies' training sets, see grid_cost.py)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="2 steps on tiny inputs: checks the paths, measures nothing")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (grid_cost.py --gpu-json)")
    args = parser.parse_args()
    if args.smoke:
        args.size = args.small_size = 64
        args.batch = args.small_batch = 4
        args.warmup, args.steps, args.workers = 1, 2, 0
        args.backbones, args.small, args.shared_runs = args.backbones[:1], args.small[:1], args.shared_runs[:2]
    print(plan(args))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.smoke:
        print(f"smoke run on {name}: figures below check the code paths, they are not measurements")
    results: dict[str, Any] = {"device": name, "bare": {}, "end_to_end": {}, "runs_per_hour": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = max(args.batch, args.small_batch) * (max(args.steps, args.warmup) + 1)
        cache_path = root / "images.npy"
        cache = memmap_source(cache_path, n, args.size, "aiforcovid", 0)
        print(f"\n{'backbone':>20} {'bare img/s':>11} {'e2e img/s':>10} {'e2e/bare':>9}")
        for backbone in args.backbones:
            bare = bare_images_per_s(backbone, args.size, args.batch, args.warmup, args.steps, device)
            e2e = end_to_end_images_per_s(backbone, cache, args.size, args.batch, args.warmup, args.steps, device,
                                          args.workers, root / backbone)
            results["bare"][backbone], results["end_to_end"][backbone] = bare, e2e
            print(f"{backbone:>20} {bare:11.1f} {e2e:10.1f} {e2e / bare:9.2f}")
        small_path = cache_path
        if args.small_size != args.size:
            small_path = root / "small.npy"
            memmap_source(small_path, n, args.small_size, "aiforcovid", 0)
        print(f"\n{'backbone':>20} {'runs/GPU':>9} {'img/s':>9} {'runs/hour':>10} {'vs 1 run':>9}")
        for backbone in args.small:
            single = None
            for n_runs in args.shared_runs:
                ips = shared_images_per_s(backbone, small_path, n_runs, args.small_size, args.small_batch,
                                          args.warmup, args.steps, device, args.workers, root / "shared")
                single = single or ips
                per_hour = ips * 3600 / args.run_images
                results["runs_per_hour"].setdefault(backbone, {})[n_runs] = per_hour
                print(f"{backbone:>20} {n_runs:9d} {ips:9.1f} {per_hour:10.2f} {ips / single:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\n{name}; wall time, one timed window of {args.steps} steps per figure")


if __name__ == "__main__":
    main()
