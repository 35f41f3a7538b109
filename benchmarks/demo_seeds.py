"""The demo over several twin seeds: prognosis accuracy per strategy and the paired comparisons, per seed and spread.

Reads the report of each demo folder (``report/headline.csv``, ``report/effects.csv``) and the twin's generator seed
from its ``config.yaml`` (``synth.seed``, else ``seed``); trains nothing. Accuracy is the report's per-fold mean.

    for s in 0 1 2 3; do mdmt demo --set synth.seed=$s --out demo-seed$s; done
    python benchmarks/demo_seeds.py demo-seed0 demo-seed1 demo-seed2 demo-seed3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

STRATEGIES = {"stl_prognosis": "STL", "ft": "FT", "mdmt_permuted": "MDMT, BrixIA labels permuted", "mdmt": "MDMT"}
PROTOCOLS = {"cv5": "CV", "loco": "LOCO"}


def read_demo(folder: Path) -> tuple[int, pd.DataFrame, pd.DataFrame]:
    """The twin seed, accuracy in % per strategy × protocol, and the paired accuracy comparisons of one demo folder."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    seed = int(config["seed"] if config["synth"].get("seed") is None else config["synth"]["seed"])
    headline = pd.read_csv(folder / "report" / "headline.csv")
    headline = headline[headline["aggregation"] == "per-fold mean"].set_index("strategy")
    accuracy = pd.DataFrame({label: headline[f"{label} ACC"] * 100 for label in PROTOCOLS.values()})
    effects = pd.read_csv(folder / "report" / "effects.csv")
    effects = effects[effects["metric"] == "accuracy"].assign(points=lambda e: e["mean_diff"] * 100)
    return seed, accuracy.loc[list(STRATEGIES)], effects


def spread(values: pd.DataFrame, spec: str = ".1f") -> pd.Series:
    """``mean (min to max)`` per column of a seeds × columns table."""
    return values.apply(lambda c: f"{c.mean():{spec}} ({c.min():{spec}} to {c.max():{spec}})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="demo output folders (mdmt demo --out)")
    args = parser.parse_args()
    demos = sorted((read_demo(folder) for folder in args.folders), key=lambda demo: demo[0])
    seeds = [seed for seed, _, _ in demos]

    print("Prognosis accuracy % (per-fold mean) per twin seed")
    print("| strategy | " + " | ".join(f"{p} seed {s}" for p in PROTOCOLS.values() for s in seeds) + " |")
    print("|---" * (1 + len(seeds) * len(PROTOCOLS)) + "|")
    for strategy, label in STRATEGIES.items():
        cells = [f"{acc.loc[strategy, p]:.1f}" for p in PROTOCOLS.values() for _, acc, _ in demos]
        print(f"| {label} | " + " | ".join(cells) + " |")

    print(f"\nPrognosis accuracy %: mean (min to max) over twin seeds {', '.join(map(str, seeds))}")
    print("| strategy | " + " | ".join(PROTOCOLS.values()) + " |")
    print("|---" * (1 + len(PROTOCOLS)) + "|")
    for strategy, label in STRATEGIES.items():
        values = pd.DataFrame([acc.loc[strategy] for _, acc, _ in demos])
        print(f"| {label} | " + " | ".join(spread(values)) + " |")

    print("\nPaired accuracy comparisons (points, one-tailed paired t-test p, wins of n) per twin seed")
    print("| comparison | protocol | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (min to max) |")
    print("|---" * (3 + len(seeds)) + "|")
    first = demos[0][2]
    for comparison in dict.fromkeys(first["comparison"]):
        for protocol, label in PROTOCOLS.items():
            rows = [e[(e["comparison"] == comparison) & (e["protocol"] == protocol)].iloc[0] for _, _, e in demos]
            cells = [f"{r['points']:+.1f}, p = {r['p']:.2g}, {r['wins']}/{r['n']}" for r in rows]
            points = pd.DataFrame({"points": [r["points"] for r in rows]})
            print(f"| {comparison} | {label} | " + " | ".join(cells) + f" | {spread(points, '+.1f')['points']} |")


if __name__ == "__main__":
    main()
