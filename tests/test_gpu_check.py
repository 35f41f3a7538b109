"""benchmarks/gpu_check.py: every step on CPU (``--smoke``), a step past its time limit, the grid's counts, and
grid_cost.py's use of the measured GPU figures."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _finite(value: object) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, (int, float)) or math.isfinite(value)


def test_smoke_runs_every_step_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), str(out), "--smoke"], check=False,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 step(s) failed" in result.stdout
    check_smoke_figures(out)


def check_smoke_figures(out: Path) -> None:
    """Every step of a ``--smoke`` run into ``out`` ok, with finite figures of the smoke sizes."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True and summary["device"] == "CPU" and summary["torch"]
    assert set(summary["steps"]) == {"throughput", "grid", "bf16", "torchrun"}
    for name, step in summary["steps"].items():
        record = json.loads((out / f"{name}.json").read_text())
        assert (step["status"], record["status"], record["error"]) == ("ok", "ok", None), name
        assert record["seconds"] == step["seconds"] > 0 and _finite(record), name

    throughput = json.loads((out / "throughput.json").read_text())
    assert throughput["smoke"] is True and throughput["size"] == 64
    assert set(throughput["bare"]) == set(throughput["end_to_end"]) == {"tiny_cnn"}
    assert throughput["end_to_end"]["tiny_cnn"] > 0 and throughput["runs_per_hour"]["tiny_cnn"]["2"] > 0

    grid = json.loads((out / "grid.json").read_text())
    assert grid["runs"] == 2 and set(grid["metrics"]) == {"stl_prognosis/tiny_cnn/cv5/fold0/seed0",
                                                          "mdmt/tiny_cnn/cv5/fold0/seed0"}
    assert grid["first"] == {"already_done": 0, "completed_now": 2, "failed": 0, "skipped": 0}
    assert grid["second"] == {"already_done": 2, "completed_now": 0, "failed": 0, "skipped": 0}
    assert all(0.0 <= m["roc_auc"] <= 1.0 for m in grid["metrics"].values())
    assert all(h["epochs"] == 1 and h["losses_finite"] for h in grid["history"].values())

    bf16 = json.loads((out / "bf16.json").read_text())
    for mode in ("bf16", "fp32"):
        assert len(bf16[mode]["losses"]) == 3 and bf16[mode]["images_per_s"] > 0
        assert bf16[mode]["autocast"] is False  # bf16 autocast is for CUDA only: the CPU runs both in fp32
        assert bf16[mode]["diverged"] is False
    assert bf16["bf16"]["losses"] == bf16["fp32"]["losses"]  # the same seeded batches and model

    torchrun = json.loads((out / "torchrun.json").read_text())
    assert (torchrun["nproc"], torchrun["ddp"], torchrun["history"]["epochs"]) == (1, False, 1)
    assert set(torchrun["metrics"]) == {"accuracy", "roc_auc", "sensitivity", "specificity", "f1_weighted"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_nothing_runs_and_the_exit_code_says_so(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), str(tmp_path)], check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["cuda"], summary["steps"], summary["smoke"]) == (False, {}, False)
    assert summary["error"].startswith("no CUDA device") and summary["error"] in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path: Path) -> None:
    """The step's whole process group is killed at its limit; the record says so and the run goes on."""
    check = _script("gpu_check")
    sizes = dataclasses.replace(check.SMOKE, limits={"bf16": 1})
    start = time.perf_counter()
    record = check.run_step("bf16", tmp_path, sizes, smoke=True, nproc=1)
    assert time.perf_counter() - start < 10
    assert (record["status"], record["error"]) == ("failed", "timed out after 1 s")
    assert json.loads((tmp_path / "bf16.json").read_text()) == record
    assert "images_per_s" not in record
    left = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in _cmdline(p)]
    assert not left, "the step's process outlived its limit"


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return ""


def test_grid_counts_and_error_lines_are_read_from_the_output() -> None:
    check = _script("gpu_check")
    table = ("┃ status        ┃ runs ┃ which ┃\n│ already done  │    3 │       │\n│ completed now │    1 │       │\n"
             "│ failed        │    0 │       │\n│ skipped       │    0 │       │")
    assert check.grid_counts(table) == {"already_done": 3, "completed_now": 1, "failed": 0, "skipped": 0}
    with pytest.raises(ValueError, match="'skipped'"):
        check.grid_counts(table.rsplit("\n", 1)[0])
    torchrun = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nImportError: cannot import name 'f'\n"
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n=====\n")
    assert check.error_line(torchrun) == "ImportError: cannot import name 'f'"
    assert check.error_line("error: data.image_size: 7 is below 16\n") == "error: data.image_size: 7 is below 16"
    assert check.error_line("loading\nkilled\n\n") == "killed"
    with pytest.raises(ValueError, match="nan"):
        check.finite_numbers({"a": [1.0, {"b": float("nan")}]})
    assert check.finite_numbers({"a": [1, {"b": 2.5}], "c": "text"}) == [1.0, 2.5]


def test_grid_cost_projects_from_the_measured_gpu_figures(tmp_path: Path) -> None:
    """A measured anchor replaces the assumed one; smoke figures and figures at another size are refused."""
    cost = _script("grid_cost")
    measured = tmp_path / "throughput.json"
    measured.write_text(json.dumps({"status": "ok", "size": 256, "smoke": False, "device": "NVIDIA H100",
                                    "end_to_end": {"resnet50": 1500.0, "densenet121": 1200.0}}))
    gpu = cost.gpu_figures(measured, 256)
    assert gpu == {"resnet50": 1500.0, "densenet121": 1200.0}
    factor, source = cost.speedup("resnet50", 0.25, gpu, anchor_gpu=2000.0, fallback=2500.0)
    assert factor == pytest.approx(1500.0 * 0.25) and "measured" in source
    factor, source = cost.speedup("resnet50", 0.25, {}, anchor_gpu=2000.0, fallback=2500.0)
    assert factor == pytest.approx(2000.0 * 0.25) and "assumed" in source
    assert cost.speedup("resnet50", None, gpu, anchor_gpu=2000.0, fallback=2500.0)[0] == 2500.0
    assert cost.gpu_figures(None, 256) == {}
    with pytest.raises(SystemExit, match="measured at 256 px"):
        cost.gpu_figures(measured, 224)
    measured.write_text(json.dumps({"size": 64, "smoke": True, "end_to_end": {"resnet50": 3.0}}))
    with pytest.raises(SystemExit, match="smoke"):
        cost.gpu_figures(measured, 64)
    bare = tmp_path / "gpu_throughput.json"  # gpu_throughput.py --json itself names no size
    bare.write_text(json.dumps({"device": "NVIDIA H100", "end_to_end": {"resnet50": 1800}}))
    assert cost.gpu_figures(bare, 256) == {"resnet50": 1800.0}
