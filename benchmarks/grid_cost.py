"""Cost of the paper's grid: 18 backbones × (5-fold CV + 6 LOCO folds) × (STL τ1, STL τ2, FT, MDMT).

The runs are those ``mdmt grid --config paper`` trains (``expand_grid``): STL τ2 runs only on BrixIA's 5 CV folds,
since every LOCO fold pairs with the same BrixIA fold (``protocol.paired_cv_fold``), and FT starts from them. Each
run's training and validation images come from the paper's split files (``--splits``, default
``../shared/data/official-splits``: counted) or, without them, from the protocol's fractions (CV: train 3/5,
validation 1/5; LOCO: one center of 6 out, a tenth of the rest validates).

Per backbone at 256 px (the paper's ``model.input_size``):
  - training throughput: **measured** on this machine's CPU for ``--measure`` backbones (a bare training step:
    forward + loss + backward + Adam, channels_last, ``--threads`` threads, CPU time of this process, median of
    ``--repeats`` after one warm-up step); the other backbones are **projected** from their forward FLOPs
    (counted with ``torch.utils.flop_counter``) at the median measured CPU seconds per GFLOP;
  - GPU throughput: **measured** when ``--gpu-json`` (``benchmarks/gpu_throughput.py --json``, or the
    ``throughput.json`` of ``benchmarks/gpu_check.py``, at ``--size``) holds the backbone's end-to-end images/s,
    otherwise **projected** as min(``--gpu-cap``, CPU images/s × speed-up). The speed-up is anchored on one figure:
    ``--anchor`` (resnet50)'s GPU images/s ÷ its measured CPU images/s, the GPU figure measured when ``--gpu-json``
    holds it, else ``--anchor-gpu`` (assumed: bf16 on an H100 at 256 px); ``--speedup`` instead when the anchor's
    CPU figure is not measured. ``--gpu-cap`` is the assumed ceiling of the data path (loader +
    augmentation) for small backbones.
Images per run: epochs × (training images + validation images / 3, a forward costing about a third of a step).
Epochs per run: the paper config's bounds are warm-up 40 + patience 65 + 1 = 106 (stops as soon as it may) and 300;
the assumed mean places the demo's ``history.csv`` runs (``--demo-runs``) at the same relative position between the
demo config's own bounds, or the middle of the paper's bounds when no demo output exists. Target: ≤ 12 GPU-hours
on one H100-class GPU.

    python benchmarks/grid_cost.py [--measure resnet18 shufflenet_v2_x0_5 ...] [--speedup 800] [--gpu-json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from mdmt.cli import config_path
from mdmt.config import Config, ModelConfig, PluginRef, load_config, parse_override
from mdmt.protocols import get_protocol, run_fold
from mdmt.data.splits import official_splits
from mdmt.experiments.grid import expand_grid
from mdmt.losses import task_losses
from mdmt.models.multitask import build_model
from mdmt.runs import RunSpec
from mdmt.tasks import Task, get_task
from mdmt.train.engine import make_optimizer
from mdmt.train.strategies import get_strategy

SIZES = {"aiforcovid": 1585, "brixia": 4695}
"""Images of each dataset (the paper's counts), for the fractions when no split files are given."""


def bounds(config: Config) -> tuple[int, int]:
    """Fewest and most epochs a run of ``config`` trains: warm-up + patience + 1, and ``max_epochs``."""
    return config.train.warmup_epochs + config.train.early_stopping + 1, config.train.max_epochs


def paper_grid(splits: Path | None) -> tuple[Config, list[RunSpec]]:
    """The paper config (official protocols when ``splits`` is given, else cv5 and loco) and its runs, as
    ``mdmt grid`` lists them."""
    overrides = ["data.datasets.aiforcovid.params.root=unread",
                 "data.datasets.brixia.params.root=unread"]  # the grid's runs are listed without reading any data
    overrides.append(f"protocol.official_splits_dir={splits}" if splits else "grid.protocols=[cv5, loco]")
    config = load_config(config_path("paper"), [parse_override(o) for o in overrides])
    return config, expand_grid(config)


@functools.cache
def _split_sizes(splits: Path, protocol: str, dataset: str) -> list[tuple[int, int]]:
    return [(len(s.train), len(s.val)) for s in official_splits(splits, get_protocol(protocol).folder, dataset)]


def train_val(dataset: str, protocol: str, fold: int, config: Config, splits: Path | None) -> tuple[float, float]:
    """Training and validation images of ``dataset`` in (protocol, fold): counted in the split files or by fraction."""
    if splits:
        return _split_sizes(splits, protocol, dataset)[fold]
    n, k = SIZES[dataset], config.protocol.cv_folds
    if protocol == "cv5":
        return n * (k - 2) / k, n / k
    rest = n * (1 - 1 / len(config.protocol.loco_centers))
    return rest * (1 - config.protocol.loco_val_fraction), rest * config.protocol.loco_val_fraction


def images_per_epoch(config: Config, spec: RunSpec, splits: Path | None) -> float:
    """Training-step equivalents of one epoch of ``spec``: training images + validation images / 3."""
    total = 0.0
    for dataset in get_strategy(spec.strategy, config).datasets:
        protocol, fold = run_fold(spec.protocol, spec.fold, [dataset], config)
        train, val = train_val(dataset, protocol, fold, config, splits)
        total += train + val / 3
    return total


def mean_epochs(demo_runs: Path, paper: Config) -> tuple[float, str]:
    """Assumed mean epochs per paper run and where the figure comes from."""
    lengths = [len(pd.read_csv(p)) for p in demo_runs.rglob("history.csv")] if demo_runs.is_dir() else []
    low, high = bounds(paper)
    if not lengths:
        return (low + high) / 2, f"middle of the paper bounds {low}–{high} (no demo history.csv found)"
    demo_low, demo_high = bounds(load_config(config_path("demo")))
    position = min(1.0, max(0.0, (statistics.mean(lengths) - demo_low) / (demo_high - demo_low)))
    source = (f"{len(lengths)} demo runs average {statistics.mean(lengths):.1f} epochs = {position:.2f} of the way "
              f"from {demo_low} to {demo_high}; the same place between the paper bounds {low}–{high}")
    return low + position * (high - low), source


def gflops(model: torch.nn.Module, size: int) -> float:
    """Forward GFLOPs of one image."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def cpu_seconds_per_image(model: torch.nn.Module, task: Task, size: int, batch: int, repeats: int) -> float:
    """Median CPU seconds per image of a bare training step (channels_last), after one warm-up step."""
    model.train().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = {task.name: torch.randint(0, 2, (batch, task.target_dim)).float()}
    present = {task.name: torch.ones(batch, dtype=torch.bool)}
    optimizer = make_optimizer(model.parameters(), torch.device("cpu"), lr=1e-3)
    times = []
    for i in range(repeats + 1):
        start = time.process_time()
        loss = sum(task_losses(model(x), targets, present, [task], "clean").values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            times.append((time.process_time() - start) / batch)
    return statistics.median(times)


def gpu_figures(path: Path | None, size: int) -> dict[str, float]:
    """End-to-end GPU images/s per backbone from ``path`` (none without it); SystemExit naming the file when its
    figures come from a smoke run or were measured at another image side than ``size``."""
    if path is None:
        return {}
    figures = json.loads(path.read_text())
    if figures.get("smoke"):
        raise SystemExit(f"{path}: figures of a --smoke run check code paths, they are not measurements")
    if figures.get("size", size) != size:
        raise SystemExit(f"{path}: measured at {figures['size']} px, the projection is at --size {size}")
    return {backbone: float(ips) for backbone, ips in figures.get("end_to_end", {}).items()}


def speedup(anchor: str, anchor_cpu_s: float | None, gpu: dict[str, float], anchor_gpu: float,
            fallback: float) -> tuple[float, str]:
    """GPU images/s ÷ CPU images/s of the anchor (its GPU figure measured when ``gpu`` holds it, else
    ``anchor_gpu``, assumed), or ``fallback`` (assumed) when its CPU figure is not measured; and where it comes
    from."""
    if anchor_cpu_s is None:
        return fallback, "--speedup (assumed)"
    if anchor in gpu:
        return gpu[anchor] * anchor_cpu_s, f"{anchor} {gpu[anchor]:.0f} img/s on the GPU (measured) ÷ its CPU img/s"
    return anchor_gpu * anchor_cpu_s, f"{anchor} {anchor_gpu:g} img/s on H100 (assumed) ÷ its measured CPU img/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs="+", default=["shufflenet_v2_x0_5", "mobilenet_v2", "resnet18",
                                                          "resnet50", "densenet121"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speedup", type=float, default=2500.0,
                        help="assumed H100 images/s ÷ CPU images/s when the anchor is not measured")
    parser.add_argument("--anchor", default="resnet50")
    parser.add_argument("--anchor-gpu", type=float, default=2000.0,
                        help="assumed H100 bf16 training images/s of the anchor at 256 px")
    parser.add_argument("--gpu-cap", type=float, default=8000.0, help="assumed data-path ceiling, images/s")
    parser.add_argument("--gpu-json", type=Path, default=None,
                        help="gpu_throughput.py --json output, or gpu_check.py's OUT/throughput.json")
    parser.add_argument("--demo-runs", type=Path, default=Path("demo-output/results/runs"))
    parser.add_argument("--splits", type=Path, default=Path("../shared/data/official-splits"),
                        help="the paper's split files (sizes counted there; fractions when the folder is missing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("prognosis")
    gpu = gpu_figures(args.gpu_json, args.size)
    splits = args.splits if args.splits.is_dir() else None
    paper, specs = paper_grid(splits)
    backbones = [PluginRef.of(b).name for b in paper.grid.backbones]
    epochs, epochs_source = mean_epochs(args.demo_runs, paper)
    per_epoch = {spec: images_per_epoch(paper, spec, splits) for spec in specs}
    images = {b: epochs * sum(n for spec, n in per_epoch.items() if spec.backbone == b) for b in backbones}

    rows = {}
    for backbone in backbones:
        cfg = dataclasses.replace(ModelConfig(), backbone=backbone, input_size=args.size)
        torch.manual_seed(0)
        model = build_model(cfg, [task])
        rows[backbone] = {"gflops": gflops(model, args.size)}
        if backbone in args.measure:
            rows[backbone]["cpu_s"] = cpu_seconds_per_image(model, task, args.size, args.batch, args.repeats)
    per_gflop = statistics.median(r["cpu_s"] / r["gflops"] for r in rows.values() if "cpu_s" in r)
    factor, factor_source = speedup(args.anchor, rows.get(args.anchor, {}).get("cpu_s"), gpu, args.anchor_gpu,
                                    args.speedup)

    table = Table(title=f"paper grid cost, {args.size} px, {len(specs)} runs of {len(backbones)} backbones, "
                        f"{epochs:.0f} epochs per run (assumed)",
                  caption=f"m = measured, p = projected; CPU: {args.threads} thread(s), CPU time; GPU p = min("
                          f"{args.gpu_cap:g}, CPU img/s × {factor:.0f})")
    for column in ("backbone", "GFLOPs", "CPU img/s", "", "GPU img/s", " ", "CPU-hours", "GPU-hours"):
        table.add_column(column, justify="right")
    total_cpu = total_gpu = 0.0
    for backbone, r in rows.items():
        cpu_s = r.get("cpu_s", r["gflops"] * per_gflop)
        gpu_ips = gpu.get(backbone)
        gpu_label = "m" if gpu_ips else "p"
        gpu_ips = gpu_ips or min(args.gpu_cap, factor / cpu_s)
        cpu_hours, gpu_hours = images[backbone] * cpu_s / 3600, images[backbone] / gpu_ips / 3600
        total_cpu += cpu_hours
        total_gpu += gpu_hours
        table.add_row(backbone, f"{r['gflops']:.2f}", f"{1 / cpu_s:.2f}", "m" if "cpu_s" in r else "p",
                      f"{gpu_ips:.0f}", gpu_label, f"{cpu_hours:,.0f}", f"{gpu_hours:.2f}")
    table.add_row("total", "", "", "", "", "", f"{total_cpu:,.0f}", f"{total_gpu:.1f}", style="bold")
    console = Console()
    console.print(table)
    console.print(f"epochs per run: {epochs:.1f} ({epochs_source})")
    console.print(f"speed-up CPU → GPU: {factor:.0f}× ({factor_source})")
    per_strategy = Counter(spec.strategy for spec in specs if spec.backbone == backbones[0])
    console.print(f"runs: {len(specs)} = {len(backbones)} backbones × ("
                  + " + ".join(f"{n} {name}" for name, n in per_strategy.items()) + "); split sizes "
                  + (f"counted in {args.splits}" if splits else "from the protocol's fractions"))
    console.print(f"images per backbone (train + val/3, all epochs): {images[backbones[0]]:,.0f}; per epoch by "
                  "strategy: "
                  + ", ".join(f"{name} {statistics.mean(v for k, v in per_epoch.items() if k.strategy == name):,.0f}"
                              for name in per_strategy))
    verdict = "within" if total_gpu <= 12 else "over"
    console.print(f"projected GPU-hours {total_gpu:.1f} vs target 12 on one H100-class GPU: {verdict} "
                  f"({'measured' if gpu else 'no'} GPU figures used)")


if __name__ == "__main__":
    main()
