"""A corpus of bad inputs through the command line, one table row each.

Every case builds its bad input in a fresh workspace (a config pointing at the session's tiny twin, a copy of its
image caches, an empty results folder), runs one ``mdmt`` command (in this process, or a real ``python -m
mdmt.cli`` process), and asserts: the exit code; that the output names the file, key or id; that nothing prints
a traceback; and that nothing was written or lost outside the paths the case allows (the twin, the session's
caches and runs are never touched, and no temporary file is left behind).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import logging
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from mdmt.cli import main
from mdmt.config import merge

SIZE = 32
PROGNOSIS_RUN = "runs/stl_prognosis/tiny_cnn/cv5/fold0/seed0"
SEVERITY_RUN = "runs/stl_severity/tiny_cnn/cv5/fold0/seed0"
FT_RUN = "runs/ft/tiny_cnn/cv5/fold0/seed0"
OFFICIAL_RUN = "runs/stl_prognosis/tiny_cnn/official-cv5/fold0/seed0"
AFC_IMAGES = 36
BRIXIA_IMAGES = 48
COHORT_ROWS = 18
VICTIM = "P_102"
"""An AIforCOVID release-1 id of the tiny twin (hospital D), the film the image cases damage."""


# ---------------------------------------------------------------------------------------------- workspace
def base_values(twin: Path, cache: Path, results: Path) -> dict[str, Any]:
    """The study every case starts from: AIforCOVID + BrixIA of the twin, tiny_cnn at 32 px, one epoch."""
    return {
        "data": {"datasets": {"aiforcovid": {"name": "aiforcovid", "params": {"root": str(twin / "AIforCOVID")}},
                              "brixia": {"name": "brixia", "params": {"root": str(twin / "BRIXIA")}}},
                 "cache_dir": str(cache), "image_size": SIZE, "crop": "lungs_classical"},
        "model": {"backbone": "tiny_cnn", "input_size": SIZE},
        "train": {"max_epochs": 1, "warmup_epochs": 0, "batch_size": 16},
        "runtime": {"threads": 1, "device": "cpu"},
        "results_dir": str(results),
    }


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` → the sha256 of its bytes (``dir`` for a folder)."""
    return {str(p): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@dataclass(frozen=True)
class Base:
    """The session's tiny twin (with the manifest cohort), its caches and two finished runs; never modified."""

    root: Path
    twin: Path
    cache: Path
    results: Path
    files: dict[str, str]


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Twin → caches → finished stl_prognosis and stl_severity runs (cv5 fold 0), built once."""
    from mdmt.synth import generate

    root = tmp_path_factory.mktemp("bad-inputs-base")
    twin, cache, results = root / "twin", root / "cache", root / "results"
    generate(twin, preset="tiny", seed=0, progress=False, cohort=True)
    config = root / "mdmt.yaml"
    config.write_text(yaml.safe_dump(base_values(twin, cache, results)))
    for argv in (["prepare"], ["train", "--strategy", "stl_prognosis"], ["train", "--strategy", "stl_severity"]):
        assert main([*argv, "--config", str(config)]) == 0
    config.unlink()
    return Base(root, twin, cache, results, snapshot(root))


class Workspace:
    """One case's folder: ``mdmt.yaml`` (the base study), a copy of the caches, ``results/``; placeholders."""

    def __init__(self, root: Path, base: Base):
        self.root = root
        self.base = base
        self.cache = root / "cache"
        self.results = root / "results"
        self.config = root / "mdmt.yaml"
        self.held: list[Any] = []
        self.values = base_values(base.twin, self.cache, self.results)
        shutil.copytree(base.cache, self.cache)
        self.write_config()

    def write_config(self, changes: dict[str, Any] | None = None) -> None:
        """Merge ``changes`` into the config and write ``mdmt.yaml``."""
        self.values = merge(self.values, changes or {})
        self.config.write_text(yaml.safe_dump(self.values, sort_keys=False))

    def own(self, folder: str) -> Path:
        """A private copy of the twin's ``folder`` (AIforCOVID, BRIXIA or COHORT), used by the config from now on."""
        target = self.root / "twin" / folder
        shutil.copytree(self.base.twin / folder, target)
        dataset = {"AIforCOVID": "aiforcovid", "BRIXIA": "brixia"}.get(folder)
        if dataset is not None:
            self.write_config({"data": {"datasets": {dataset: {"params": {"root": str(target)}}}}})
        return target

    def cohort(self, **params: Any) -> Path:
        """Add the twin's manifest cohort (a private copy) as dataset ``cohort``; returns the manifest."""
        manifest = self.own("COHORT") / "manifest.csv"
        values = {"path": str(manifest), "image_column": "image", "patient_column": "patient",
                  "center_column": "center", "label_columns": {"outcome": "prognosis"}, **params}
        self.write_config({"data": {"datasets": {"cohort": {"name": "table", "params": values}}}})
        return manifest

    def finished(self, run: str = PROGNOSIS_RUN) -> Path:
        """A copy of one of the session's finished runs in this workspace's results."""
        target = self.results / run
        shutil.copytree(self.base.results / run, target)
        return target

    def unfinished(self, run: str = PROGNOSIS_RUN) -> Path:
        """A finished run made unfinished (as after a kill): no DONE, no predictions or metrics."""
        target = self.finished(run)
        for name in ("DONE", "metrics.json", "predictions_prognosis.csv"):
            (target / name).unlink()
        return target

    def cache_of(self, dataset: str) -> Path:
        """The one cache folder of ``dataset`` that the session's caches do not have."""
        known = {p.name for p in self.base.cache.iterdir()}
        found = [p for p in self.cache.glob(f"{dataset}-*") if p.name not in known]
        assert len(found) == 1, found
        return found[0]

    def names(self) -> dict[str, str]:
        return {"ws": str(self.root), "config": str(self.config), "cache": str(self.cache),
                "results": str(self.results), "twin": str(self.base.twin), "run": str(self.results / PROGNOSIS_RUN),
                "sev": str(self.results / SEVERITY_RUN), "ft": str(self.results / FT_RUN),
                "official": str(self.results / OFFICIAL_RUN)}

    def fill(self, text: str) -> str:
        """``text`` with ``{ws}``, ``{config}``, ``{cache}``, ``{results}``, ``{twin}``, ``{run}`` … replaced."""
        for name, value in self.names().items():
            text = text.replace("{" + name + "}", value)
        return text


Setup = Callable[[Workspace, pytest.MonkeyPatch], None]
Check = Callable[[Workspace, str], None]


@dataclass(frozen=True)
class Case:
    """A bad input: how to make it, the command, the exit code, what the output must name, what may change."""

    name: str
    argv: tuple[str, ...]
    code: int = 2
    names: tuple[str, ...] = ()
    """Fragments the output must contain (placeholders filled): the file, key or id at fault."""
    setup: Setup | None = None
    writes: tuple[str, ...] = ()
    """Paths (placeholders filled) under which files may appear, change or go; nothing else may."""
    check: Check | None = None
    process: bool = False
    """Run ``python -m mdmt.cli`` in a real process (``setup`` may only write files then)."""
    file_limit: int | None = None
    """RLIMIT_FSIZE of that process: writes past it fail as on a full disk."""
    marks: tuple[Any, ...] = ()


def _main(argv: list[str], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
          ) -> tuple[int, list[str], str]:
    """Exit code, the printed streams (stdout, stderr) and the log."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, [captured.out, captured.err], caplog.text


def _process(argv: list[str], ws: Workspace, file_limit: int | None) -> tuple[int, list[str], str]:
    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "mdmt.cli", *argv], cwd=ws.root, env=env, capture_output=True,
                          text=True, timeout=300, check=False, preexec_fn=limit)
    assert done.returncode >= 0, f"killed by signal {-done.returncode}"
    return done.returncode, [done.stdout, done.stderr], ""


def _allowed(path: str, prefixes: list[str], after: dict[str, str]) -> bool:
    """``path`` matches or lies under one of ``prefixes`` (shell patterns), or is a new folder on the way to one."""
    return any(fnmatch.fnmatchcase(path, p) or path.startswith(p.rstrip("/") + "/")
               or (after.get(path) == "dir" and p.startswith(path + "/")) for p in prefixes)


# ---------------------------------------------------------------------------------------------- helpers
def write(relative: str, content: str | bytes) -> Setup:
    """Setup: write ``content`` to ``<ws>/<relative>``."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        path = ws.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def steps(*setups: Setup) -> Setup:
    """Setup: each of ``setups`` in turn."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        for one in setups:
            one(ws, monkeypatch)

    return setup


def damage_film(how: Callable[[Path], None], dataset: str = "AIforCOVID", film: str = f"imgs/{VICTIM}.dcm") -> Setup:
    """Setup: a private copy of ``dataset`` with ``how`` applied to one film."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        how(ws.own(dataset) / film)

    return setup


def truncate(keep: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(path.read_bytes()[:keep])


def replace_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def overwrite_in_place(path: Path) -> None:
    """The file's bytes reversed in place: same size, other content."""
    with open(path, "r+b") as handle:
        data = handle.read()
        handle.seek(0)
        handle.write(data[::-1])


def png_named_dcm(path: Path) -> None:
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path, format="PNG")


def edit_sheet(edit: Callable[[pd.DataFrame], pd.DataFrame], sheet: str = "AIforCOVID.xlsx") -> Setup:
    """Setup: a private AIforCOVID whose ``sheet`` is rewritten through ``edit``."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        path = ws.own("AIforCOVID") / sheet
        edit(pd.read_excel(path, dtype=str)).to_excel(path, index=False)

    return setup


def set_cell(column: str, row: int, value: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[row, column] = value
        return table

    return edit


def duplicate_across_sheets(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private AIforCOVID whose release-2 sheet starts with release 1's first ImageFile."""
    folder = ws.own("AIforCOVID")
    first = pd.read_excel(folder / "AIforCOVID.xlsx", dtype=str).at[0, "ImageFile"]
    path = folder / "AIforCOVID_r2.xlsx"
    set_cell("ImageFile", 0, first)(pd.read_excel(path, dtype=str)).to_excel(path, index=False)


def edit_metadata(edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Setup:
    """Setup: a private BrixIA whose metadata file (``;``, BOM) is rewritten through ``edit``."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        path = ws.own("BRIXIA") / "metadata_global_v2.csv"
        table = pd.read_csv(path, sep=";", dtype=str, encoding="utf-8-sig")
        edit(table).to_csv(path, sep=";", index=False, encoding="utf-8-sig")

    return setup


def edit_manifest(edit: Callable[[pd.DataFrame], pd.DataFrame], **params: Any) -> Setup:
    """Setup: the cohort added as a ``table`` dataset, its manifest rewritten through ``edit``."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        manifest = ws.cohort(**params)
        edit(pd.read_csv(manifest, dtype=str)).to_csv(manifest, index=False)

    return setup


def keep(table: pd.DataFrame) -> pd.DataFrame:
    return table


def config(changes: dict[str, Any]) -> Setup:
    """Setup: ``changes`` merged into the workspace config."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        ws.write_config(changes)

    return setup


def finished(run: str = PROGNOSIS_RUN) -> Setup:
    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        ws.finished(run)

    return setup


def bad_checkpoint(name: str, how: Callable[[Path], None], run: str = PROGNOSIS_RUN, unfinished: bool = True
                   ) -> Setup:
    """Setup: a run copied from the session (unfinished, or finished) whose checkpoint ``name`` is ``how``-ed."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        folder = ws.unfinished(run) if unfinished else ws.finished(run)
        how(folder / name)

    return setup


def foreign_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(3)}, "epoch": 4}, path)


class Planted:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint would do with ``weights_only=False``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def planted_pickle(path: Path) -> None:
    marker = path.parents[len(SEVERITY_RUN.split("/"))] / "PWNED"  # the results folder
    torch.save({"format": 2, "model": {"w": torch.zeros(1)}, "payload": Planted(marker)}, path)


def raising(number: int, where: str) -> Callable[..., Any]:
    """A writer that fails with OSError ``number`` naming ``where`` (a path under the workspace)."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(number, os.strerror(number), where)

    return fail


def official_splits(extra_test: tuple[str, ...] = (), empty: str | None = None, blank: str | None = None,
                    missing: str | None = None) -> Setup:
    """Setup: official split files (AFC/5/0) from the twin's cached AIforCOVID ids, protocol official-cv5.

    ``extra_test`` ids are added to test.txt; ``empty`` part has only its header; ``blank`` part is a 0-byte file;
    ``missing`` part has no file.
    """

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        records = pd.read_csv(next(ws.base.cache.glob("aiforcovid-*")) / "records.csv", dtype=str)
        ids = records["image_id"].tolist()
        labels = dict(zip(ids, np.where(records["prognosis"].astype(float) > 0, "SEVERE", "MILD"), strict=True))
        centers = dict(zip(ids, records["center"], strict=True))
        parts = {"train": ids[:24], "val": ids[24:30], "test": ids[30:] + list(extra_test)}
        folder = ws.root / "splits" / "AFC" / "5" / "0"
        folder.mkdir(parents=True)
        for part, members in parts.items():
            if part == missing:
                continue
            lines = ["img label center"] + ([] if part == empty else
                                            [f"{i} {labels.get(i, 'MILD')} {centers.get(i, 'A')}" for i in members])
            (folder / f"{part}.txt").write_text("" if part == blank else "\n".join(lines) + "\n")
        ws.write_config({"protocol": {"official_splits_dir": str(ws.root / "splits")}})

    return setup


# ---------------------------------------------------------------------------------------------- checks
def counts_add_up(dataset: str, total: int, failed: tuple[str, ...] = (), dropped: tuple[str, ...] = ()) -> Check:
    """The new cache of ``dataset``: cached + failed + dropped == ``total`` rows, the named ids failed/dropped."""

    def check(ws: Workspace, text: str) -> None:
        from mdmt.cache.image_cache import open_cache

        cache = open_cache(ws.cache_of(dataset))
        assert len(cache) + len(cache.failed) + len(cache.dropped) == total
        assert sorted(cache.failed["image_id"]) == sorted(failed)
        assert sorted(cache.dropped["image_id"]) == sorted(dropped)
        assert not set(failed + dropped) & set(cache.records["image_id"])

    return check


def no_marker(ws: Workspace, text: str) -> None:
    assert not (ws.results / "PWNED").exists(), "the planted pickle ran"
    assert "weights_only" not in text and "trust" not in text, "the refusal suggests loading the file unsafely"


def rerun_trained_again(ws: Workspace, text: str) -> None:
    run = ws.results / PROGNOSIS_RUN
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.5
    assert (run / "DONE").is_file() and (run / "metrics.json").is_file()


def missing_ids_recorded(ws: Workspace, text: str) -> None:
    table = pd.read_csv(ws.results / OFFICIAL_RUN / "split_ids_missing.csv", dtype=str)
    assert table.to_dict("records") == [{"dataset": "aiforcovid", "part": "test", "image_id": "P_9999"}]
    assert (ws.results / OFFICIAL_RUN / "DONE").is_file()


def rebuilt(dataset: str) -> Check:
    """The damaged cache folder of ``dataset`` opens again with every image."""

    def check(ws: Workspace, text: str) -> None:
        from mdmt.cache.image_cache import open_cache, verify_images

        (folder,) = ws.cache.glob(f"{dataset}-*")
        cache = verify_images(open_cache(folder))
        assert len(cache) == {"aiforcovid": AFC_IMAGES, "brixia": BRIXIA_IMAGES}[dataset]
        assert cache.images.shape == (len(cache), SIZE, SIZE)

    return check


def report_lists_unreadable(file: str) -> Check:
    def check(ws: Workspace, text: str) -> None:
        page = (ws.results / "report" / "report.md").read_text()
        assert "stl_prognosis/tiny_cnn/cv5/0/0" in page and file in page and "unreadable" in page

    return check


def untouched(relative: str) -> Check:
    """``relative`` (under the workspace) still exists: nothing was lost."""
    return lambda ws, text: None if (ws.root / relative).exists() else pytest.fail(f"{relative} was removed")


def held_lock(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    ws.results.mkdir()
    handle = open(ws.results / "grid.lock", "a+")  # noqa: SIM115 - held until the workspace goes
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("4242")
    handle.flush()
    ws.held.append(handle)


def full_images_file(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's images are streamed into a full device (writes fail with ENOSPC)."""
    import builtins

    import mdmt.cache.image_cache as cache_module

    def open_full(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        target = "/dev/full" if str(path).endswith("images.u8") and "w" in mode else path
        return builtins.open(target, mode, *args, **kwargs)

    monkeypatch.setattr(cache_module, "open", open_full, raising=False)


def no_free_space(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mdmt.cache.image_cache.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))


def writer_fails(number: int, name: str) -> Setup:
    """Setup: every atomic write of a file called ``name`` fails with OSError ``number``."""

    def setup(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
        import mdmt.runs

        real = mdmt.runs.atomic_write_bytes

        def write_bytes(data: bytes, path: str | Path, durable: bool = True) -> None:
            if Path(path).name == name:
                raise OSError(number, os.strerror(number), str(path))
            real(data, path, durable)

        monkeypatch.setattr(mdmt.runs, "atomic_write_bytes", write_bytes)

    return setup


def trained_then_data_changed(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained on a private AIforCOVID, cut short (no DONE), then one of its films deleted."""
    root = ws.own("AIforCOVID")
    assert main(["train", "--config", str(ws.config), "--strategy", "stl_prognosis"]) == 0
    for name in ("DONE", "metrics.json", "predictions_prognosis.csv"):
        (ws.results / PROGNOSIS_RUN / name).unlink()
    (root / "imgs" / f"{VICTIM}.dcm").unlink()


def synthetic_twin(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["synth", str(ws.root / "out"), "--preset", "tiny", "--seed", "0"]) == 0


# ---------------------------------------------------------------------------------------------- the corpus
CONFIG = ("config", "--config", "{config}")
PREPARE = ("prepare", "--config", "{config}")
TRAIN = ("train", "--config", "{config}", "--strategy", "stl_prognosis")
GRID = ("grid", "--config", "{config}", "--set", "grid.backbones=[tiny_cnn]", "--set", "grid.protocols=[cv5]",
        "--set", "grid.folds=[0]")
CACHE = ("{cache}",)
RESUMED = ("{run}/config.yaml", "{run}/FAILED")
"""What a refused resumption rewrites: the config (its paths are this workspace's) and the error."""
BAD_YAML = "{ws}/bad.yaml"
PLUGIN = "{ws}/plugin.py"

CASES: list[Case] = [
    # ------------------------------------------------------------------ config files: syntax, keys, types
    Case("yaml_mapping_in_wrong_place", ("train", "--config", BAD_YAML), names=(f"{BAD_YAML}:3:14: YAML syntax error",),
         setup=write("bad.yaml", "train:\n  lr: 0.1\n   batch_size: 4\n")),
    Case("yaml_unclosed_flow_mapping", ("prepare", "--config", BAD_YAML), names=(f"{BAD_YAML}:2:1: YAML syntax error",),
         setup=write("bad.yaml", "train: {lr: 0.1\n")),
    Case("yaml_tab_indentation", ("config", "--config", BAD_YAML), names=(f"{BAD_YAML}:2:1: YAML syntax error",),
         setup=write("bad.yaml", "train:\n\tlr: 0.1\n")),
    Case("yaml_top_level_list", ("config", "--config", BAD_YAML), names=(f"{BAD_YAML}: the top level must be a mapping",),
         setup=write("bad.yaml", "- train\n- lr\n")),
    Case("yaml_not_text", ("config", "--config", BAD_YAML), names=(f"{BAD_YAML}: not a UTF-8 text file",),
         setup=write("bad.yaml", b"\xff\xfe\x00\x81train")),
    Case("config_file_missing", ("train", "--config", "{ws}/absent.yaml"),
         names=("config file not found: {ws}/absent.yaml",)),
    Case("config_is_a_folder", ("train", "--config", "{ws}"), names=("{ws}: not a file",)),
    Case("unknown_top_level_key", ("config", "--config", BAD_YAML), names=("unknown key(s) trainn",),
         setup=write("bad.yaml", "trainn: {lr: 0.1}\n")),
    Case("unknown_nested_key", (*TRAIN, "--set", "train.lrr=0.1"), names=("config.train: unknown key(s) lrr",)),
    Case("override_without_value", (*CONFIG, "--set", "train.lr"),
         names=("override 'train.lr' must look like section.key=value",)),
    Case("override_not_yaml", (*CONFIG, "--set", "train.lr=[1,"), names=("--set train.lr=[1,: the value is not valid",)),
    Case("int_given_text", (*TRAIN, "--set", "train.batch_size=sixteen"),
         names=("config.train.batch_size: expected int, got 'sixteen'",)),
    Case("section_given_a_number", (*CONFIG, "--set", "train=5"), names=("config.train: expected a mapping, got 5",)),
    Case("int_given_bool", (*TRAIN, "--set", "train.max_epochs=true"),
         names=("config.train.max_epochs: expected int, got True",)),
    Case("pair_given_one_value", (*PREPARE, "--set", "data.clip_percentiles=[2]"),
         names=("config.data.clip_percentiles: expected 2 values",)),
    Case("choice_misspelt", (*PREPARE, "--set", "data.crop=lung"), names=("config.data.crop: 'lung' is not one of",)),
    Case("option_not_a_number", ("train", "--config", "{config}", "--epochs", "three"),
         names=("argument --epochs: invalid int value: 'three'",)),
    # ------------------------------------------------------------------ out-of-range values
    Case("image_size_negative", (*PREPARE, "--image-size", "-8"), names=("data.image_size = -8 is not allowed",)),
    Case("lr_nan", (*TRAIN, "--set", "train.lr=.nan"), names=("train.lr = nan is not allowed: must be > 0",)),
    Case("lr_negative", (*TRAIN, "--set", "train.lr=-0.1"), names=("train.lr = -0.1 is not allowed",)),
    Case("clip_percentiles_reversed", (*PREPARE, "--set", "data.clip_percentiles=[98, 2]"),
         names=("data.clip_percentiles = (98.0, 2.0) is not allowed",)),
    Case("device_unknown", (*TRAIN, "--device", "tpu"), names=("runtime.device = 'tpu' is not allowed",)),
    Case("cv_folds_two", (*TRAIN, "--set", "protocol.cv_folds=2"), names=("protocol.cv_folds = 2 is not allowed",)),
    Case("max_epochs_zero", (*TRAIN, "--epochs", "0"), names=("train.max_epochs = 0 is not allowed",)),
    Case("several_bad_values", (*TRAIN, "--set", "train.lr=-1", "--set", "train.batch_size=0"),
         names=("train.lr = -1.0", "train.batch_size = 0")),
    Case("input_too_small_for_backbone", (*TRAIN, "--set", "model.input_size=4"),
         names=("model.input_size 4 is too small for backbone tiny_cnn",)),
    Case("fold_out_of_range", (*TRAIN, "--fold", "7"), names=("fold 7 does not exist",)),
    Case("protocol_unknown", (*TRAIN, "--protocol", "cv10"), names=("unknown protocol 'cv10'",)),
    Case("task_weight_of_unknown_task", (*TRAIN, "--set", "loss.task_weights={prognosys: 1}"),
         names=("loss.task_weights names unknown task(s) ['prognosys']",)),
    Case("extra_task_on_unknown_dataset", (*TRAIN, "--set", "model.extra_tasks=[{name: age, column: Age, dataset: x}]"),
         names=("model.extra_tasks ['age']: dataset must be one of data.datasets",)),
    Case("weights_file_missing", (*TRAIN, "--weights", "{ws}/weights.pt"), names=("weights file not found: {ws}/weights.pt",)),
    Case("weights_file_garbage", (*TRAIN, "--weights", "{ws}/weights.pt"), setup=write("weights.pt", b"garbage"),
         names=("{ws}/weights.pt: not a readable torch state dict",)),
    Case("weights_safetensors_garbage", (*TRAIN, "--weights", "{ws}/weights.safetensors"),
         setup=write("weights.safetensors", b"garbage"), names=("{ws}/weights.safetensors: not a readable torch state",)),
    Case("weights_of_another_network", (*TRAIN, "--weights", "{ws}/weights.pt"),
         setup=lambda ws, mp: torch.save({"fc.weight": torch.zeros(2, 2)}, ws.root / "weights.pt"),
         names=("{ws}/weights.pt: does not match the backbone",)),
    Case("results_dir_is_a_file", (*TRAIN, "--results-dir", "{ws}/notes.txt"), setup=write("notes.txt", "x"),
         names=("{ws}/notes.txt/runs/stl_prognosis/tiny_cnn/cv5/fold0/seed0: not a directory",)),
    # ------------------------------------------------------------------ plug-ins by name and their params
    Case("strategy_unknown", ("train", "--config", "{config}", "--strategy", "nosuch"),
         names=("unknown strategy 'nosuch'",)),
    Case("backbone_unknown", (*TRAIN, "--backbone", "nosuchnet"), names=("unknown backbone 'nosuchnet'",)),
    Case("head_unknown", ("train", "--config", "{config}", "--strategy", "stl_severity", "--set", "model.head=nohead"),
         names=("unknown head 'nohead'",)),
    Case("weighting_unknown", (*TRAIN, "--set", "loss.weighting=noweight"), names=("unknown weighting 'noweight'",)),
    Case("dataset_plugin_unknown", (*PREPARE, "--set", "data.datasets.extra={name: nosuchreader}"),
         names=("unknown dataset 'nosuchreader'",)),
    Case("backbone_param_misspelt", (*TRAIN, "--set", "model.backbone={name: tiny_cnn, params: {widht: 8}}"),
         names=("backbone 'tiny_cnn' params: unknown key(s) widht",)),
    Case("head_param_wrong_type", (*TRAIN, "--set", "model.heads={prognosis: {name: mlp, params: {dropout: high}}}"),
         names=("dropout: expected float, got 'high'",)),
    Case("weighting_param_unknown", (*TRAIN, "--set", "loss.weighting={name: uncertainty, params: {nope: 1}}"),
         names=("unknown key(s) nope",)),
    Case("dataset_param_misspelt", (*PREPARE, "--set", "data.datasets.aiforcovid.params.rot=/x"),
         names=("data.datasets.aiforcovid.params: unknown key(s) rot",)),
    Case("strategy_on_unknown_dataset",
         ("train", "--config", "{config}", "--strategy", "mine", "--set",
          "strategies.mine={name: train, params: {datasets: [nosuch], tasks: [prognosis]}}"),
         names=("strategies.mine.params.datasets: dataset(s) ['nosuch']",)),
    Case("strategy_starts_from_unknown",
         ("train", "--config", "{config}", "--strategy", "mine", "--set",
          "strategies.mine={name: train, params: {datasets: [aiforcovid], tasks: [prognosis], start_from: [nosuch]}}"),
         names=("unknown strategy 'nosuch'",)),
    Case("strategy_task_unknown",
         ("train", "--config", "{config}", "--strategy", "mine", "--set",
          "strategies.mine={name: train, params: {datasets: [aiforcovid], tasks: [prognosys]}}"),
         names=("prognosys",)),
    Case("plugin_file_missing", (*CONFIG, "--set", "plugins=[{ws}/absent.py]"),
         names=("plugins: file not found: {ws}/absent.py",)),
    Case("plugin_syntax_error", (*TRAIN, "--set", f"plugins=[{PLUGIN}]"), names=(f"{PLUGIN}", "line 2", "SyntaxError"),
         setup=write("plugin.py", "import math\ndef broken(:\n")),
    Case("plugin_raises_on_import", (*CONFIG, "--set", f"plugins=[{PLUGIN}]"),
         names=(f"{PLUGIN}", "line 1", "RuntimeError: boom"), setup=write("plugin.py", "raise RuntimeError('boom')\n")),
    Case("plugin_imports_a_missing_module", (*CONFIG, "--set", f"plugins=[{PLUGIN}]"),
         names=(f"{PLUGIN}", "nosuchmodule_xyz"), setup=write("plugin.py", "import nosuchmodule_xyz\n")),
    Case("plugin_module_not_installed", (*CONFIG, "--set", "plugins=[nosuch_mdmt_plugin]"),
         names=("plugins: cannot import 'nosuch_mdmt_plugin'",)),
    Case("plugin_registers_a_taken_name", (*CONFIG, "--set", f"plugins=[{PLUGIN}]"),
         names=("backbone 'tiny_cnn' is registered twice",),
         setup=write("plugin.py", "from mdmt.models.backbones import BACKBONES\n"
                                  "BACKBONES.add('tiny_cnn', lambda params, **context: None)\n")),
    # ------------------------------------------------------------------ AIforCOVID and BrixIA on disk
    Case("aiforcovid_root_missing", (*PREPARE, "--aiforcovid-root", "{ws}/nowhere"),
         names=("AIforCOVID root not found: {ws}/nowhere",)),
    Case("aiforcovid_sheet_missing", PREPARE, names=("dataset 'aiforcovid'", "27 of 36 input rows lost",
                                                     "not listed in any sheet", "max_drop_fraction"),
         setup=damage_film(os.remove, film="AIforCOVID.xlsx"), writes=("{ws}/twin",)),
    Case("aiforcovid_every_sheet_missing", PREPARE, names=("no AIforCOVID sheet found",),
         setup=steps(damage_film(os.remove, film="AIforCOVID.xlsx"),
                     lambda ws, mp: [os.remove(ws.root / "twin/AIforCOVID" / s)
                                     for s in ("AIforCOVID_r2.xlsx", "AIforCOVID_r3.xlsx")])),
    Case("aiforcovid_sheet_without_prognosis", PREPARE, names=("AIforCOVID.xlsx: missing column 'Prognosis'",),
         setup=edit_sheet(lambda t: t.drop(columns=["Prognosis"]))),
    Case("aiforcovid_prognosis_unparsable", PREPARE, names=("AIforCOVID.xlsx", "'MODERATE'", "row 3"),
         setup=edit_sheet(set_cell("Prognosis", 1, "MODERATE"))),
    Case("aiforcovid_id_in_two_sheets", PREPARE,
         names=("duplicate ImageFile in the AIforCOVID sheets", "AIforCOVID.xlsx row 2", "AIforCOVID_r2.xlsx row 2"),
         setup=duplicate_across_sheets),
    Case("aiforcovid_sheet_not_a_workbook", PREPARE, names=("AIforCOVID_r3.xlsx: cannot read table",),
         setup=damage_film(replace_bytes(b"PK\x03\x04 not a zip"), film="AIforCOVID_r3.xlsx")),
    Case("brixia_metadata_missing", PREPARE, names=("no BrixIA metadata file",),
         setup=damage_film(os.remove, "BRIXIA", "metadata_global_v2.csv")),
    Case("brixia_metadata_empty", PREPARE, names=("metadata_global_v2.csv: cannot read table",),
         setup=damage_film(replace_bytes(b""), "BRIXIA", "metadata_global_v2.csv")),
    Case("brixia_image_folder_missing", PREPARE, names=("BrixIA image folder not found",),
         setup=damage_film(shutil.rmtree, "BRIXIA", "dicom_clean")),
    Case("brixia_score_not_digits", PREPARE, names=("metadata_global_v2.csv: BrixiaScore must be", "'01x300'"),
         setup=edit_metadata(set_cell("BrixiaScore", 4, "01x300"))),
    Case("brixia_global_disagrees", PREPARE, names=("BrixiaScoreGlobal differs", "'17'"),
         setup=edit_metadata(set_cell("BrixiaScoreGlobal", 2, "17"))),
    Case("brixia_filename_twice", PREPARE, names=("metadata_global_v2.csv: duplicate Filename",),
         setup=edit_metadata(lambda t: pd.concat([t, t.iloc[[3]]], ignore_index=True))),
    # ------------------------------------------------------------------ image files: named by id, not fatal
    Case("dicom_garbage", PREPARE, code=0, setup=damage_film(replace_bytes(b"garbage " * 40)),
         names=(f"aiforcovid: {VICTIM}: unreadable, left out: not a DICOM file",), writes=CACHE,
         check=counts_add_up("aiforcovid", AFC_IMAGES, failed=(VICTIM,))),
    Case("dicom_empty", PREPARE, code=0, setup=damage_film(replace_bytes(b"")), writes=CACHE,
         names=(f"{VICTIM}: unreadable, left out: empty file (0 bytes)",),
         check=counts_add_up("aiforcovid", AFC_IMAGES, failed=(VICTIM,))),
    Case("dicom_truncated_pixels", PREPARE, code=0, setup=damage_film(truncate(3000)), writes=CACHE,
         names=(f"{VICTIM}: unreadable, left out: truncated DICOM",),
         check=counts_add_up("aiforcovid", AFC_IMAGES, failed=(VICTIM,))),
    Case("dicom_cut_in_header", PREPARE, code=0, setup=damage_film(truncate(200)), writes=CACHE,
         names=(f"{VICTIM}: unreadable, left out: no pixel data in 200 bytes",),
         check=counts_add_up("aiforcovid", AFC_IMAGES, failed=(VICTIM,))),
    Case("png_named_dcm", PREPARE, code=0, setup=damage_film(png_named_dcm), writes=CACHE,
         names=(f"{VICTIM}: unreadable, left out: PNG image named .dcm",),
         check=counts_add_up("aiforcovid", AFC_IMAGES, failed=(VICTIM,))),
    Case("image_file_missing", PREPARE, code=0, setup=damage_film(os.remove), writes=CACHE,
         names=(f"aiforcovid: {VICTIM}: dropped: file not found",),
         check=counts_add_up("aiforcovid", AFC_IMAGES, dropped=(VICTIM,))),
    Case("image_not_in_any_sheet", PREPARE, code=0, writes=CACHE,
         setup=lambda ws, mp: shutil.copy(ws.own("AIforCOVID") / f"imgs/{VICTIM}.dcm",
                                          ws.root / "twin/AIforCOVID/imgs/P_9999.dcm"),
         names=("aiforcovid: P_9999: dropped: not listed in any sheet",),
         check=counts_add_up("aiforcovid", AFC_IMAGES + 1, dropped=("P_9999",))),
    Case("image_folder_unreadable", PREPARE, writes=CACHE,
         setup=lambda ws, mp: [p.write_bytes(b"x") for p in (ws.own("AIforCOVID") / "imgs").glob("*.dcm")],
         names=("dataset 'aiforcovid'", "27 of 36 input rows lost", "not a DICOM file", "max_drop_fraction = 0.1")),
    Case("unreadable_image_not_skipped", (*PREPARE, "--set", "data.skip_unreadable=false"),
         setup=damage_film(replace_bytes(b"garbage " * 40)), names=(f"{VICTIM}.dcm: not a DICOM file",)),
    Case("boxes_file_missing", (*PREPARE, "--set", "data.crop=boxes", "--set", "data.boxes_file={ws}/boxes.csv"),
         names=("{ws}/boxes.csv: boxes file not found",)),
    Case("boxes_file_unset", (*PREPARE, "--set", "data.crop=boxes"), names=("data.crop = boxes needs data.boxes_file",)),
    Case("boxes_file_without_corners", (*PREPARE, "--set", "data.crop=boxes", "--set", "data.boxes_file={ws}/boxes.csv"),
         setup=write("boxes.csv", f"image_id,x0\n{VICTIM},3\n"), names=("{ws}/boxes.csv: missing column(s) y0, x1, y1",)),
    Case("boxes_not_integer", (*PREPARE, "--set", "data.crop=boxes", "--set", "data.boxes_file={ws}/boxes.csv"),
         setup=write("boxes.csv", f"image_id,x0,y0,x1,y1\n{VICTIM},3,4,a,9\n"),
         names=(f"{{ws}}/boxes.csv: image_id {VICTIM}: box [3, 4, 'a', 9] is not integer",)),
    Case("masks_dir_missing", (*PREPARE, "--set", "data.crop=masks", "--set", "data.masks_dir={ws}/masks"),
         names=("data.masks_dir", "{ws}/masks")),
    Case("cache_dir_is_a_file", (*PREPARE, "--cache-dir", "{ws}/notes.txt"), setup=write("notes.txt", "x"),
         names=("{ws}/notes.txt: cannot create the cache folder",)),
    # ------------------------------------------------------------------ a manifest (table dataset)
    Case("manifest_label_unparsable", PREPARE,
         names=("manifest.csv (cohort) row 7: prognosis value 'MAYBE' is not MILD/SEVERE or 0/1",),
         setup=edit_manifest(set_cell("outcome", 5, "MAYBE"))),
    Case("manifest_score_not_a_number", PREPARE, names=("manifest.csv (cohort) row 4: brixia_global value 'high'",),
         setup=edit_manifest(set_cell("brixia_global", 2, "high"))),
    Case("manifest_blank_patient", PREPARE, code=0, writes=CACHE,
         names=("blank patient: manifest.csv row 5",), setup=edit_manifest(set_cell("patient", 3, "")),
         check=counts_add_up("cohort", COHORT_ROWS, dropped=("G20875_1",))),
    Case("manifest_missing_column", PREPARE, names=("manifest.csv: missing column 'patient'",),
         setup=edit_manifest(lambda t: t.rename(columns={"patient": "subject"}))),
    Case("manifest_duplicate_id", PREPARE, names=("dataset 'cohort': duplicate image_id",),
         setup=edit_manifest(lambda t: pd.concat([t, t.iloc[[2]]], ignore_index=True))),
    Case("manifest_stratify_column_missing", PREPARE, names=("data.datasets.cohort.params.stratify: no column 'grade'",),
         setup=edit_manifest(keep, stratify="grade")),
    Case("manifest_file_missing", PREPARE, names=("manifest 'cohort' not found", "manifest.csv"),
         setup=lambda ws, mp: os.remove(ws.cohort())),
    Case("manifest_path_not_set", PREPARE, names=("data.datasets.cohort.params.path is not set",),
         setup=lambda ws, mp: ws.write_config({"data": {"datasets": {"cohort": {"name": "table"}}}})),
    Case("manifest_column_clashes", PREPARE, names=("manifest.csv: column(s) ['dataset'] clash with record columns",),
         setup=edit_manifest(lambda t: t.assign(dataset="x"))),
    # ------------------------------------------------------------------ official split files
    Case("official_split_unknown_id", (*TRAIN, "--protocol", "official-cv5"), code=0,
         setup=official_splits(extra_test=("P_9999",)), writes=("{official}",),
         names=("P_9999", "{official}/split_ids_missing.csv"), check=missing_ids_recorded),
    Case("official_split_empty_part", (*TRAIN, "--protocol", "official-cv5"), setup=official_splits(empty="test"),
         names=("empty split part(s) aiforcovid/test",)),
    Case("official_split_empty_file", (*TRAIN, "--protocol", "official-cv5"), setup=official_splits(blank="val"),
         names=("{ws}/splits/AFC/5/0/val.txt",)),
    Case("official_split_file_missing", (*TRAIN, "--protocol", "official-cv5"), setup=official_splits(missing="val"),
         names=("official splits: file not found: {ws}/splits/AFC/5/0/val.txt",)),
    Case("official_splits_dir_unset", (*TRAIN, "--protocol", "official-cv5"),
         names=("protocol.official_splits_dir must be set",)),
    # ------------------------------------------------------------------ corrupt cache files: named, rebuilt
    Case("cache_images_truncated", PREPARE, code=0, writes=CACHE, names=("images.u8", "truncated or corrupt"),
         setup=lambda ws, mp: truncate(500)(next(ws.cache.glob("aiforcovid-*")) / "images.u8"),
         check=rebuilt("aiforcovid")),
    Case("cache_images_overwritten", PREPARE, code=0, writes=CACHE, names=("images.u8: contents differ",),
         setup=lambda ws, mp: overwrite_in_place(next(ws.cache.glob("aiforcovid-*")) / "images.u8"),
         check=rebuilt("aiforcovid")),
    Case("cache_records_edited", PREPARE, code=0, writes=CACHE, names=("records.csv: contents differ",),
         setup=lambda ws, mp: replace_bytes(b"image_id\nP_1\n")(next(ws.cache.glob("brixia-*")) / "records.csv"),
         check=rebuilt("brixia")),
    Case("cache_meta_not_json", PREPARE, code=0, writes=CACHE, names=("meta.json: unreadable cache metadata",),
         setup=lambda ws, mp: replace_bytes(b"{")(next(ws.cache.glob("aiforcovid-*")) / "meta.json"),
         check=rebuilt("aiforcovid")),
    Case("cache_marker_missing", PREPARE, code=0, writes=CACHE, names=("not a complete image cache",),
         setup=lambda ws, mp: os.remove(next(ws.cache.glob("aiforcovid-*")) / "COMPLETE"),
         check=rebuilt("aiforcovid")),
    # ------------------------------------------------------------------ checkpoints
    Case("last_checkpoint_truncated", TRAIN, setup=bad_checkpoint("last.pt", truncate(1000)), writes=RESUMED,
         names=("{run}/last.pt: not a readable mdmt checkpoint",)),
    Case("last_checkpoint_empty", TRAIN, setup=bad_checkpoint("last.pt", replace_bytes(b"")), writes=RESUMED,
         names=("{run}/last.pt: not a readable mdmt checkpoint",)),
    Case("last_checkpoint_foreign", TRAIN, setup=bad_checkpoint("last.pt", foreign_checkpoint),
         writes=RESUMED, names=("{run}/last.pt: not an mdmt checkpoint of format 2",)),
    Case("last_checkpoint_is_text", TRAIN, setup=bad_checkpoint("last.pt", replace_bytes(b"epoch 3\n")),
         writes=RESUMED, names=("{run}/last.pt: not a readable mdmt checkpoint",)),
    Case("dependency_checkpoint_planted_pickle", ("train", "--config", "{config}", "--strategy", "ft"),
         setup=bad_checkpoint("best.pt", planted_pickle, SEVERITY_RUN, unfinished=False),
         names=("{sev}/best.pt: not a readable mdmt checkpoint",), check=no_marker),
    Case("dependency_checkpoint_truncated", ("train", "--config", "{config}", "--strategy", "ft"),
         setup=bad_checkpoint("best.pt", truncate(4000), SEVERITY_RUN, unfinished=False),
         names=("{sev}/best.pt: not a readable mdmt checkpoint",)),
    Case("dependency_not_trained", ("train", "--config", "{config}", "--strategy", "ft"),
         names=("starts from run(s) that are not finished: stl_severity/tiny_cnn/cv5/0/0",)),
    # ------------------------------------------------------------------ a run tied to its inputs
    Case("finished_run_other_config", (*TRAIN, "--set", "train.lr=0.5"), setup=finished(),
         names=("{run} holds a finished run with other inputs (config.train.lr changed)", "--rerun-changed")),
    Case("finished_run_other_config_rerun", (*TRAIN, "--set", "train.lr=0.5", "--rerun-changed"), code=0,
         setup=finished(), writes=("{run}",), names=("run finished: {run}",), check=rerun_trained_again),
    Case("unfinished_run_data_changed", TRAIN, setup=trained_then_data_changed, writes=CACHE,
         names=("{run} holds an unfinished run with other inputs", "caches.aiforcovid")),
    Case("finished_run_inputs_unreadable", TRAIN, setup=steps(finished(), write(f"results/{PROGNOSIS_RUN}/inputs.json",
                                                                                "{not json")),
         names=("{run}/inputs.json",)),
    # ------------------------------------------------------------------ grids
    Case("grid_with_a_refused_run", (*GRID, "--set", "grid.strategies=[stl_prognosis]", "--set", "train.lr=0.5"),
         code=1, setup=finished(), writes=("{results}/grid.lock", "{run}/FAILED"),
         names=("stl_prognosis/tiny_cnn/cv5/0/0", "other inputs")),
    Case("grid_with_a_bad_dependency", (*GRID, "--set", "grid.strategies=[ft]"), code=1,
         setup=bad_checkpoint("best.pt", truncate(4000), SEVERITY_RUN, unfinished=False),
         writes=("{results}/grid.lock", "{results}/runs/ft"),
         names=("ft/tiny_cnn/cv5/0/0", "best.pt")),
    Case("grid_locked_by_another", (*GRID, "--set", "grid.strategies=[stl_prognosis]"), setup=held_lock,
         names=("another mdmt grid is running on {results} (pid 4242)",)),
    Case("grid_fold_out_of_range", (*GRID, "--set", "grid.strategies=[stl_prognosis]", "--set", "grid.folds=[7]"),
         writes=("{results}/grid.lock",), names=("grid.folds: fold(s) [7] do not exist",)),
    Case("grid_strategy_unknown", (*GRID, "--set", "grid.strategies=[nosuch]"), writes=("{results}/grid.lock",),
         names=("unknown strategy 'nosuch'",)),
    # ------------------------------------------------------------------ reports
    Case("report_metrics_not_json", ("report", "{results}"), code=0,
         setup=steps(finished(), write(f"results/{PROGNOSIS_RUN}/metrics.json", "{\"prognosis\": {\"acc")),
         writes=("{results}/report",), names=("report: {results}/report/report.html",),
         check=report_lists_unreadable("metrics.json")),
    Case("report_predictions_garbled", ("report", "{results}"), code=0,
         setup=steps(finished(), write(f"results/{PROGNOSIS_RUN}/predictions_prognosis.csv", "image_id,y_true\nP_1,x\n")),
         writes=("{results}/report",), names=("report: {results}/report/report.html",),
         check=report_lists_unreadable("predictions_prognosis.csv")),
    Case("report_metrics_missing", ("report", "{results}"), code=0,
         setup=lambda ws, mp: (ws.finished() / "metrics.json").unlink(),
         writes=("{results}/report",), names=("report: {results}/report/report.html",),
         check=report_lists_unreadable("metrics.json: missing")),
    Case("report_predictions_cut_mid_row", ("report", "{results}"), code=0,
         setup=lambda ws, mp: truncate(-6)(ws.finished() / "predictions_prognosis.csv"),
         writes=("{results}/report",), names=("report: {results}/report/report.html",),
         check=report_lists_unreadable("predictions_prognosis.csv: the last row has no line break")),
    Case("report_beside_an_old_index", ("report", "{results}"), code=0,  # an older mdmt's index.sqlite is left be
         setup=steps(finished(), write("results/index.sqlite", "not a database " * 100)),
         writes=("{results}/report",), names=("report: {results}/report/report.html",)),
    Case("report_folder_missing", ("report", "{ws}/nowhere"), names=("results folder {ws}/nowhere does not exist",)),
    Case("report_on_a_file", ("report", "{ws}/results.txt"), setup=write("results.txt", "x"),
         names=("{ws}/results.txt: is a file, not a results folder",)),
    Case("report_out_under_a_file", ("report", "{results}", "--out", "{ws}/notes.txt/report"),
         setup=steps(finished(), write("notes.txt", "x")),
         names=("{ws}/notes.txt/report: not a directory",)),
    # ------------------------------------------------------------------ synth
    Case("synth_onto_a_file", ("synth", "{ws}/twin.txt", "--preset", "tiny"), setup=write("twin.txt", "keep"),
         names=("{ws}/twin.txt: exists and is not a folder",)),
    Case("synth_into_a_non_empty_folder", ("synth", "{ws}", "--preset", "tiny"), names=("{ws}: not empty", "--overwrite")),
    Case("synth_over_another_twin", ("synth", "{ws}/out", "--preset", "tiny", "--seed", "1"), setup=synthetic_twin,
         names=("{ws}/out: holds a synthetic twin with other parameters (seed 0 → 1)",)),
    Case("synth_fault_unknown", ("synth", "{ws}/out", "--preset", "tiny", "--fault", "nosuch"),
         names=("unknown synthetic fault(s) ['nosuch']",)),
    Case("synth_preset_unknown", ("synth", "{ws}/out", "--preset", "huge"),
         names=("config.synth.preset: 'huge' is not one of",)),
    Case("synth_opacity_nan", ("synth", "{ws}/out", "--preset", "tiny", "--opacity", "nan"),
         names=("synth.opacity = nan is not allowed",)),
    # ------------------------------------------------------------------ full and read-only disks
    Case("cache_disk_full_by_space_check", PREPARE, setup=steps(damage_film(lambda p: None), no_free_space),
         names=("{cache}/aiforcovid-", ": not enough free disk space for the image cache")),
    Case("cache_disk_full_while_writing", PREPARE, setup=steps(damage_film(lambda p: None), full_images_file),
         names=("{cache}: cannot write the image cache", "No space left on device")),
    Case("run_folder_read_only", TRAIN, setup=writer_fails(errno.EACCES, "spec.json"),
         writes=("{run}",), names=("{run}/spec.json: permission denied",)),
    Case("history_disk_full", TRAIN, setup=writer_fails(errno.ENOSPC, "history.csv"),
         writes=("{run}",), names=("{run}/history.csv: no space left on device",)),
    Case("report_disk_full", ("report", "{results}"), setup=steps(finished(), writer_fails(errno.ENOSPC, "headline.csv")),
         writes=("{results}/report",),
         names=("{results}/report/headline.csv: no space left on device",)),
    # ------------------------------------------------------------------ the same through a real process
    Case("process_yaml_syntax_error", ("train", "--config", BAD_YAML), process=True,
         names=(f"{BAD_YAML}:2:1: YAML syntax error",), setup=write("bad.yaml", "train: {lr: 0.1\n")),
    Case("process_dicom_garbage", PREPARE, code=0, process=True, writes=CACHE,
         setup=damage_film(replace_bytes(b"garbage " * 40)),
         names=(f"aiforcovid: {VICTIM}: unreadable, left out: not a DICOM file (no DICM preamble and not an image)",),
         check=counts_add_up("aiforcovid", AFC_IMAGES, failed=(VICTIM,))),
    Case("process_planted_pickle", ("train", "--config", "{config}", "--strategy", "ft"), process=True,
         setup=bad_checkpoint("best.pt", planted_pickle, SEVERITY_RUN, unfinished=False),
         names=("{sev}/best.pt: not a readable mdmt checkpoint",), check=no_marker),
    Case("process_checkpoint_disk_full", TRAIN, process=True, file_limit=64 * 1024, writes=("{run}",),
         names=("{run}/best.pt: file too large",)),
    Case("process_report_metrics_not_json", ("report", "{results}"), code=0, process=True,
         setup=steps(finished(), write(f"results/{PROGNOSIS_RUN}/metrics.json", "[1, 2")),
         writes=("{results}/report",), check=report_lists_unreadable("metrics.json"),
         names=("report: {results}/report/report.html",)),
]


# ---------------------------------------------------------------------------------------------- the test
@pytest.fixture
def workspace(base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    monkeypatch.chdir(tmp_path)  # anything written to a relative default lands here and is seen
    ws = Workspace(tmp_path, base)
    yield ws
    for handle in ws.held:
        handle.close()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, workspace: Workspace, base: Base, capsys: pytest.CaptureFixture[str],
                   caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit code, the file/key/id named, no traceback, nothing written or lost beyond what the case allows."""
    ws = workspace
    caplog.set_level(logging.WARNING)
    if case.setup is not None:
        case.setup(ws, monkeypatch)
    capsys.readouterr()
    caplog.clear()
    argv = [ws.fill(a) for a in case.argv]
    before = snapshot(ws.root)
    code, streams, log = _process(argv, ws, case.file_limit) if case.process else _main(argv, capsys, caplog)
    after = snapshot(ws.root)
    text = "".join(streams) + log

    assert "Traceback" not in text, text
    assert code == case.code, text
    for fragment in case.names:
        assert ws.fill(fragment) in text, f"{ws.fill(fragment)!r} not in:\n{text}"
    if code == 2:  # one error line, the last of its stream
        assert sum("error: " in line for line in text.splitlines()) == 1, text
        assert any(lines and "error: " in lines[-1] for lines in (s.strip().splitlines() for s in streams)), text
    allowed = [ws.fill(w) for w in case.writes]
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert [p for p in changed if not _allowed(p, allowed, after)] == []
    assert [p for p in after if ".tmp-" in Path(p).name] == []
    assert snapshot(base.root) == base.files, "the session's twin, caches or runs changed"
    if case.check is not None:
        case.check(ws, text)


def test_the_corpus_is_large_and_names_are_unique() -> None:
    """At least 60 cases, each a distinct name, each naming what is at fault."""
    names = [c.name for c in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert all(c.names for c in CASES)
