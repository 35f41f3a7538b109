"""kill -9 a real grid at several moments, start it again each time: the same numbers as a grid never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mdmt.config import to_dict
from mdmt.runs import DONE_FILE, LAST_CHECKPOINT, RUNS_DIR

RUNS = 3


def _grid(config_file: Path, results: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mdmt.cli", "grid", "--config", str(config_file),
                             "--results-dir", str(results)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for(results: Path, pattern: str, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list((results / RUNS_DIR).rglob(pattern))) < count:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"no {count} × {pattern} in {timeout} s"
        time.sleep(0.05)


def _outputs(results: Path) -> dict[str, bytes]:
    files = sorted((results / RUNS_DIR).rglob("predictions_*.csv")) + sorted((results / RUNS_DIR).rglob("metrics.json"))
    return {str(p.relative_to(results)): p.read_bytes() for p in files}


def test_a_grid_killed_at_three_moments_finishes_with_the_numbers_of_an_uninterrupted_one(tiny_config, tmp_path):
    values = to_dict(tiny_config)
    values["train"].update(max_epochs=4, warmup_epochs=0)
    values["grid"].update(backbones=["tiny_cnn"], strategies=["stl_prognosis"], protocols=["cv5"], folds=[0, 1, 2],
                          seeds=[0], workers=1)
    config_file = tmp_path / "grid.yaml"
    config_file.write_text(yaml.safe_dump(values))

    reference = tmp_path / "reference"
    assert _grid(config_file, reference).wait(timeout=600) == 0

    killed = tmp_path / "killed"
    moments = [(LAST_CHECKPOINT, 1), (DONE_FILE, 1), (LAST_CHECKPOINT, 3)]  # mid-run, between runs, mid-run
    for pattern, count in moments:
        process = _grid(config_file, killed)
        _wait_for(killed, pattern, count, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    final = _grid(config_file, killed)
    assert final.wait(timeout=600) == 0, final.stderr.read().decode()[-2000:]
    assert len(list((killed / RUNS_DIR).rglob(DONE_FILE))) == RUNS
    assert not list(killed.rglob("*.tmp-*"))  # no temporary file left behind
    expected, got = _outputs(reference), _outputs(killed)
    assert len(expected) == 2 * RUNS and got == expected

