"""What checking an image cache's content costs (``mdmt.cache.image_cache.verify_images``: the sha256 of ``images.u8``).

(a) The demo: its twin and caches (shipped ``demo`` config), then one of its runs (``stl_prognosis``, cv5 fold 0)
    started as a grid worker starts it (the caches opened by path, so the run checks them). The run's start-up is
    its wall time less its epochs (``history.csv``): caches, splits, loaders, model, then the test predictions
    and metrics.
(b) A paper-sized cache: 6,280 uint8 images of 256 px (392.5 MiB; AIforCOVID's 1,585 + BrixIA's 4,695 films),
    random bytes written to a temporary folder (what is hashed does not matter, its size does). The file was just
    written, so it is read from the page cache; a cold read adds the disk's own time. sha256 is what the cache
    records; blake2b, the other fast hash of hashlib, is shown for comparison. The second check in a process finds
    the file unchanged (same size and modification time) and hashes nothing. Its share: against the start-up of
    the demo run of (a), as if that run had opened a paper-sized cache.

    python benchmarks/cache_checksum.py [--images 6280] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from mdmt.cache import image_cache as cache_module
from mdmt.cache.image_cache import (
    IMAGES_CHECKSUM,
    IMAGES_FILE,
    ImageCache,
    verify_images,
)
from mdmt.cache.preprocess import file_sha256
from mdmt.cli import config_path
from mdmt.config import PluginRef, load_config
from mdmt.data.datasets import prepare
from mdmt.demo import twin_datasets
from mdmt.runs import HISTORY_FILE, RunSpec
from mdmt.synth import generate
from mdmt.train.run import train_run

console = Console(width=120)
CHUNK = 2**20


def blake2b_file(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def seconds(run: Callable[[], object], repeats: int, before: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of ``repeats`` calls (``before`` runs, untimed, ahead of each)."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_cache(folder: Path) -> ImageCache:
    """An ImageCache of ``folder/images.u8`` with its checksum: all ``verify_images`` reads."""
    empty = pd.DataFrame()
    meta = {IMAGES_CHECKSUM: file_sha256(folder / IMAGES_FILE)}
    return ImageCache(folder, "bench", np.empty(0, np.uint8), empty, empty, meta, empty, empty)


def paper_sized(scratch: Path, n_images: int, size: int, repeats: int, startup: float) -> Table:
    folder = scratch / "paper"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / IMAGES_FILE, "wb") as out:
        for start in range(0, n_images, 256):
            out.write(rng.integers(0, 256, (min(256, n_images - start), size, size), dtype=np.uint8).tobytes())
    mib = (folder / IMAGES_FILE).stat().st_size / 2**20
    cache = bare_cache(folder)
    console.print(f"(b) {n_images:,} images of {size} px ({mib:.1f} MiB), read from the page cache, median of "
                  f"{repeats}; share: of the demo run's start-up in (a)")
    table = Table()
    for column in ("check", "seconds", "MB/s", "share"):
        table.add_column(column, justify="left" if column == "check" else "right")
    rows = {
        "sha256 (file_sha256)": seconds(lambda: file_sha256(folder / IMAGES_FILE), repeats),
        "blake2b (hashlib)": seconds(lambda: blake2b_file(folder / IMAGES_FILE), repeats),
        "verify_images, first in a process": seconds(lambda: verify_images(cache), repeats,
                                                     before=cache_module._VERIFIED.clear),
        "verify_images, again (unchanged file)": seconds(lambda: verify_images(cache), repeats),
    }
    for name, value in rows.items():
        rate = f"{mib * 2**20 / value / 1e6:,.0f}" if "again" not in name else "—"
        table.add_row(name, f"{value:.4f}" if value >= 1e-3 else f"{value * 1e6:.0f} µs", rate,
                      f"{value / startup:.2%}")
    return table


def demo_run(scratch: Path) -> tuple[Table, float]:
    config = load_config(config_path("demo"))
    data_dir, s = scratch / "demo" / "data", config.synth
    generate(data_dir, preset=s.preset, seed=s.seed, image_size=s.image_size, progress=False)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, datasets=twin_datasets(config, data_dir),
                                         cache_dir=str(scratch / "demo" / "cache")),
        results_dir=str(scratch / "demo" / "results"))
    caches = prepare(config, progress=False)
    check = {}
    for name, cache in caches.items():
        cache_module._VERIFIED.clear()
        start = time.perf_counter()
        verify_images(cache)
        check[name] = (time.perf_counter() - start, (cache.path / IMAGES_FILE).stat().st_size / 2**20)
    cache_module._VERIFIED.clear()  # the run checks its cache as a grid worker's first run does
    spec = RunSpec("stl_prognosis", PluginRef.of(config.model.backbone).name, "cv5", 0, 0)
    start = time.perf_counter()
    run_dir = train_run(config, spec, progress=False, caches={name: str(c.path) for name, c in caches.items()})
    wall = time.perf_counter() - start
    epochs = float(pd.read_csv(run_dir / HISTORY_FILE)["seconds"].sum())
    startup = wall - epochs
    console.print(f"(a) the demo: one run ({spec.key}): wall {wall:.2f} s, epochs {epochs:.2f} s, start-up and "
                  f"end {startup:.2f} s; each cache's first check in a process")
    table = Table()
    for column in ("cache", "MiB", "check s", "share of the run's start-up"):
        table.add_column(column, justify="left" if column == "cache" else "right")
    for name, (value, mib) in check.items():
        table.add_row(name, f"{mib:.1f}", f"{value:.4f}", f"{value / startup:.2%}")
    return table, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6280)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1-minute load "
                  f"{os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="mdmt-checksum-") as scratch:
        demo, startup = demo_run(Path(scratch))
        console.print(demo)
        console.print(paper_sized(Path(scratch), args.images, args.size, args.repeats, startup))
    console.print(f"1-minute load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
