"""The SLURM backend through submitit's LocalExecutor: real runs in dependency order, failed and killed jobs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_grid import CONTROL, calls, fake_run, make_config

from mdmt.config import Config, SlurmConfig
from mdmt.errors import ConfigError
from mdmt.experiments import grid
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
    with pytest.raises(ConfigError, match=r"(?=.*grid\.slurm\.mem_gb = 0 )(?=.*grid\.slurm\.gpus_per_run = -1)"):
        make_config(tmp_path, "grid.slurm.mem_gb=0", "grid.slurm.gpus_per_run=-1")


# ------------------------------------------------------------------------------ a cluster without accounting
class StubJob:
    """A SLURM job as submitit shows it where sacct fails (no slurmdbd): state UNKNOWN, and a sacct warning at each
    status poll. The run happens at submission, in this process; a ``cancelled`` job never leaves a result."""

    state = "UNKNOWN"

    def __init__(self, job_id: str, folder: Path, run: Path | None):
        self.job_id = job_id
        self.paths = SimpleNamespace(stderr=folder / f"{job_id}_0_log.err")
        self.run = run
        self.polls = 0

    def done(self) -> bool:
        self.polls += 1
        logging.getLogger("submitit").warning(f"Call #{self.polls} - Bypassing sacct error Command '['sacct', '-o', "
                                              f"'JobID,State,NodeList', '--parsable2', '-j', '{self.job_id}']' "
                                              "returned non-zero exit status 1., status may be inaccurate.")
        return self.run is not None

    def result(self) -> Path:
        assert self.run is not None, "waited on a job that left no result"
        return self.run

    def cancel(self, check: bool = True) -> None:
        pass


def stub_submitit(folder: Path, cancelled: set[str], jobs: dict[str, StubJob]) -> SimpleNamespace:
    """A submitit module whose SlurmExecutor runs each job's run at once, except the ``cancelled`` run keys."""

    class SlurmExecutor:
        def __init__(self, folder: Path):
            self.folder = Path(folder)

        def update_parameters(self, **parameters: object) -> None:
            pass

        def submit(self, function: object, run_fn, config: Config, spec: RunSpec, threads: int) -> StubJob:
            run = None if spec.key in cancelled else run_fn(config, spec, False)
            job = StubJob(str(100 + len(jobs)), self.folder, run)
            jobs[spec.key] = job
            return job

    return SimpleNamespace(SlurmExecutor=SlurmExecutor)


@pytest.fixture
def fast_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grid, "QUEUE_POLL_S", 0.01)
    monkeypatch.setattr(grid, "RESULT_GRACE_S", 0.1)
    monkeypatch.setattr(grid, "QUEUE_UNREADABLE_S", 0.1)


def test_a_cancelled_job_without_accounting_fails_from_the_queue_with_one_warning_line(tmp_path, monkeypatch,
                                                                                       caplog, fast_queue):
    config = make_config(tmp_path, "grid.strategies=[stl_prognosis, stl_severity, ft]", "grid.protocols=[cv5]",
                         "grid.folds=[0]", "grid.backbones=[net_a]", "grid.backend=slurm", "grid.slurm.executor=slurm")
    severity = RunSpec("stl_severity", "net_a", "cv5", 0, 0)
    jobs: dict[str, StubJob] = {}
    monkeypatch.setattr(grid, "_submitit", lambda config: stub_submitit(tmp_path / "slurm", {severity.key}, jobs))
    reads: list[str] = []

    def queue(job_id: str) -> str | None:  # squeue lists the cancelled job twice, then it has left the queue
        reads.append(job_id)
        return "RUNNING" if len(reads) <= 2 else None

    monkeypatch.setattr(grid, "queue_state", queue)
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    summary = run_grid(config, workers=2, backend="slurm", run_fn=fake_run, progress=False)
    assert time.monotonic() - start < 20
    job = jobs[severity.key]
    assert summary.failed == {severity.key: f"SlurmJobError: job {job.job_id} left the queue without a result (no "
                                            "longer known to SLURM; read from the queue, accounting is off); its log: "
                                            f"{job.paths.stderr}"}
    assert summary.completed == ["stl_prognosis/net_a/cv5/0/0"] and summary.skipped == {"ft/net_a/cv5/0/0":
                                                                                          [severity.key]}
    assert set(reads) == {job.job_id} and len(reads) >= 3  # the job that finished was never looked up
    polls = sum(j.polls for j in jobs.values())
    lines = [r.getMessage() for r in caplog.records]
    assert polls >= 3 and not any("sacct error" in line for line in lines)
    assert lines == ["SLURM accounting is off (sacct fails): job states are read from the queue (squeue, scontrol)"]
    assert logging.getLogger("submitit").filters == []  # the grid's filter goes with the grid


def test_a_job_whose_result_shows_after_it_left_the_queue_is_done(tmp_path, fast_queue):
    job = StubJob("7", tmp_path, None)
    states = iter(["PENDING", "RUNNING", "COMPLETED"])

    def queue(job_id: str) -> str | None:
        state = next(states)
        if state == "COMPLETED":
            job.run = tmp_path / "run"  # the result file arrives within the grace period
        return state

    assert grid._job_result(job, queue) == tmp_path / "run"


def test_a_queue_that_cannot_be_read_fails_the_run_after_a_bounded_wait(tmp_path, fast_queue):
    def unreachable(job_id: str) -> str | None:
        raise subprocess.SubprocessError("squeue: slurm_load_jobs error: Unable to contact slurm controller")

    job = StubJob("8", tmp_path, None)
    with pytest.raises(grid.SlurmJobError, match=r"job 8: no state for 0 s \(sacct has none and the queue cannot "
                                                 r"be read: squeue: slurm_load_jobs error: Unable to contact"):
        grid._job_result(job, unreachable)


@pytest.mark.parametrize(("answers", "state"), [
    ({"squeue": (0, "RUNNING\n", "")}, "RUNNING"),
    ({"squeue": (0, "", ""), "scontrol": (0, "JobId=42 JobName=mdmt JobState=CANCELLED Reason=None\n", "")},
     "CANCELLED"),
    ({"squeue": (1, "", "slurm_load_jobs error: Invalid job id specified\n"),
      "scontrol": (1, "", "slurm_load_jobs error: Invalid job id specified\n")}, None),
])
def test_the_queue_state_comes_from_squeue_then_scontrol(monkeypatch, answers, state):
    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert command[-1] == "42" or command[3] == "42"
        code, out, err = answers[command[0]]
        return subprocess.CompletedProcess(command, code, out, err)

    monkeypatch.setattr(grid.subprocess, "run", run)
    assert grid.queue_state("42") == state
    answers = {"squeue": (1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")}
    with pytest.raises(subprocess.SubprocessError, match="Unable to contact slurm controller"):
        grid.queue_state("42")
