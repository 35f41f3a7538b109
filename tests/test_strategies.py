"""Strategies as data, run specs, split pairing, the label-permutation control, and whole runs on the tiny twin."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mdmt.config import Config, PluginRef, load_config, parse_override
from mdmt.data.datasets import select
from mdmt.data.loaders import build_data, permute_labels
from mdmt.errors import ConfigError
from mdmt.protocols import build_splits, get_protocol
from mdmt.runs import DONE_FILE, RunSpec
from mdmt.tasks import REGION_COLUMNS, get_task
from mdmt.train import estimators as estimators_module
from mdmt.train import run as run_module
from mdmt.train.checkpoints import load_model_state
from mdmt.train.run import finished_run, train_run
from mdmt.train.strategies import dependencies, get_strategy

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "mdmt" / "configs"
SEVERITY_LABELS = (*REGION_COLUMNS, "brixia_global")


def _config(**sections: object) -> Config:
    """Defaults with the two paper datasets configured (no files needed for specs and dependencies)."""
    overrides = ["data.datasets.aiforcovid.params.root=A", "data.datasets.brixia.params.root=B"]
    overrides += [f"{k}={v}" for k, v in sections.items()]
    return load_config(None, [parse_override(o) for o in overrides])


def _splits(config: Config, caches: dict, protocol: str, fold: int, seed: int = 0) -> dict:
    datasets = select(config, list(caches))
    return build_splits(config, datasets, caches, protocol, fold, seed)


# ------------------------------------------------------------------------------------------ specs and deps
def test_run_dir_and_key_follow_the_contract(tmp_path):
    spec = RunSpec("mdmt", "resnet18", "loco", 3, 7)
    assert spec.key == "mdmt/resnet18/loco/3/7"
    assert spec.run_dir(tmp_path) == tmp_path / "runs" / "mdmt" / "resnet18" / "loco" / "fold3" / "seed7"


@pytest.mark.parametrize("loco_fold", [0, 2])
def test_ft_on_loco_pairs_with_the_configured_brixia_fold(loco_fold):
    config = _config(**{"protocol.paired_cv_fold": loco_fold})
    assert dependencies(RunSpec("ft", "b", "loco", 3, 5), config) == [RunSpec("stl_severity", "b", "cv5", loco_fold, 5)]
    assert dependencies(RunSpec("ft", "b", "cv5", 3, 5), config) == [RunSpec("stl_severity", "b", "cv5", 3, 5)]


def test_mdmt_depends_on_the_strategies_it_starts_from():
    spec = RunSpec("mdmt", "b", "loco", 4, 1)
    assert dependencies(spec, _config()) == []
    config = _config(**{"strategies.mdmt.params.start_from": "[stl_prognosis, stl_severity]"})
    expected = [RunSpec("stl_prognosis", "b", "loco", 4, 1), RunSpec("stl_severity", "b", "cv5", 0, 1)]
    assert dependencies(spec, config) == expected
    config = _config(**{"strategies.mdmt.params.start_from": "[magic]"})
    with pytest.raises(ConfigError, match="unknown strategy 'magic'"):
        dependencies(spec, config)


def test_strategies_are_data_with_their_tasks_and_datasets():
    config = _config(**{"model.severity_task": "severity_regions"})
    names = {n: (get_strategy(n, config).task_names(config), get_strategy(n, config).datasets)
             for n in config.strategies}
    assert names == {
        "stl_prognosis": (("prognosis",), ("aiforcovid",)),
        "stl_severity": (("severity_regions",), ("brixia",)),
        "ft": (("prognosis",), ("aiforcovid",)),
        "mdmt": (("prognosis", "severity_regions"), ("aiforcovid", "brixia")),
        "mdmt_permuted": (("prognosis", "severity_regions"), ("aiforcovid", "brixia")),
    }
    assert get_strategy("mdmt_permuted", config).stage.permute == ["brixia"]
    for name in ("stl_prognosis", "stl_severity"):
        assert dependencies(RunSpec(name, "b", "cv5", 0, 0), config) == []
    with pytest.raises(ConfigError, match="unknown strategy"):
        get_strategy("nope", config)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("strategies.x.params.datasets", "[aiforcovid, elsewhere]", "elsewhere"),
    ("strategies.x.params.permute", "[brixia]", "permute"),
    ("strategies.x.params.select", "severity", "select"),
    ("strategies.x.params.start_weights", "[0.3]", "start_weights"),
    ("strategies.x.params.epochs", "3", "epochs"),
])
def test_a_bad_strategy_entry_names_its_key(key, value, fragment):
    base = {"strategies.x.params.datasets": "[aiforcovid]", "strategies.x.params.tasks": "[prognosis]",
            "strategies.x.params.start_from": "[stl_prognosis]"}
    config = _config(**{**base, key: value})
    with pytest.raises(ConfigError, match=fragment):
        get_strategy("x", config).check(RunSpec("x", "b", "cv5", 0, 0), config)


def test_shipped_configs_load():
    paper = load_config(CONFIGS / "paper.yaml")
    demo = load_config(CONFIGS / "demo.yaml")
    demo3 = load_config(CONFIGS / "demo3.yaml")
    assert len(paper.grid.backbones) == len({b.name for b in paper.grid.backbones}) == 18
    assert (paper.train.batch_size, paper.model.input_size) == (128, 256)
    assert get_strategy("mdmt", paper).stage.start_from == ["stl_prognosis", "stl_severity"]
    assert set(paper.strategies) >= {"stl_prognosis", "stl_severity", "ft", "mdmt"}
    assert demo.model.backbone.name == "tiny_cnn" and demo.model.severity_task == "severity_regions"
    assert "mdmt_permuted" in demo.grid.strategies
    assert get_strategy("mdmt3", demo3).datasets == ("aiforcovid", "brixia", "cohort")


# ------------------------------------------------------------------------------------------ the control
def test_permuted_labels_move_whole_label_sets_among_training_rows_only():
    rng = np.random.default_rng(0)
    n = 40
    records = pd.DataFrame({"image_id": [str(i) for i in range(n)]})
    regions = rng.integers(0, 4, (n, 6)).astype(float)
    for j, column in enumerate(REGION_COLUMNS):
        records[column] = regions[:, j]
    records["brixia_global"] = regions.sum(axis=1)
    rows = np.arange(0, 30)
    out = permute_labels(records, rows, SEVERITY_LABELS, seed=3)
    cols = list(SEVERITY_LABELS)
    pd.testing.assert_frame_equal(out.iloc[30:], records.iloc[30:])
    before = {tuple(r) for r in records.iloc[rows][cols].to_numpy()}
    after = {tuple(r) for r in out.iloc[rows][cols].to_numpy()}
    assert before == after  # each image got another image's complete, consistent label set
    assert (out.iloc[rows][cols].to_numpy() != records.iloc[rows][cols].to_numpy()).any(axis=1).mean() > 0.8
    assert out[cols].equals(permute_labels(records, rows, SEVERITY_LABELS, seed=3)[cols])
    assert not out[cols].equals(permute_labels(records, rows, SEVERITY_LABELS, seed=4)[cols])


# ------------------------------------------------------------------------------------------ splits
def _tiny(tiny_config: Config, results: Path, start_from: list[str] | None = None, **train: object) -> Config:
    strategies = dict(tiny_config.strategies)
    if start_from is not None:
        mdmt = PluginRef.of(strategies["mdmt"])
        strategies["mdmt"] = PluginRef(mdmt.name, {**mdmt.params, "start_from": start_from})
    return dataclasses.replace(
        tiny_config,
        strategies=strategies,
        results_dir=str(results),
        model=dataclasses.replace(tiny_config.model, severity_task="severity_regions", input_size=32),
        train=dataclasses.replace(tiny_config.train, **{"max_epochs": 2, **train}),
    )


def test_loco_folds_pair_with_one_brixia_cv_fold(tiny_config, tiny_caches):
    config = dataclasses.replace(tiny_config, protocol=dataclasses.replace(tiny_config.protocol, paired_cv_fold=1))
    afc = tiny_caches["aiforcovid"].records
    folds = get_protocol("loco").folds(config)
    assert len(folds) == afc["center"].nunique()
    cv = _splits(config, tiny_caches, "cv5", 1)
    for fold in folds[:2]:
        splits = _splits(config, tiny_caches, "loco", fold)
        assert list(splits["brixia"].test) == list(cv["brixia"].test)
        held_out = set(afc.set_index("image_id").loc[list(splits["aiforcovid"].test), "center"])
        assert len(held_out) == 1
    for split in cv.values():
        parts = [set(split.train), set(split.val), set(split.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_the_permuted_control_changes_only_the_brixia_training_targets(tiny_config, tiny_caches, tmp_path):
    config = _tiny(tiny_config, tmp_path)
    strategy = get_strategy("mdmt_permuted", config)
    tasks = [get_task(n) for n in strategy.task_names(config)]
    splits = _splits(config, tiny_caches, "cv5", 0)
    permute = {name: select(config, [name])[name].label_columns for name in strategy.stage.permute}
    data = build_data(config, tiny_caches, splits, tasks, seed=0, permute=permute)
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
    config = _tiny(tiny_config, tmp_path_factory.mktemp("runs"), start_from=["stl_prognosis", "stl_severity"])
    order = ["stl_prognosis", "stl_severity", "ft", "mdmt"]
    return config, {name: train_run(config, RunSpec(name, "tiny_cnn", "cv5", 0, 0), progress=False) for name in order}


def test_run_directories_hold_the_contract_files(finished_runs):
    config, dirs = finished_runs
    common = {"config.yaml", "spec.json", "inputs.json", "tasks.json", "history.csv", "best.pt", "last.pt",
              "metrics.json", "calibration.json", "ood_features.npz", "metadata.json", "model_card.md", DONE_FILE}
    severity = "severity_regions"
    expected_tasks = {"stl_prognosis": {"prognosis"}, "stl_severity": {severity}, "ft": {"prognosis"},
                      "mdmt": {"prognosis", severity}}
    for name, run_dir in dirs.items():
        files = {p.name for p in run_dir.iterdir()}
        predictions = {f"{part}predictions_{t}.csv" for t in expected_tasks[name] for part in ("", "val_")}
        assert files == common | predictions, name
        assert set(json.loads((run_dir / "metrics.json").read_text())) == expected_tasks[name]
        spec = RunSpec(name, "tiny_cnn", "cv5", 0, 0)
        assert json.loads((run_dir / "spec.json").read_text()) == dataclasses.asdict(spec)
        assert load_config(run_dir / "config.yaml").run.strategy == name


def test_prognosis_predictions_cover_the_test_split(finished_runs, tiny_caches):
    config, dirs = finished_runs
    test_ids = set(_splits(config, tiny_caches, "cv5", 0)["aiforcovid"].test)
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
    get_strategy("ft", config).init(model, RunSpec("ft", "tiny_cnn", "cv5", 0, 0), config, Path(config.results_dir))
    severity = load_model_state(dirs["stl_severity"])
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, severity[k]) for k, v in backbone.items())


def test_mdmt_starts_from_the_average_of_the_stl_backbones(finished_runs):
    config, dirs = finished_runs
    from mdmt.models.multitask import build_model

    model = build_model(config.model, [get_task("prognosis"), get_task("severity_regions")])
    get_strategy("mdmt", config).init(model, RunSpec("mdmt", "tiny_cnn", "cv5", 0, 0), config, Path(config.results_dir))
    prognosis, severity = load_model_state(dirs["stl_prognosis"]), load_model_state(dirs["stl_severity"])
    beta = 0.5
    weights = [name for name, _ in model.named_parameters() if name.startswith("backbone.")]
    assert weights
    for name in weights:
        expected = beta * prognosis[name] + (1 - beta) * severity[name]
        assert torch.allclose(model.state_dict()[name], expected), name


def test_finished_run_returns_without_training(finished_runs, monkeypatch):
    config, dirs = finished_runs

    def fail(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(estimators_module, "fit", fail)
    assert train_run(config, RunSpec("mdmt", "tiny_cnn", "cv5", 0, 0), progress=False) == dirs["mdmt"]


def test_missing_dependency_is_named(tiny_config, tmp_path):
    config = _tiny(tiny_config, tmp_path)
    with pytest.raises(ConfigError, match="stl_severity/tiny_cnn/cv5/0/0"):
        train_run(config, RunSpec("ft", "tiny_cnn", "loco", 2, 0), progress=False)


def test_stl_severity_refuses_a_loco_protocol(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="cv5"):
        train_run(_tiny(tiny_config, tmp_path), RunSpec("stl_severity", "tiny_cnn", "loco", 1, 0), progress=False)


def test_a_finished_run_with_other_inputs_is_refused_or_rerun(finished_runs, monkeypatch, tmp_path):
    config, dirs = finished_runs
    spec = RunSpec("stl_prognosis", "tiny_cnn", "cv5", 0, 0)
    shutil.copytree(dirs["stl_prognosis"], spec.run_dir(tmp_path))
    config = dataclasses.replace(config, results_dir=str(tmp_path))

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("fit was called")

    monkeypatch.setattr(estimators_module, "fit", fail)
    assert train_run(config, spec, progress=False) == spec.run_dir(tmp_path)  # same inputs: nothing to do
    changed = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.5))
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train_run(changed, spec, progress=False)
    other_folds = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, cv_folds=4))
    with pytest.raises(ConfigError, match=r"splits\.aiforcovid"):
        train_run(other_folds, spec, progress=False)
    rerun = dataclasses.replace(changed, run=dataclasses.replace(changed.run, rerun_changed=True))
    with pytest.raises(RuntimeError, match="fit was called"):
        train_run(rerun, spec, progress=False)
    run_dir = spec.run_dir(tmp_path)
    assert not (run_dir / DONE_FILE).exists() and "fit was called" in (run_dir / "FAILED").read_text()


def _best_sha256(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()


def test_a_parent_trained_again_makes_its_child_stale(finished_runs, tiny_caches, tmp_path):
    config, dirs = finished_runs
    parents = json.loads((dirs["mdmt"] / "inputs.json").read_text())["parents"]
    assert parents == {name: {"checkpoint": _best_sha256(dirs[name])} for name in ("stl_prognosis", "stl_severity")}
    config = dataclasses.replace(config, results_dir=str(tmp_path))
    severity, ft = RunSpec("stl_severity", "tiny_cnn", "cv5", 0, 0), RunSpec("ft", "tiny_cnn", "cv5", 0, 0)
    for spec in (severity, ft):
        shutil.copytree(dirs[spec.strategy], spec.run_dir(tmp_path))
    before = _best_sha256(severity.run_dir(tmp_path))
    assert finished_run(config, ft, tiny_caches)  # the parent it started from: finished, nothing to do

    shutil.rmtree(severity.run_dir(tmp_path))  # the parent deleted and trained again (here with another rate)
    train_run(dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.01)), severity, progress=False)
    after = _best_sha256(severity.run_dir(tmp_path))
    assert after != before
    stale = re.escape(f"{ft.run_dir(tmp_path)} holds a finished run with other inputs "
                      "(parents.stl_severity.checkpoint changed)")
    with pytest.raises(ConfigError, match=stale):
        train_run(config, ft, progress=False)
    with pytest.raises(ConfigError, match=stale):
        finished_run(config, ft, tiny_caches)  # what the grid asks before it submits anything
    assert (ft.run_dir(tmp_path) / DONE_FILE).is_file()

    rerun = dataclasses.replace(config, run=dataclasses.replace(config.run, rerun_changed=True))
    assert train_run(rerun, ft, progress=False) == ft.run_dir(tmp_path)
    saved = json.loads((ft.run_dir(tmp_path) / "inputs.json").read_text())
    assert saved["parents"] == {"stl_severity": {"checkpoint": after}}
    assert finished_run(config, ft, tiny_caches)


def test_an_extra_head_from_a_sheet_column_trains_beside_prognosis(tiny_config, tiny_caches, tmp_path):
    from mdmt.config import TaskConfig

    config = _tiny(tiny_config, tmp_path)
    extra = [TaskConfig(name="death", column="Death", kind="classification", classes=["0", "1"], dataset="aiforcovid")]
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, extra_tasks=extra))
    stl_severity = get_strategy("stl_severity", config)
    tasks = run_module.run_tasks(stl_severity, config, select(config, stl_severity.datasets))
    assert [t.name for t in tasks] == ["severity_regions"]
    run_dir = train_run(config, RunSpec("stl_prognosis", "tiny_cnn", "cv5", 0, 0), progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"prognosis", "death"}
    table = pd.read_csv(run_dir / "predictions_death.csv", dtype={"image_id": str})
    truth = tiny_caches["aiforcovid"].records.set_index("image_id").loc[table["image_id"], "Death"]
    assert np.array_equal(truth.to_numpy(dtype=float), table["y_true"].to_numpy(dtype=float))
    history = pd.read_csv(run_dir / "history.csv")
    assert history["train_death_loss"].notna().all()


def test_ids_the_split_files_list_but_the_cache_lacks_are_listed():
    from mdmt.data.splits import Split
    from mdmt.train.run import missing_split_ids

    ids = np.array(["a"])
    splits = {"aiforcovid": Split("official-cv5", 0, ids, ids, ids, missing={"train": ["P_9"], "test": ["P_7", "P_8"]}),
              "brixia": Split("official-cv5", 0, ids, ids, ids)}
    table = missing_split_ids(splits)
    assert table.values.tolist() == [["aiforcovid", "train", "P_9"], ["aiforcovid", "test", "P_7"],
                                     ["aiforcovid", "test", "P_8"]]
    assert missing_split_ids({"brixia": splits["brixia"]}).empty
