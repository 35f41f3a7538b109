"""The SLURM backend through submitit's LocalExecutor: real runs in dependency order, failed and killed jobs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from test_grid import CONTROL, calls, fake_run, make_config

from mdmt.config import Config, SlurmConfig
from mdmt.errors import ConfigError
from mdmt.experiments.grid import run_grid
from mdmt.runs import RunSpec
from mdmt.store import FAILED_FILE, ResultsStore

pytest.importorskip("submitit", reason="submitit is not installed (pip install 'mdmt[slurm]')")

TESTS = Path(__file__).resolve().parent
LOCAL = ["grid.backend=slurm", "grid.slurm.executor=local", "grid.slurm.gpus_per_run=0", "grid.slurm.time_minutes=5"]


@pytest.fixture
def importable_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Job processes unpickle the fake run functions of this folder by module name."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def killable_run(config: Config, spec: RunSpec, progress: bool = True) -> Path:
    """``fake_run``, except that a key listed under ``kill`` in control.json dies as a cancelled job does."""
    control_file = Path(config.results_dir) / CONTROL
    if control_file.is_file() and spec.key in json.loads(control_file.read_text()).get("kill", []):
        os.kill(os.getpid(), signal.SIGKILL)
    return fake_run(config, spec, progress)


def fake_grid(results: Path, *strategies: str) -> Config:
    return make_config(results, f"grid.strategies=[{', '.join(strategies)}]", "grid.protocols=[cv5]",
                       "grid.folds=[0]", "grid.backbones=[net_a]", *LOCAL)


def test_a_real_grid_runs_as_jobs_in_dependency_order_and_a_second_call_skips_it(tiny_config, tmp_path):
    config = dataclasses.replace(
        tiny_config, results_dir=str(tmp_path),
        train=dataclasses.replace(tiny_config.train, max_epochs=1, warmup_epochs=0),
        grid=dataclasses.replace(tiny_config.grid, backbones=["tiny_cnn"], strategies=["stl_severity", "ft"],
                                 protocols=["cv5"], folds=[0], seeds=[0], workers=2, backend="slurm",
                                 slurm=SlurmConfig(executor="local", gpus_per_run=0, time_minutes=5)))
    summary = run_grid(config, workers=2, backend="slurm", progress=False)
    severity, ft = RunSpec("stl_severity", "tiny_cnn", "cv5", 0, 0), RunSpec("ft", "tiny_cnn", "cv5", 0, 0)
    assert summary.ok and summary.completed == [severity.key, ft.key], summary.failed
    runs = ResultsStore(tmp_path).runs("done").set_index("key")
    assert runs.loc[ft.key, "started"] >= runs.loc[severity.key, "finished"]
    assert len(list((tmp_path / "slurm").glob("*_log.out"))) == 2  # one job per run, its logs in grid.slurm.folder

    again = run_grid(config, workers=2, backend="slurm", progress=False)
    assert again.completed == [] and again.already_done == [severity.key, ft.key]
    assert len(list((tmp_path / "slurm").glob("*_log.out"))) == 2  # no job submitted


def test_a_failed_job_is_a_failed_run_and_a_rerun_submits_only_what_is_missing(tmp_path, importable_tests):
    config = fake_grid(tmp_path, "stl_prognosis", "stl_severity", "ft")
    severity = RunSpec("stl_severity", "net_a", "cv5", 0, 0)
    (tmp_path / CONTROL).write_text(json.dumps({"fail": [severity.key]}))
    summary = run_grid(config, workers=2, backend="slurm", run_fn=fake_run, progress=False)
    assert summary.completed == ["stl_prognosis/net_a/cv5/0/0"]
    assert summary.failed == {severity.key: f"SlurmJobError: ValueError: boom in {severity.key}"}
    assert summary.skipped == {"ft/net_a/cv5/0/0": [severity.key]}
    assert (severity.run_dir(tmp_path) / FAILED_FILE).is_file()
    assert ResultsStore(tmp_path).runs("failed")["error"].item().strip().endswith(f"boom in {severity.key}")

    (tmp_path / CONTROL).unlink()
    retry = run_grid(config, workers=2, backend="slurm", run_fn=fake_run, progress=False)
    assert retry.ok and retry.already_done == ["stl_prognosis/net_a/cv5/0/0"]
    assert retry.completed == [severity.key, "ft/net_a/cv5/0/0"]
    keys = [c["key"] for c in calls(tmp_path)]  # the first two ran at once
    assert sorted(keys[:2]) == sorted([*summary.completed, severity.key]) and keys[2:] == retry.completed


@pytest.mark.slow  # submitit waits 15 s for the result of a job that ended without one
def test_a_killed_job_is_a_failed_run_that_the_next_grid_runs_again(tmp_path, importable_tests):
    config = fake_grid(tmp_path, "stl_severity", "ft")
    severity = RunSpec("stl_severity", "net_a", "cv5", 0, 0)
    (tmp_path / CONTROL).write_text(json.dumps({"kill": [severity.key]}))
    summary = run_grid(config, workers=2, backend="slurm", run_fn=killable_run, progress=False)
    assert list(summary.failed) == [severity.key] and "ended without a result" in summary.failed[severity.key]
    assert summary.skipped == {"ft/net_a/cv5/0/0": [severity.key]}

    (tmp_path / CONTROL).unlink()
    retry = run_grid(config, workers=2, backend="slurm", run_fn=killable_run, progress=False)
    assert retry.ok and retry.completed == [severity.key, "ft/net_a/cv5/0/0"]


def test_missing_submitit_or_sbatch_is_a_config_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(ConfigError, match=r"mdmt\[slurm\]"):
        run_grid(fake_grid(tmp_path, "stl_severity"), backend="slurm", run_fn=fake_run, progress=False)
    monkeypatch.delitem(sys.modules, "submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(ConfigError, match="sbatch"):
        run_grid(make_config(tmp_path, "grid.strategies=[stl_severity]"), backend="slurm", run_fn=fake_run,
                 progress=False)
    assert not (tmp_path / "grid.lock").exists()


def test_slurm_numbers_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"grid\.slurm\.mem_gb = 0 .*grid\.slurm\.gpus_per_run = -1"):
        make_config(tmp_path, "grid.slurm.mem_gb=0", "grid.slurm.gpus_per_run=-1")
