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
