"""The grid runner: expansion and order, skip/resume, failure isolation, parallel workers, Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
from test_store import write_fake_run

from mdmt.config import Config, load_config, parse_override
from mdmt.errors import ConfigError
from mdmt.experiments.grid import cpu_count, expand_grid, run_grid
from mdmt.runs import RunSpec
from mdmt.store import FAILED_FILE, ResultsStore
from mdmt.train.strategies import dependencies

CALLS = "calls.log"
CONTROL = "control.json"


def make_config(results: Path | str, *overrides: str) -> Config:
    return load_config(None, [parse_override(o) for o in (f"results_dir={results}", *overrides)])


def small_config(results: Path) -> Config:
    """One backbone, 3 CV folds, 2 LOCO centers, MDMT from the STL average: 18 runs."""
    return make_config(results, "protocol.cv_folds=3", "protocol.loco_centers=[A, B]",
                       "strategies.mdmt.params.start_from=[stl_prognosis, stl_severity]", "grid.backbones=[net_a]")


def fake_run(config: Config, spec: RunSpec, progress: bool = True) -> Path:
    """Stands in for train_run: checks its dependencies are done, logs the call, obeys control.json, writes a run."""
    import torch

    results = Path(config.results_dir)
    for dep in dependencies(spec, config):
        if not (dep.run_dir(results) / "DONE").is_file():
            raise RuntimeError(f"{spec.key} started before its dependency {dep.key}")
    control = json.loads((results / CONTROL).read_text()) if (results / CONTROL).is_file() else {}
    with open(results / CALLS, "a") as log:
        log.write(json.dumps({"key": spec.key, "start": time.time(), "threads": torch.get_num_threads()}) + "\n")
    if spec.key in control.get("fail", []):
        raise ValueError(f"boom in {spec.key}")
    if len(calls(results)) == control.get("interrupt_at"):
        raise KeyboardInterrupt  # as if the machine stopped in the middle of this run
    time.sleep(control.get("sleep", 0.0))
    run_dir = write_fake_run(results, spec)
    with open(results / CALLS, "a") as log:
        log.write(json.dumps({"key": spec.key, "end": time.time()}) + "\n")
    return run_dir


def calls(results: Path) -> list[dict]:
    path = results / CALLS
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [line for line in lines if "start" in line]


def dependants_of(failed: RunSpec, specs: list[RunSpec], config: Config) -> set[str]:
    """Keys of every run that needs ``failed``, directly or through another run."""
    out: set[str] = set()
    for spec in specs:  # dependency order: a dependant's own dependencies come earlier
        if any(d == failed or d.key in out for d in dependencies(spec, config)):
            out.add(spec.key)
    return out


# --------------------------------------------------------------------------------------------- expansion
def test_paper_grid_counts_and_dependencies_first(tmp_path):
    config = make_config(tmp_path, "grid.backbones=[b1, b2]", "grid.seeds=[0, 1]",
                         "strategies.mdmt.params.start_from=[stl_prognosis, stl_severity]")
    specs = expand_grid(config)
    folds = config.protocol.cv_folds + len(config.protocol.loco_centers)  # 5 + 6
    prognosis_runs = 3 * folds  # stl_prognosis, ft, mdmt on every CV and LOCO fold
    severity_runs = config.protocol.cv_folds  # BrixIA CV folds only (LOCO pairs with one of them)
    assert len(specs) == 2 * 2 * (prognosis_runs + severity_runs)
    assert len({s.key for s in specs}) == len(specs)
    position = {spec: i for i, spec in enumerate(specs)}
    for spec in specs:
        for dep in dependencies(spec, config):
            assert position[dep] < position[spec], f"{dep.key} must come before {spec.key}"
    assert {s.protocol for s in specs if s.strategy == "stl_severity"} == {"cv5"}


def test_dependencies_are_added_when_not_requested(tmp_path):
    config = make_config(tmp_path, "grid.strategies=[ft]", "grid.protocols=[loco]", "protocol.paired_cv_fold=2")
    specs = expand_grid(config)
    assert specs[0] == RunSpec("stl_severity", "resnet18", "cv5", 2, 0)
    assert [s.fold for s in specs[1:]] == list(range(len(config.protocol.loco_centers)))
    assert {s.strategy for s in specs[1:]} == {"ft"}


def test_severity_on_loco_is_its_paired_cv_fold(tmp_path):
    config = make_config(tmp_path, "grid.strategies=[stl_severity]", "grid.protocols=[loco, cv5]",
                         "grid.folds=[0, 3]")
    assert expand_grid(config) == [RunSpec("stl_severity", "resnet18", "cv5", f, 0) for f in (0, 3)]


def test_a_fold_the_protocol_lacks_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="loco"):
        expand_grid(make_config(tmp_path, "grid.protocols=[loco]", "grid.folds=[6]"))


# --------------------------------------------------------------------------------------------- running
def test_runs_everything_once_and_skips_done_runs(tmp_path):
    config = small_config(tmp_path)
    specs = expand_grid(config)
    assert len(specs) == 18
    summary = run_grid(config, run_fn=fake_run, progress=False)
    assert summary.ok and summary.completed == [s.key for s in specs]
    assert [c["key"] for c in calls(tmp_path)] == [s.key for s in specs]
    assert set(summary.run_seconds) == set(summary.completed)
    assert 0 < sum(summary.run_seconds.values()) < summary.seconds
    again = run_grid(config, run_fn=fake_run, progress=True)
    assert len(calls(tmp_path)) == len(specs)
    assert again.completed == [] and len(again.already_done) == len(specs)
    runs = ResultsStore(tmp_path).runs("done")
    assert sorted(runs["key"]) == sorted(s.key for s in specs)


def test_rerun_after_a_crash_runs_only_what_is_missing(tmp_path):
    config = small_config(tmp_path)
    specs = expand_grid(config)
    (tmp_path / CONTROL).write_text(json.dumps({"interrupt_at": 3}))
    with pytest.raises(KeyboardInterrupt):
        run_grid(config, run_fn=fake_run, progress=False)
    assert ResultsStore(tmp_path).runs("running")["key"].tolist() == [specs[2].key]
    (tmp_path / CONTROL).unlink()

    summary = run_grid(config, run_fn=fake_run, progress=False)
    second_session = [c["key"] for c in calls(tmp_path)][3:]
    assert second_session == [s.key for s in specs[2:]]
    assert summary.already_done == [s.key for s in specs[:2]]
    assert summary.ok and len(ResultsStore(tmp_path).runs("done")) == len(specs)


def test_a_failed_run_skips_its_dependants_only(tmp_path):
    config = small_config(tmp_path)
    specs = expand_grid(config)
    broken = RunSpec("stl_severity", "net_a", "cv5", 0, 0)
    (tmp_path / CONTROL).write_text(json.dumps({"fail": [broken.key]}))
    summary = run_grid(config, run_fn=fake_run, progress=False)
    skipped = dependants_of(broken, specs, config)
    assert len(skipped) == 6  # ft and mdmt on cv5 fold 0 and on both LOCO folds
    assert list(summary.failed) == [broken.key] and "boom" in summary.failed[broken.key]
    assert set(summary.skipped) == skipped
    assert set(summary.completed) == {s.key for s in specs} - skipped - {broken.key}
    store = ResultsStore(tmp_path)
    assert store.runs("failed")["error"].item().strip().endswith(f"ValueError: boom in {broken.key}")
    assert (broken.run_dir(tmp_path) / FAILED_FILE).is_file()

    (tmp_path / CONTROL).unlink()
    retry = run_grid(config, run_fn=fake_run, progress=False)
    assert set(retry.completed) == skipped | {broken.key}
    assert retry.ok and store.runs("failed").empty


def _max_overlap(results: Path) -> int:
    lines = [json.loads(line) for line in (results / CALLS).read_text().splitlines()]
    events = sorted((line.get("start", line.get("end")), 1 if "start" in line else -1) for line in lines)
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_two_workers_complete_the_same_runs_as_one(tmp_path):
    serial, parallel = small_config(tmp_path / "serial"), small_config(tmp_path / "parallel")
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / CONTROL).write_text(json.dumps({"sleep": 0.3}))
    one = run_grid(serial, workers=1, run_fn=fake_run, progress=False)
    two = run_grid(parallel, workers=2, run_fn=fake_run, progress=False)
    assert two.ok and sorted(two.completed) == sorted(one.completed)
    assert _max_overlap(tmp_path / "parallel") == 2
    assert {c["threads"] for c in calls(tmp_path / "parallel")} == {max(1, cpu_count() // 2)}


def where_and_what(config: Config, spec: RunSpec, progress: bool = True) -> Path:
    """A run that records the folder it works in, an environment variable and whether it imported the engine."""
    run_dir = write_fake_run(config.results_dir, spec)
    (run_dir / "seen.json").write_text(json.dumps({"cwd": os.getcwd(), "mark": os.environ.get("MDMT_TEST_MARK"),
                                                   "engine_imported": "mdmt.train.run" in sys.modules,
                                                   "pid": os.getpid()}))
    return run_dir


def test_workers_see_the_grids_folder_and_environment_of_each_call(tmp_path, monkeypatch):
    """Workers are spawned for each grid: what the grid's process changed before the call (its folder, its
    environment) reaches every run, and a run finds the engine imported (its function's module imports it)."""
    seen = {}
    for call in ("first", "second"):
        here = tmp_path / call
        here.mkdir()
        monkeypatch.chdir(here)
        monkeypatch.setenv("MDMT_TEST_MARK", call)
        config = make_config("results", "grid.strategies=[stl_prognosis]", "grid.protocols=[cv5]",
                             "protocol.cv_folds=3", "grid.backbones=[net_a]")
        assert run_grid(config, workers=2, run_fn=where_and_what, progress=False).ok
        seen[call] = [json.loads(p.read_text()) for p in (here / "results").rglob("seen.json")]
        assert len(seen[call]) == 3
        assert {s["cwd"] for s in seen[call]} == {str(here)} and {s["mark"] for s in seen[call]} == {call}
        assert all(s["engine_imported"] and s["pid"] != os.getpid() for s in seen[call])


def test_unknown_backend_and_missing_ray_are_config_errors(tmp_path, monkeypatch):
    config = small_config(tmp_path)
    with pytest.raises(ConfigError, match="backend"):
        run_grid(config, backend="nope", run_fn=fake_run, progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"mdmt\[ray\]"):
        run_grid(config, backend="ray", run_fn=fake_run, progress=False)


@pytest.mark.slow  # starting a local Ray cluster takes 7-20 s on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'mdmt[ray]')")
def test_ray_backend_completes_the_grid(tmp_path):
    import ray

    config = small_config(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    try:
        summary = run_grid(config, workers=2, backend="ray", run_fn=fake_run, progress=False)
    finally:
        ray.shutdown()
    assert summary.ok and sorted(summary.completed) == sorted(s.key for s in expand_grid(config))
    assert {c["threads"] for c in calls(tmp_path)} == {1}  # 2 CPUs / 2 workers


# --------------------------------------------------------------------------------------------- the lock
def test_a_second_grid_on_the_same_results_folder_stops_at_once(tmp_path):
    from mdmt.experiments.grid import grid_lock

    config = small_config(tmp_path)
    with grid_lock(tmp_path):
        with pytest.raises(ConfigError, match=f"another mdmt grid is running on {tmp_path} \\(pid {os.getpid()}\\)"):
            run_grid(config, run_fn=fake_run, progress=False)
        assert calls(tmp_path) == []
    summary = run_grid(config, run_fn=fake_run, progress=False)  # released: the next grid runs
    assert summary.ok and len(calls(tmp_path)) == len(expand_grid(config))


def test_loco_folds_come_from_the_centers_in_the_data(tmp_path):
    config = make_config(tmp_path, "grid.strategies=[stl_prognosis]", "grid.protocols=[loco]",
                         "protocol.loco_centers=[A, B]")
    assert [s.fold for s in expand_grid(config)] == [0, 1]
    assert [s.fold for s in expand_grid(config, centers=["A", "B", "Z"])] == [0, 1, 2]


def test_the_grid_prepares_each_dataset_once_and_its_runs_open_those_caches(tiny_config, tmp_path, monkeypatch):
    import dataclasses

    from mdmt.train import run as run_module

    def no_prepare(*args: object, **kwargs: object) -> None:
        raise AssertionError("a grid run prepared its datasets again")

    monkeypatch.setattr(run_module, "prepare", no_prepare)
    config = dataclasses.replace(
        tiny_config, results_dir=str(tmp_path),
        train=dataclasses.replace(tiny_config.train, max_epochs=1, warmup_epochs=0),
        grid=dataclasses.replace(tiny_config.grid, backbones=["tiny_cnn"], strategies=["stl_prognosis", "mdmt"],
                                 protocols=["cv5"], folds=[0], seeds=[0], workers=1))
    summary = run_grid(config, progress=False)
    assert summary.ok and len(summary.completed) == 2, summary.failed
