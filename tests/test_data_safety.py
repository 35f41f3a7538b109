"""The data side never loses data silently and never crashes: prepare's loss limit, corrupt and unwritable caches,
byte-identical images kept on one side of every split, official ids missing from the cache, the true reason for a
bad image file. Every case checks the exception, that its message names the dataset, file or id, and that the
counts add up (cached + failed + dropped == the rows the reader saw)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from helpers.dicom_fixtures import write_dicom
from PIL import Image

from mdmt.cache import image_cache as cache_module
from mdmt.cache.image_cache import (
    CONTENT_HASH,
    SPACE_MARGIN,
    build_cache,
    open_cache,
    summary_table,
    verify_images,
)
from mdmt.config import Config, DataConfig, load_config
from mdmt.data.datasets import Dataset, prepare
from mdmt.errors import ConfigError, DataError, ImageReadError
from mdmt.images import read_image
from mdmt.protocols import dataset_split
from mdmt.sources import SourceTable

SIZE = 16


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (24, 20), dtype=np.uint16)


def data_config(**changes) -> DataConfig:
    return DataConfig(**{"image_size": SIZE, "crop": "none", **changes})


def films(folder: Path, ids: list[str], broken: tuple[str, ...] = (), missing: tuple[str, ...] = ()) -> list[Path]:
    """One DICOM per id (``broken``: a text file instead, ``missing``: no file)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, image_id in enumerate(ids):
        path = folder / f"{image_id}.dcm"
        if image_id in broken:
            path.write_bytes(b"this is not an image")
        elif image_id not in missing:
            write_dicom(path, pixels(seed))
        paths.append(path)
    return paths


def source(folder: Path, ids: list[str], **kinds) -> SourceTable:
    paths = films(folder, ids, **kinds)
    records = pd.DataFrame({"image_id": ids, "patient_id": ids, "center": "A", "path": list(map(str, paths)),
                            "dataset": "toy", "prognosis": [float(i % 2) for i in range(len(ids))]})
    return SourceTable(records, pd.DataFrame(columns=["image_id", "path", "reason"]))


# ------------------------------------------------------------------------------------------------ prepare
def manifest_study(tmp_path: Path, n: int = 10, broken=(), missing=(), **data) -> Config:
    """A ``table`` dataset ``toy`` of ``n`` films T_0…, two centers, prognosis from an ``outcome`` column."""
    ids = [f"T_{i}" for i in range(n)]
    films(tmp_path / "films", ids, broken=broken, missing=missing)
    pd.DataFrame({"path": [f"films/{i}.dcm" for i in ids], "patient": [f"P{i}" for i in range(n)],
                  "center": ["AB"[i % 2] for i in range(n)], "outcome": ["SEVERE" if i % 3 == 0 else "MILD"
                                                                         for i in range(n)],
                  "grade": ["high" if i % 2 else "low" for i in range(n)]}).to_csv(tmp_path / "manifest.csv",
                                                                                   index=False)
    params = {"path": str(tmp_path / "manifest.csv"), "patient_column": "patient", "center_column": "center",
              "label_columns": {"outcome": "prognosis", "grade": "grade_text"}, **data.pop("params", {})}
    values = {"datasets": {"toy": {"name": "table", "params": params}}, "cache_dir": str(tmp_path / "cache"),
              "image_size": SIZE, "crop": "none", **data}
    return load_config(None, [{"data": values, "protocol": {"dataset": "toy", "loco_centers": ["A", "B"]}}])


def test_prepare_within_the_limit_keeps_every_row_accounted_for(tmp_path):
    config = manifest_study(tmp_path, broken=("T_4",))  # 1 of 10 lost: exactly the 0.1 allowed
    cache = prepare(config, progress=False)["toy"]
    assert (len(cache), len(cache.failed), len(cache.dropped)) == (9, 1, 0)
    assert cache.failed["image_id"].tolist() == ["T_4"]
    assert cache.records["grade_text"].tolist() == ["low", "high", "low", "high", "high", "low", "high", "low", "high"]


@pytest.mark.parametrize(("broken", "missing", "lost", "reason"), [
    ((), ("T_1", "T_2", "T_3"), 3, "3× file not found"),
    (("T_0", "T_5"), (), 2, "2× not a DICOM file (no DICM preamble and not an image)"),
    (("T_0",), ("T_9",), 2, "1× file not found"),
])
def test_prepare_fails_when_more_than_the_allowed_share_is_lost(tmp_path, broken, missing, lost, reason):
    config = manifest_study(tmp_path, broken=broken, missing=missing)
    with pytest.raises(DataError) as caught:
        prepare(config, progress=False)
    message = str(caught.value)
    assert "'toy'" in message and f"{lost} of 10 input rows lost" in message and "max_drop_fraction = 0.1" in message
    assert reason in message and (broken + missing)[0] in message

    allowed = manifest_study(tmp_path / "allowed", broken=broken, missing=missing, max_drop_fraction=1.0)
    cache = prepare(allowed, progress=False)["toy"]
    assert (len(cache.failed), len(cache.dropped)) == (len(broken), len(missing))
    assert len(cache) + len(cache.failed) + len(cache.dropped) == 10
    assert sorted([*cache.failed["image_id"], *cache.dropped["image_id"]]) == sorted(broken + missing)


@pytest.mark.parametrize(("broken", "missing", "first"), [
    (tuple(f"T_{i}" for i in range(4)), (), "T_0: not a DICOM file (no DICM preamble and not an image)"),
    ((), tuple(f"T_{i}" for i in range(4)), "T_0: file not found"),
])
def test_an_empty_dataset_is_an_error_even_when_any_loss_is_allowed(tmp_path, broken, missing, first):
    config = manifest_study(tmp_path, n=4, broken=broken, missing=missing, max_drop_fraction=1.0)
    with pytest.raises(DataError, match=r"dataset 'toy': no readable image \(4 input row\(s\)") as caught:
        prepare(config, progress=False)
    assert first in str(caught.value)


def test_a_missing_sheet_fails_prepare_naming_the_dataset_and_the_count(tiny_data, tmp_path):
    root = shutil.copytree(tiny_data / "AIforCOVID", tmp_path / "AIforCOVID")
    (root / "AIforCOVID_r2.xlsx").unlink()
    unlisted = len(list((root / "imgs_r2").iterdir()))
    assert unlisted == 6
    values = {"datasets": {"aiforcovid": {"params": {"root": str(root)}}}, "cache_dir": str(tmp_path / "cache"),
              "image_size": SIZE, "crop": "none"}
    with pytest.raises(DataError, match=r"dataset 'aiforcovid': 6 of 36 input rows lost \(17%\).*"
                                        r"6× not listed in any sheet"):
        prepare(load_config(None, [{"data": values}]), progress=False)
    assert not (tmp_path / "cache").exists()  # the reader's drops alone stop it before any caching


def test_a_stratify_column_that_does_not_exist_is_an_error_naming_it(tmp_path):
    config = manifest_study(tmp_path, params={"stratify": "sex"})
    with pytest.raises(ConfigError, match=r"data\.datasets\.toy\.params\.stratify: no column 'sex' in the records "
                                          r"of manifest\.csv"):
        prepare(config, progress=False)
    good = manifest_study(tmp_path / "good", params={"stratify": "grade_text"})
    records = prepare(good, progress=False)["toy"].records
    dataset = Dataset("toy", lambda: None, ("prognosis",), lambda r: r["grade_text"].eq("high").to_numpy(float))
    split = dataset_split(dataset, records, "cv5", 0, good, seed=0)
    assert sum(len(ids) for ids in split.parts().values()) + len(split.dropped) == 10


# ------------------------------------------------------------------------------------------- corrupt caches
def _truncate(by: int) -> Callable[[Path], None]:
    return lambda path: os.truncate(path, path.stat().st_size - by)


CORRUPTIONS = {
    "images.u8 short by one image": ("images.u8", _truncate(SIZE * SIZE)),
    "images.u8 one byte too long": ("images.u8", lambda p: p.write_bytes(p.read_bytes() + b"\0")),
    "records.csv cut mid-line": ("records.csv", _truncate(7)),
    "records.csv deleted": ("records.csv", Path.unlink),
    "meta.json not JSON": ("meta.json", lambda p: p.write_text("{not json")),
    "meta.json without shape": ("meta.json", lambda p: p.write_text('{"key": "x", "tables": {}}')),
    "failed.csv emptied": ("failed.csv", lambda p: p.write_text("")),
    "dropped.csv with a line more": ("dropped.csv", lambda p: p.write_text(p.read_text() + "X,/x,y\n")),
    "duplicates.csv deleted": ("duplicates.csv", Path.unlink),
    "COMPLETE deleted": ("COMPLETE", Path.unlink),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_cache_file_is_named_and_the_cache_rebuilt(tmp_path, caplog, case):
    name, corrupt = CORRUPTIONS[case]
    toy = source(tmp_path / "data", [f"P_{i}" for i in range(5)])
    first = build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    images, records = np.array(first.images), first.records.copy()
    corrupt(first.path / name)
    with pytest.raises(DataError, match=re.escape(name)):
        open_cache(first.path)
    with caplog.at_level(logging.WARNING, logger="mdmt.cache.image_cache"):
        again = build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "rebuilding" in warnings[0]
    assert again.path == first.path and len(again) == 5
    np.testing.assert_array_equal(np.asarray(again.images), images)
    pd.testing.assert_frame_equal(again.records, records)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]


def _overwrite_in_place(path: Path) -> None:
    """The file's bytes inverted in place (same size), its modification time a second later, as an edit made after
    the last check would leave it (a file system's clock may not tick between two writes this close)."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        data = handle.read()
        handle.seek(0)
        handle.write(bytes(255 - b for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_images_overwritten_in_place_are_refused_by_a_run_and_rebuilt_by_prepare(tmp_path, caplog, monkeypatch):
    toy = source(tmp_path / "data", [f"P_{i}" for i in range(5)])
    first = build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    images = np.array(first.images)
    hashed: list[str] = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    for _ in range(3):
        assert verify_images(open_cache(first.path)).path == first.path
    assert hashed.count("images.u8") == 1  # once per process while the file stays as it was

    _overwrite_in_place(first.path / "images.u8")
    with pytest.raises(DataError) as refused:
        verify_images(open_cache(first.path))  # the size still matches: open_cache alone takes it
    assert str(refused.value) == (f"{first.path / 'images.u8'}: contents differ from the sha256 meta.json recorded "
                                  "at the build (bytes overwritten or corrupt); the cache is refused: `mdmt prepare` "
                                  "rebuilds it")
    with caplog.at_level(logging.WARNING, logger="mdmt.cache.image_cache"):
        again = build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "images.u8: contents differ" in warnings[0] and "rebuilding" in warnings[0]
    np.testing.assert_array_equal(np.asarray(verify_images(again).images), images)


def test_a_run_refuses_a_cache_overwritten_since_the_grid_built_it(tiny_config, tiny_caches, tmp_path):
    from mdmt.runs import RunSpec
    from mdmt.train.run import train_run

    copy = Path(shutil.copytree(tiny_caches["aiforcovid"].path, tmp_path / tiny_caches["aiforcovid"].path.name))
    _overwrite_in_place(copy / "images.u8")
    config = dataclasses.replace(tiny_config, results_dir=str(tmp_path / "results"))
    with pytest.raises(DataError, match=re.escape(f"{copy / 'images.u8'}: contents differ from the sha256")):
        train_run(config, RunSpec("stl_prognosis", "tiny_cnn", "cv5", 0, 0), progress=False,
                  caches={"aiforcovid": str(copy)})
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------- safe writes
def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    toy = source(tmp_path / "data", [f"P_{i}" for i in range(5)])
    needed = 5 * SIZE * SIZE + SPACE_MARGIN
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=10**9, used=10**9, free=needed - 1))
    expected = (f"not enough free disk space for the image cache: {needed} bytes needed (5 images of {SIZE}×{SIZE} "
                f"plus {SPACE_MARGIN} spare), {needed - 1} free")
    with pytest.raises(DataError, match=re.escape(expected)) as caught:
        build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    assert str(tmp_path / "cache" / "toy-") in str(caught.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_write_error_mid_build_names_the_folder_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    toy = source(tmp_path / "data", [f"P_{i}" for i in range(5)])

    def no_space(text: str, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache_module, "atomic_write_text", no_space)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'cache'}: cannot write the image cache ([Errno 28] "
                                                  "No space left on device")):
        build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unwritable_cache_folder_is_a_data_error(tmp_path, monkeypatch):
    toy = source(tmp_path / "data", ["P_0"])

    def read_only(self: Path, *args, **kwargs) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'ro'}: cannot create the cache folder")):
        build_cache(toy, data_config(), tmp_path / "ro", progress=False)


def test_the_images_and_every_table_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    original = os.fsync

    def spy(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        original(fd)

    monkeypatch.setattr(os, "fsync", spy)
    cache = build_cache(source(tmp_path / "data", ["P_0", "P_1"]), data_config(), tmp_path / "cache", progress=False)
    names = {name.split(".tmp-")[0] for name in synced}
    assert names == {"images.u8", "records.csv", "crops.csv", "failed.csv", "dropped.csv", "duplicates.csv",
                     "meta.json", "COMPLETE"}
    assert set(os.listdir(cache.path)) == names


# ------------------------------------------------------------------------------------------------ duplicates
def test_byte_identical_files_are_hashed_listed_and_warned(tmp_path, caplog):
    toy = source(tmp_path / "data", ["P_1", "P_2", "P_3"])
    copy = tmp_path / "data" / "DUP.dcm"
    shutil.copyfile(tmp_path / "data" / "P_1.dcm", copy)
    toy.records.loc[3] = ["DUP", "DUP", "B", str(copy), "toy", 1.0]
    with caplog.at_level(logging.WARNING, logger="mdmt.cache.image_cache"):
        cache = build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in toy.records["path"]]
    assert cache.records[CONTENT_HASH].tolist() == digests and digests[0] == digests[3]
    assert cache.duplicates[["image_id", "duplicate_of"]].values.tolist() == [["DUP", "P_1"]]
    assert "P_1 and DUP are byte-identical" in caplog.text
    assert summary_table({"toy": cache}).iloc[0]["duplicates"] == 1
    assert open_cache(cache.path).duplicates["image_id"].tolist() == ["DUP"]


def twin_records() -> pd.DataFrame:
    """40 patients over centers A-D, one image each; P22 (center C) also has I22b, and its I22 is a byte copy
    of P5's I5 (center B)."""
    rows = [{"image_id": f"I{i}", "patient_id": f"P{i}", "center": "ABCD"[i % 4], "prognosis": float(i % 3 == 0),
             CONTENT_HASH: f"h{i}"} for i in range(40)]
    rows[22][CONTENT_HASH] = "h5"
    rows.append({"image_id": "I22b", "patient_id": "P22", "center": "C", "prognosis": 0.0, CONTENT_HASH: "h22b"})
    return pd.DataFrame(rows)


TWINS = {"I5", "I22", "I22b"}


def split_config(tmp_path: Path) -> Config:
    return load_config(None, [{"protocol": {"dataset": "toy", "loco_centers": ["A", "B", "C", "D"],
                                            "official_splits_dir": str(tmp_path / "official")}}])


def toy_dataset(official_kind: str | None = None) -> Dataset:
    return Dataset("toy", lambda: None, ("prognosis",), lambda r: r["prognosis"].to_numpy(float), official_kind)


@pytest.mark.parametrize(("protocol", "folds"), [("cv5", 5), ("loco", 4)])
def test_byte_identical_images_land_on_one_side_in_cv_and_loco(tmp_path, protocol, folds):
    records, config = twin_records(), split_config(tmp_path)
    for fold in range(folds):
        split = dataset_split(toy_dataset(), records, protocol, fold, config, seed=0)
        sides = {part for part, ids in split.parts().items() if TWINS & set(ids)}
        assert len(sides) == 1, (fold, sides)
        placed = [i for ids in split.parts().values() for i in ids] + split.dropped["image_id"].tolist()
        assert sorted(placed) == sorted(records["image_id"])  # every image once: in a part or left out by id
    held_out_b = dataset_split(toy_dataset(), records, "loco", 1, config, seed=0)
    assert "I5" in held_out_b.test and {"I22", "I22b"} <= set(held_out_b.dropped["image_id"])
    unmerged = dataset_split(toy_dataset(), records.drop(columns=CONTENT_HASH), "loco", 1, config, seed=0)
    assert "I5" in unmerged.test and "I22" in {*unmerged.train, *unmerged.val}  # what the merge prevents


def write_official(folder: Path, parts: dict[str, list[str]]) -> None:
    for fold in range(5):
        for part, ids in parts.items():
            path = folder / "AFC" / "5" / str(fold) / f"{part}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("img label center\n" + "".join(f"{i} MILD A\n" for i in ids))


def test_official_ids_not_in_the_cache_are_kept_by_part_and_twins_not_split(tmp_path):
    listed = {"train": ["I0", "I1", "I2", "I3", "X1"], "val": ["I4", "X2"], "test": ["I5", "I6", "X3", "X4"]}
    write_official(tmp_path / "official", listed)
    records = twin_records().iloc[:7].assign(**{CONTENT_HASH: ["h0", "h5", "h2", "h3", "h4", "h5", "h6"]})
    split = dataset_split(toy_dataset("AFC"), records, "official-cv5", 2, split_config(tmp_path), seed=0)
    assert split.missing == {"train": ["X1"], "val": ["X2"], "test": ["X3", "X4"]}
    assert split.train.tolist() == ["I0", "I2", "I3"] and split.val.tolist() == ["I4"]
    assert split.test.tolist() == ["I5", "I6"]
    reasons = split.dropped.set_index("image_id")["reason"].to_dict()
    assert reasons == {"X1": "not in the records", "X2": "not in the records", "X3": "not in the records",
                       "X4": "not in the records", "I1": "byte-identical to an image in test"}
    kept = sum(len(ids) for ids in split.parts().values())
    assert kept + len(split.dropped) == sum(map(len, listed.values())) == 11


# --------------------------------------------------------------------------------------- bad image files
def _png_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels(0).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels(0).astype(np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _cut_dicom(keep: Callable[[int], int]) -> Callable[[Path], bytes]:
    """A valid DICOM's first ``keep(length)`` bytes."""
    def make(folder: Path) -> bytes:
        data = write_dicom(folder / "whole.dcm", pixels(0)).read_bytes()
        return data[: keep(len(data))]

    return make


BAD_FILES = {
    "empty.dcm": (lambda folder: b"", "empty file (0 bytes)"),
    "random.dcm": (lambda folder: np.random.default_rng(1).bytes(4096),
                   "not a DICOM file (no DICM preamble and not an image)"),
    "png.dcm": (lambda folder: _png_bytes(), "PNG image named .dcm"),
    "jpeg.dcm": (lambda folder: _jpeg_bytes(), "JPEG image named .dcm"),
    "truncated.dcm": (_cut_dicom(lambda n: n - 480), "truncated DICOM: 480 of 960 bytes of pixel data"),
    "header-only.dcm": (_cut_dicom(lambda n: 200), "no pixel data in 200 bytes (a truncated DICOM"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_image_file_gets_its_true_reason(tmp_path, name):
    make, reason = BAD_FILES[name]
    folder = tmp_path / "bad"
    folder.mkdir()
    path = folder / name
    path.write_bytes(make(folder))
    with pytest.raises(ImageReadError) as caught:
        read_image(path)
    assert reason in caught.value.reason and str(path) in str(caught.value)

    toy = source(tmp_path / "data", ["P_0", "P_1"])
    toy.records.loc[2] = [name, name, "A", str(path), "toy", 0.0]
    cache = build_cache(toy, data_config(), tmp_path / "cache", progress=False)
    assert cache.failed["image_id"].tolist() == [name] and reason in cache.failed["reason"][0]
    assert len(cache) + len(cache.failed) == 3
