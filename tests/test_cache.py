"""Preprocessing cache: round trip, reuse, keys, atomic builds, unreadable files, string ids."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from mdmt.cache import image_cache as cache_module
from mdmt.cache import preprocess as preprocess_module
from mdmt.cache.image_cache import COMPLETE_FILE, build_cache, open_cache, summary_table
from mdmt.config import DataConfig
from mdmt.data.datasets import prepare
from mdmt.errors import DataError, ImageReadError
from mdmt.images import normalize_intensity, read_image
from mdmt.lungs.locate import crop_to_box, locate_lungs

IDS = ["12345678901234567890", "00000000000000000042", "P_1", "P_2_7", "98765432109876543210"]


def write_chest_dicom(path, seed: int, height: int = 72, width: int = 64) -> None:
    """A small 12-bit MONOCHROME2 chest-like DICOM: dark air, bright body, two dark lungs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.full((height, width), 300.0)
    img[((xx - width / 2) / (0.46 * width)) ** 2 + ((yy - 0.58 * height) / (0.62 * height)) ** 2 < 1] = 2800
    for cx in (0.3, 0.7):
        lung = ((xx - (cx + rng.uniform(-0.03, 0.03)) * width) / (0.13 * width)) ** 2 + (
            (yy - 0.47 * height) / (0.27 * height)
        ) ** 2
        img[lung < 1] = 1200
    img = ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 60, img.shape)
    pixels = np.clip(img, 0, 4095).astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", str(seed)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = height, width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_source(directory, ids=IDS, broken: str | None = None) -> SimpleNamespace:
    """A SourceTable-like object over freshly written DICOMs (``broken``: that id gets a garbage file)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed, image_id in enumerate(ids):
        path = directory / f"{image_id}.dcm"
        if image_id == broken:
            path.write_bytes(b"this is not a DICOM file")
        else:
            write_chest_dicom(path, seed)
        rows.append(
            {
                "image_id": image_id,
                "patient_id": image_id,
                "center": "A",
                "path": str(path),
                "dataset": "toy",
                "prognosis": float(seed % 2),
                "study_date": f"2020031{seed}",
                "sex": "F" if seed % 2 else None,
            }
        )
    dropped = pd.DataFrame([{"image_id": "P_9", "path": str(directory / "P_9.dcm"), "reason": "file missing"}])
    return SimpleNamespace(records=pd.DataFrame(rows), dropped=dropped)


def config(**changes) -> DataConfig:
    return DataConfig(**{"image_size": 32, **changes})


def count_preprocessing(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = preprocess_module.preprocess_image

    def counting(path, image_id, cfg):
        calls.append(image_id)
        return original(path, image_id, cfg)

    monkeypatch.setattr(preprocess_module, "preprocess_image", counting)
    return calls


def test_round_trip_equals_direct_preprocessing(tmp_path):
    source = make_source(tmp_path / "data")
    cache = build_cache(source, config(), tmp_path / "cache", progress=False)
    assert cache.images.shape == (len(IDS), 32, 32) and cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    for i, row in cache.records.iterrows():
        img01 = normalize_intensity(read_image(row["path"]), 2.0, 98.0)
        box = locate_lungs(img01)
        crop = crop_to_box(img01, box, 0.05)
        resized = np.asarray(Image.fromarray(crop, mode="F").resize((32, 32), Image.BILINEAR))
        expected = np.rint(np.clip(resized, 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(cache.images[i], expected)
        assert row["crop_ok"] == box.ok and (row["box_x0"], row["box_y1"]) == (box.x0, box.y1)
    assert cache.records["crop_ok"].all()


def test_ids_survive_as_strings(tmp_path):
    cache = build_cache(make_source(tmp_path / "data"), config(), tmp_path / "cache", progress=False)
    reopened = open_cache(cache.path)
    assert reopened.records["image_id"].tolist() == IDS
    assert reopened.records["patient_id"].tolist() == IDS
    assert reopened.records["study_date"].tolist() == [f"2020031{i}" for i in range(len(IDS))]
    assert reopened.records["sex"].isna().tolist() == [i % 2 == 0 for i in range(len(IDS))]
    assert reopened.records["prognosis"].dtype == float and reopened.records["crop_ok"].dtype == bool
    assert reopened.dropped["image_id"].tolist() == ["P_9"]
    assert reopened.meta["shape"] == [len(IDS), 32, 32]


def test_second_build_reuses_cache(tmp_path, monkeypatch):
    source = make_source(tmp_path / "data")
    first = build_cache(source, config(), tmp_path / "cache", progress=False)
    stamp = (first.path / COMPLETE_FILE).stat().st_mtime_ns
    calls = count_preprocessing(monkeypatch)
    second = build_cache(source, config(), tmp_path / "cache", progress=False)
    assert calls == []
    assert second.path == first.path and second.key == first.key
    assert (second.path / COMPLETE_FILE).stat().st_mtime_ns == stamp


def test_changed_file_parameter_or_label_gives_new_key(tmp_path):
    source = make_source(tmp_path / "data")
    base = build_cache(source, config(), tmp_path / "cache", progress=False)
    path = source.records["path"][2]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = build_cache(source, config(), tmp_path / "cache", progress=False)
    resized = build_cache(source, config(image_size=24), tmp_path / "cache", progress=False)
    source.records.loc[0, "prognosis"] = 1 - source.records.loc[0, "prognosis"]
    relabelled = build_cache(source, config(), tmp_path / "cache", progress=False)
    keys = {base.key, touched.key, resized.key, relabelled.key}
    assert len(keys) == 4
    assert resized.images.shape == (len(IDS), 24, 24)
    assert base.path.name.startswith("toy-") and len(base.path.name) == len("toy-") + 16


def test_interrupted_build_leaves_no_complete_cache(tmp_path, monkeypatch):
    source = make_source(tmp_path / "data")
    original = preprocess_module.preprocess_image
    done: list[str] = []

    def crash_after_two(path, image_id, cfg):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(image_id)
        return original(path, image_id, cfg)

    monkeypatch.setattr(preprocess_module, "preprocess_image", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(source, config(), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(preprocess_module, "preprocess_image", original)

    key = cache_module.cache_key(source.records, config())
    final = tmp_path / "cache" / f"toy-{key[:16]}"
    stale = final.with_name(final.name + ".tmp-999999999")  # a build killed hard: no such process
    (stale / "junk").mkdir(parents=True)
    with pytest.raises(DataError, match="not a complete"):
        open_cache(stale)
    cache = build_cache(source, config(), tmp_path / "cache", progress=False)
    assert cache.path == final and len(cache) == len(IDS)
    assert not stale.exists()


def test_unreadable_file_listed_or_raised(tmp_path):
    source = make_source(tmp_path / "data", broken="P_1")
    cache = build_cache(source, config(), tmp_path / "cache", progress=False)
    assert len(cache) == len(IDS) - 1 and "P_1" not in cache.records["image_id"].tolist()
    assert cache.failed["image_id"].tolist() == ["P_1"]
    assert cache.failed["path"][0].endswith("P_1.dcm") and cache.failed["reason"][0]
    summary = summary_table({"toy": cache}).iloc[0]
    assert (summary["cached"], summary["failed"][:6], summary["dropped"]) == (4, "1 (1× ", "1 (1× file missing)")
    for skip_cache in (tmp_path / "cache", tmp_path / "fresh"):  # reusing the cache or building anew
        with pytest.raises(ImageReadError, match="P_1.dcm"):
            build_cache(source, config(skip_unreadable=False), skip_cache, progress=False)
    assert not list((tmp_path / "fresh").iterdir())


def test_parallel_workers_match_in_process(tmp_path):
    source = make_source(tmp_path / "data")
    serial = build_cache(source, config(), tmp_path / "serial", progress=False)
    parallel = build_cache(source, config(), tmp_path / "parallel", progress=False, workers=2)
    assert parallel.key == serial.key
    np.testing.assert_array_equal(np.asarray(parallel.images), np.asarray(serial.images))


def test_boxes_file_crop_and_its_identity_in_key(tmp_path):
    source = make_source(tmp_path / "data", ids=IDS[:2])
    boxes = tmp_path / "boxes.csv"
    pd.DataFrame({"image_id": IDS[:1], "x0": [8], "y0": [4], "x1": [56], "y1": [60]}).to_csv(boxes, index=False)
    cache = build_cache(source, config(crop="boxes", boxes_file=str(boxes)), tmp_path / "cache", progress=False)
    assert cache.records["crop_ok"].tolist() == [True, False]
    assert cache.records["crop_method"].tolist() == ["boxes", "full-image"]
    pd.DataFrame({"image_id": IDS[:1], "x0": [9], "y0": [4], "x1": [56], "y1": [60]}).to_csv(boxes, index=False)
    os.utime(boxes, ns=(0, os.stat(boxes).st_mtime_ns + 1_000_000_000))
    changed = build_cache(source, config(crop="boxes", boxes_file=str(boxes)), tmp_path / "cache", progress=False)
    assert changed.key != cache.key


def test_cache_pickles_by_path(tmp_path):
    import pickle

    cache = build_cache(make_source(tmp_path / "data"), config(), tmp_path / "cache", progress=False)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.path == cache.path and isinstance(clone.images, np.memmap)
    np.testing.assert_array_equal(clone.images, cache.images)


def test_prepare_builds_each_configured_dataset(tiny_config, tiny_caches):
    from mdmt.sources import read_aiforcovid, read_brixia

    assert set(tiny_caches) == {"aiforcovid", "brixia"}
    readers = {
        "aiforcovid": (read_aiforcovid, tiny_config.data.datasets["aiforcovid"].params["root"]),
        "brixia": (read_brixia, tiny_config.data.datasets["brixia"].params["root"]),
    }
    for name, cache in tiny_caches.items():
        reader, root = readers[name]
        table = reader(root)
        assert len(cache) + len(cache.failed) == len(table.records)
        assert cache.records["image_id"].tolist() == [
            i for i in table.records["image_id"] if i not in set(cache.failed["image_id"])
        ]
        assert len(cache.dropped) == len(table.dropped)
        assert cache.images.shape[1:] == (tiny_config.data.image_size,) * 2
        assert cache.records["crop_ok"].mean() >= 0.9  # classical localiser; the lungs' darkness varies by patient
    again = prepare(tiny_config, progress=False)
    assert {n: c.path for n, c in again.items()} == {n: c.path for n, c in tiny_caches.items()}
