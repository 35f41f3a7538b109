"""A plain (not editable) install carries everything ``mdmt demo`` needs: the configs and the lung segmenter."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_configs_and_weights_and_runs_from_its_install(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("mdmt-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "mdmt").rglob("*.py")}
    assert modules <= names
    assert {"mdmt/configs/demo.yaml", "mdmt/configs/demo3.yaml", "mdmt/configs/paper.yaml"} <= names
    assert "mdmt/lungs/weights/lung_unet.pt" in names

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import mdmt.cli as c; from mdmt.config import load_config; "
            "assert c.CONFIGS_DIR.is_relative_to(__import__('pathlib').Path(r'%s')), c.CONFIGS_DIR; "
            "print(load_config(c.config_path('demo')).model.backbone.name)") % target
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.stdout.strip() == "tiny_cnn"
