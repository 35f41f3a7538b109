"""Data pipeline throughput on the synthetic ``small`` preset (images/s, one table).

(a) decode + normalise + crop + resize every DICOM each time (what the official loader does per experiment),
(b) read the preprocessed cache into batches with ``CachedImageDataset`` + ``DataLoader`` (no augmentation),
(c) the same batches through the batched augmentation ``BatchAugmenter``.
Target: b/a >= 20.

    python benchmarks/data_pipeline.py [--data DIR] [--image-size 256] [--decode-images 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mdmt.cache.image_cache import build_cache
from mdmt.cache.preprocess import preprocess_image
from mdmt.config import AugmentConfig, DataConfig, RuntimeConfig, TrainConfig
from mdmt.data.augment import BatchAugmenter
from mdmt.data.batches import CachedImageDataset, MultiSourceDataset, make_loader
from mdmt.sources import read_aiforcovid, read_brixia
from mdmt.synth import generate
from mdmt.tasks import get_task

console = Console()


def images_per_second(run: Callable[[], int]) -> tuple[float, int, float]:
    """Run once; returns (images/s, images, seconds)."""
    start = time.perf_counter()
    count = run()
    seconds = time.perf_counter() - start
    return count / seconds, count, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, help="an existing synthetic root (default: generate `small` in a temp dir)"
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-images", type=int, default=300, help="images decoded for (a)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the cache for (b) and (c)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="mdmt-bench-") as scratch:
        root = args.data
        if root is None:
            root = Path(scratch) / "synthetic"
            start = time.perf_counter()
            generate(root, preset="small", seed=0)
            console.print(f"generated the small preset in {time.perf_counter() - start:.1f} s")
        sources = {"aiforcovid": read_aiforcovid(root / "AIforCOVID"), "brixia": read_brixia(root / "BRIXIA")}
        cfg = DataConfig(image_size=args.image_size)

        records = [table.records for table in sources.values()]
        decode_rows = [row for frame in records for row in frame[["path", "image_id"]].itertuples(index=False)]
        decode_rows = decode_rows[:: max(1, len(decode_rows) // args.decode_images)][: args.decode_images]

        def decode_every_time() -> int:
            for path, image_id in decode_rows:
                preprocess_image(path, image_id, cfg)
            return len(decode_rows)

        rate_a = images_per_second(decode_every_time)

        start = time.perf_counter()
        caches = [build_cache(table, cfg, Path(scratch) / "cache", progress=False) for table in sources.values()]
        build_seconds = time.perf_counter() - start
        n_cached = sum(len(cache) for cache in caches)

        task_of = {"aiforcovid": get_task("prognosis"), "brixia": get_task("severity_global4")}
        dataset = MultiSourceDataset(
            [
                CachedImageDataset(cache, range(len(cache)), [task_of[name]], source=i)
                for i, (name, cache) in enumerate(zip(sources, caches, strict=True))
            ]
        )
        loader = make_loader(dataset, TrainConfig(batch_size=args.batch_size), shuffle=True, seed=0,
                             runtime=RuntimeConfig(device="cpu"))
        augmenter = BatchAugmenter(AugmentConfig(), list(task_of.values()))
        generator = torch.Generator().manual_seed(0)

        def batches(augment: bool) -> Callable[[], int]:
            def run() -> int:
                count = 0
                for epoch in range(args.epochs):
                    loader.batch_sampler.set_epoch(epoch)
                    for batch in loader:
                        if augment:
                            augmenter(batch["image"].float() / 255.0, batch["targets"], generator)
                        count += len(batch["image"])
                return count

            return run

        rate_b = images_per_second(batches(augment=False))
        rate_c = images_per_second(batches(augment=True))

    table = Table(
        title=f"data pipeline, synthetic small, {args.image_size} px, batch {args.batch_size}, {args.threads} thread(s)"
    )
    for column in ("path", "images", "seconds", "images/s", "vs (a)"):
        table.add_column(column, justify="right" if column != "path" else "left")
    rows = [
        ("(a) decode+normalise+crop+resize", rate_a),
        ("(b) cache → dataset → batches", rate_b),
        ("(c) (b) + BatchAugmenter", rate_c),
    ]
    for label, (rate, count, seconds) in rows:
        table.add_row(label, str(count), f"{seconds:.2f}", f"{rate:,.0f}", f"{rate / rate_a[0]:.1f}×")
    console.print(table)
    console.print(f"cache build (one-off, {n_cached} images, in-process): {build_seconds:.1f} s")
    verdict = "[green]met" if rate_b[0] / rate_a[0] >= 20 else "[red]missed"
    console.print(f"target b/a >= 20: {verdict} ({rate_b[0] / rate_a[0]:.1f})")


if __name__ == "__main__":
    main()
