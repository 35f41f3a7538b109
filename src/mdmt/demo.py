"""The main job on built-in data: synthetic twin → caches → STL/FT/MDMT grid → statistics → report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console

from mdmt.config import Config, PluginRef, save_config

COHORT_MANIFEST = "COHORT/manifest.csv"
"""Where the twin writes its third dataset (``synth.cohort``)."""

console = Console()


def _synthetic_data(config: Config, data_dir: Path) -> None:
    """Generate the synthetic twin unless the same parameters and generator version already produced ``data_dir``."""
    from mdmt.synth import GENERATOR_VERSION, generate

    params = dataclasses.asdict(config.synth) | {"generator_version": GENERATOR_VERSION}
    params.pop("out")
    stamp = data_dir / "demo-params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        console.print(f"synthetic data: reusing {data_dir}")
        return
    s = config.synth
    summary = generate(data_dir, preset=s.preset, seed=s.seed, decoupled=s.decoupled, faults=s.faults,
                       opacity=s.opacity, cohort=s.cohort, image_size=s.image_size, workers=config.runtime.workers)
    if hasattr(summary, "table"):
        console.print(summary.table())
    stamp.write_text(json.dumps(params))


def twin_datasets(config: Config, data_dir: Path) -> dict[str, PluginRef]:
    """``data.datasets`` pointing at the twin in ``data_dir`` (the cohort's table options come from the config)."""
    datasets = {
        "aiforcovid": PluginRef("aiforcovid", {"root": str(data_dir / "AIforCOVID")}),
        "brixia": PluginRef("brixia", {"root": str(data_dir / "BRIXIA")}),
    }
    if config.synth.cohort:
        cohort = PluginRef.of(config.data.datasets.get("cohort", PluginRef("table"))).named("table")
        datasets["cohort"] = PluginRef(cohort.name, {**cohort.params, "path": str(data_dir / COHORT_MANIFEST)})
    return datasets


def run_demo(config: Config, out: Path) -> Path:
    """Run the whole study on the synthetic twin under ``out``; returns the report path."""
    from mdmt.experiments.grid import run_grid

    start = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    console.rule("1/3 synthetic AIforCOVID + BrixIA twin" + (" + cohort" if config.synth.cohort else ""))
    _synthetic_data(config, data_dir)

    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, datasets=twin_datasets(config, data_dir), cache_dir=str(out / "cache")),
        results_dir=str(out / "results"),
    )
    save_config(config, out / "config.yaml")

    console.rule("2/3 image caches and training grid")
    summary = run_grid(config, workers=config.grid.workers, backend=config.grid.backend)
    console.print(summary)
    for line in summary.problems():
        console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)

    console.rule("3/3 statistics and report")
    from mdmt.evaluate.report import (  # matplotlib: 0.4 s, needed here only
        build_report,
        collect,
        headline_table_text,
    )

    data = collect(config.results_dir)
    report = build_report(config.results_dir, out / "report", data=data)
    console.print(headline_table_text(config.results_dir, data=data))
    console.print(f"[green]report: {report.resolve()}  ({time.perf_counter() - start:.0f} s in all)")
    return report
