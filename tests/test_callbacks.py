"""Training callbacks: the hooks' order and rows, phase timing on and off, the TensorBoard and MLflow loggers (written
to local folders and read back), and the one-line refusal of a logger whose package is missing."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdmt.config import (
    Config,
    PluginRef,
    TrainConfig,
    load_config,
    parse_override,
    save_config,
)
from mdmt.data.batches import CachedImageDataset, ImageArrays, make_loader
from mdmt.errors import ConfigError
from mdmt.losses import build_weighting
from mdmt.models.multitask import build_model
from mdmt.runs import HISTORY_FILE
from mdmt.tasks import get_task
from mdmt.train.callbacks import ALLOW_FILE_STORE_ENV, Callback, check_callbacks
from mdmt.train.engine import (
    EVAL_PHASES,
    TIMING_COLUMNS,
    TRAIN_PHASES,
    FitResult,
    Trainer,
    fit,
)

KEY = "mdmt/tiny_cnn/cv5/0/0"
SIZE = 32


class Recorder(Callback):
    """Every hook call in order, with what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append(("start", trainer.state.epoch))

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        self.calls.append(("epoch", (epoch, dict(row))))

    def on_fit_end(self, result: FitResult) -> None:
        self.calls.append(("end", result))


class Killed(Exception):
    """Stands for the process dying after an epoch."""


class Kill(Callback):
    def __init__(self, after: int):
        self.after = after

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        if epoch == self.after:
            raise Killed


def _train_config(**values: object) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **{"max_epochs": 2, "warmup_epochs": 0, "batch_size": 16, **values})


def _fit(run_dir: Path, cfg: TrainConfig, callbacks: list[Callback]) -> tuple[FitResult, torch.nn.Module]:
    """tiny_cnn on 48 random 32 px films with random prognosis labels, 16 more to validate on; the run folder records
    a config whose results_dir is its parent (the loggers' default folders)."""
    rng = np.random.default_rng(0)
    records = pd.DataFrame({"image_id": [f"p{i}" for i in range(64)], "prognosis": rng.integers(0, 2, 64) * 1.0})
    cache = ImageArrays(rng.integers(0, 256, (64, SIZE, SIZE), dtype=np.uint8), records)
    tasks = [get_task("prognosis")]
    train = make_loader(CachedImageDataset(cache, np.arange(48), tasks), cfg, shuffle=True)
    val = make_loader(CachedImageDataset(cache, np.arange(48, 64), tasks), cfg)
    model_cfg = dataclasses.replace(Config().model, backbone=PluginRef("tiny_cnn"), input_size=SIZE)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(Config(), model=model_cfg, train=cfg, results_dir=str(run_dir.parent)),
                run_dir / "config.yaml")
    torch.manual_seed(0)
    model = build_model(model_cfg, tasks)
    result = fit(model, tasks, train, val, cfg, None, build_weighting("fixed", tasks), run_dir, "prognosis",
                 progress=False, input_size=SIZE, callbacks=callbacks, description=KEY)
    return result, model


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """A 2-epoch run with phase timing (the default), a recorder and the TensorBoard logger of the config."""
    results = tmp_path_factory.mktemp("callbacks")
    recorder = Recorder()
    result, model = _fit(results / "timed", _train_config(callbacks=[PluginRef("tensorboard")]), [recorder])
    return results, result, model, recorder


def test_hooks_are_called_in_order_with_each_epochs_history_row(timed):
    results, result, _, recorder = timed
    names = [name for name, _ in recorder.calls]
    assert names == ["start", "epoch", "epoch", "end"]
    assert recorder.calls[0][1] == 0  # a fresh run starts at epoch 0
    history = pd.read_csv(results / "timed" / HISTORY_FILE)
    rows = [value for name, value in recorder.calls if name == "epoch"]
    assert [epoch for epoch, _ in rows] == [0, 1]
    for (epoch, row), (_, written) in zip(rows, history.iterrows(), strict=True):
        assert row == pytest.approx(written.to_dict(), rel=1e-12)
        assert row["train_prognosis_loss"] > 0 and row["seconds"] > 0
    assert recorder.calls[-1][1] is result and result.epochs_run == 2


def test_phase_timing_off_drops_the_phase_columns_and_changes_no_number(timed, tmp_path):
    """The history's columns with timing on are the ones ``benchmarks/demo_profile.py`` reads, in this order; with
    ``train.phase_timing: false`` the phase columns are left out and every loss and weight is the same."""
    results, timed_result, timed_model, _ = timed
    phases = [f"{phase}_s" for phase in (*TRAIN_PHASES, *EVAL_PHASES)]
    header = (results / "timed" / HISTORY_FILE).read_text().splitlines()[0]
    assert header.split(",") == ["epoch", "lr", "seconds", *phases, "train_loss", "val_loss", "train_prognosis_loss",
                                 "val_prognosis_loss", "selected"]
    untimed, untimed_model = _fit(tmp_path / "untimed", _train_config(phase_timing=False), [])
    written = pd.read_csv(tmp_path / "untimed" / HISTORY_FILE)
    assert list(written.columns) == [c for c in header.split(",") if c not in phases]
    measured = [c for c in TIMING_COLUMNS if c in untimed.history.columns]
    assert measured == ["seconds"]
    pd.testing.assert_frame_equal(untimed.history.drop(columns=measured),
                                  timed_result.history.drop(columns=list(TIMING_COLUMNS)))
    for (name, a), b in zip(timed_model.state_dict().items(), untimed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_tensorboard_event_files_hold_every_history_column(timed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, result, _, _ = timed
    folder = results / "tensorboard" / KEY  # the default: <results_dir>/tensorboard/<run key>
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    history = result.history
    assert sorted(events.Tags()["scalars"]) == sorted(c for c in history.columns if c != "epoch")
    for column in history.columns.drop("epoch"):
        logged = events.Scalars(column)
        assert [e.step for e in logged] == history["epoch"].tolist()
        assert [e.value for e in logged] == history[column].astype(np.float32).tolist(), column  # float32 events
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"results_dir: {results}" in text and "phase_timing: true" in text


def test_mlflow_run_holds_the_config_and_history_and_a_resume_goes_on_in_it(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'mdmt[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(ALLOW_FILE_STORE_ENV, "")  # restored (unset) after the test
    monkeypatch.delenv(ALLOW_FILE_STORE_ENV)  # the logger opts in to MLflow's folder store itself

    cfg = _train_config(max_epochs=3, callbacks=[PluginRef("mlflow", {"experiment": "study"})])
    with pytest.raises(Killed):
        _fit(tmp_path / "run", cfg, [Kill(after=1)])
    result, _ = _fit(tmp_path / "run", cfg, [])  # resumes at epoch 2
    assert os.environ[ALLOW_FILE_STORE_ENV] == "true"
    client = MlflowClient((tmp_path / "mlruns").as_uri())  # the default: <results_dir>/mlruns
    experiment = client.get_experiment_by_name("study")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == KEY and run.info.status == "FINISHED"
    assert run.data.params["train.max_epochs"] == "3" and run.data.params["results_dir"] == str(tmp_path)
    assert run.data.params["model.backbone.name"] == "tiny_cnn"
    history = result.history
    for column in history.columns.drop("epoch"):
        logged = client.get_metric_history(run.info.run_id, column)
        assert sorted((m.step, m.value) for m in logged) == list(zip(history["epoch"], history[column])), column


def test_a_logger_without_its_package_is_refused_in_one_line(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("tensorboard", "mlflow") else real(name, *args))
    config = load_config(None, [parse_override("train.callbacks=[{name: mlflow}]")])
    with pytest.raises(ConfigError) as refused:
        check_callbacks(config.train.callbacks)
    assert str(refused.value) == ("train.callbacks[0]: 'mlflow' needs the mlflow package, which is not installed: "
                                  "pip install 'mdmt[mlflow]'")
    cfg = _train_config(callbacks=[PluginRef("tensorboard")])
    with pytest.raises(ConfigError, match=r"pip install 'mdmt\[tensorboard\]'"):
        _fit(tmp_path / "run", cfg, [])
    assert not (tmp_path / "run" / HISTORY_FILE).exists()  # refused before any training
    with pytest.raises(ConfigError, match="unknown callback 'tensorbord'; did you mean tensorboard"):
        check_callbacks(["tensorbord"])
    with pytest.raises(ConfigError, match=r"train.callbacks\[0\] = .* must be a \{name, params\} entry"):
        load_config(None, [parse_override("train.callbacks=[{params: {log_dir: x}}]")])
