"""Lung localiser vs the synthetic ground-truth lung boxes: box IoU per dataset and per center.

Prints mean and 10th-percentile IoU, the share of images where the localiser failed soft (crop not
flagged ok) and the time per image. Target: mean IoU >= 0.85 (the segmenter: >= 0.90).
Real films: ``benchmarks/lung_real.py``.

    python benchmarks/lung_iou.py [--data DIR] [--preset small] [--seed 0] [--localiser segmenter|classical]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from mdmt.lungs.locate import localiser_iou, locate_lungs, locate_lungs_classical
from mdmt.synth import generate

DATASETS = ("aiforcovid", "brixia")
LOCALISERS = {"segmenter": locate_lungs, "classical": locate_lungs_classical}
console = Console()


def truth_table(root: Path, dataset: str) -> pd.DataFrame:
    """The generator's truth rows (id, center, true box) with absolute image paths."""
    truth = pd.read_csv(root / "_synthetic_truth" / f"{dataset}.csv", dtype={"image_id": str})
    return truth.assign(path=[str(root / p) for p in truth["path"]], dataset=dataset)


def summary(results: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """n, mean IoU, 10th percentile, fail-soft share (unreadable images excluded) per group."""
    readable = results[results["method"] != "unreadable"]
    grouped = readable.groupby(by, sort=True) if by else [("all", readable)]
    rows = []
    for key, group in grouped:
        rows.append(
            {
                "group": " / ".join(key) if isinstance(key, tuple) else str(key),
                "n": len(group),
                "mean IoU": group["iou"].mean(),
                "p10 IoU": group["iou"].quantile(0.1),
                "fail-soft": 1.0 - group["ok"].mean(),
            }
        )
    return pd.DataFrame(rows)


def print_table(title: str, frame: pd.DataFrame) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in frame.itertuples(index=False):
        group, n, mean, p10, failsoft = row
        table.add_row(group, str(n), f"{mean:.3f}", f"{p10:.3f}", f"{failsoft:.1%}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="an existing synthetic root (default: generate one in a temp dir)")
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--localiser", default="segmenter", choices=sorted(LOCALISERS))
    args = parser.parse_args()
    locate = LOCALISERS[args.localiser]

    with tempfile.TemporaryDirectory(prefix="mdmt-lung-iou-") as scratch:
        root = args.data
        if root is None:
            root = Path(scratch) / "synthetic"
            generate(root, preset=args.preset, seed=args.seed)
        start = time.perf_counter()
        results = pd.concat([localiser_iou(truth_table(root, name), locate=locate) for name in DATASETS],
                            ignore_index=True)
        seconds = time.perf_counter() - start

    print_table("lung box IoU per dataset / center", summary(results, ["dataset", "center"]))
    print_table("lung box IoU per dataset", summary(results, ["dataset"]))
    overall = summary(results, [])
    print_table("lung box IoU, all images", overall)
    unreadable = results[results["method"] == "unreadable"]
    if len(unreadable):
        console.print(f"unreadable (excluded): {', '.join(unreadable['image_id'])}")
    failed = results[~results["ok"] & (results["method"] != "unreadable")]
    for row in failed.itertuples():
        console.print(f"fail-soft {row.dataset} {row.image_id} ({row.center}): {row.note}")
    console.print(
        f"{len(results)} images, {1000 * seconds / len(results):.1f} ms per image (read + normalise + locate)"
    )
    target = 0.90 if args.localiser == "segmenter" else 0.85
    verdict = "[green]met" if overall["mean IoU"].iloc[0] >= target else "[red]missed"
    console.print(f"{args.localiser}: target mean IoU >= {target}: {verdict}")


if __name__ == "__main__":
    main()
