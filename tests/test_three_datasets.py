"""Any number of datasets: a third dataset written as a plain manifest trains beside AIforCOVID and BrixIA from
config alone, each sample adding the losses of the tasks its dataset labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mdmt.cli import CONFIGS_DIR, main
from mdmt.config import load_config
from mdmt.data.datasets import prepare, select
from mdmt.data.loaders import build_data
from mdmt.protocols import build_splits
from mdmt.runs import RunSpec
from mdmt.tasks import get_task
from mdmt.train.strategies import get_strategy


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The tiny twin with its cohort, and a config file (demo3's layout) pointing at it: nothing else is needed."""
    from mdmt.synth import generate

    data = tmp_path_factory.mktemp("tiny-cohort")
    generate(data, preset="tiny", seed=0, progress=False, cohort=True)
    work = tmp_path_factory.mktemp("three")
    values = yaml.safe_load((CONFIGS_DIR / "demo3.yaml").read_text())
    values["data"].update(image_size=32, crop="lungs_classical", cache_dir=str(work / "cache"))
    values["data"]["datasets"].update({
        "aiforcovid": {"params": {"root": str(data / "AIforCOVID")}},
        "brixia": {"params": {"root": str(data / "BRIXIA")}},
    })
    values["data"]["datasets"]["cohort"]["params"]["path"] = str(data / "COHORT" / "manifest.csv")
    values["model"]["input_size"] = 32
    values["train"].update(max_epochs=2, warmup_epochs=0, batch_size=16)
    values["results_dir"] = str(work / "results")
    path = work / "three.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_cohort_reads_with_both_labels(study):
    config = load_config(study)
    caches = prepare(config, ["cohort"], progress=False)
    records = caches["cohort"].records
    assert len(records) > 0 and set(records["center"]) == {"G", "H"}
    assert set(records["prognosis"].dropna()) <= {0.0, 1.0} and records["prognosis"].notna().all()
    regions, present = get_task("severity_regions").encode(records)
    assert present.all() and regions.min() >= 0 and regions.max() <= 3


def test_three_datasets_mix_in_the_training_batches(study):
    config = load_config(study)
    strategy = get_strategy("mdmt3", config)
    datasets = select(config, strategy.datasets)
    caches = prepare(config, strategy.datasets, progress=False)
    tasks = [get_task(n) for n in strategy.task_names(config)]
    splits = build_splits(config, datasets, caches, "cv5", 0, 0)
    data = build_data(config, caches, splits, tasks, seed=0)
    sources, both = set(), 0
    for batch in data.train:
        source = batch["source"].numpy()
        sources |= set(source.tolist())
        prognosis, severity = batch["present"]["prognosis"].numpy(), batch["present"]["severity_regions"].numpy()
        assert not prognosis[source == 1].any() and not severity[source == 0].any()  # the indicator masks
        both += int((prognosis & severity)[source == 2].sum())
    assert sources == {0, 1, 2}
    assert both == len(splits["cohort"].train)  # every cohort image trains both heads


def test_mdmt_trains_on_three_datasets_from_the_config_file_alone(study):
    args = ["train", "--config", str(study), "--strategy", "mdmt3", "--protocol", "cv5", "--fold", "0"]
    assert main(args) == 0
    config = load_config(study)
    run_dir = RunSpec("mdmt3", "tiny_cnn", "cv5", 0, 0).run_dir(config.results_dir)
    prognosis = pd.read_csv(run_dir / "predictions_prognosis.csv", dtype={"image_id": str})
    assert set(prognosis["dataset"]) == {"aiforcovid", "cohort"}
    severity = pd.read_csv(run_dir / "predictions_severity_regions.csv", dtype={"image_id": str})
    assert set(severity["dataset"]) == {"brixia", "cohort"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"prognosis", "prognosis@aiforcovid", "prognosis@cohort", "severity_regions@cohort"} <= set(metrics)
    assert metrics["prognosis"] == metrics["prognosis@aiforcovid"]  # scored on the home dataset
    tasks = json.loads((run_dir / "tasks.json").read_text())
    assert tasks["prognosis"]["home"] == "aiforcovid" and tasks["severity_regions"]["home"] == "brixia"
    assert np.isfinite(pd.read_csv(run_dir / "history.csv")["train_loss"]).all()
