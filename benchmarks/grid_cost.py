"""Cost of the paper's grid: 18 backbones × (5-fold CV + 6 LOCO folds) × (STL τ1, STL τ2, FT, MDMT).

Per backbone at 256 px (the paper's ``model.input_size``):
  - training throughput: **measured** on this machine's CPU for ``--measure`` backbones (a bare training step:
    forward + loss + backward + Adam, channels_last, ``--threads`` threads, CPU time of this process, median of
    ``--repeats`` after one warm-up step); the other backbones are **projected** from their forward FLOPs
    (counted with ``torch.utils.flop_counter``) at the median measured CPU seconds per GFLOP;
  - GPU throughput: **measured** when ``--gpu-json`` (written by ``benchmarks/gpu_throughput.py --json``) holds the
    backbone's end-to-end images/s, otherwise **projected** as min(``--gpu-cap``, CPU images/s × speed-up). The
    speed-up is an assumption anchored on one figure: ``--anchor`` (resnet50) trains at ``--anchor-gpu`` images/s
    on an H100 in bf16 at 256 px (assumed, not measured here) ÷ its measured CPU images/s; ``--speedup`` instead
    when the anchor is not measured. ``--gpu-cap`` is the assumed ceiling of the data path (loader +
    augmentation) for small backbones.
Images per run: epochs × (training images + validation images / 3, a forward costing about a third of a step).
Epochs per run: the paper config's bounds are warm-up 40 + patience 65 ≈ 106 (stops as soon as it may) and 300;
the assumed mean places the demo's ``history.csv`` runs (``--demo-runs``) at the same relative position between the
demo's own bounds, or the middle of the paper's bounds when no demo output exists. Target: ≤ 12 GPU-hours on one
H100-class GPU.

    python benchmarks/grid_cost.py [--measure resnet18 shufflenet_v2_x0_5 ...] [--speedup 800] [--gpu-json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from mdmt.config import ModelConfig, TrainConfig
from mdmt.losses import task_losses
from mdmt.models.multitask import build_model
from mdmt.tasks import Task, get_task

BACKBONES = ["densenet121", "densenet161", "densenet169", "densenet201",
             "efficientnet_b0", "efficientnet_b1_pruned", "efficientnet_es", "efficientnet_es_pruned",
             "efficientnet_lite0", "googlenet", "mobilenet_v2",
             "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2",
             "shufflenet_v2_x0_5", "shufflenet_v2_x1_0"]
N_AIFORCOVID, N_BRIXIA = 1585, 4695
CV_FOLDS, LOCO_FOLDS = 5, 6
TRAIN_FRACTION, VAL_FRACTION = 0.72, 0.08  # CV: a fifth is test, a tenth of the rest validates
STRATEGY_DATASETS = {"stl_prognosis": ("aiforcovid",), "stl_severity": ("brixia",), "ft": ("aiforcovid",),
                     "mdmt": ("aiforcovid", "brixia")}
SIZES = {"aiforcovid": N_AIFORCOVID, "brixia": N_BRIXIA}
PAPER_BOUNDS = (TrainConfig().warmup_epochs + TrainConfig().early_stopping + 1, TrainConfig().max_epochs)
DEMO_BOUNDS = (2 + 8 + 1, 20)  # demo.yaml: warm-up 2, patience 8, max 20


def images_per_epoch() -> float:
    """Images one epoch of every strategy of one fold processes, in training-step equivalents, summed."""
    total = 0.0
    for datasets in STRATEGY_DATASETS.values():
        n = sum(SIZES[d] for d in datasets)
        total += n * TRAIN_FRACTION + n * VAL_FRACTION / 3
    return total


def mean_epochs(demo_runs: Path) -> tuple[float, str]:
    """Assumed mean epochs per paper run and where the figure comes from."""
    lengths = [len(pd.read_csv(p)) for p in demo_runs.rglob("history.csv")] if demo_runs.is_dir() else []
    low, high = PAPER_BOUNDS
    if not lengths:
        return (low + high) / 2, f"middle of the paper bounds {low}–{high} (no demo history.csv found)"
    demo_low, demo_high = DEMO_BOUNDS
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
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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
    parser.add_argument("--gpu-json", type=Path, default=None, help="gpu_throughput.py --json output")
    parser.add_argument("--demo-runs", type=Path, default=Path("demo-output/results/runs"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("prognosis")
    gpu = json.loads(args.gpu_json.read_text()).get("end_to_end", {}) if args.gpu_json else {}
    epochs, epochs_source = mean_epochs(args.demo_runs)
    per_fold = images_per_epoch() * epochs
    runs_images = per_fold * (CV_FOLDS + LOCO_FOLDS)

    rows = {}
    for backbone in BACKBONES:
        cfg = dataclasses.replace(ModelConfig(), backbone=backbone, input_size=args.size)
        torch.manual_seed(0)
        model = build_model(cfg, [task])
        rows[backbone] = {"gflops": gflops(model, args.size)}
        if backbone in args.measure:
            rows[backbone]["cpu_s"] = cpu_seconds_per_image(model, task, args.size, args.batch, args.repeats)
    per_gflop = statistics.median(r["cpu_s"] / r["gflops"] for r in rows.values() if "cpu_s" in r)
    if "cpu_s" in rows.get(args.anchor, {}):
        speedup = args.anchor_gpu * rows[args.anchor]["cpu_s"]
        speedup_source = f"{args.anchor} {args.anchor_gpu:g} img/s on H100 (assumed) ÷ its measured CPU img/s"
    else:
        speedup, speedup_source = args.speedup, "--speedup (assumed)"

    table = Table(title=f"paper grid cost, {args.size} px, {len(BACKBONES)} backbones × {CV_FOLDS + LOCO_FOLDS} folds "
                        f"× {len(STRATEGY_DATASETS)} strategies, {epochs:.0f} epochs per run (assumed)",
                  caption=f"m = measured, p = projected; CPU: {args.threads} thread(s), CPU time; GPU p = min("
                          f"{args.gpu_cap:g}, CPU img/s × {speedup:.0f}) (assumed)")
    for column in ("backbone", "GFLOPs", "CPU img/s", "", "GPU img/s", " ", "CPU-hours", "GPU-hours"):
        table.add_column(column, justify="right")
    total_cpu = total_gpu = 0.0
    for backbone, r in rows.items():
        cpu_s = r.get("cpu_s", r["gflops"] * per_gflop)
        gpu_ips = gpu.get(backbone)
        gpu_label = "m" if gpu_ips else "p"
        gpu_ips = gpu_ips or min(args.gpu_cap, speedup / cpu_s)
        cpu_hours, gpu_hours = runs_images * cpu_s / 3600, runs_images / gpu_ips / 3600
        total_cpu += cpu_hours
        total_gpu += gpu_hours
        table.add_row(backbone, f"{r['gflops']:.2f}", f"{1 / cpu_s:.2f}", "m" if "cpu_s" in r else "p",
                      f"{gpu_ips:.0f}", gpu_label, f"{cpu_hours:,.0f}", f"{gpu_hours:.2f}")
    table.add_row("total", "", "", "", "", "", f"{total_cpu:,.0f}", f"{total_gpu:.1f}", style="bold")
    console = Console()
    console.print(table)
    console.print(f"epochs per run: {epochs:.1f} ({epochs_source})")
    console.print(f"speed-up CPU → H100: {speedup:.0f}× ({speedup_source})")
    console.print(f"images per fold (4 strategies, train + val/3, all epochs): {per_fold:,.0f}; "
                  f"runs: {len(BACKBONES) * (CV_FOLDS + LOCO_FOLDS) * len(STRATEGY_DATASETS)}")
    verdict = "within" if total_gpu <= 12 else "over"
    console.print(f"projected GPU-hours {total_gpu:.1f} vs target 12 on one H100-class GPU: {verdict} "
                  f"({'measured' if gpu else 'no'} GPU figures used)")


if __name__ == "__main__":
    main()
