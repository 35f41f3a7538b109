"""The training engine: determinism, exact resume after a kill, selection, early stopping, checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from mdmt.config import Config
from mdmt.data.datasets import select
from mdmt.data.loaders import build_data
from mdmt.losses import build_weighting
from mdmt.protocols import build_splits
from mdmt.runs import BEST_CHECKPOINT, HISTORY_FILE, LAST_CHECKPOINT
from mdmt.tasks import get_task
from mdmt.train.callbacks import Callback
from mdmt.train.checkpoints import load_checkpoint
from mdmt.train.engine import (
    EVAL_PHASES,
    SYNC_TIMING_ENV,
    TIMING_COLUMNS,
    TRAIN_PHASES,
    FitResult,
    LoopState,
    LossMeter,
    PhaseClock,
    Trainer,
    fit,
    history_csv,
    is_eligible,
)
from mdmt.train.strategies import get_strategy


class Killed(Exception):
    """Stands for the process dying after a given epoch."""


def _engine_config(tiny_config: Config, **train: object) -> Config:
    values = {"max_epochs": 4, "warmup_epochs": 0, "early_stopping": 50, "batch_size": 16, **train}
    return dataclasses.replace(
        tiny_config,
        model=dataclasses.replace(tiny_config.model, severity_task="severity_regions", input_size=32),
        train=dataclasses.replace(tiny_config.train, **values),
    )


def _fit(
    config: Config, caches: dict, run_dir: Path, kill_after: int | None = None, seed: int = 0, weighting: str = "fixed"
) -> tuple[FitResult, torch.nn.Module]:
    """MDMT on the tiny twin with augmentation (so its generator is exercised), tiny_cnn at 32 px."""
    from mdmt.data.augment import BatchAugmenter
    from mdmt.losses import build_weighting
    from mdmt.models.multitask import build_model

    strategy = get_strategy("mdmt", config)
    tasks = [get_task(n) for n in strategy.task_names(config)]
    torch.manual_seed(seed)
    datasets = select(config, strategy.datasets)
    splits = build_splits(config, datasets, caches, "cv5", 0, seed)
    data = build_data(config, caches, splits, tasks, seed)
    model = build_model(config.model, tasks)

    class Kill(Callback):
        def on_epoch_end(self, epoch: int, row: dict) -> None:
            if epoch == kill_after:
                raise Killed

    result = fit(
        model, tasks, data.train, data.val, config.train, BatchAugmenter(config.augment, tasks),
        build_weighting(weighting, tasks, config.loss.task_weights), run_dir, "prognosis", progress=False,
        loss_variant=config.loss.variant, seed=seed, input_size=config.model.input_size, callbacks=[Kill()],
    )
    return result, model


def _comparable(history: pd.DataFrame) -> pd.DataFrame:
    return history.drop(columns=list(TIMING_COLUMNS))


@pytest.fixture(scope="module")
def reference(tiny_config, tiny_caches, tmp_path_factory):
    """One uninterrupted 4-epoch run."""
    config = _engine_config(tiny_config)
    run_dir = tmp_path_factory.mktemp("engine") / "reference"
    result, model = _fit(config, tiny_caches, run_dir)
    return config, run_dir, result, model


def test_history_has_a_row_per_epoch_with_every_loss(reference):
    config, run_dir, result, _ = reference
    history = pd.read_csv(run_dir / HISTORY_FILE)
    expected = {"epoch", "lr", "train_loss", "val_loss", "selected", *TIMING_COLUMNS} | {
        f"{part}_{t}_loss" for part in ("train", "val") for t in ("prognosis", "severity_regions")
    }
    assert set(history.columns) == expected
    assert history["epoch"].tolist() == list(range(config.train.max_epochs))
    assert history[sorted(expected - {"epoch", "selected"})].notna().all().all()
    # the total is per sample over both datasets, so it lies between the smallest and the sum of the task means
    for part in ("train", "val"):
        means = history[[f"{part}_prognosis_loss", f"{part}_severity_regions_loss"]]
        assert (history[f"{part}_loss"] <= means.sum(axis=1) + 1e-9).all()
        assert (history[f"{part}_loss"] > 0).all()


def test_history_file_is_what_pandas_would_write(reference):
    """``history_csv`` replaces ``DataFrame.to_csv`` (a quarter of its cost): the same text for the engine's rows and
    for a NaN (a task without labels in the validation set)."""
    _, run_dir, result, _ = reference
    rows = result.history.to_dict("records")
    assert history_csv(rows) == pd.DataFrame(rows).to_csv(index=False) == (run_dir / HISTORY_FILE).read_text()
    odd = [{"epoch": 0, "lr": 1e-05, "loss": math.nan, "selected": 0}, {"epoch": 1, "lr": 0.1 + 0.2, "loss": 2.5,
                                                                          "selected": 1}]
    assert history_csv(odd) == pd.DataFrame(odd).to_csv(index=False)


def test_adam_is_fused_on_cpu(reference):
    """The optimizer step runs torch's fused kernel on the CPU (0.40 against 0.72 ms a step for the demo's network)."""
    config, run_dir, _, model = reference
    tasks = [get_task("prognosis"), get_task("severity_regions")]
    weighting = build_weighting("fixed", tasks, config.loss.task_weights)
    trainer = Trainer(model, tasks, config.train, weighting, run_dir / "fused", "prognosis")
    assert trainer.optimizer.defaults["fused"] is True


def test_history_splits_each_epochs_time_into_phases(reference):
    _, run_dir, _, _ = reference
    history = pd.read_csv(run_dir / HISTORY_FILE)
    phases = history[[f"{phase}_s" for phase in (*TRAIN_PHASES, *EVAL_PHASES)]]
    assert (phases >= 0).all().all()
    assert (history[["forward_s", "backward_s", "eval_forward_s"]] > 0).all().all()
    # the phases are contiguous laps of the epoch's clock: together they are the epoch's seconds, less only the
    # few statements between the passes (rounding: 0.5 ms for seconds, 0.05 ms per phase)
    assert (phases.sum(axis=1) <= history["seconds"] + 1e-3).all()
    assert (phases.sum(axis=1) >= 0.95 * history["seconds"] - 1e-3).all()


def test_phase_clock_laps_are_contiguous_and_sync_only_a_gpu_when_asked(monkeypatch):
    import time

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    start = time.perf_counter()
    clock = PhaseClock(("a", "b", "c"), torch.device("cpu"), sync=True)
    clock.lap("a"), time.sleep(0.02), clock.lap("b"), clock.lap("a")
    assert sum(clock.seconds.values()) == pytest.approx(time.perf_counter() - start, abs=5e-3)
    assert clock.seconds["b"] >= 0.02 and clock.seconds["a"] < 0.01 and clock.seconds["c"] == 0.0
    assert synced == []  # nothing to wait for on a CPU
    PhaseClock(("a",), torch.device("cuda"), sync=False).lap("a")
    assert synced == []  # a GPU is not synchronised unless asked (MDMT_SYNC_TIMING=1)
    PhaseClock(("a",), torch.device("cuda"), sync=True).lap("a")
    assert synced == [torch.device("cuda")]


def test_gpu_sync_of_the_phase_times_is_asked_by_the_environment(monkeypatch, tmp_path):
    from mdmt.losses import build_weighting

    tasks = [get_task("prognosis")]
    cfg = Config().train

    def trainer() -> Trainer:
        return Trainer(torch.nn.Linear(2, 2), tasks, cfg, build_weighting("fixed", tasks), tmp_path, "prognosis",
                       device=torch.device("cpu"))

    monkeypatch.delenv(SYNC_TIMING_ENV, raising=False)
    assert not trainer().sync_timing
    monkeypatch.setenv(SYNC_TIMING_ENV, "1")
    assert trainer().sync_timing


def test_best_checkpoint_is_the_lowest_eligible_selection_loss(reference):
    config, run_dir, result, _ = reference
    history = result.history
    eligible = history[[is_eligible(e, config.train) for e in history["epoch"]]]
    best = eligible.loc[eligible["val_prognosis_loss"].idxmin()]
    assert result.best_epoch == int(best["epoch"])
    assert math.isclose(result.best_score, best["val_prognosis_loss"])
    assert history.loc[history["selected"] == 1, "epoch"].iloc[-1] == result.best_epoch
    saved = load_checkpoint(run_dir / BEST_CHECKPOINT)
    assert saved["epoch"] == result.best_epoch and math.isclose(saved["score"], result.best_score)


def test_last_checkpoint_holds_everything_needed_to_resume(reference):
    _, run_dir, result, model = reference
    ckpt = load_checkpoint(run_dir / LAST_CHECKPOINT)
    assert {"model", "optimizer", "scheduler", "weighting", "loop", "history", "rng", "sampler_epoch"} <= set(ckpt)
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert ckpt["loop"]["epoch"] == result.epochs_run and ckpt["loop"]["finished"]
    for name, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][name], value.cpu()), name


def test_same_seed_gives_identical_history_and_weights(reference, tiny_caches, tmp_path):
    config, _, result, model = reference
    again, model_again = _fit(config, tiny_caches, tmp_path / "again")
    pd.testing.assert_frame_equal(_comparable(again.history), _comparable(result.history))
    for (name, a), b in zip(model.state_dict().items(), model_again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_killed_run_resumes_to_the_same_result(reference, tiny_caches, tmp_path):
    config, run_dir, result, model = reference
    with pytest.raises(Killed):
        _fit(config, tiny_caches, tmp_path / "killed", kill_after=1)
    partial = pd.read_csv(tmp_path / "killed" / HISTORY_FILE)
    assert partial["epoch"].tolist() == [0, 1]
    resumed, resumed_model = _fit(config, tiny_caches, tmp_path / "killed")
    pd.testing.assert_frame_equal(_comparable(resumed.history), _comparable(result.history))
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    best_a = load_checkpoint(run_dir / BEST_CHECKPOINT)["model"]
    best_b = load_checkpoint(tmp_path / "killed" / BEST_CHECKPOINT)["model"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_checkpoint_interval_replays_to_the_same_result(reference, tiny_caches, tmp_path):
    """With ``checkpoint_every_s`` longer than the run, ``last.pt`` is written only after the last epoch; a run killed
    before it starts again and still ends with the reference's history and weights."""
    config, _, result, model = reference
    sparse = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every_s=1e9))
    with pytest.raises(Killed):
        _fit(sparse, tiny_caches, tmp_path / "run", kill_after=1)
    assert not (tmp_path / "run" / LAST_CHECKPOINT).exists()
    assert pd.read_csv(tmp_path / "run" / HISTORY_FILE)["epoch"].tolist() == [0, 1]
    again, model_again = _fit(sparse, tiny_caches, tmp_path / "run")
    pd.testing.assert_frame_equal(_comparable(again.history), _comparable(result.history))
    for (name, a), b in zip(model.state_dict().items(), model_again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)["loop"]["finished"]


@pytest.mark.parametrize("interval,checkpoints", [(0.0, 4), (1e9, 1)])
def test_files_are_flushed_to_disk_with_each_last_checkpoint(reference, tiny_caches, tmp_path, monkeypatch,
                                                             interval, checkpoints):
    """``history.csv`` and ``best.pt`` are replaced at every epoch and new best, but fsynced only with ``last.pt``
    (every epoch by default, after the last one with a long ``checkpoint_every_s``): a power cut can only lose what
    the next resume replays."""
    import os

    config, _, result, _ = reference
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name.split(".tmp-")[0])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sparse = dataclasses.replace(config, train=dataclasses.replace(config.train, checkpoint_every_s=interval))
    _fit(sparse, tiny_caches, tmp_path / "run")
    selections = int(result.history["selected"].sum())
    assert synced.count(LAST_CHECKPOINT) == synced.count(HISTORY_FILE) == checkpoints
    assert 1 <= synced.count(BEST_CHECKPOINT) <= min(selections, checkpoints)
    assert synced[-1] == LAST_CHECKPOINT and HISTORY_FILE in synced[-3:]


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa"])
def test_resume_restores_the_task_weighting_state(weighting, tiny_config, tiny_caches, tmp_path):
    config = _engine_config(tiny_config, max_epochs=4)
    whole, _ = _fit(config, tiny_caches, tmp_path / "whole", weighting=weighting)
    with pytest.raises(Killed):
        _fit(config, tiny_caches, tmp_path / "cut", kill_after=2, weighting=weighting)
    resumed, _ = _fit(config, tiny_caches, tmp_path / "cut", weighting=weighting)
    pd.testing.assert_frame_equal(_comparable(resumed.history), _comparable(whole.history))
    state = load_checkpoint(tmp_path / "cut" / LAST_CHECKPOINT)["weighting"]
    if weighting == "uncertainty":  # learned log-variances moved away from 0 and were checkpointed
        assert state["log_vars"].abs().min() > 0
    else:  # DWA keeps the last two epochs' mean training losses
        history = state["_extra_state"]["history"]
        last_two = whole.history["train_prognosis_loss"].iloc[-2:].tolist()
        assert [h["prognosis"] for h in history] == pytest.approx(last_two)


def test_finished_run_is_not_trained_again(reference, tiny_caches, tmp_path):
    config, _, result, _ = reference
    first, _ = _fit(config, tiny_caches, tmp_path / "run")
    stamp = (tmp_path / "run" / LAST_CHECKPOINT).stat().st_mtime_ns
    second, _ = _fit(config, tiny_caches, tmp_path / "run")
    assert (tmp_path / "run" / LAST_CHECKPOINT).stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(second.history, first.history)


def test_early_stopping_counts_only_eligible_epochs():
    cfg = dataclasses.replace(Config().train, warmup_epochs=2, early_stopping=3, max_epochs=20)
    scores = [0.1, 0.05, 0.9, 0.8, 0.85, 0.7, 0.75, 0.71, 0.72, 0.1]  # epochs 0-2 are the warm-up
    state, picked = LoopState(), []
    for epoch, score in enumerate(scores):
        picked.append(state.observe(epoch, score, cfg))
        if state.finished:
            break
    # the low warm-up scores are ignored; 3 is the first eligible epoch, 5 the last improvement, 6-8 fail
    assert [e for e, p in enumerate(picked) if p] == [3, 5]
    assert (state.best_epoch, state.best_score, state.epoch, state.stopped_early) == (5, 0.7, 9, True)
    state = LoopState()
    for epoch in range(4):
        state.observe(epoch, 1.0 - epoch, dataclasses.replace(cfg, max_epochs=4))
    assert state.finished and not state.stopped_early and state.best_epoch == 3


def test_training_stops_early_and_logs_it(tiny_config, tiny_caches, tmp_path):
    config = _engine_config(tiny_config, max_epochs=30, warmup_epochs=1, early_stopping=2, lr=0.05)
    result, _ = _fit(config, tiny_caches, tmp_path / "stop")
    history = result.history
    last_selected = history.loc[history["selected"] == 1, "epoch"].max()
    assert result.stopped_early and result.epochs_run == last_selected + 1 + config.train.early_stopping
    assert result.epochs_run < config.train.max_epochs


def test_eligibility_follows_the_papers_warmup():
    cfg = Config().train  # warmup 40, max 300: epoch index > 40
    assert not is_eligible(40, cfg) and is_eligible(41, cfg)
    short = dataclasses.replace(cfg, max_epochs=3)  # shorter than the warm-up: the last epoch still counts
    assert [is_eligible(e, short) for e in range(3)] == [False, False, True]


def test_loss_meter_means_per_labelled_sample_and_total_per_sample():
    meter = LossMeter(["a", "b"], torch.device("cpu"))
    # batch of 4: a labelled on 1 sample with loss 2 → loss_a = 2/4; b on 3 samples summing to 3 → 3/4
    meter.add({"a": torch.tensor(0.5), "b": torch.tensor(0.75)},
              {"a": torch.tensor([1, 0, 0, 0], dtype=torch.bool), "b": torch.tensor([0, 1, 1, 1], dtype=torch.bool)}, 4)
    meter.add({"a": torch.tensor(1.0), "b": torch.tensor(0.0)},
              {"a": torch.tensor([1, 1], dtype=torch.bool), "b": torch.tensor([0, 0], dtype=torch.bool)}, 2)
    assert meter.task_means() == pytest.approx({"a": (2 + 2) / 3, "b": 3 / 3})
    assert meter.total() == pytest.approx((2 + 2 + 3) / 6)


DDP_SCRIPT = '''
import sys
import torch
from torch import nn
from mdmt.config import load_config
from mdmt.cache.image_cache import open_cache
from mdmt.losses import build_weighting
from mdmt.tasks import get_task
from mdmt.train.distributed import init_distributed, shutdown
from mdmt.data.datasets import select
from mdmt.protocols import build_splits
from mdmt.train.engine import fit
from mdmt.data.loaders import build_data
from mdmt.train.distributed import ShardedBatchSampler
from mdmt.train.strategies import get_strategy


class NoBatchNorm(nn.Module):
    """Batch statistics would differ per rank; without them DDP must match one process exactly."""

    def __init__(self, tasks):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({t.name: nn.Linear(8, t.n_outputs) for t in tasks})

    def forward(self, x):
        h = self.backbone(x)
        return {name: head(h) for name, head in self.heads.items()}


config = load_config(sys.argv[1])
caches = {name: open_cache(path) for name, path in zip(("aiforcovid", "brixia"), sys.argv[2:4])}
ctx, device = init_distributed("cpu")
torch.set_num_threads(1)
strategy = get_strategy("mdmt", config)
tasks = [get_task(n) for n in strategy.task_names(config)]
torch.manual_seed(0)
model = NoBatchNorm(tasks)
datasets = select(config, strategy.datasets)
splits = build_splits(config, datasets, caches, "cv5", 0, 0)
data = build_data(config, caches, splits, tasks, 0, shard=lambda s: ShardedBatchSampler(s, ctx))
fit(model, tasks, data.train, data.val, config.train, None, build_weighting("fixed", tasks), sys.argv[4],
    "prognosis", progress=False, loss_variant=config.loss.variant, input_size=config.model.input_size, dist=ctx,
    device=device)
if ctx.is_main:
    torch.save(model.state_dict(), sys.argv[4] + "/final.pt")
shutdown(ctx)
'''


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_config, tiny_caches, tmp_path):
    """torchrun with 2 CPU processes on gloo: same losses and weights as one process (no batch norm)."""
    import os
    import subprocess
    import sys

    from mdmt.config import save_config

    config = _engine_config(tiny_config, max_epochs=2, batch_size=15)
    save_config(config, tmp_path / "config.yaml")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    args = [str(tmp_path / "config.yaml"), str(tiny_caches["aiforcovid"].path), str(tiny_caches["brixia"].path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, str(tmp_path / "ddp.py"), *args, str(tmp_path / "one")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(tmp_path / "ddp.py"), *args, str(tmp_path / "two")], check=True, env=env)
    one, two = (_comparable(pd.read_csv(tmp_path / d / HISTORY_FILE)) for d in ("one", "two"))
    pd.testing.assert_frame_equal(one, two, atol=1e-5, rtol=1e-4)
    a, b = (torch.load(tmp_path / d / "final.pt") for d in ("one", "two"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_ranks_split_every_global_batch_and_gradient_weightings_are_refused():
    from mdmt.errors import ConfigError
    from mdmt.train.distributed import DistContext, ShardedBatchSampler, check_weighting

    batches = [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    shards = [list(ShardedBatchSampler(batches, DistContext(rank, 2))) for rank in range(2)]
    assert shards == [[[0, 2, 4], [5, 7]], [[1, 3], [6]]]  # the 1-sample batch cannot feed 2 ranks: skipped by both
    check_weighting("gradnorm", DistContext())  # one process: anything goes
    check_weighting("uncertainty", DistContext(0, 2))
    for name in ("gradnorm", "pcgrad"):
        with pytest.raises(ConfigError, match=name):
            check_weighting(name, DistContext(1, 2))


# ------------------------------------------------------------------------------------------ safe checkpoints
class _Planted:
    """A pickle that runs code when unpickled without ``weights_only``."""

    def __reduce__(self):
        return (Path.touch, (Path(_PLANTED_MARK),))


_PLANTED_MARK = ""


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    from mdmt.errors import DataError

    global _PLANTED_MARK
    _PLANTED_MARK = str(tmp_path / "pwned")
    path = tmp_path / "best.pt"
    torch.save({"format": 2, "model": {}, "payload": _Planted()}, path)
    with pytest.raises(DataError, match="best.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_truncated_empty_or_foreign_checkpoints_are_clear_errors(reference, tmp_path, content):
    from mdmt.errors import DataError

    _, run_dir, _, _ = reference
    path = tmp_path / LAST_CHECKPOINT
    if content is None:  # a real checkpoint cut in half
        data = (run_dir / LAST_CHECKPOINT).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=LAST_CHECKPOINT):
        load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "foreign.pt")  # another program's (or an older mdmt's) file
    with pytest.raises(DataError, match="format"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    from mdmt.train.checkpoints import rng_states, save_checkpoint, set_rng_states

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"model": {}, "rng": rng_states()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
