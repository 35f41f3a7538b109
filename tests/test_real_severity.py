"""Synthetic-to-real pretraining: the shipped stage chain (``real_severity``) and the twin stage of
``benchmarks/severity_real.py``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdmt.cli import config_path
from mdmt.config import load_config, parse_override
from mdmt.experiments.grid import expand_grid
from mdmt.sources.tables import SYNTHETIC_MARKER
from mdmt.train.strategies import dependencies, get_strategy

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "severity_real.py"


def test_the_shipped_chain_starts_each_real_fold_from_the_twin_run_of_its_fold_and_seed():
    config = load_config(config_path("real_severity"))
    runs = expand_grid(config)
    by_strategy = {name: [r for r in runs if r.strategy == name]
                   for name in ("twin_severity", "real_from_twin", "real_scratch")}
    assert {name: len(found) for name, found in by_strategy.items()} == dict.fromkeys(by_strategy, 15)
    order = {run: i for i, run in enumerate(runs)}
    for run in by_strategy["real_from_twin"]:
        get_strategy(run.strategy, config).check(run, config)
        (parent,) = dependencies(run, config)
        assert (parent.strategy, parent.protocol, parent.fold, parent.seed) == ("twin_severity", "cv5", run.fold,
                                                                                run.seed)
        assert order[parent] < order[run]  # the twin stage trains first
    assert all(not dependencies(run, config) for run in by_strategy["real_scratch"])
    assert get_strategy("twin_severity", config).max_epochs(config) == 60
    assert get_strategy("real_from_twin", config).max_epochs(config) == config.train.max_epochs == 1000


@pytest.fixture()
def benchmark(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("severity_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "severity_real", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the yardstick trains on one thread


def test_a_fold_starts_from_the_pretrained_backbone_with_a_fresh_head(benchmark, tmp_path: Path):
    overrides = [*benchmark.YARDSTICK, "data.image_size=32", "model.input_size=32", "data.crop=none",
                 "train.max_epochs=1", f"data.cache_dir={tmp_path}", "runtime.workers=0"]
    config = load_config(None, [parse_override(o) for o in overrides])
    twin = benchmark.twin_films(config, "tiny")
    marker = tmp_path / f"twin-tiny-seed{benchmark.TWIN_SEED}" / SYNTHETIC_MARKER
    written = marker.stat().st_mtime_ns
    assert len(benchmark.twin_films(config, "tiny").cache) == len(twin.cache) == 48
    assert marker.stat().st_mtime_ns == written  # the twin is written once, then reused
    start, line = benchmark.pretrain(config, twin, 0)
    assert line.startswith("seed 0 twin pretraining: 38 train, 10 val; best epoch 1 of 1")
    kept, line = benchmark.pretrain(config, twin, 0)  # a later lever reuses the stage
    assert "reused" in line and all(torch.equal(kept[key], value) for key, value in start.items())

    still = load_config(None, [*(parse_override(o) for o in overrides), parse_override("train.lr=1e-12")])
    rows = np.arange(len(twin.cache))

    def gaps(model: torch.nn.Module) -> dict[str, float]:
        """The largest change of any backbone and of any head weight from ``start`` (BatchNorm's running
        statistics move in training whatever the learning rate)."""
        out = {"backbone": 0.0, "head": 0.0}
        for key, value in model.named_parameters():
            part = "backbone" if key.startswith("backbone.") else "head"
            out[part] = max(out[part], float((value.detach() - start[key]).abs().max()))
        return out

    started = gaps(benchmark.train_model(still, twin, rows, 1, start)[0])
    assert started["backbone"] < 1e-6 and started["head"] > 1e-3  # the backbone loaded, the head drawn afresh
    assert gaps(benchmark.train_model(still, twin, rows, 1)[0])["backbone"] > 1e-3  # without a start: fresh


def test_compare_runs_the_paired_one_tailed_wilcoxon_over_the_seed_fold_maes(benchmark, tmp_path: Path):
    """Six (seed, fold) models, each 0.1·k lower in the run: all lower, exact p = 1/2^6; other films refused."""
    def write(name: str, shift: float, ids: tuple[str, ...] = ("a", "b")) -> Path:
        rows = [{"seed": seed, "fold": fold, "image_id": f"{image_id}{seed}{fold}", "true_global": 6.0,
                 "pred_global": 6.0 + 1.0 - shift * (3 * seed + fold + 1)}
                for seed in (0, 1) for fold in range(3) for image_id in ids]
        path = tmp_path / name
        path.write_text(json.dumps({"predictions": rows}))
        return path

    line = benchmark.compare(write("run.json", 0.1), write("base.json", 0.0))
    assert "over 6 (seed, fold) global MAEs" in line and "lower in 6 of 6" in line
    assert float(line.split("p=")[1].split(";")[0]) == pytest.approx(1 / 64, abs=1e-4)
    with pytest.raises(SystemExit, match="did not score the same films"):
        benchmark.compare(write("other.json", 0.1, ("a", "c")), write("base.json", 0.0))
