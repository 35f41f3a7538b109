"""Strategies, run specs, splits pairing, the label-permutation control, and whole runs on the tiny twin."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdmt.config import Config, load_config
from mdmt.errors import ConfigError
from mdmt.tasks import get_task
from mdmt.train import run as run_module
from mdmt.train.engine import load_model_state
from mdmt.train.run import DONE_FILE, RunSpec, build_data, build_splits, folds_for, train_run
from mdmt.train.strategies import (
    SEVERITY_LABEL_COLUMNS,
    STRATEGIES,
    dependencies,
    get_strategy,
    permute_severity_labels,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ------------------------------------------------------------------------------------------ specs and deps
def test_run_dir_and_key_follow_the_contract(tmp_path):
    spec = RunSpec("mdmt", "resnet18", "loco", 3, 7)
    assert spec.key == "mdmt/resnet18/loco/3/7"
    assert spec.run_dir(tmp_path) == tmp_path / "runs" / "mdmt" / "resnet18" / "loco" / "fold3" / "seed7"


@pytest.mark.parametrize("loco_fold", [0, 2])
def test_ft_on_loco_pairs_with_the_configured_brixia_fold(loco_fold):
    config = Config()
    config.protocol.severity_loco_fold = loco_fold
    assert dependencies(RunSpec("ft", "b", "loco", 3, 5), config) == [RunSpec("stl_severity", "b", "cv5", loco_fold, 5)]
    assert dependencies(RunSpec("ft", "b", "cv5", 3, 5), config) == [RunSpec("stl_severity", "b", "cv5", 3, 5)]


def test_mdmt_depends_on_both_stl_runs_only_with_stl_average():
    config = Config()
    spec = RunSpec("mdmt", "b", "loco", 4, 1)
    config.train.mdmt_init = "imagenet"
    assert dependencies(spec, config) == []
    config.train.mdmt_init = "stl_average"
    expected = [RunSpec("stl_prognosis", "b", "loco", 4, 1), RunSpec("stl_severity", "b", "cv5", 0, 1)]
    assert dependencies(spec, config) == expected
    config.train.mdmt_init = "magic"
    with pytest.raises(ConfigError, match="mdmt_init"):
        dependencies(spec, config)


def test_single_task_runs_have_no_dependencies_and_their_own_task():
    config = Config()
    config.model.severity_task = "severity_regions"
    assert {n: s.task_names(config) for n, s in STRATEGIES.items()} == {
        "stl_prognosis": ("prognosis",), "stl_severity": ("severity_regions",), "ft": ("prognosis",),
        "mdmt": ("prognosis", "severity_regions"),
    }
    for name in ("stl_prognosis", "stl_severity"):
        assert dependencies(RunSpec(name, "b", "cv5", 0, 0), config) == []
    with pytest.raises(ConfigError, match="unknown strategy"):
        get_strategy("nope")


def test_both_configs_load():
    paper = load_config(CONFIGS / "paper.yaml")
    demo = load_config(CONFIGS / "demo.yaml")
    assert len(paper.grid.backbones) == len(set(paper.grid.backbones)) == 18
    assert (paper.train.batch_size, paper.model.input_size, paper.train.mdmt_init) == (128, 256, "stl_average")
    assert demo.model.backbone == "tiny_cnn" and demo.model.severity_task == "severity_regions"


# ------------------------------------------------------------------------------------------ the control
def test_permuted_labels_move_whole_label_sets_among_training_rows_only():
    rng = np.random.default_rng(0)
    n = 40
    records = pd.DataFrame({"image_id": [str(i) for i in range(n)]})
    regions = rng.integers(0, 4, (n, 6)).astype(float)
    for j, column in enumerate(SEVERITY_LABEL_COLUMNS[:6]):
        records[column] = regions[:, j]
    records["brixia_global"] = regions.sum(axis=1)
    rows = np.arange(0, 30)
    out = permute_severity_labels(records, rows, seed=3)
    cols = list(SEVERITY_LABEL_COLUMNS)
    pd.testing.assert_frame_equal(out.iloc[30:], records.iloc[30:])
    before = {tuple(r) for r in records.iloc[rows][cols].to_numpy()}
    after = {tuple(r) for r in out.iloc[rows][cols].to_numpy()}
    assert before == after  # each image got another image's complete, consistent label set
    assert (out.iloc[rows][cols].to_numpy() != records.iloc[rows][cols].to_numpy()).any(axis=1).mean() > 0.8
    assert out[cols].equals(permute_severity_labels(records, rows, seed=3)[cols])
    assert not out[cols].equals(permute_severity_labels(records, rows, seed=4)[cols])


# ------------------------------------------------------------------------------------------ splits
def _tiny(tiny_config: Config, results: Path, **train: object) -> Config:
    return dataclasses.replace(
        tiny_config,
        results_dir=str(results),
        model=dataclasses.replace(tiny_config.model, severity_task="severity_regions", input_size=32),
        train=dataclasses.replace(tiny_config.train, **{"max_epochs": 2, "device": "cpu", **train}),
    )


def test_loco_folds_pair_with_one_brixia_cv_fold(tiny_config, tiny_caches):
    config = dataclasses.replace(tiny_config, protocol=dataclasses.replace(tiny_config.protocol, severity_loco_fold=1))
    afc = tiny_caches["aiforcovid"].records
    folds = folds_for("loco", config, afc)
    assert len(folds) == afc["center"].nunique()
    cv = build_splits(config, tiny_caches, "cv5", 1, seed=0)
    for fold in folds[:2]:
        splits = build_splits(config, tiny_caches, "loco", fold, seed=0)
        assert list(splits["brixia"].test) == list(cv["brixia"].test)
        held_out = set(afc.set_index("image_id").loc[list(splits["aiforcovid"].test), "center"])
        assert len(held_out) == 1
    for split in cv.values():
        parts = [set(split.train), set(split.val), set(split.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_permute_flag_changes_only_the_brixia_training_targets(tiny_config, tiny_caches, tmp_path):
    config = _tiny(tiny_config, tmp_path, permute_severity_labels=True)
    strategy = get_strategy("mdmt")
    tasks = [get_task(n) for n in strategy.task_names(config)]
    splits = build_splits(config, tiny_caches, "cv5", 0, seed=0)
    data = build_data(config, strategy, tiny_caches, splits, tasks, seed=0)
    brixia = tiny_caches["brixia"].records
    true_targets, _ = get_task("severity_regions").encode(brixia)
    changed, seen = 0, 0
    for batch in data.train:
        on_brixia = batch["present"]["severity_regions"].numpy()
        rows = batch["row"].numpy()[on_brixia]
        got = batch["targets"]["severity_regions"].numpy()[on_brixia]
        changed += int((got != true_targets[rows]).any(axis=1).sum())
        seen += len(rows)
    assert seen > 0 and changed / seen > 0.5
    for batch in data.val:
        on_brixia = batch["present"]["severity_regions"].numpy()
        rows = batch["row"].numpy()[on_brixia]
        assert np.array_equal(batch["targets"]["severity_regions"].numpy()[on_brixia], true_targets[rows])


# ------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def finished_runs(tiny_config, tiny_caches, tmp_path_factory):
    """stl_prognosis, stl_severity, ft and MDMT (STL-average init) on cv5 fold 0, 2 epochs each."""
    config = _tiny(tiny_config, tmp_path_factory.mktemp("runs"), mdmt_init="stl_average")
    order = ["stl_prognosis", "stl_severity", "ft", "mdmt"]
    return config, {name: train_run(config, RunSpec(name, "tiny_cnn", "cv5", 0, 0), progress=False) for name in order}


def test_run_directories_hold_the_contract_files(finished_runs):
    config, dirs = finished_runs
    common = {"config.yaml", "spec.json", "history.csv", "best.pt", "last.pt", "metrics.json", DONE_FILE}
    severity = "severity_regions"
    expected_tasks = {"stl_prognosis": {"prognosis"}, "stl_severity": {severity}, "ft": {"prognosis"},
                      "mdmt": {"prognosis", severity}}
    for name, run_dir in dirs.items():
        files = {p.name for p in run_dir.iterdir()}
        assert files == common | {f"predictions_{t}.csv" for t in expected_tasks[name]}, name
        assert set(json.loads((run_dir / "metrics.json").read_text())) == expected_tasks[name]
        spec = RunSpec(name, "tiny_cnn", "cv5", 0, 0)
        assert json.loads((run_dir / "spec.json").read_text()) == dataclasses.asdict(spec)
        assert load_config(run_dir / "config.yaml").run.strategy == name


def test_prognosis_predictions_cover_the_test_split(finished_runs, tiny_caches):
    config, dirs = finished_runs
    test_ids = set(build_splits(config, tiny_caches, "cv5", 0, seed=0)["aiforcovid"].test)
    for name in ("stl_prognosis", "ft", "mdmt"):
        table = pd.read_csv(dirs[name] / "predictions_prognosis.csv", dtype={"image_id": str, "patient_id": str})
        assert list(table.columns[:5]) == ["image_id", "patient_id", "center", "dataset", "fold"]
        assert {"y_true", "score", "y_pred"} <= set(table.columns)
        assert set(table["image_id"]) == test_ids and len(table) == len(test_ids)
        assert set(table["y_true"]) <= {0, 1} and set(table["y_pred"]) <= {0, 1}
        assert table["score"].between(0, 1).all()
        assert ((table["score"] > 0.5) == (table["y_pred"] == 1)).all()
        truth = tiny_caches["aiforcovid"].records.set_index("image_id").loc[table["image_id"], "prognosis"]
        assert np.array_equal(truth.to_numpy(), table["y_true"].to_numpy())


def test_ft_starts_from_the_severity_backbone(finished_runs):
    config, dirs = finished_runs
    from mdmt.models.multitask import build_model

    tasks = [get_task("prognosis")]
    model = build_model(config.model, tasks)
    get_strategy("ft").init(model, RunSpec("ft", "tiny_cnn", "cv5", 0, 0), config, Path(config.results_dir))
    severity = load_model_state(dirs["stl_severity"])
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, severity[k]) for k, v in backbone.items())


def test_mdmt_starts_from_the_average_of_the_stl_backbones(finished_runs):
    config, dirs = finished_runs
    from mdmt.models.multitask import build_model

    model = build_model(config.model, [get_task("prognosis"), get_task("severity_regions")])
    get_strategy("mdmt").init(model, RunSpec("mdmt", "tiny_cnn", "cv5", 0, 0), config, Path(config.results_dir))
    prognosis, severity = load_model_state(dirs["stl_prognosis"]), load_model_state(dirs["stl_severity"])
    beta = config.train.stl_beta
    weights = [name for name, _ in model.named_parameters() if name.startswith("backbone.")]
    assert weights
    for name in weights:
        expected = beta * prognosis[name] + (1 - beta) * severity[name]
        assert torch.allclose(model.state_dict()[name], expected), name


def test_finished_run_returns_without_training(finished_runs, monkeypatch):
    config, dirs = finished_runs

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(run_module, "fit", fail)
    assert train_run(config, RunSpec("mdmt", "tiny_cnn", "cv5", 0, 0), progress=False) == dirs["mdmt"]


def test_missing_dependency_is_named(tiny_config, tmp_path):
    config = _tiny(tiny_config, tmp_path, mdmt_init="stl_average")
    with pytest.raises(ConfigError, match="stl_severity/tiny_cnn/cv5/0/0"):
        train_run(config, RunSpec("ft", "tiny_cnn", "loco", 2, 0), progress=False)


def test_stl_severity_refuses_a_loco_protocol(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="cv5"):
        train_run(_tiny(tiny_config, tmp_path), RunSpec("stl_severity", "tiny_cnn", "loco", 1, 0), progress=False)


def test_resuming_under_a_different_config_is_refused(finished_runs, tiny_config, tmp_path):
    config = _tiny(tiny_config, tmp_path)
    spec = RunSpec("stl_prognosis", "tiny_cnn", "cv5", 1, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    from mdmt.config import save_config

    save_config(dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.5)), run_dir / "config.yaml")
    with pytest.raises(ConfigError, match="different config"):
        train_run(config, spec, progress=False)


def test_an_extra_head_from_a_sheet_column_trains_beside_prognosis(tiny_config, tiny_caches, tmp_path):
    from mdmt.config import TaskConfig

    config = _tiny(tiny_config, tmp_path)
    extra = [TaskConfig(name="death", column="Death", kind="classification", classes=["0", "1"], dataset="aiforcovid")]
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, extra_tasks=extra))
    assert [t.name for t in run_module.run_tasks(get_strategy("stl_severity"), config)] == ["severity_regions"]
    run_dir = train_run(config, RunSpec("stl_prognosis", "tiny_cnn", "cv5", 0, 0), progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"prognosis", "death"}
    table = pd.read_csv(run_dir / "predictions_death.csv", dtype={"image_id": str})
    truth = tiny_caches["aiforcovid"].records.set_index("image_id").loc[table["image_id"], "Death"]
    assert np.array_equal(truth.to_numpy(dtype=float), table["y_true"].to_numpy(dtype=float))
    history = pd.read_csv(run_dir / "history.csv")
    assert history["train_death_loss"].notna().all()
