"""Clinical data: the encoder (fitted on training records only), late fusion in mdmt_clinical, the clinical-only
baseline, and a clear error for a column the sheet lacks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mdmt.clinical_encoder import ENCODER_FILE, ClinicalEncoder
from mdmt.config import PluginRef
from mdmt.errors import ConfigError
from mdmt.runs import DONE_FILE, RunSpec, predictions_file

COLUMNS = ["Age", "Sex", "LDH", "PaO2", "DifficultyInBreathing", "RespiratoryFailure"]


def test_encoder_fits_on_train_only_with_missing_indicators() -> None:
    train = pd.DataFrame({"LDH": [100.0, 200.0, np.nan, 300.0], "Sex": ["M", "F", None, "M"]})
    encoder = ClinicalEncoder(["LDH", "Sex"]).fit(train)
    assert encoder.numeric["LDH"] == (200.0, pytest.approx(np.std([100, 200, 300])))
    assert encoder.names == ["LDH", "LDH_missing", "Sex=F", "Sex=M", "Sex_missing"]
    test = pd.DataFrame({"LDH": [5000.0, np.nan], "Sex": ["X", "F"]})
    features = encoder.transform(test)
    assert encoder.numeric["LDH"][0] == 200.0  # transforming other records never moves the fit
    assert features.dtype == np.float32 and features.shape == (2, 5)
    assert features[1, :2].tolist() == [0.0, 1.0]  # blank: the training mean (0) and the indicator
    assert features[0, 2:].tolist() == [0.0, 0.0, 0.0]  # an unseen category: no one-hot bit, not missing
    assert features[1, 2:].tolist() == [1.0, 0.0, 0.0]
    again = ClinicalEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    np.testing.assert_array_equal(again.transform(test), features)


def test_encoder_names_missing_columns() -> None:
    with pytest.raises(ConfigError, match="'PaO2'"):
        ClinicalEncoder(["PaO2"]).fit(pd.DataFrame({"LDH": [1.0]}))


def _config(tiny_config, tmp_path, **strategies):
    entries = dict(tiny_config.strategies)
    entries.update({name: PluginRef("train", params) for name, params in strategies.items()})
    return dataclasses.replace(tiny_config, strategies=entries, results_dir=str(tmp_path / "results"))


def test_mdmt_clinical_and_clinical_only_run(tiny_config, tiny_caches, tmp_path) -> None:
    from mdmt.infer.model_io import load_trained
    from mdmt.train.run import train_run

    config = _config(
        tiny_config, tmp_path,
        mdmt_clinical={"datasets": ["aiforcovid", "brixia"], "tasks": ["prognosis", "severity"], "clinical": COLUMNS},
        clinical_only={"datasets": ["aiforcovid"], "tasks": ["prognosis"], "clinical": COLUMNS, "estimator": "clinical_logistic"},
    )
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_epochs=1))
    for name in ("mdmt_clinical", "clinical_only"):
        run_dir = train_run(config, RunSpec(name, "tiny_cnn", "cv5", 0, 0), progress=False)
        assert (run_dir / DONE_FILE).is_file()
        state = json.loads((run_dir / ENCODER_FILE).read_text())
        assert state["columns"] == COLUMNS and "LDH_missing" in state["features"]
        predictions = pd.read_csv(run_dir / predictions_file("prognosis"))
        assert len(predictions) > 0 and predictions["score"].between(0, 1).all()
    assert not (run_dir / "best.pt").exists()  # the baseline trains no network
    with pytest.raises(ConfigError, match="trains no network"):
        load_trained(run_dir)


def test_fusion_adds_a_linear_clinical_term_to_the_heads_logits(tiny_config) -> None:
    from mdmt.models.multitask import build_model
    from mdmt.tasks import get_task

    tasks = [get_task("prognosis"), get_task("severity_global4")]
    torch.manual_seed(0)
    model = build_model(tiny_config.model, tasks, clinical_dim=3, fused=["prognosis"]).eval()
    weight, bias = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]), torch.tensor([0.0, 0.25])
    model.set_clinical_term("prognosis", weight, bias)
    x, clinical = torch.randn(2, 3, 48, 48), torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    with torch.no_grad():
        out = model(x, clinical)
        features = model.features(x)
        image_only = model.heads["prognosis"](features)
    expected = image_only + torch.tensor([[0.0, 2.25], [0.0, -1.75]])
    torch.testing.assert_close(out["prognosis"], expected)
    torch.testing.assert_close(out["severity_global4"], model.heads["severity_global4"](features))
    assert model.heads["prognosis"][0].in_features == model.feature_dim  # the head reads the image only
    assert "clinical.prognosis.weight" in model.state_dict() and not any(
        n.startswith("clinical.") for n, _ in model.named_parameters())  # kept fixed: buffers, not parameters
    with pytest.raises(ConfigError, match="clinical"):
        model(x)


def test_missing_clinical_column_is_a_clear_error(tiny_config, tiny_caches, tmp_path) -> None:
    from mdmt.train.run import train_run

    config = _config(tiny_config, tmp_path, bad={"datasets": ["aiforcovid"], "tasks": ["prognosis"],
                                                 "clinical": ["LDH", "Ferritin"]})
    with pytest.raises(ConfigError, match="Ferritin.*aiforcovid"):
        train_run(config, RunSpec("bad", "tiny_cnn", "cv5", 0, 0), progress=False)
    assert not RunSpec("bad", "tiny_cnn", "cv5", 0, 0).run_dir(config.results_dir).exists()


def test_demo_clinical_config_pairs_the_strategies() -> None:
    from mdmt.cli import config_path
    from mdmt.config import load_config
    from mdmt.evaluate.report_stats import DEFAULT_COMPARISONS
    from mdmt.train.strategies import get_strategy

    config = load_config(config_path("demo_clinical"))
    fused, baseline = get_strategy("mdmt_clinical", config), get_strategy("clinical_only", config)
    assert fused.stage.clinical == baseline.stage.clinical and "Death" not in fused.stage.clinical
    assert (baseline.stage.estimator, fused.stage.estimator) == ("clinical_logistic", "network")
    assert {("mdmt_clinical", "mdmt"), ("mdmt_clinical", "clinical_only")} <= set(DEFAULT_COMPARISONS)
