"""Peak memory: ``mdmt demo`` on a reduced grid, and one training epoch from a paper-size memory-mapped cache.

(a) ``mdmt demo`` as a child process (default ``--set grid.seeds=[0] --set grid.protocols=[cv5]``): every 0.2 s
    the ``/proc/<pid>/status`` of it and all its descendants (the grid's runs are separate processes) is read;
    reported are the largest ``VmHWM`` of any one process and the largest sum of ``VmRSS`` over the processes
    alive at once (shared pages counted in each). ``ru_maxrss`` of children is not used: Linux carries it across
    fork and exec, so it would report this (torch-importing) parent's size.
(b) a paper-size cache: 1,585 + 4,695 uint8 images at 256 px (random pixels, ``np.memmap`` files the size of the
    real caches; generating and decoding 6,280 DICOMs does not fit this CPU's time) read by one training epoch
    (``Trainer.train_epoch``, tiny_cnn, both datasets mixed, ``--loader-workers`` loader processes). For the
    trainer and each loader worker: peak RSS (``VmHWM``) and, at the end of the epoch, ``RssAnon`` (private
    memory: a copy of the cache would land here) and ``RssFile`` (pages of the mapped cache file, shared with the
    page cache, not copied), against the cache files' size.

    python benchmarks/memory.py [--skip-demo] [--demo-set grid.seeds=[0] ...] [--input-size 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_step import memmap_source

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

MiB = 2**20


def status_fields(pid: int | str = "self") -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of a process in MiB (from ``/proc/<pid>/status``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def demo_peak(settings: list[str], out: Path) -> tuple[float, float, float, str]:
    """(largest VmHWM of one process MiB, largest summed VmRSS MiB, wall seconds, command) of ``mdmt demo``."""
    command = [str(Path(sys.executable).with_name("mdmt")), "demo", "--out", str(out)]
    for setting in settings:
        command += ["--set", setting]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_one = peak_sum = 0.0
    while process.poll() is None:
        total = 0.0
        for pid in descendants(process.pid):
            try:
                fields = status_fields(pid)
            except (OSError, ValueError):
                continue
            peak_one = max(peak_one, fields.get("VmHWM", 0.0))
            total += fields.get("VmRSS", 0.0)
        peak_sum = max(peak_sum, total)
        time.sleep(0.2)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}")
    return peak_one, peak_sum, time.perf_counter() - start, " ".join(command[1:])


def paper_cache_epoch(root: Path, sizes: tuple[int, int], image_size: int, input_size: int, batch: int,
                      workers: int) -> tuple[float, list[tuple[str, dict[str, float]]]]:
    """(cache MiB, [(process, status fields)]) after one epoch over both memory-mapped caches."""
    config = Config()
    prognosis, severity = get_task("prognosis"), get_task(config.model.severity_task)
    sources = [memmap_source(root / "aiforcovid.npy", sizes[0], image_size, "aiforcovid", 0),
               memmap_source(root / "brixia.npy", sizes[1], image_size, "brixia", 1)]
    cache_mib = sum((root / f"{d}.npy").stat().st_size for d in ("aiforcovid", "brixia")) / MiB
    tasks = [prognosis, severity]
    dataset = MultiSourceDataset([CachedImageDataset(s, np.arange(len(s.records)), tasks, source=i)
                                  for i, s in enumerate(sources)])
    train = dataclasses.replace(config.train, batch_size=batch)
    loader = make_loader(dataset, train, batch_sampler=MixedBatchSampler(dataset.source_sizes, batch, seed=0),
                         runtime=RuntimeConfig(device="cpu", loader_workers=workers))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config.model, backbone="tiny_cnn", input_size=input_size), tasks)
    trainer = Trainer(model, tasks, train, build_weighting("fixed", tasks), root / "run", "prognosis",
                      input_size=input_size, device=torch.device("cpu"))
    iterator = iter(loader)
    trainer.train_epoch(_Reuse(iterator), None, 0)
    rows = [("trainer", status_fields())]
    for i, worker in enumerate(getattr(iterator, "_workers", [])):
        rows.append((f"loader worker {i}", status_fields(worker.pid)))
    del iterator
    return cache_mib, rows


class _Reuse:
    """An iterable over an existing loader iterator, so its worker processes can be inspected afterwards."""

    def __init__(self, iterator: object):
        self.iterator = iterator

    def __iter__(self) -> object:
        return self.iterator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--demo-set", nargs="*", default=["grid.seeds=[0]", "grid.protocols=[cv5]"])
    parser.add_argument("--sizes", nargs=2, type=int, default=[1585, 4695])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=64, help="network input (the cache stays --image-size)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache_mib, rows = paper_cache_epoch(root, (args.sizes[0], args.sizes[1]), args.image_size, args.input_size,
                                            args.batch, args.loader_workers)
        print(f"(b) one epoch over a paper-size memory-mapped cache: {args.sizes[0]:,} + {args.sizes[1]:,} images at "
              f"{args.image_size} px = {cache_mib:.0f} MiB of cache files; tiny_cnn at {args.input_size} px, batch "
              f"{args.batch}, {args.loader_workers} loader workers (pid {os.getpid()})")
        print(f"{'process':>16} {'peak RSS':>9} {'RssAnon':>8} {'RssFile':>8} {'anon/cache':>11} {'peak/cache':>11}")
        for name, f in rows:
            print(f"{name:>16} {f['VmHWM']:8.0f}M {f['RssAnon']:7.0f}M {f['RssFile']:7.0f}M "
                  f"{f['RssAnon'] / cache_mib:11.2f} {f['VmHWM'] / cache_mib:11.2f}")
        if not args.skip_demo:
            peak_one, peak_sum, seconds, command = demo_peak(args.demo_set, root / "demo")
            print(f"\n(a) {command}\n    peak RSS of the largest process: {peak_one:.0f} MiB; largest RSS summed over "
                  f"the processes alive at once: {peak_sum:.0f} MiB; wall {seconds:.0f} s")


if __name__ == "__main__":
    main()
