"""The ``mdmt`` command. Every option maps onto a config key (see ``mdmt.config``)."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from mdmt.config import Config, load_config, parse_override
from mdmt.errors import ConfigError, DataError

console = Console()
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
"""The configs shipped inside the package (``--config paper`` names ``paper.yaml`` there)."""


@dataclass(frozen=True)
class Option:
    """A command-line option and the config key it sets."""

    flags: tuple[str, ...]
    key: str
    type: Callable[[str], Any] | None = str
    help: str = ""
    action: str | None = None


def _opt(
    *flags: str, key: str, type: Callable[[str], Any] | None = str, help: str = "", action: str | None = None
) -> Option:
    return Option(tuple(flags), key, type, help, action)


DATA_OPTIONS = (
    _opt("--aiforcovid-root", key="data.datasets.aiforcovid.params.root",
         help="AIforCOVID root (imgs*/ + AIforCOVID*.xlsx)"),
    _opt("--brixia-root", key="data.datasets.brixia.params.root",
         help="BrixIA root (dicom_clean/ + metadata_global_v2.csv)"),
    _opt("--cache-dir", key="data.cache_dir", help="where preprocessed image caches live"),
    _opt("--image-size", key="data.image_size", type=int, help="side of the cached square images (px)"),
    _opt("--crop", key="data.crop", help="lungs | none | masks | boxes"),
    _opt("--prepare-workers", key="data.workers", type=int, help="processes decoding images (0 = in-process)"),
)
PREPARE_OPTIONS = (
    _opt("--qc", key="data.qc", type=None, action="store_true",
         help="write contact sheets (each film with its crop box) into <cache>/qc/"),
)
RUN_OPTIONS = (
    _opt("--strategy", key="run.strategy", help="a strategy of the config (mdmt info lists them)"),
    _opt("--backbone", key="model.backbone", help="backbone name (mdmt info lists them)"),
    _opt("--weights", key="model.weights", help="none | imagenet | path to a local state_dict"),
    _opt("--protocol", key="run.protocol", help="cv5 | loco | official-cv5 | official-loco"),
    _opt("--fold", key="run.fold", type=int, help="fold index"),
    _opt("--seed", key="seed", type=int, help="random seed"),
    _opt("--epochs", key="train.max_epochs", type=int, help="maximum epochs"),
    _opt("--batch-size", key="train.batch_size", type=int, help="batch size"),
    _opt("--device", key="train.device", help="auto | cpu | cuda | cuda:N | mps"),
    _opt("--results-dir", key="results_dir", help="where run directories are written"),
    _opt("--rerun-changed", key="run.rerun_changed", type=None, action="store_true",
         help="train again a run whose folder holds one with other inputs"),
)
GRID_OPTIONS = (
    _opt("--workers", key="grid.workers", type=int, help="runs in parallel (local processes)"),
    _opt("--backend", key="grid.backend", help="local | ray | slurm"),
    _opt("--results-dir", key="results_dir", help="where run directories are written"),
    _opt("--rerun-changed", key="run.rerun_changed", type=None, action="store_true",
         help="train again the runs whose inputs changed"),
)
INFER_OPTIONS = (
    _opt("--batch-size", key="infer.batch_size", type=int, help="films per forward pass (default 16)"),
    _opt("--device", key="infer.device", help="cpu | cuda | cuda:N | mps | auto (default cpu)"),
    _opt("--clinical", key="infer.clinical",
         help="CSV or Excel sheet of clinical values, one row per film (a run whose model reads clinical columns)"),
    _opt("--clinical-id", key="infer.clinical_id",
         help="the sheet's column naming each row's film by file name or stem (default ImageFile)"),
)
EXPORT_OPTIONS = (
    _opt("--device", key="infer.device", help="cpu | cuda | cuda:N | mps | auto (default cpu)"),
)
SYNTH_OPTIONS = (
    _opt("--preset", key="synth.preset", help="tiny | small | medium"),
    _opt("--seed", key="synth.seed", type=int, help="generator seed"),
    _opt("--decoupled", key="synth.decoupled", type=None, action="store_true",
         help="prognosis independent of severity (negative control)"),
    _opt("--opacity", key="synth.opacity", type=float, help="opacity strength (default: the preset's)"),
    _opt("--fault", key="synth.faults", type=None, action="append", help="inject a fault (repeatable)"),
)
SYNTH_OUT_OPTIONS = (
    _opt("--overwrite", key="synth.overwrite", type=None, action="store_true",
         help="write into a non-empty folder, or replace a twin written with other parameters"),
)


def _add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for option in options:
        kwargs: dict[str, Any] = {"dest": option.key, "default": None, "help": f"{option.help} [{option.key}]"}
        if option.action:
            kwargs["action"] = option.action
        else:
            kwargs["type"] = option.type
            kwargs["metavar"] = option.flags[0].lstrip("-").replace("-", "_").upper()
        parser.add_argument(*option.flags, **kwargs)


def config_path(value: str) -> Path:
    """A config file, or the name of a config shipped with mdmt (``paper``, ``demo``, ``demo3``)."""
    path = Path(value)
    packaged = CONFIGS_DIR / f"{value}.yaml"
    return packaged if not path.exists() and packaged.is_file() else path


def _add_config(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    shipped = ", ".join(p.stem for p in sorted(CONFIGS_DIR.glob("*.yaml")))
    parser.add_argument("--config", type=config_path, default=default,
                        help=f"YAML config file, or a shipped one by name: {shipped}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.lr=0.01 (repeatable)")


def resolve_config(args: argparse.Namespace, options: Sequence[Option]) -> Config:
    """Defaults < config file < --set overrides < explicit options."""
    overrides = [parse_override(text) for text in args.overrides]
    for option in options:
        value = getattr(args, option.key, None)
        if value is not None and value is not False:
            overrides.append(_nested(option.key, value))
    return load_config(args.config, overrides)


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    from mdmt.data.synthetic import generate

    config = resolve_config(args, SYNTH_OPTIONS + SYNTH_OUT_OPTIONS)
    out = args.out or config.synth.out
    s = config.synth
    summary = generate(out, preset=s.preset, seed=s.seed, decoupled=s.decoupled, faults=s.faults, opacity=s.opacity,
                       cohort=s.cohort, overwrite=s.overwrite, image_size=s.image_size, workers=s.workers)
    console.print(summary.table() if hasattr(summary, "table") else summary)
    console.print(f"[green]synthetic data written to {Path(out).resolve()}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    config = resolve_config(args, DATA_OPTIONS + PREPARE_OPTIONS)  # a bad config is refused before heavy imports
    from mdmt.data.crop_qc import crop_issue_lines, write_contact_sheets
    from mdmt.data.datasets import prepare

    caches = prepare(config)
    for name, cache in caches.items():
        for line in crop_issue_lines(cache.records, name):
            _say(line)
        for row in cache.dropped.itertuples():
            _say(f"{name}: {row.image_id}: dropped: {row.reason}")
        for row in cache.failed.itertuples():
            _say(f"{name}: {row.image_id}: unreadable, left out: {row.reason}")
        _say(f"{name}: {len(cache.records)} images cached, {len(cache.dropped)} dropped, {len(cache.failed)} failed "
             f"→ {cache.path} (crops: {cache.path / 'crops.csv'})")
        if config.data.qc:
            sheets = write_contact_sheets(cache.records, cache.path / "qc")
            _say(f"{name}: {len(sheets)} contact sheet(s) in {cache.path / 'qc'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mdmt.config import PluginRef
    from mdmt.runs import RunSpec

    config = resolve_config(args, DATA_OPTIONS + RUN_OPTIONS)  # a bad config is refused before torch is imported
    from mdmt.train.run import train_run

    backbone = PluginRef.of(config.model.backbone).name
    spec = RunSpec(config.run.strategy, backbone, config.run.protocol, config.run.fold, config.seed)
    run_dir = train_run(config, spec)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _say(f"run finished: {run_dir}", style="green")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    config = resolve_config(args, DATA_OPTIONS + GRID_OPTIONS)  # a bad config is refused before torch is imported
    from mdmt.experiments.grid import run_grid

    summary = run_grid(config, workers=config.grid.workers, backend=config.grid.backend)
    console.print(summary)
    for line in summary.problems():
        _say(line, style="red")
    return 0 if summary.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from mdmt.evaluate.report import build_report, collect, headline_table_text

    for path, what in ((args.results, "results folder"), (args.out, "report folder (--out)")):
        if path is not None and path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: is a file, not a {what}")
    if args.rescore:
        from mdmt.evaluate.scoring import rescore

        console.print(f"rescored {rescore(args.results)} run(s) from their prediction files")
    data = collect(args.results, args.task)
    path = build_report(args.results, args.out, task=args.task, data=data)
    _say(headline_table_text(args.results, args.task, data))
    _say(f"report: {path}", style="green")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mdmt.demo import run_demo

    if args.config is None:
        args.config = CONFIGS_DIR / ("demo3.yaml" if args.datasets == 3 else "demo.yaml")
    config = resolve_config(args, SYNTH_OPTIONS + GRID_OPTIONS)
    out = args.out or ("demo-output-3" if args.datasets == 3 else "demo-output")
    run_demo(config, out=Path(out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from mdmt import __version__
    from mdmt.data.datasets import DATASETS
    from mdmt.models.backbones import BACKBONES
    from mdmt.models.heads import HEADS
    from mdmt.tasks import TASK_NAMES
    from mdmt.train.strategies import STRATEGIES, describe
    from mdmt.weighting import WEIGHTINGS

    config = resolve_config(args, ())
    console.print(f"mdmt {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    table = Table(title="plug-ins ({name, params} in a config)")
    for column in ("kind", "name", "what", "params"):
        table.add_column(column)
    for registry in (DATASETS, BACKBONES, HEADS, WEIGHTINGS, STRATEGIES):
        for name, summary, params in registry.describe():
            table.add_row(registry.kind, name, summary, params)
    console.print(table)
    console.print(f"tasks: {', '.join(TASK_NAMES)}")
    strategies = Table(title="strategies of this config")
    strategies.add_column("name")
    strategies.add_column("what")
    for name, summary in describe(config):
        strategies.add_row(name, summary)
    console.print(strategies)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from mdmt.config import to_dict

    config = resolve_config(args, ())
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _films(args: argparse.Namespace, module: str, function: str, verb: str, written: Callable[[Any], str]) -> int:
    """Apply ``mdmt.infer.<module>.<function>`` of the run to the films (the config is checked before the heavy
    import); print each skipped film with its reason, then ``written(result)``: what was written."""
    infer = resolve_config(args, INFER_OPTIONS).infer
    apply = getattr(importlib.import_module(f"mdmt.infer.{module}"), function)
    result = apply(args.run, args.paths, args.out, batch_size=infer.batch_size, device=infer.device,
                   clinical=infer.clinical, clinical_id=infer.clinical_id)
    for row in result.skipped.itertuples(index=False):
        console.print(f"skipped {row.path}: {row.reason}", markup=False, highlight=False)
    console.print(f"[green]{len(result.table)} film(s) {verb}, {len(result.skipped)} skipped → "
                  f"{escape(written(result))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    return _films(args, "predict", "predict_files", "predicted",
                  lambda result: f"{result.written[0]} (and predictions.json, skipped.csv)")


def cmd_explain(args: argparse.Namespace) -> int:
    return _films(args, "explain", "explain_files", "explained",
                  lambda result: f"{args.out} (overlays, contact sheets, predictions.csv)")


def cmd_export(args: argparse.Namespace) -> int:
    infer = resolve_config(args, EXPORT_OPTIONS).infer
    from mdmt.infer.export import export_run

    for path in export_run(args.run, args.format, args.out, device=infer.device):
        console.print(f"[green]wrote {escape(str(path))}")
    return 0


def _add_infer(sub: Any, name: str, help: str, out: str, paths: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    _add_config(p)
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="a finished run folder (holds DONE)")
    if paths:
        p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM, PNG or JPEG files, or folders")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    _add_options(p, INFER_OPTIONS if paths else EXPORT_OPTIONS)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="mdmt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic data → caches → STL/FT/MDMT grid → statistics → report")
    _add_config(p)
    _add_options(p, SYNTH_OPTIONS + GRID_OPTIONS)
    p.add_argument("--datasets", type=int, choices=(2, 3), default=2,
                   help="3: add the twin's third dataset and compare MDMT over three datasets with two (demo3)")
    p.add_argument("--out", default=None, help="output folder (default demo-output, or demo-output-3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write the synthetic AIforCOVID + BrixIA twin in the real formats")
    _add_config(p)
    p.add_argument("out", nargs="?", default=None, help="output folder [synth.out]")
    _add_options(p, SYNTH_OPTIONS + SYNTH_OUT_OPTIONS)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="preprocess each dataset once into the image cache")
    _add_config(p)
    _add_options(p, DATA_OPTIONS + PREPARE_OPTIONS)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="one run: strategy × backbone × protocol × fold × seed")
    _add_config(p)
    _add_options(p, DATA_OPTIONS + RUN_OPTIONS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("grid", help="run every missing run of the configured study")
    _add_config(p)
    _add_options(p, DATA_OPTIONS + GRID_OPTIONS)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="tables, statistics and figures rebuilt from a results folder")
    p.add_argument("results", type=Path, help="results folder (holds runs/)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default RESULTS/report)")
    p.add_argument("--task", default="prognosis", help="the task the tables and tests are about")
    p.add_argument("--rescore", action="store_true", help="recompute every run's metrics from its predictions first")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="versions, device, every plug-in, tasks and the config's strategies")
    _add_config(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the resolved config (a shipped one: --config paper)")
    _add_config(p)
    p.set_defaults(func=cmd_config)

    _add_infer(sub, "predict", "P(SEVERE), Brixia bin and regional scores of new films with a trained run",
               "predictions").set_defaults(func=cmd_predict)
    _add_infer(sub, "explain", "Grad-CAM overlays of the prognosis and severity heads, Brixia zones, contact sheet",
               "explanations").set_defaults(func=cmd_explain)
    p = _add_infer(sub, "export", "the run's network as ONNX or TorchScript with preprocessing.json", "export",
                   paths=False)
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True, help="the exported file's format")
    p.set_defaults(func=cmd_export)
    return parser


def os_error_message(exc: OSError) -> str:
    """One line naming the path(s) and the reason: ``/x/y: permission denied``, ``/x/y: no space left on device``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    reason = reason[:1].lower() + reason[1:]
    paths = " → ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{paths}: {reason}" if paths else f"{reason} ({errno.errorcode.get(exc.errno or 0, type(exc).__name__)})"


def _say(text: str, style: str | None = None) -> None:
    """Print ``text`` as it is: no markup, no highlighting, lines never wrapped (a path or an id stays whole)."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _error(message: str) -> int:
    """Print ``error: <message>`` as one line (no markup, no wrapping) and return exit code 2."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mdmt`` console script: bad config, data, paths or disks exit 2 with one line."""
    # No hub downloads unless the user opts in with HF_HUB_OFFLINE=0 (timm retries for ~46 s offline).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError) as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(os_error_message(exc))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: finished runs are kept; the same command resumes")
        return 130


if __name__ == "__main__":
    sys.exit(main())
