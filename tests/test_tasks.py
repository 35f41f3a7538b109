"""Tasks: target encoding, label-present masks, bins, errors."""

import numpy as np
import pandas as pd
import pytest

from mdmt.errors import ConfigError, DataError
from mdmt.tasks import REGION_COLUMNS, bin_scores, get_task, make_task


def records():
    rows = [
        {"image_id": "P_1", "prognosis": 1.0},
        {"image_id": "P_2", "prognosis": 0.0},
        {"image_id": "123", "prognosis": np.nan, "brixia_global": 4.0, **dict(zip(REGION_COLUMNS, [0, 1, 1, 0, 1, 1]))},
        {"image_id": "456", "prognosis": np.nan, "brixia_global": 15.0, **dict(zip(REGION_COLUMNS, [3, 3, 3, 2, 2, 2]))},
    ]
    return pd.DataFrame(rows)


def test_paper_global_bins_edges():
    scores = np.arange(19)
    bins = bin_scores(scores, (5, 10, 15))
    assert bins.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 4
    assert np.isnan(bin_scores(np.array([np.nan]), (5,))[0])


def test_prognosis_present_only_where_labelled():
    targets, present = get_task("prognosis").encode(records())
    assert present.tolist() == [True, True, False, False]
    assert targets[:, 0].tolist() == [1, 0, 0, 0]


def test_severity_variants_encode_from_the_same_columns():
    df = records()
    t, p = get_task("severity_global4").encode(df)
    assert p.tolist() == [False, False, True, True] and t[2:, 0].tolist() == [0, 3]
    t, p = get_task("severity_lung4").encode(df)
    assert t[2].tolist() == [1, 1] and t[3].tolist() == [3, 2]  # right 2 → bin 1, 9 → 3; left 6 → bin 2
    task = get_task("severity_regions")
    t, p = task.encode(df)
    assert t.shape == (4, 6) and t[3].tolist() == [3, 3, 3, 2, 2, 2]
    assert task.flip_perm == (3, 4, 5, 0, 1, 2) and task.n_outputs == 6
    assert get_task("severity_ordinal").n_outputs == 18


def test_a_table_without_the_columns_has_no_labels():
    t, p = get_task("severity_global4").encode(pd.DataFrame({"image_id": ["a"], "prognosis": [1.0]}))
    assert not p.any() and t.shape == (1, 1)


def test_out_of_range_labels_name_the_id():
    df = pd.DataFrame({"image_id": ["P_9"], "prognosis": [2.0]})
    with pytest.raises(DataError, match="P_9"):
        get_task("prognosis").encode(df)


def test_manifest_task_maps_class_names_and_rejects_unknown_values():
    task = make_task("effusion", "eff", classes=["no", "yes"])
    t, p = task.encode(pd.DataFrame({"image_id": ["a", "b", "c"], "eff": ["YES", " no", None]}))
    assert t[:, 0].tolist() == [1, 0, 0] and p.tolist() == [True, True, False]
    with pytest.raises(DataError, match="maybe"):
        task.encode(pd.DataFrame({"image_id": ["a"], "eff": ["maybe"]}))


def test_unknown_task_lists_the_choices():
    with pytest.raises(ConfigError, match="severity_global4"):
        get_task("severity")


def test_tasks_pickle_for_worker_processes():
    import pickle

    for task in (get_task("prognosis"), get_task("severity_lung4"), make_task("x", "col", classes=["a", "b"])):
        again = pickle.loads(pickle.dumps(task))
        df = pd.DataFrame({"image_id": ["1"], "prognosis": [1.0], "col": ["b"], **{c: [1] for c in REGION_COLUMNS}})
        assert [a.tolist() for a in again.encode(df)] == [a.tolist() for a in task.encode(df)]


def test_training_evaluation_and_predict_bin_the_global_score_the_same_way():
    """The same global scores through the training targets, the metrics' bins and predict's columns."""
    import torch

    from mdmt.evaluate.metrics import severity_metrics
    from mdmt.tasks import GLOBAL_BIN_NAMES, global_bins

    integers = np.arange(19, dtype=float)
    targets = get_task("severity_global4").encode(pd.DataFrame({"image_id": integers.astype(str),
                                                                 "brixia_global": integers}))[0][:, 0]
    np.testing.assert_array_equal(targets, global_bins(integers))
    # continuous predicted scores, spread evenly over six regions (14.99 and 4.5 sit on the edges)
    totals = np.array([0.0, 4.4, 4.5, 9.49, 9.5, 14.49, 14.99, 18.0])
    regions = torch.tensor(np.repeat(totals[:, None] / 6, 6, axis=1), dtype=torch.float64)
    columns = get_task("severity_regions").film_columns(regions)
    expected = [0, 0, 1, 1, 2, 2, 3, 3]
    assert columns["brixia_bin"].tolist() == global_bins(totals).tolist() == expected
    assert columns["brixia_bin_range"].tolist() == [GLOBAL_BIN_NAMES[b] for b in expected]
    # true regional scores whose global sums 0, 5, 10, 15 lie in those bins: the metrics' bins of the predicted
    # sums agree with predict's on every film exactly when global4 accuracy is 1
    by_bin = {0: [0] * 6, 1: [1, 1, 1, 1, 1, 0], 2: [2, 2, 2, 2, 1, 1], 3: [3, 3, 3, 2, 2, 2]}
    truth = np.array([by_bin[b] for b in expected], dtype=float)
    assert severity_metrics("regions", truth, regions.numpy())["global4_accuracy"] == 1.0


def test_a_plugin_task_is_one_registered_class():
    from dataclasses import dataclass

    from mdmt.tasks import TASKS, RegressionTask

    @dataclass
    class AgeParams:
        column: str = "age"

    @TASKS.register("age_test_only", AgeParams, "a regression task of a plug-in file")
    def age(params: AgeParams, name: str) -> RegressionTask:
        return RegressionTask(name, (params.column,), 1, 0, lambda r: r[params.column].to_numpy(float))

    task = get_task("age_test_only")
    assert task.scorer == "regression" and task.n_outputs == 1
    targets, present = task.encode(pd.DataFrame({"image_id": ["a", "b"], "age": [61.0, np.nan]}))
    assert targets[:, 0].tolist() == [61.0, 0.0] and present.tolist() == [True, False]
    assert task.entry(["m"], "m")["scorer"] == "regression"
