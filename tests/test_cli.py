"""The command line: sub-commands run, bad input gives a clear error and exit code 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pandas as pd
import pytest

from mdmt.cli import main, os_error_message
from mdmt.errors import ConfigError


def test_info_lists_the_papers_backbones(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("densenet121", "shufflenet_v2_x0_5", "efficientnet_lite0", "mdmt", "severity_global4"):
        assert name in out


def test_missing_config_file_exits_2_with_its_name(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_unknown_override_key_exits_2(capsys):
    assert main(["prepare", "--set", "data.imagesize=3"]) == 2
    assert "imagesize" in capsys.readouterr().err


def test_synth_writes_both_datasets(tmp_path):
    out = tmp_path / "twin"
    assert main(["synth", str(out), "--preset", "tiny", "--seed", "3"]) == 0
    sheet = pd.read_excel(out / "AIforCOVID" / "AIforCOVID.xlsx")
    assert {"ImageFile", "Hospital", "Prognosis"} <= set(sheet.columns)
    assert len(list((out / "BRIXIA" / "dicom_clean").glob("*.dcm"))) > 0


def test_prepare_reports_missing_root(tmp_path, capsys):
    assert main(["prepare", "--aiforcovid-root", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ no tracebacks
def run(capsys, *argv: str) -> tuple[int, str]:
    """``main(argv)``: its exit code and everything it printed, which never holds a traceback."""
    code = main(list(argv))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.1\n   batch_size: 4\n")
    code, text = run(capsys, "config", "--config", str(path))
    assert code == 2
    assert f"{path}:3:14: YAML syntax error: mapping values are not allowed here" in text
    assert len(text.strip().splitlines()) == 1


def test_a_yaml_syntax_error_gives_no_traceback_from_the_process(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {lr: 0.1\n")
    done = subprocess.run([sys.executable, "-m", "mdmt.cli", "train", "--config", str(path)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "broken.yaml:2:1: YAML syntax error" in done.stderr and done.stdout == ""
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["config", "--set", "train.lr=[1,"], "--set train.lr=[1,: the value is not valid YAML"),
        (["config", "--set", "train.lr=.nan"], "train.lr = nan is not allowed: must be > 0"),
        (["config", "--set", "data.clip_percentiles=[98, 2]"], "data.clip_percentiles = (98.0, 2.0)"),
        (["train", "--epochs", "0"], "train.max_epochs = 0 is not allowed: must be >= 1"),
        (["train", "--device", "gpu"], "runtime.device = 'gpu' is not allowed"),
        (["train", "--set", "train=5", "--epochs", "3"], "--set train=5: config.train: expected a mapping, got 5"),
        (["grid", "--set", "data.workers=2"], "--set data.workers=2: data.workers is now runtime.workers"),
        (["prepare", "--image-size", "-8"], "data.image_size = -8 is not allowed"),
        (["grid", "--workers", "0"], "grid.workers = 0 is not allowed"),
        (["synth", "--opacity", "nan"], "synth.opacity = nan is not allowed"),
    ],
)
def test_bad_values_exit_2_naming_the_key(capsys, argv, fragment):
    code, text = run(capsys, *argv)
    assert code == 2 and fragment in text


NO_CUDA = "error: runtime.device cuda: no CUDA device on this machine (torch.cuda.is_available() is False)"
DEVICE_COMMANDS = [["train"], ["grid"], ["demo"], ["predict", "--run", "nowhere", "film.png"],
                   ["explain", "--run", "nowhere", "film.png"], ["export", "--run", "nowhere", "--format", "onnx"]]


@pytest.mark.parametrize("argv", DEVICE_COMMANDS, ids=[a[0] for a in DEVICE_COMMANDS])
def test_a_device_the_machine_lacks_or_an_unknown_one_is_one_line_before_any_work(argv, tmp_path, capsys,
                                                                                 monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    unknown = "error: runtime.device = 'tpu' is not allowed: must be auto, cpu, cuda, cuda:N or mps"
    for device, expected in (("cuda", NO_CUDA), ("tpu", unknown)):
        code, text = run(capsys, *argv, "--device", device)
        assert (code, text.strip()) == (2, expected)
    assert list(tmp_path.iterdir()) == []  # nothing was written: the demo's twin, a run folder, an output folder


def test_a_grid_for_a_cluster_leaves_the_device_to_the_cluster(capsys, monkeypatch):
    import torch

    from mdmt.experiments import grid

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(grid, "run_grid", lambda config, **kwargs: (_ for _ in ()).throw(ConfigError("submitted")))
    assert run(capsys, "grid", "--backend", "slurm", "--device", "cuda") == (2, "error: submitted\n")


def test_report_reads_config_and_set(tmp_path, capsys):
    (tmp_path / "results.txt").write_text("x")
    config = tmp_path / "study.yaml"
    config.write_text(f"results_dir: {tmp_path / 'results.txt'}\n")
    code, text = run(capsys, "report", "--config", str(config))
    assert code == 2 and f"{tmp_path / 'results.txt'}: is a file, not a results folder" in text
    code, text = run(capsys, "report", "--set", f"results_dir={tmp_path / 'results.txt'}")
    assert code == 2 and f"{tmp_path / 'results.txt'}: is a file, not a results folder" in text


def test_an_error_is_printed_as_is_on_one_line(tmp_path, capsys):
    missing = tmp_path / ("[/red]" + "x" * 120) / "config.yaml"  # markup and a line longer than the terminal
    code, text = run(capsys, "config", "--config", str(missing))
    assert code == 2 and text.strip() == f"error: config file not found: {missing}"


# ---------------------------------------------------------------------------------- folders and disks
def test_a_path_under_a_file_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, text = run(capsys, "synth", str(tmp_path / "file" / "twin"), "--preset", "tiny")
    assert code == 2 and f"{tmp_path / 'file' / 'twin'}: not a directory" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_exits_2_naming_it(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, text = run(capsys, "synth", str(folder / "twin"), "--preset", "tiny")
    finally:
        folder.chmod(0o755)
    assert code == 2 and f"{folder / 'twin'}: permission denied" in text


@pytest.mark.parametrize("number, reason", [(errno.ENOSPC, "no space left on device"),
                                            (errno.EACCES, "permission denied"),
                                            (errno.EROFS, "read-only file system")])
def test_a_full_or_read_only_disk_exits_2_naming_the_file(tmp_path, capsys, monkeypatch, number, reason):
    def failing_write(plan, rendered, out, seed):
        raise OSError(number, os.strerror(number), str(out / "BRIXIA" / "x.dcm"))

    monkeypatch.setattr("mdmt.synth.twin.write_image", failing_write)
    code, text = run(capsys, "synth", str(tmp_path / "twin"), "--preset", "tiny")
    assert code == 2 and f"{tmp_path / 'twin' / 'BRIXIA' / 'x.dcm'}: {reason}" in text


def test_os_errors_without_a_path_still_give_the_reason():
    assert os_error_message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "no space left on device (ENOSPC)"
    assert os_error_message(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b")).startswith("/a → /b: ")


# ------------------------------------------------------------------------------------------------ synth
def test_synth_onto_a_file_exits_2_naming_it(tmp_path, capsys):
    target = tmp_path / "twin.txt"
    target.write_text("keep")
    code, text = run(capsys, "synth", str(target), "--preset", "tiny")
    assert code == 2 and f"{target}: exists and is not a folder" in text
    assert target.read_text() == "keep"


def test_synth_into_a_non_empty_folder_needs_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    code, text = run(capsys, "synth", str(tmp_path), "--preset", "tiny")
    assert code == 2 and f"{tmp_path}: not empty" in text and "--overwrite" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert run(capsys, "synth", str(tmp_path), "--preset", "tiny", "--overwrite")[0] == 0
    assert (tmp_path / "notes.txt").read_text() == "keep" and (tmp_path / "BRIXIA").is_dir()


def test_synth_over_a_twin_with_other_parameters_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "twin"
    assert run(capsys, "synth", str(out), "--preset", "tiny", "--seed", "0")[0] == 0
    assert run(capsys, "synth", str(out), "--preset", "tiny", "--seed", "0")[0] == 0  # same inputs: rewritten
    sheet = (out / "AIforCOVID" / "AIforCOVID.xlsx").read_bytes()
    code, text = run(capsys, "synth", str(out), "--preset", "tiny", "--seed", "1")
    assert code == 2 and f"{out}: holds a synthetic twin with other parameters (seed 0 → 1)" in text
    assert (out / "AIforCOVID" / "AIforCOVID.xlsx").read_bytes() == sheet
    assert run(capsys, "synth", str(out), "--preset", "tiny", "--seed", "1", "--overwrite")[0] == 0
    assert (out / "AIforCOVID" / "AIforCOVID.xlsx").read_bytes() != sheet


# ----------------------------------------------------------------------------------------------- report
def test_report_on_a_file_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "results.txt").write_text("x")
    code, text = run(capsys, "report", str(tmp_path / "results.txt"))
    assert code == 2 and f"{tmp_path / 'results.txt'}: is a file, not a results folder" in text
    (tmp_path / "results").mkdir()
    code, text = run(capsys, "report", str(tmp_path / "results"), "--out", str(tmp_path / "results.txt"))
    assert code == 2 and f"{tmp_path / 'results.txt'}: is a file, not a report folder" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "results.txt"]
    assert not any((tmp_path / "results").iterdir())


# ---------------------------------------------------------------------------------------- exit codes
def test_an_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mdmt.cli.load_config", interrupted)
    code, text = run(capsys, "config")
    assert code == 130 and "interrupted" in text


@pytest.mark.parametrize("argv", [["fly"], ["train", "--epochz", "3"], ["train", "--epochs", "three"]])
def test_unknown_commands_and_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
