"""The grid runner: expand a study into runs, run what is missing in dependency order, record every run.
(Over 400 lines on purpose: expansion, ordering and the four backends share the run records and the lock.)

``expand_grid`` turns ``config.grid`` (backbones × strategies × protocols × folds × seeds) into RunSpecs, adds the
runs each one starts from (``mdmt.train.strategies.dependencies``) and orders them so that a dependency always
comes first. ``run_grid`` skips runs whose ``DONE`` exists, runs the rest on a backend (in this process, a pool
of spawned processes, Ray tasks, or SLURM jobs through submitit)
with at most ``workers`` at once, starts a run only when its dependencies are done, and records each start and
failure in the run's folder (:class:`~mdmt.store.ResultsStore`). A failed run does not stop the others; the runs
that depend on it are skipped and reported. After a crash the same call skips what finished and the engine resumes the
interrupted run from its ``last.pt``.
"""

from __future__ import annotations

import fcntl
import functools
import graphlib
import itertools
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mdmt.cache.image_cache import ImageCache
from mdmt.config import Config, PluginRef
from mdmt.data.datasets import prepare
from mdmt.errors import ConfigError
from mdmt.plugins import load_plugins
from mdmt.progress import make_progress
from mdmt.protocols import get_protocol, loco_centers, run_fold
from mdmt.runs import DONE_FILE, RunSpec
from mdmt.store import ResultsStore
from mdmt.train.run import finished_run, train_run
from mdmt.train.strategies import dependencies, get_strategy

RunFn = Callable[[Config, RunSpec, bool], Path]
Submit = Callable[[RunSpec], Future]
BACKENDS = ("local", "ray", "slurm")


# --------------------------------------------------------------------------------------------- expansion
def grid_folds(protocol: str, config: Config, centers: list[str] | None = None) -> list[int]:
    """The folds of ``protocol`` the grid runs: ``config.grid.folds`` (checked) or all of them.

    LOCO has one fold per center of the data (``centers``), or of ``protocol.loco_centers`` without data.
    """
    available = get_protocol(protocol).folds(config, centers)
    if config.grid.folds is None:
        return available
    unknown = [f for f in config.grid.folds if f not in available]
    if unknown:
        raise ConfigError(f"grid.folds: fold(s) {unknown} do not exist in protocol {protocol!r} "
                          f"(folds {available[0]}..{available[-1]})")
    return list(config.grid.folds)


def _requested(config: Config, centers: list[str] | None) -> Iterator[RunSpec]:
    """The runs the grid names; a strategy without ``protocol.dataset`` runs on the folds its datasets follow."""
    grid = config.grid
    backbones = [PluginRef.of(b).name for b in grid.backbones]
    for backbone, name, protocol, seed in itertools.product(backbones, grid.strategies, grid.protocols, grid.seeds):
        datasets = get_strategy(name, config).datasets
        for fold in grid_folds(protocol, config, centers):
            yield RunSpec(name, backbone, *run_fold(protocol, fold, datasets, config), seed)


def expand_grid(config: Config, centers: list[str] | None = None) -> list[RunSpec]:
    """Every run of the study plus the runs they depend on, de-duplicated, dependencies first.

    Runs are ordered by depth in the dependency graph (runs without dependencies first), then by the order the
    grid names them (backbone, strategy, protocol, seed, fold).
    """
    graph: dict[RunSpec, list[RunSpec]] = {}
    pending = list(_requested(config, centers))
    while pending:
        spec = pending.pop(0)
        if spec not in graph:
            graph[spec] = dependencies(spec, config)
            pending.extend(graph[spec])
    named = {spec: i for i, spec in enumerate(graph)}
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as error:
        raise ConfigError(f"dependency cycle: {' → '.join(s.key for s in error.args[1])}") from None
    order: list[RunSpec] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=named.__getitem__)
        order += ready
        sorter.done(*ready)
    return order


# --------------------------------------------------------------------------------------------- summary
@dataclass
class GridSummary:
    """What one ``run_grid`` call did (run keys)."""

    total: int
    already_done: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """key → the error's last line (the full traceback is in the run's FAILED file)."""
    skipped: dict[str, list[str]] = field(default_factory=dict)
    """key → the failed or skipped dependencies it could not start without."""
    run_seconds: dict[str, float] = field(default_factory=dict)
    """key → wall seconds of each run this call ran, from its submission to its result."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every run of the grid is done."""
        return not self.failed and not self.skipped

    def problems(self) -> list[str]:
        """One line per failed run (its error) and per skipped run (what it needed), to print unwrapped."""
        return ([f"failed: {key}: {error}" for key, error in self.failed.items()]
                + [f"skipped: {key} (needs {', '.join(needs)})" for key, needs in self.skipped.items()])

    def __rich__(self) -> Table:
        table = Table(title=f"grid: {self.total} runs in {self.seconds:.0f} s", show_header=True)
        table.add_column("status")
        table.add_column("runs", justify="right")
        table.add_column("which")
        table.add_row("already done", str(len(self.already_done)), "")
        table.add_row("completed now", str(len(self.completed)), "")
        table.add_row("[red]failed", str(len(self.failed)), "\n".join(self.failed))
        table.add_row("[yellow]skipped", str(len(self.skipped)),
                      "\n".join(f"{k} (needs {', '.join(d)})" for k, d in self.skipped.items()))
        return table


# --------------------------------------------------------------------------------------------- the lock
LOCK_FILE = "grid.lock"


@contextmanager
def grid_lock(results_dir: Path) -> Iterator[None]:
    """Hold ``<results_dir>/grid.lock`` (an exclusive ``flock``) for one grid: a second ``mdmt grid`` on the same
    folder stops with an error before it trains anything (run_grid takes the lock once the grid is checked, so a
    refused grid writes nothing). The kernel drops the lock when the holder dies, so a killed grid never leaves the
    folder locked."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(f"another mdmt grid is running on {results_dir} (pid {holder}); wait for it to finish "
                              f"or use another results_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- backends
def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_with_threads(run_fn: RunFn, config: Config, spec: RunSpec, threads: int) -> Path:
    """Worker entry point: limit torch to ``threads`` threads, then run ``spec`` quietly."""
    import torch

    load_plugins(config.plugins)
    torch.set_num_threads(threads)
    return run_fn(config, spec, False)


def _inline(run_fn: RunFn, config: Config, progress: bool) -> Submit:
    """Runs each spec in this process at submission; the Future comes back finished."""

    def submit(spec: RunSpec) -> Future:
        future: Future = Future()
        try:
            future.set_result(run_fn(config, spec, progress))
        except Exception as exc:  # noqa: BLE001 - recorded as the run's failure
            future.set_exception(exc)
        return future

    return submit


@contextmanager
def _process_pool(run_fn: RunFn, config: Config, workers: int) -> Iterator[Submit]:
    """A pool of ``workers`` spawned processes (a fresh interpreter in the grid's folder and environment, nothing
    inherited from this one's threads), each run limited to cores // workers torch threads.

    Measured against workers forked from a fork server that had imported the engine: no gain (A/B, alternating
    pairs, whole-command wall time: benchmarks/RESULTS.md, "Machinery")."""
    threads = max(1, cpu_count() // workers)
    context = multiprocessing.get_context("spawn")
    pools = [ProcessPoolExecutor(max_workers=workers, mp_context=context)]

    def submit(spec: RunSpec) -> Future:
        arguments = (run_with_threads, run_fn, config, spec, threads)
        try:
            return pools[-1].submit(*arguments)
        except BrokenProcessPool:  # a worker died (its runs are recorded as failed): start a fresh pool
            pools.append(ProcessPoolExecutor(max_workers=workers, mp_context=context))
            return pools[-1].submit(*arguments)

    try:
        yield submit
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _ray_tasks(run_fn: RunFn, config: Config, workers: int) -> Iterator[Submit]:
    """Each run a Ray task with cores // workers CPUs (a running cluster via RAY_ADDRESS, else a local one)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("grid.backend 'ray' needs Ray: install mdmt[ray] (pip install 'mdmt[ray]')") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = max(1, int(ray.cluster_resources().get("CPU", cpu_count())) // workers)
    task = ray.remote(run_with_threads).options(num_cpus=cpus, max_retries=0)
    try:
        yield lambda spec: task.remote(run_fn, config, spec, cpus).future()
    finally:
        if started_here:
            ray.shutdown()


class SlurmJobError(RuntimeError):
    """A run's SLURM job failed: the message is the run's traceback, or why the job left no result."""


ENDED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                          "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"})
"""SLURM job states after which the job holds no resources and will write nothing more."""
QUEUE_POLL_S = 10.0
"""Seconds between two reads of the queue for a job whose state sacct does not know."""
RESULT_GRACE_S = 60.0
"""How long a job that left the queue may take to show its result file (a shared file system's lag)."""
QUEUE_UNREADABLE_S = 900.0
"""A job whose state neither sacct nor the queue gives for this long is a failed run."""
SACCT_WARNING = "Bypassing sacct error"
"""What submitit logs at each status poll when ``sacct`` fails (a cluster without accounting, no slurmdbd)."""
log = logging.getLogger(__name__)


def queue_state(job_id: str) -> str | None:
    """A SLURM job's state from the controller: ``squeue``, else ``scontrol show job`` (a job that ended a few
    minutes ago); None when neither knows the job (it has left the queue). OSError or SubprocessError when the
    commands cannot be run or answer with another error."""
    queued = _slurm_answer(["squeue", "-h", "-j", job_id, "-o", "%T"]).split()
    if queued:
        return queued[0]
    found = re.search(r"JobState=(\S+)", _slurm_answer(["scontrol", "show", "job", "-o", job_id]))
    return found.group(1) if found else None


def _slurm_answer(command: list[str]) -> str:
    """What a SLURM command prints; "" when the controller does not know the job; SubprocessError otherwise."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode == 0:
        return done.stdout
    if "invalid job id" in done.stderr.lower():
        return ""
    raise subprocess.SubprocessError(f"{' '.join(command)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def _wait_in_queue(job: Any, queue: Callable[[str], str | None]) -> None:
    """Return once ``job.done()`` or sacct knows the job (submitit's own wait then holds). Without accounting
    submitit reads UNKNOWN for ever and would wait on a cancelled job for good, so its state comes from ``queue``
    instead: a job out of the queue, or in an ended state, has ``RESULT_GRACE_S`` to show its result and is a
    failed run (SlurmJobError) after that, as is a job whose state cannot be read for ``QUEUE_UNREADABLE_S``."""
    gone_since: float | None = None
    unread_since: float | None = None
    while not job.done():
        if job.state != "UNKNOWN":
            return
        now = time.monotonic()
        try:
            state = queue(str(job.job_id))
        except (OSError, subprocess.SubprocessError) as exc:
            unread_since = unread_since if unread_since is not None else now
            if now - unread_since > QUEUE_UNREADABLE_S:
                raise SlurmJobError(f"job {job.job_id}: no state for {QUEUE_UNREADABLE_S:.0f} s (sacct has none and "
                                    f"the queue cannot be read: {exc}); its log: {job.paths.stderr}") from None
        else:
            unread_since = None
            if state is None or state in ENDED_STATES:
                gone_since = gone_since if gone_since is not None else now
                if now - gone_since > RESULT_GRACE_S:
                    seen = state or "no longer known to SLURM"
                    raise SlurmJobError(f"job {job.job_id} left the queue without a result ({seen}; read from the "
                                        f"queue, accounting is off); its log: {job.paths.stderr}")
            else:
                gone_since = None
        time.sleep(QUEUE_POLL_S)


class _OneAccountingWarning(logging.Filter):
    """On submitit's logger: drops its sacct warning of each status poll; the first becomes one line of ours."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if SACCT_WARNING not in record.getMessage():
            return True
        with self._lock:
            said, self._said = self._said, True
        if not said:
            log.warning("SLURM accounting is off (sacct fails): job states are read from the queue (squeue, scontrol)")
        return False


def _job_result(job: Any, queue: Callable[[str], str | None] | None = None) -> Path:
    """Wait for a submitit ``job`` (a SLURM job's state read from ``queue`` while sacct has none:
    ``_wait_in_queue``); the run folder it returns, else SlurmJobError."""
    from submitit.core.utils import FailedJobError, UncompletedJobError, pickle_load

    if queue is not None:
        _wait_in_queue(job, queue)
    try:
        return job.result()
    except FailedJobError:
        _, trace = pickle_load(job.paths.result_pickle)
        raise SlurmJobError(str(trace).strip()) from None
    except UncompletedJobError:
        raise SlurmJobError(f"job {job.job_id} ended without a result (cancelled, out of time or killed; "
                            f"state {job.state}); its log: {job.paths.stderr}") from None


def _submitit(config: Config) -> Any:
    """The submitit module; ConfigError when it is missing, or when SLURM is asked for and sbatch is not here."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("grid.backend 'slurm' needs submitit: install mdmt[slurm] (pip install 'mdmt[slurm]')"
                          ) from None
    if config.grid.slurm.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("grid.backend 'slurm' needs SLURM's sbatch on PATH (run mdmt grid on a login node), "
                          "or grid.slurm.executor: local to run the jobs on this machine")
    return submitit


@contextmanager
def _slurm_jobs(run_fn: RunFn, config: Config, workers: int) -> Iterator[Submit]:
    """Each run one submitit job with the resources of ``grid.slurm`` (``executor: local``: a process here).

    At most ``workers`` jobs are queued or running at once; jobs still running when the grid stops are cancelled.
    A SLURM job's state falls back to the queue where sacct fails (``_wait_in_queue``), said once in one line.
    """
    submitit = _submitit(config)
    slurm = config.grid.slurm
    folder = Path(config.results_dir) / slurm.folder
    executor: Any
    if slurm.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=slurm.time_minutes, gpus_per_node=slurm.gpus_per_run)
        threads = max(1, cpu_count() // workers)
    else:
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(partition=slurm.partition, time=slurm.time_minutes,
                                   gpus_per_node=slurm.gpus_per_run, cpus_per_task=slurm.cpus_per_run,
                                   mem=f"{slurm.mem_gb}GB", additional_parameters=dict(slurm.additional_parameters))
        threads = slurm.cpus_per_run
    live: set[Any] = set()

    def submit(spec: RunSpec) -> Future:
        if slurm.executor == "slurm":
            executor.update_parameters(job_name=f"mdmt:{spec.key}")
        try:
            job = executor.submit(run_with_threads, run_fn, config, spec, threads)
        except Exception as exc:  # noqa: BLE001 - the job was refused: recorded as the run's failure
            refused: Future = Future()
            refused.set_exception(exc)
            return refused
        live.add(job)
        future: Future = Future()

        def wait_for_job() -> None:  # a daemon thread: a grid that stops never waits for the queue
            try:
                future.set_result(_job_result(job, queue_state if slurm.executor == "slurm" else None))
            except Exception as exc:  # noqa: BLE001 - the run's failure
                future.set_exception(exc)
            finally:
                live.discard(job)

        threading.Thread(target=wait_for_job, name=f"mdmt-slurm-{job.job_id}", daemon=True).start()
        return future

    accounting = _OneAccountingWarning()
    logging.getLogger("submitit").addFilter(accounting)
    try:
        yield submit
    finally:
        for job in list(live):
            job.cancel(check=False)
        logging.getLogger("submitit").removeFilter(accounting)


@contextmanager
def _backend(backend: str, workers: int, run_fn: RunFn, config: Config, progress: bool) -> Iterator[Submit]:
    if backend == "ray":
        with _ray_tasks(run_fn, config, workers) as submit:
            yield submit
    elif backend == "slurm":
        with _slurm_jobs(run_fn, config, workers) as submit:
            yield submit
    elif workers > 1:
        with _process_pool(run_fn, config, workers) as submit:
            yield submit
    else:
        yield _inline(run_fn, config, progress)


# --------------------------------------------------------------------------------------------- the runner
def _finished(config: Config, specs: list[RunSpec], caches: dict[str, ImageCache] | None, summary: GridSummary
              ) -> set[RunSpec]:
    """The runs already finished with the same inputs; a finished run with other inputs is recorded as failed
    (refused) unless ``run.rerun_changed`` (then it runs again). Without caches (a test's fake runs) DONE counts."""
    results_dir = Path(config.results_dir)
    marked = [spec for spec in specs if (spec.run_dir(results_dir) / DONE_FILE).is_file()]
    if caches is None:
        return set(marked)
    done = set()
    for spec in marked:
        try:
            if finished_run(config, spec, caches):
                done.add(spec)
        except ConfigError as exc:
            summary.failed[spec.key] = _error_line(exc)
    return done


def _error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def _error_line(error: BaseException) -> str:
    last = str(error).strip().splitlines()
    return f"{type(error).__name__}: {last[-1] if last else ''}"


def run_grid(
    config: Config,
    workers: int = 1,
    backend: str = "local",
    run_fn: RunFn | None = None,
    progress: bool = True,
) -> GridSummary:
    """Run every run of ``expand_grid(config)`` that has no ``DONE`` yet; returns what happened.

    ``workers`` runs at most that many at once (local: spawned processes, one in this process when 1;
    ``backend="ray"``: Ray tasks; ``backend="slurm"``: submitit jobs configured by ``config.grid.slurm``).
    Without ``run_fn`` each run is ``train_run`` on the caches this grid builds once; a ``run_fn(config, spec,
    progress) -> run_dir`` replaces the whole run (it reads or builds whatever data it needs).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"grid.backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "slurm":
        _submitit(config)  # before any work: a grid that cannot submit prepares nothing
    workers = max(1, int(workers))
    start = time.perf_counter()
    results_dir = Path(config.results_dir)
    with ExitStack() as stack:
        caches = prepare(config, progress=progress) if run_fn is None else None  # built once, here
        home = caches.get(config.protocol.dataset) if caches else None
        specs = expand_grid(config, loco_centers(config, home.records) if home is not None else None)
        stack.enter_context(grid_lock(results_dir))  # after the checks: a refused grid writes nothing
        store = ResultsStore(results_dir)
        needs = {spec: dependencies(spec, config) for spec in specs}
        summary = GridSummary(total=len(specs))
        done = _finished(config, specs, caches, summary)
        pending = [spec for spec in specs if spec not in done and spec.key not in summary.failed]
        summary.already_done = [s.key for s in specs if s in done]

        if run_fn is None:  # the runs open the caches built above instead of preparing them again
            run_fn = functools.partial(train_run, caches={name: str(c.path) for name, c in caches.items()})
        submit = stack.enter_context(_backend(backend, workers, run_fn, config, progress))
        bar = stack.enter_context(make_progress()) if progress else None
        bar_task = bar.add_task("grid", total=len(specs), completed=len(done), status="") if bar else None
        running: dict[Future, tuple[RunSpec, float]] = {}

        def show(advance: int = 0, starting: RunSpec | None = None) -> None:
            if bar is not None:
                keys = [s.key for s, _ in running.values()] + ([starting.key] if starting else [])
                bar.update(bar_task, advance=advance, status=", ".join(keys))

        while pending or running:
            for spec in list(pending):  # pending is in dependency order, so skipping propagates in one pass
                blocked = [d.key for d in needs[spec] if d.key in summary.failed or d.key in summary.skipped]
                if blocked:
                    pending.remove(spec)
                    summary.skipped[spec.key] = blocked
                    show(advance=1)
            ready = [spec for spec in pending if all(d in done for d in needs[spec])]
            for spec in ready[: max(0, workers - len(running))]:
                pending.remove(spec)
                store.record_start(spec)
                began = time.perf_counter()
                show(starting=spec)
                running[submit(spec)] = (spec, began)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec, began = running.pop(future)
                summary.run_seconds[spec.key] = time.perf_counter() - began
                error = future.exception()
                if error is None:
                    done.add(spec)
                    summary.completed.append(spec.key)
                else:
                    summary.failed[spec.key] = _error_line(error)
                    store.record_failure(spec, _error_text(error))
                show(advance=1)
    summary.seconds = time.perf_counter() - start
    return summary
