"""GPU check: every figure the project needs from a GPU, in one run of under 8 minutes on one H100, as JSON.

Four steps, each in its own process group with a time limit; a failed or timed-out step is recorded and the next
one runs:
  throughput  ``gpu_throughput.py --json``: bare against end to end images/s for resnet50 and densenet121 at
              256 px, batch 128, and runs per hour with 1, 2 and 4 small runs sharing the GPU;
  grid        ``mdmt synth`` the ``tiny`` twin, then ``mdmt grid`` on CUDA through the grid's worker processes
              (resnet18 at 224 px, stl_prognosis + mdmt, CV folds 0 and 1, ``--workers 2``): every run's
              ``REQUIRED_METRICS`` and losses finite, and the same command again trains nothing;
  bf16        50 steps of the engine's training epoch (``Trainer.train_epoch``: loader, masked loss, fused Adam)
              for resnet50 at 256 px, batch 128, with bf16 autocast and in fp32 on the same seeded batches:
              images/s after 10 warm-up steps, and the loss at steps 1 and 50 (``diverged``: not finite or more
              than twice the first);
  torchrun    ``torchrun --standalone --nproc_per_node 1 -m mdmt.cli train``: one MDMT run on the twin (DONE,
              finite metrics). With one process torchrun sets WORLD_SIZE 1 and the run trains without DDP: this
              proves the launch path; ``--nproc N`` on an N-GPU machine trains under DDP with NCCL.
It writes ``OUT/<step>.json`` (status, seconds, error and the step's figures), ``OUT/<step>.log`` (the step's
output) and ``OUT/summary.json`` (each step's status, error and seconds, the device, torch version, git commit),
prints a table and exits 1 when a step failed; ``OUT/work`` holds the twin, the caches and the run folders (a step
run again trains again). ``--smoke`` runs every step on CPU with tiny inputs (tiny_cnn at 64 px, 1 to 3 steps or
epochs, one fold; ``tests/test_gpu_check.py``): it checks the paths and measures nothing.
``grid_cost.py --gpu-json OUT/throughput.json`` projects the paper grid's cost from the measured figures.

    python benchmarks/gpu_check.py OUT [--smoke] [--steps throughput grid bf16 torchrun]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mdmt.runs import DONE_FILE, HISTORY_FILE, METRICS_FILE, RunSpec, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAILED_MARK = "step failed: "


@dataclass(frozen=True)
class Sizes:
    """What each step runs: the GPU sizes, or the smoke test's."""

    device: str
    throughput_args: tuple[str, ...]
    throughput_size: int
    """The image side ``gpu_throughput.py`` runs at with these arguments."""
    backbone: str
    """The grid's and torchrun's backbone."""
    image_size: int
    folds: tuple[int, ...]
    epochs: int
    batch: int
    bf16_backbone: str
    bf16_size: int
    bf16_batch: int
    bf16_steps: int
    bf16_warmup: int
    loader_workers: int
    limits: dict[str, int] = field(default_factory=dict)
    """Seconds each step may take."""


GPU = Sizes("cuda", (), 256, "resnet18", 224, (0, 1), 3, 32, "resnet50", 256, 128, 50, 10, 4,
            {"throughput": 180, "grid": 150, "bf16": 60, "torchrun": 60})  # 450 s at most
SMOKE = Sizes("cpu", ("--device", "cpu", "--smoke", "--backbones", "tiny_cnn", "--shared-runs", "2"), 64, "tiny_cnn",
              64, (0,), 1, 16, "tiny_cnn", 64, 4, 3, 1, 0,
              {"throughput": 240, "grid": 240, "bf16": 120, "torchrun": 120})
GRID_WORKERS = 2
REQUIRED_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1_weighted")
"""Prognosis metrics defined whenever a test fold holds both classes (precision, for one, is not when a short run
predicts no SEVERE film)."""


def mdmt_command(command: str, out: Path, sizes: Sizes, *extra: str) -> list[str]:
    """``python -m mdmt.cli COMMAND`` on the twin in ``out/work`` with the check's backbone, sizes and schedule."""
    work = out / "work"
    return [sys.executable, "-m", "mdmt.cli", command, "--config", "demo",
            "--aiforcovid-root", str(work / "data" / "AIforCOVID"), "--brixia-root", str(work / "data" / "BRIXIA"),
            "--cache-dir", str(work / "cache"), "--image-size", str(sizes.image_size),
            "--set", f"model.input_size={sizes.image_size}", "--set", f"train.batch_size={sizes.batch}",
            "--set", f"train.max_epochs={sizes.epochs}", "--set", "train.warmup_epochs=0",
            "--set", f"runtime.device={sizes.device}", *extra]


def call(command: list[str]) -> str:
    """Run ``command`` (its output echoed to this step's log); its stdout, or RuntimeError naming its exit code."""
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    print(result.stdout, result.stderr, sep="\n", flush=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[1:3])} exited with {result.returncode}: "
                           f"{error_line(result.stderr + result.stdout)}")
    return result.stdout


def error_line(output: str) -> str:
    """The first exception or ``error:`` line of a command's output (the root cause under torchrun, whose own
    error follows the worker's), else its last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"([\w.]*(Error|Exception)\b|error:)", line)]
    return (errors or lines or [""])[0 if errors else -1]


def finite_numbers(value: Any) -> list[float]:
    """Every number in a nested JSON value; ValueError naming the first that is not finite (null counts as NaN)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in finite_numbers(v)]
    if value is None or isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError(f"not a finite number: {value}")
    return [float(value)] if isinstance(value, (int, float)) else []


def finished_runs(results: Path) -> dict[str, Path]:
    """Run key → run folder of every run under ``results`` that holds DONE."""
    runs = results / "runs"
    return {"/".join(p.parent.relative_to(runs).parts): p.parent for p in sorted(runs.rglob(DONE_FILE))}


def prognosis_metrics(run_dir: Path) -> dict[str, float]:
    """The run's prognosis metrics; ValueError when one of ``REQUIRED_METRICS`` is missing or not finite, or when
    the run's training or validation loss is not finite in some epoch."""
    metrics = json.loads((run_dir / METRICS_FILE).read_text()).get("prognosis", {})
    bad = [name for name in REQUIRED_METRICS if not isinstance(metrics.get(name), (int, float))
           or not math.isfinite(metrics[name])]
    if bad:
        raise ValueError(f"{run_dir / METRICS_FILE}: prognosis {', '.join(bad)} missing or not finite")
    history = _history(run_dir)
    if not history["losses_finite"]:
        raise ValueError(f"{run_dir / HISTORY_FILE}: a training or validation loss is not finite")
    return {name: metrics[name] for name in REQUIRED_METRICS}


def grid_counts(stdout: str) -> dict[str, int]:
    """The rows of ``mdmt grid``'s summary table: already done, completed now, failed, skipped."""
    counts = {}
    for row in ("already done", "completed now", "failed", "skipped"):
        match = re.search(rf"{row}\W+(\d+)", stdout)
        if match is None:
            raise ValueError(f"mdmt grid printed no '{row}' count")
        counts[row.replace(" ", "_")] = int(match.group(1))
    return counts


# --------------------------------------------------------------------------------------------- the steps
def step_throughput(out: Path, sizes: Sizes) -> dict[str, Any]:
    """``gpu_throughput.py --json``: bare and end-to-end images/s, runs per hour with runs sharing the device."""
    path = out / "work" / "gpu_throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stdout = call([sys.executable, str(HERE / "gpu_throughput.py"), *sizes.throughput_args, "--json", str(path)])
    if not path.is_file():
        raise RuntimeError(f"gpu_throughput.py wrote no figures: {stdout.strip().splitlines()[-1:]}")
    figures = json.loads(path.read_text())
    finite_numbers(figures)
    ratios = {b: figures["end_to_end"][b] / figures["bare"][b] for b in figures["bare"]}
    return {**figures, "size": sizes.throughput_size, "smoke": "--smoke" in sizes.throughput_args,
            "e2e_over_bare": ratios,
            "headline": ", ".join(f"{b} e2e {figures['end_to_end'][b]:.0f} img/s ({r:.2f} of bare)"
                                  for b, r in ratios.items())}


def step_grid(out: Path, sizes: Sizes) -> dict[str, Any]:
    """``mdmt grid`` on the twin through its worker processes; finite metrics; a second call trains nothing."""
    work = out / "work"
    shutil.rmtree(work / "grid", ignore_errors=True)  # a check run again trains every run again
    call([sys.executable, "-m", "mdmt.cli", "synth", str(work / "data"), "--preset", "tiny", "--seed", "0",
          "--overwrite"])
    command = mdmt_command("grid", out, sizes, "--results-dir", str(work / "grid"), "--workers", str(GRID_WORKERS),
                           "--set", f"grid.backbones=[{sizes.backbone}]",
                           "--set", "grid.strategies=[stl_prognosis,mdmt]", "--set", "grid.protocols=[cv5]",
                           "--set", f"grid.folds=[{','.join(map(str, sizes.folds))}]", "--set", "grid.seeds=[0]")
    start = time.perf_counter()
    first = grid_counts(call(command))
    first_s = time.perf_counter() - start
    runs = finished_runs(work / "grid")
    expected = 2 * len(sizes.folds)
    if first["completed_now"] != expected or len(runs) != expected:
        raise RuntimeError(f"expected {expected} finished runs, the grid printed {first} and {len(runs)} hold DONE")
    metrics = {key: prognosis_metrics(run_dir) for key, run_dir in runs.items()}
    stamps = {key: (run_dir / DONE_FILE).stat().st_mtime_ns for key, run_dir in runs.items()}
    start = time.perf_counter()
    second = grid_counts(call(command))
    second_s = time.perf_counter() - start
    rewritten = [key for key, run_dir in runs.items() if (run_dir / DONE_FILE).stat().st_mtime_ns != stamps[key]]
    if second["completed_now"] or second["already_done"] != expected or rewritten:
        raise RuntimeError(f"the second grid trained again: it printed {second}; DONE rewritten: {rewritten}")
    history = {key: _history(run_dir) for key, run_dir in runs.items()}
    mean_auc = sum(m["roc_auc"] for m in metrics.values()) / len(metrics)
    return {"runs": len(runs), "first": first, "second": second, "first_s": first_s, "second_s": second_s,
            "metrics": metrics, "history": history,
            "headline": f"{len(runs)} runs in {first_s:.0f} s, mean ROC AUC {mean_auc:.3f}; second call "
                        f"{second['already_done']} already done, {second['completed_now']} trained, {second_s:.0f} s"}


def _history(run_dir: Path) -> dict[str, float]:
    """Epochs a run trained, their summed wall seconds and whether every loss is finite (``history.csv``)."""
    import pandas as pd

    history = pd.read_csv(run_dir / HISTORY_FILE)
    losses = history[["train_loss", "val_loss"]].to_numpy(dtype=float)
    return {"epochs": len(history), "seconds": float(history["seconds"].sum()),
            "losses_finite": bool(math.isfinite(losses.sum()))}


def step_bf16(out: Path, sizes: Sizes) -> dict[str, Any]:
    """The engine's training steps with and without bf16 autocast on the same seeded batches."""
    import torch
    from train_step import memmap_source

    work = out / "work" / "bf16"
    work.mkdir(parents=True, exist_ok=True)
    cache = memmap_source(work / "images.npy", sizes.bf16_batch * 4, sizes.bf16_size, "aiforcovid", 0)
    device = torch.device(sizes.device)
    modes = {name: _engine_steps(amp, cache, sizes, device, work / name) for name, amp in (("bf16", True),
                                                                                           ("fp32", False))}
    return {**modes, "backbone": sizes.bf16_backbone, "size": sizes.bf16_size, "batch": sizes.bf16_batch,
            "steps": sizes.bf16_steps,
            "bf16_speedup": modes["bf16"]["images_per_s"] / modes["fp32"]["images_per_s"],
            "headline": "; ".join(f"{name} {m['images_per_s']:.0f} img/s, loss {m['loss_first']:.3f} → "
                                  f"{m['loss_last']:.3f}{' DIVERGED' if m['diverged'] else ''}"
                                  for name, m in modes.items())}


def _engine_steps(amp: bool, cache: Any, sizes: Sizes, device: Any, run_dir: Path) -> dict[str, Any]:
    """``sizes.bf16_steps`` steps of ``Trainer.train_epoch`` from a fresh seeded model: images/s after the warm-up
    steps, every step's loss (read once the epoch is over, so no step waits for the device)."""
    import dataclasses

    import numpy as np
    import torch

    from mdmt.config import Config, RuntimeConfig
    from mdmt.data.batches import (
        CachedImageDataset,
        MixedBatchSampler,
        MultiSourceDataset,
        make_loader,
    )
    from mdmt.models.multitask import build_model
    from mdmt.tasks import get_task
    from mdmt.train.engine import Trainer
    from mdmt.weighting import build_weighting

    task, config, batch = get_task("prognosis"), Config(), sizes.bf16_batch
    train = dataclasses.replace(config.train, batch_size=batch, amp=amp, channels_last=True)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config.model, backbone=sizes.bf16_backbone,
                                            input_size=sizes.bf16_size), [task])
    trainer = Trainer(model, [task], train, build_weighting("fixed", [task]), run_dir, "prognosis",
                      input_size=sizes.bf16_size, device=device)
    data = MultiSourceDataset([CachedImageDataset(cache, np.arange(batch * sizes.bf16_steps) % len(cache.records),
                                                  [task])])
    loader = make_loader(data, train, batch_sampler=MixedBatchSampler(data.source_sizes, batch, seed=0),
                         runtime=RuntimeConfig(device=device.type, loader_workers=sizes.loader_workers))
    running: list[torch.Tensor] = []
    timed: list[float] = []

    def on_step(meter: Any) -> None:
        running.append(sum(meter.sums.values()))  # a new tensor: the running loss sum after this step
        if len(running) == sizes.bf16_warmup:
            _sync(device)
            timed.append(time.perf_counter())

    trainer.train_epoch(loader, None, 0, on_step)
    _sync(device)
    seconds = time.perf_counter() - timed[0]
    sums = torch.stack(running).double().cpu()
    losses = (torch.diff(sums, prepend=sums.new_zeros(1)) / batch).tolist()
    first, last = losses[0], losses[-1]
    return {"autocast": trainer.amp, "images_per_s": (len(losses) - sizes.bf16_warmup) * batch / seconds,
            "loss_first": first, "loss_last": last, "losses": losses,
            "diverged": not math.isfinite(last) or last > 2 * first}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_torchrun(out: Path, sizes: Sizes, nproc: int = 1) -> dict[str, Any]:
    """``torchrun -m mdmt.cli train`` of one MDMT run on the twin: DONE and finite metrics."""
    work = out / "work"
    if not (work / "data" / "AIforCOVID").is_dir():
        call([sys.executable, "-m", "mdmt.cli", "synth", str(work / "data"), "--preset", "tiny", "--seed", "0"])
    results = work / "torchrun"
    shutil.rmtree(results, ignore_errors=True)
    train = mdmt_command("train", out, sizes, "--results-dir", str(results), "--strategy", "mdmt",
                         "--backbone", sizes.backbone, "--protocol", "cv5", "--fold", "0", "--seed", "0")
    start = time.perf_counter()
    stdout = call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   *train[1:]])
    seconds = time.perf_counter() - start
    run_dir = RunSpec("mdmt", sizes.backbone, "cv5", 0, 0).run_dir(results)
    if "run finished" not in stdout or not (run_dir / DONE_FILE).is_file():
        raise RuntimeError(f"torchrun returned 0 but {run_dir} holds no {DONE_FILE}")
    metrics = prognosis_metrics(run_dir)
    return {"nproc": nproc, "ddp": nproc > 1, "launch_to_exit_s": seconds, "metrics": metrics,
            "history": _history(run_dir),
            "headline": f"{nproc} process(es), DONE in {seconds:.0f} s, ROC AUC {metrics['roc_auc']:.3f}"}


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "throughput": step_throughput, "grid": step_grid, "bf16": step_bf16, "torchrun": step_torchrun}


# --------------------------------------------------------------------------------------------- the runner
def run_step(name: str, out: Path, sizes: Sizes, smoke: bool, nproc: int) -> dict[str, Any]:
    """Run one step in a child process group (killed at its time limit); write ``OUT/<name>.json`` and its log."""
    command = [sys.executable, str(Path(__file__).resolve()), str(out), "--only", name, "--nproc", str(nproc)]
    command += ["--smoke"] if smoke else []
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "COLUMNS": "200",
           "PYTHONUNBUFFERED": "1"}
    figures_path = out / f"{name}.json"
    figures_path.unlink(missing_ok=True)
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(out / f"{name}.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=sizes.limits[name])
            error = None if code == 0 else f"{_step_error(out / f'{name}.log')} (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the step and everything it started
            child.wait()
            error = f"timed out after {sizes.limits[name]} s"
    seconds, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
    figures = json.loads(figures_path.read_text()) if error is None and figures_path.is_file() else {}
    if error is None and not figures:
        error = "the step wrote no figures"
    record = {**figures, "status": "ok" if error is None else "failed", "error": error, "seconds": seconds,
              "cpu_s": cpu}
    write_json(record, figures_path)
    return record


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children and the descendants they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _step_error(log: Path) -> str:
    """What a step's child printed as its failure (``step failed: ...``), else the log's first error line."""
    text = log.read_text(errors="replace")
    marked = [line for line in text.splitlines() if line.startswith(FAILED_MARK)]
    return marked[-1].removeprefix(FAILED_MARK) if marked else error_line(text)


def environment() -> dict[str, Any]:
    """torch version, the device, the git commit (and whether the tree has uncommitted changes)."""
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': c, 'device': torch.cuda.get_device_name(0) if c else 'CPU', "
             "'gpus': torch.cuda.device_count()}))")
    found = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                      timeout=120).stdout)

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {**found, "commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON figures, logs and the twin")
    parser.add_argument("--smoke", action="store_true", help="every step on CPU with tiny inputs (measures nothing)")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes (one per GPU)")
    parser.add_argument("--only", choices=list(STEPS), help=argparse.SUPPRESS)  # a step's child process
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = SMOKE if args.smoke else GPU
    if args.only:
        sys.path.insert(0, str(HERE))
        try:
            extra = {"nproc": args.nproc} if args.only == "torchrun" else {}
            write_json(STEPS[args.only](out, sizes, **extra), out / f"{args.only}.json")
        except Exception as error:  # noqa: BLE001 - the parent records it
            traceback.print_exc()
            print(f"{FAILED_MARK}{type(error).__name__}: {' '.join(str(error).split())}")
            return 1
        return 0

    console = Console(soft_wrap=True)  # lines whole (paths, errors); the table keeps its width
    start = time.perf_counter()
    env = environment()
    summary: dict[str, Any] = {**env, "smoke": args.smoke, "steps": {}}
    if not args.smoke and not env["cuda"]:
        summary["error"] = "no CUDA device: nothing measured (--smoke runs every step on CPU)"
        write_json(summary, out / "summary.json")
        console.print(summary["error"])
        return 1
    console.print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}"
                  f"{' + uncommitted changes' if env['uncommitted_changes'] else ''}"
                  f"{'; smoke run: checks the paths, measures nothing' if args.smoke else ''}")
    table = Table(title=f"gpu_check on {env['device']}{' (smoke)' if args.smoke else ''}")
    for column in ("step", "status", "seconds", "CPU s", "figures / error"):
        table.add_column(column, justify="right" if column.endswith(" s") or column == "seconds" else "left")
    for name in args.steps:
        console.print(f"{name}: limit {sizes.limits[name]} s, log {out / f'{name}.log'}")
        record = run_step(name, out, sizes, args.smoke, args.nproc)
        summary["steps"][name] = {k: record[k] for k in ("status", "error", "seconds", "cpu_s")}
        write_json(summary, out / "summary.json")  # kept when the machine goes before the last step
        table.add_row(name, record["status"], f"{record['seconds']:.0f}", f"{record['cpu_s']:.0f}",
                      record["error"] or record.get("headline", ""),
                      style=None if record["status"] == "ok" else "red")
    summary["seconds"] = time.perf_counter() - start
    write_json(summary, out / "summary.json")
    console.print(table)
    failed = [name for name, step in summary["steps"].items() if step["status"] != "ok"]
    console.print(f"{summary['seconds']:.0f} s in all; {len(failed)} step(s) failed{': ' if failed else ''}"
                  f"{', '.join(failed)}; figures in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
