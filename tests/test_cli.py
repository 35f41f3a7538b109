"""The command line: sub-commands run, bad input gives a clear error and exit code 2."""

from __future__ import annotations

import pandas as pd

from mdmt.cli import main


def test_info_lists_the_papers_backbones(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("densenet121", "shufflenet_v2_x0_5", "efficientnet_lite0", "mdmt", "severity_global4"):
        assert name in out


def test_missing_config_file_exits_2_with_its_name(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().out


def test_unknown_override_key_exits_2(capsys):
    assert main(["prepare", "--set", "data.imagesize=3"]) == 2
    assert "imagesize" in capsys.readouterr().out


def test_synth_writes_both_datasets(tmp_path):
    out = tmp_path / "twin"
    assert main(["synth", str(out), "--preset", "tiny", "--seed", "3"]) == 0
    sheet = pd.read_excel(out / "AIforCOVID" / "AIforCOVID.xlsx")
    assert {"ImageFile", "Hospital", "Prognosis"} <= set(sheet.columns)
    assert len(list((out / "BRIXIA" / "dicom_clean").glob("*.dcm"))) > 0


def test_prepare_reports_missing_root(tmp_path, capsys):
    assert main(["prepare", "--aiforcovid-root", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "nowhere" in capsys.readouterr().out
