"""The benchmark scripts run on tiny settings: the GPU one on CPU (``--smoke``) and without CUDA, the demo profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


@pytest.mark.slow
def test_gpu_throughput_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--json", str(out)], check=False,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "e2e/bare" in result.stdout and "runs/hour" in result.stdout
    assert out.is_file()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_throughput_without_cuda_measures_nothing() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT)], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: nothing measured" in result.stdout


@pytest.mark.slow
def test_demo_profile_figures_add_up(tmp_path: Path) -> None:
    """A tiny demo (2 runs of 2 epochs): every share in [0, 1], the timed phases cover the wall time, the runs'
    phases fit in their wall time and forward + backward is the headline."""
    out = tmp_path / "profile.json"
    script = SCRIPT.with_name("demo_profile.py")
    result = subprocess.run([sys.executable, str(script), "--smoke", "--set", "grid.strategies=[stl_prognosis,mdmt]",
                             "--json", str(out)], check=False, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "forward + backward" in result.stdout
    figures = json.loads(out.read_text())
    assert (figures["runs"], figures["runs_not_done"], figures["epochs"], figures["workers"]) == (2, 0, 4, 2)
    core, share, total = figures["core_s"], figures["share"], figures["wall_s"] * figures["workers"]
    assert all(0.0 <= value <= 1.0 for value in share.values()), share
    assert sum(core.values()) == pytest.approx(total, rel=1e-6)
    # setup is the wall time no timed phase (twin, caches, grid, report) claims: it must stay small
    assert share["setup"] < 0.05
    # the runs' phases and overhead are their store wall seconds, which fit in the grid's core time
    in_runs = sum(v for k, v in core.items() if k.startswith("grid: ") and k != "grid: idle")
    assert in_runs == pytest.approx(figures["run_wall_s"], rel=1e-6)
    assert figures["run_wall_s"] <= figures["phase_wall_s"]["grid"] * figures["workers"]
    assert core["grid: forward"] > 0 and core["grid: backward"] > 0
    model = core["grid: forward"] + core["grid: backward"] + core["grid: eval_forward"]
    assert figures["forward_backward_share"] == pytest.approx(model / total)
    assert figures["target"] == 0.7 and figures["met"] == (figures["forward_backward_share"] >= 0.7)


def _grid_cost():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grid_cost", SCRIPT.with_name("grid_cost.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_cost_counts_the_runs_the_grid_trains(official_splits_dir: Path) -> None:
    """The projection prices the runs ``mdmt grid --config paper`` trains: per backbone 11 STL τ1, FT and MDMT runs
    and only 5 STL τ2 runs (every LOCO fold pairs with BrixIA's fold 0); sizes counted in the split files."""
    cost = _grid_cost()
    for splits in (official_splits_dir, None):
        config, specs = cost.paper_grid(splits)
        per_strategy = {name: sum(s.strategy == name and s.backbone == "resnet18" for s in specs)
                        for name in config.grid.strategies}
        assert per_strategy == {"stl_prognosis": 11, "stl_severity": 5, "ft": 11, "mdmt": 11}
    config, specs = cost.paper_grid(official_splits_dir)
    lines = {part: len((official_splits_dir / "AFC" / "5" / "0" / f"{part}.txt").read_text().splitlines()) - 1
             for part in ("train", "val")}
    first = next(s for s in specs if s.strategy == "stl_prognosis" and s.protocol == "official-cv5" and s.fold == 0)
    assert cost.images_per_epoch(config, first, official_splits_dir) == lines["train"] + lines["val"] / 3
    mdmt = next(s for s in specs if s.strategy == "mdmt" and s.protocol == "official-loco" and s.fold == 2)
    brixia = cost.train_val("brixia", "official-cv5", 0, config, official_splits_dir)
    assert cost.images_per_epoch(config, mdmt, official_splits_dir) == pytest.approx(
        sum(cost.train_val("aiforcovid", "official-loco", 2, config, official_splits_dir)[i] / (1, 3)[i]
            for i in (0, 1)) + brixia[0] + brixia[1] / 3)
