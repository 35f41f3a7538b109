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
