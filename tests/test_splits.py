"""Splits: the paper's k-fold rotation, leave-one-center-out, and the official split files read in place."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdmt.data.splits import (
    Split,
    kfold_splits,
    loco_splits,
    official_labels,
    official_splits,
    restrict,
    split_sizes,
)
from mdmt.errors import ConfigError, DataError

CENTER_SIZES = {"A": 60, "B": 110, "C": 45, "D": 85}


def synthetic_records(seed: int = 0) -> pd.DataFrame:
    """300 patients over 4 centers with center-dependent class balance; every 5th patient has 3 images."""
    rng = np.random.default_rng(seed)
    rows = []
    patient = 0
    for center, n in CENTER_SIZES.items():
        severe_rate = {"A": 0.7, "B": 0.4, "C": 0.5, "D": 0.3}[center]
        for _ in range(n):
            label = float(rng.random() < severe_rate)
            for image in range(3 if patient % 5 == 0 else 1):
                rows.append({"image_id": f"I{patient}_{image}", "patient_id": f"P{patient}", "center": center,
                             "prognosis": label})
            patient += 1
    return pd.DataFrame(rows)


def patients_of(records: pd.DataFrame, ids: np.ndarray) -> set[str]:
    return set(records.set_index("image_id").loc[list(ids), "patient_id"])


# ------------------------------------------------------------------------------------------ k-fold
def test_kfold_is_deterministic_per_seed():
    records = synthetic_records()
    first, again, other = kfold_splits(records, seed=3), kfold_splits(records, seed=3), kfold_splits(records, seed=4)
    assert all(np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train) for a, b in zip(first, again))
    assert any(not np.array_equal(a.test, b.test) for a, b in zip(first, other))


def test_kfold_does_not_depend_on_row_order():
    records = synthetic_records()
    shuffled = records.sample(frac=1.0, random_state=1).reset_index(drop=True)
    for a, b in zip(kfold_splits(records, seed=0), kfold_splits(shuffled, seed=0)):
        assert set(a.test) == set(b.test) and set(a.val) == set(b.val)


def test_kfold_rotation_patients_and_proportions():
    records = synthetic_records()
    folds = kfold_splits(records, k=5, seed=0)
    n_patients = records["patient_id"].nunique()
    tested = [p for split in folds for p in patients_of(records, split.test)]
    assert sorted(tested) == sorted(records["patient_id"].unique())  # every patient tested exactly once
    test_sizes = [len(patients_of(records, split.test)) for split in folds]
    assert max(test_sizes) - min(test_sizes) <= 1  # remainders spread round-robin over the chunks
    for i, split in enumerate(folds):
        assert split.protocol == "cv5" and split.fold == i
        assert np.array_equal(np.sort(split.val), np.sort(folds[i - 1].test))  # val(i) = test(i - 1)
        parts = [patients_of(records, ids) for ids in (split.train, split.val, split.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert sum(map(len, parts)) == n_patients
        fractions = np.array([len(p) for p in parts]) / n_patients
        assert np.allclose(fractions, [0.6, 0.2, 0.2], atol=0.02)
        # all images of a multi-image patient are in the same part
        assert len(split.train) + len(split.val) + len(split.test) == len(records)


def test_kfold_balances_each_label_center_stratum():
    records = synthetic_records()
    patients = records.drop_duplicates("patient_id").set_index("patient_id")
    strata = patients.groupby(["prognosis", "center"]).size()
    for split in kfold_splits(records, seed=0):
        test = patients.loc[sorted(patients_of(records, split.test))]
        per_stratum = test.groupby(["prognosis", "center"]).size().reindex(strata.index, fill_value=0)
        # each stratum contributes floor or ceil of a fifth of its patients
        assert ((per_stratum >= strata // 5) & (per_stratum <= -(-strata // 5))).all()


def test_kfold_reports_unlabelled_rows(caplog):
    records = synthetic_records()
    records.loc[[3, 10], "prognosis"] = np.nan
    missing = set(records.loc[[3, 10], "image_id"])
    with caplog.at_level(logging.WARNING, logger="mdmt.data.splits"):
        folds = kfold_splits(records, seed=0)
    assert all(set(s.dropped["image_id"]) == missing for s in folds)
    assert all(not missing & set(np.concatenate([s.train, s.val, s.test])) for s in folds)
    assert "2 image(s)" in caplog.text and sorted(missing)[0] in caplog.text


def test_kfold_rejects_too_few_folds_and_missing_columns():
    with pytest.raises(ConfigError):
        kfold_splits(synthetic_records(), k=2)
    with pytest.raises(DataError, match="center"):
        kfold_splits(synthetic_records().drop(columns="center"))


# ------------------------------------------------------------------------------------------ LOCO
def test_loco_holds_out_one_center_per_fold():
    records = synthetic_records()
    order = ["C", "A", "D", "B"]
    folds = loco_splits(records, centers=order, val_fraction=0.1, seed=0)
    center_of = records.set_index("image_id")["center"]
    assert [s.fold for s in folds] == [0, 1, 2, 3]
    for split, held_out in zip(folds, order):
        assert set(center_of[split.test]) == {held_out}
        assert len(split.test) == (records["center"] == held_out).sum()
        assert held_out not in set(center_of[np.concatenate([split.train, split.val])])
        pool = patients_of(records, np.concatenate([split.train, split.val]))
        assert abs(len(patients_of(records, split.val)) / len(pool) - 0.1) < 0.01
        split.check(records)
    assert [set(center_of[s.test]) for s in loco_splits(records)] == [{"A"}, {"B"}, {"C"}, {"D"}]


def test_loco_val_is_stratified_and_seeded():
    records = synthetic_records()
    pool_rate = records.drop_duplicates("patient_id").query("center != 'A'")["prognosis"].mean()
    split = loco_splits(records, seed=0)[0]
    val = records.drop_duplicates("patient_id").set_index("patient_id").loc[sorted(patients_of(records, split.val))]
    assert abs(val["prognosis"].mean() - pool_rate) < 0.05
    assert np.array_equal(loco_splits(records, seed=0)[0].val, split.val)
    assert not np.array_equal(loco_splits(records, seed=1)[0].val, split.val)


def test_loco_keeps_a_patient_seen_in_two_centers_out_of_training():
    records = synthetic_records()
    records.loc[records["image_id"] == "I0_2", "center"] = "B"  # patient P0 (center A) also imaged in B
    folds = loco_splits(records, seed=0)
    fold_b = folds[1]
    assert "I0_2" in fold_b.test and not {"I0_0", "I0_1"} & set(np.concatenate([fold_b.train, fold_b.val]))
    assert set(fold_b.dropped["image_id"]) == {"I0_0", "I0_1"}
    with pytest.raises(ConfigError, match="Z"):
        loco_splits(records, centers=["A", "Z"])


def test_check_names_the_patient_in_two_parts():
    records = synthetic_records()
    split = Split("manual", 0, np.array(["I0_0", "I1_0"]), np.array(["I0_1"]), np.array(["I2_0"]))
    with pytest.raises(DataError, match="P0"):
        split.check(records)
    Split("manual", 0, np.array(["I0_0", "I0_1"]), np.array(["I1_0"]), np.array(["I2_0"])).check(records)


# ------------------------------------------------------------------------------------------ official files
def test_official_afc_cv5_against_a_table_of_their_ids(official_splits_dir):
    labels = official_labels(official_splits_dir, "AFC")
    assert len(labels) == 1585 and labels["prognosis"].value_counts().to_dict() == {0.0: 839, 1.0: 746}
    assert labels.groupby("center").size().to_dict() == {"A": 120, "B": 104, "C": 151, "D": 139, "E": 101, "F": 970}
    folds = [restrict(s, labels) for s in official_splits(official_splits_dir, "5", "AFC")]
    assert split_sizes(folds)[["train", "val", "test", "dropped"]].values.tolist() == [[942, 314, 314, 0]] * 5
    severe = labels.set_index("image_id")["prognosis"]
    for i, split in enumerate(folds):
        split.check(labels)
        assert severe[split.val].sum() == 148 and severe[split.test].sum() == 148
        assert set(split.val) == set(folds[i - 1].test)
    assert len(set(np.concatenate([s.test for s in folds]))) == 1570


def test_official_afc_loco_matches_the_paper_table(official_splits_dir):
    labels = official_labels(official_splits_dir, "AFC")
    folds = official_splits(official_splits_dir, "loCo", "aiforcovid", "official-loco")
    expected = [[1318, 146, 120], [1301, 144, 139], [1335, 148, 101], [553, 61, 970], [1332, 148, 104], [1290, 143, 151]]
    assert split_sizes(folds)[["train", "val", "test"]].values.tolist() == expected
    center = labels.set_index("image_id")["center"]
    assert [set(center[s.test]) for s in folds] == [{"A"}, {"D"}, {"E"}, {"F"}, {"B"}, {"C"}]


def test_official_bx_cv5_and_scores(official_splits_dir):
    folds = official_splits(official_splits_dir, "5", "BX")
    assert split_sizes(folds)[["train", "val", "test"]].values.tolist() == [[2742, 914, 914]] * 5
    assert all(len(i) >= 16 and i.isdigit() for i in folds[0].test[:50])  # 16-20 digit ids kept as text
    labels = official_labels(official_splits_dir, "BX")
    assert len(labels) == 4695
    histogram = np.bincount(labels["brixia_global"].astype(int), minlength=19).tolist()
    assert histogram == [51, 165, 299, 251, 269, 277, 370, 351, 387, 353, 391, 356, 318, 261, 233, 164, 116, 60, 23]
    assert ((labels["brixia_global"] >= 9) == (labels["label_dim"] == "BIG")).all()
    tested = labels.set_index("image_id").loc[folds[0].test, "center"]
    assert tested.value_counts().to_dict() == {"SIEMENS": 439, "CARESTREAM": 361, "AGFA": 114}


def _write(path: Path, header: str, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def test_official_folds_in_numeric_order_and_scores_zero_padded(tmp_path):
    for fold in range(12):
        for part in ("train", "val", "test"):
            ids = [f"{fold}{part[0]}{j}" for j in range(2)] if part != "test" else [str(10**19 + fold)]
            _write(tmp_path / "BX" / "10" / str(fold) / f"{part}.txt", "img label_dim scores center",
                   [f"{i} SMALL [1000] AGFA" for i in ids])
    _write(tmp_path / "BX" / "all.txt", "img label_dim scores center",
           ["10000000000000000000 SMALL [1000]", "10000000000000000003 BIG [333000]", "99 SMALL [0]"])
    folds = official_splits(tmp_path, "10", "BX")
    assert [s.fold for s in folds] == list(range(12))
    assert folds[11].test.tolist() == ["10000000000000000011"]
    labels = official_labels(tmp_path, "BX").set_index("image_id")
    assert labels.loc["10000000000000000000", [f"brixia_{r}" for r in "ABCDEF"]].tolist() == [0, 0, 1, 0, 0, 0]
    assert labels.loc["10000000000000000003", "brixia_global"] == 9
    assert labels.loc["10000000000000000000", "center"] == "AGFA" and pd.isna(labels.loc["99", "center"])


def test_official_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="AFC"):
        official_splits(tmp_path, "5", "AFC")
    with pytest.raises(ConfigError):
        official_splits(tmp_path, "7", "AFC")
    _write(tmp_path / "AFC" / "5" / "0" / "train.txt", "img label center", ["P_1 MILD A"])
    _write(tmp_path / "AFC" / "5" / "0" / "val.txt", "img label center", ["P_1 MILD A"])
    _write(tmp_path / "AFC" / "5" / "0" / "test.txt", "img label center", ["P_2 MILD A"])
    with pytest.raises(DataError, match="P_1"):
        official_splits(tmp_path, "5", "AFC")


def test_restrict_reports_ids_missing_from_the_records(caplog):
    split = Split("x", 0, np.array(["a", "b", "c"]), np.array(["d"]), np.array(["e", "f"]))
    records = pd.DataFrame({"image_id": ["a", "c", "d", "f"]})
    with caplog.at_level(logging.WARNING, logger="mdmt.data.splits"):
        limited = restrict(split, records)
    assert limited.train.tolist() == ["a", "c"] and limited.val.tolist() == ["d"] and limited.test.tolist() == ["f"]
    assert limited.dropped["image_id"].tolist() == ["b", "e"] and "2 split id(s)" in caplog.text


def test_a_split_is_the_same_for_the_same_records_protocol_and_seed(tiny_config, tiny_caches):
    """Each run computes its folds from the records (no split is kept between runs): equal records, protocol section
    and seed give equal parts; another seed or another protocol section gives other parts."""
    import dataclasses

    from mdmt.data.datasets import select
    from mdmt.protocols import build_splits

    chosen = select(tiny_config, ["aiforcovid"])
    first = build_splits(tiny_config, chosen, tiny_caches, "cv5", 1, 0)["aiforcovid"]
    copy = {"aiforcovid": dataclasses.replace(tiny_caches["aiforcovid"],
                                              records=tiny_caches["aiforcovid"].records.copy())}
    again = build_splits(tiny_config, chosen, copy, "cv5", 1, 0)["aiforcovid"]
    assert again is not first
    assert all(np.array_equal(np.sort(again.parts()[p]), np.sort(first.parts()[p])) for p in first.parts())
    other_seed = build_splits(tiny_config, chosen, tiny_caches, "cv5", 1, 1)["aiforcovid"]
    assert not np.array_equal(np.sort(other_seed.test), np.sort(first.test))
    three = dataclasses.replace(tiny_config, protocol=dataclasses.replace(tiny_config.protocol, cv_folds=3))
    thirds = build_splits(three, chosen, tiny_caches, "cv5", 1, 0)["aiforcovid"]
    assert len(thirds.test) > len(first.test)


def test_a_process_computes_each_fold_once(tiny_config, tiny_caches, monkeypatch):
    """Runs of one grid process share their folds: a second request with the same records, protocol section and seed
    gets the split already computed; another seed, another protocol section or other records are computed anew."""
    import dataclasses

    from mdmt import protocols as protocols_module
    from mdmt.data.datasets import select
    from mdmt.protocols import build_splits

    calls = []
    kfold = protocols_module.get_protocol("cv5")
    compute = type(kfold).splits
    monkeypatch.setattr(type(kfold), "splits", lambda self, *a, **k: calls.append(a[3:]) or compute(self, *a, **k))
    monkeypatch.setattr(protocols_module, "_split_memo", {})
    chosen = select(tiny_config, ["aiforcovid"])
    first = build_splits(tiny_config, chosen, tiny_caches, "cv5", 1, 0)["aiforcovid"]
    again = build_splits(tiny_config, chosen, tiny_caches, "cv5", 1, 0)["aiforcovid"]
    assert again is first and len(calls) == 1
    other_seed = build_splits(tiny_config, chosen, tiny_caches, "cv5", 1, 1)["aiforcovid"]
    assert len(calls) == 2 and not np.array_equal(np.sort(other_seed.test), np.sort(first.test))
    three = dataclasses.replace(tiny_config, protocol=dataclasses.replace(tiny_config.protocol, cv_folds=3))
    build_splits(three, chosen, tiny_caches, "cv5", 1, 0)
    assert len(calls) == 3
    copy = {"aiforcovid": dataclasses.replace(tiny_caches["aiforcovid"],
                                              records=tiny_caches["aiforcovid"].records.copy())}
    fresh = build_splits(tiny_config, chosen, copy, "cv5", 1, 0)["aiforcovid"]
    assert len(calls) == 4 and fresh is not first and np.array_equal(fresh.test, first.test)
