"""The ``mdmt`` command. Every option maps onto a config key (see ``mdmt.config``).

(Over 400 lines on purpose: one short function per command and the option builder they share; each body parses and
hands over.)
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import importlib
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console
from rich.markup import escape

from mdmt.config import Config, config_fields, load_config, parse_override
from mdmt.errors import ConfigError, DataError

console = Console()
err_console = Console(stderr=True)
"""Errors, skipped files and warnings: standard error, so that standard output holds only what a command made."""
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


DATASET_ROOTS = (
    Option(("--aiforcovid-root",), "data.datasets.aiforcovid.params.root",
           help="AIforCOVID root (imgs*/ + AIforCOVID*.xlsx) [data.datasets.aiforcovid.params.root]"),
    Option(("--brixia-root",), "data.datasets.brixia.params.root",
           help="BrixIA root (dicom_clean/ + metadata_global_v2.csv) [data.datasets.brixia.params.root]"),
)
"""The built-in datasets' folders: plug-in parameters rather than fields, so their options are declared here
(``data.datasets`` in ``COMMAND_KEYS``)."""
DATA_KEYS = ("data.datasets", "data.cache_dir", "data.image_size", "data.crop", "runtime.workers")
SYNTH_KEYS = ("synth.preset", "synth.seed", "synth.decoupled", "synth.opacity", "synth.faults", "seed",
              "runtime.workers")
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "demo": (*SYNTH_KEYS, "grid", "run.rerun_changed", "runtime"),
    "synth": (*SYNTH_KEYS, "synth.overwrite"),
    "prepare": (*DATA_KEYS, "data.qc"),
    "train": (*DATA_KEYS, "model", "run", "train", "seed", "results_dir", "runtime"),
    "grid": (*DATA_KEYS, "grid", "run.rerun_changed", "results_dir", "runtime"),
    "report": ("report",),
    "info": (),
    "config": (),
    "predict": ("infer.batch_size", "infer.clinical", "infer.clinical_id", "runtime.device", "runtime.threads"),
    "explain": ("infer", "runtime.device", "runtime.threads"),
    "export": ("runtime.device", "runtime.threads"),
}
"""The config keys, or whole sections, whose options each command takes: every config field with a ``flag``
(``mdmt.config.setting``) under them. Every command also takes ``--config`` and ``--set``."""


def field_option(key: str, f: dataclasses.Field[Any], tp: Any) -> Option:
    """The option of a config field: its flag; its help, key and allowed values (a Literal's choices, or what its
    check allows); a switch for a bool, a repeatable option for a list."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
    check = f.metadata.get("check")
    allowed = f"one of {', '.join(typing.get_args(tp))}" if typing.get_origin(tp) is Literal else \
        check.allowed if check is not None else ""
    text = f"{f.metadata.get('help', '')} [{key}{f'; {allowed}' if allowed else ''}]"
    flags = (f.metadata["flag"],)
    if tp is bool:
        return Option(flags, key, None, text, "store_true")
    if typing.get_origin(tp) is list:
        return Option(flags, key, str, text, "append")
    return Option(flags, key, tp if tp in (int, float) else str, text)


@functools.cache
def _flagged_fields() -> tuple[tuple[str, dataclasses.Field[Any], Any], ...]:
    return tuple((key, f, tp) for key, f, tp in config_fields() if "flag" in f.metadata)


def command_options(command: str) -> tuple[Option, ...]:
    """The options of ``command``: those of the flagged fields under each of its ``COMMAND_KEYS``, in order."""
    flagged = _flagged_fields()
    options: dict[str, Option] = {}
    for scope in COMMAND_KEYS[command]:
        found = DATASET_ROOTS if scope == "data.datasets" else tuple(
            field_option(key, f, tp) for key, f, tp in flagged if key == scope or key.startswith(f"{scope}."))
        if not found:
            raise ValueError(f"COMMAND_KEYS[{command!r}]: {scope!r} names no config field with a flag")
        options.update((option.key, option) for option in found)
    return tuple(options.values())


def config_path(value: str) -> Path:
    """A config file, or the name of a config shipped with mdmt (``paper``, ``demo``, ``demo3``)."""
    path = Path(value)
    packaged = CONFIGS_DIR / f"{value}.yaml"
    return packaged if not path.exists() and packaged.is_file() else path


def _add_options(parser: argparse.ArgumentParser, command: str, positional: tuple[str, ...] = ()) -> None:
    """``--config``, ``--set`` and the command's options; ``positional``: the config keys its positional arguments
    set (their ``dest``)."""
    shipped = ", ".join(p.stem for p in sorted(CONFIGS_DIR.glob("*.yaml")))
    parser.add_argument("--config", type=config_path, default=None,
                        help=f"YAML config file, or a shipped one by name: {shipped}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.lr=0.01 (repeatable); applied after "
                        "--config and before the options below")
    options = command_options(command)
    for option in options:
        kwargs: dict[str, Any] = {"dest": option.key, "default": None, "help": option.help.replace("%", "%%")}
        if option.action:
            kwargs["action"] = option.action
        if option.action != "store_true":
            kwargs["type"] = option.type
            kwargs["metavar"] = option.flags[0].lstrip("-").replace("-", "_").upper()
        parser.add_argument(*option.flags, **kwargs)
    parser.set_defaults(config_keys=(*positional, *(option.key for option in options)))


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < config file < ``--set`` overrides < the command's options; each layer is checked before they
    merge, so an option never hides a bad ``--set`` (``mdmt.config.check_layer``)."""
    overrides = [parse_override(text) for text in args.overrides]
    for key in args.config_keys:
        value = getattr(args, key, None)
        if value is not None and value is not False:
            overrides.append(_nested(key, value))
    return load_config(args.config, overrides)


def device_config(args: argparse.Namespace) -> Config:
    """``resolve_config`` for a command that uses ``runtime.device`` on this machine: a device the machine lacks is
    a one-line error before any work (``mdmt.validation.check_device``); ``runtime.threads`` is applied."""
    config = resolve_config(args)
    _use_runtime(config)
    return config


def _use_runtime(config: Config) -> None:
    import torch

    from mdmt.validation import check_device

    check_device(config.runtime.device)
    if config.runtime.threads > 0:
        torch.set_num_threads(config.runtime.threads)


def training_config(args: argparse.Namespace) -> Config:
    """``resolve_config`` for a command that trains: the callbacks are checked too (a logger's missing package),
    and the device when the runs train here (``train``, and a grid with the ``local`` backend)."""
    from mdmt.train.callbacks import check_callbacks

    config = resolve_config(args)
    check_callbacks(config.train.callbacks)
    if args.command == "train" or config.grid.backend == "local":
        _use_runtime(config)
    return config


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    from mdmt.synth import generate

    config = resolve_config(args)
    out = config.synth.out
    s = config.synth
    summary = generate(out, preset=s.preset, seed=s.seed, decoupled=s.decoupled, faults=s.faults, opacity=s.opacity,
                       cohort=s.cohort, overwrite=s.overwrite, image_size=s.image_size,
                       workers=config.runtime.workers)
    console.print(summary.table() if hasattr(summary, "table") else summary)
    console.print(f"[green]synthetic data written to {Path(out).resolve()}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    config = resolve_config(args)  # a bad config is refused before heavy imports
    from mdmt.cache.crop_qc import crop_issue_lines, write_contact_sheets
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

    config = training_config(args)  # a bad config is refused before the heavy imports
    from mdmt.train.run import train_run

    backbone = PluginRef.of(config.model.backbone).name
    spec = RunSpec(config.run.strategy, backbone, config.run.protocol, config.run.fold, config.seed)
    run_dir = train_run(config, spec)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        _say(f"run finished: {run_dir}", style="green")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    config = training_config(args)  # a bad config is refused before the heavy imports
    from mdmt.experiments.grid import run_grid

    summary = run_grid(config, workers=config.grid.workers, backend=config.grid.backend)
    console.print(summary)
    for line in summary.problems():
        _say(line, style="red")
    return 0 if summary.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    from mdmt.evaluate.report import build_report, collect, headline_table_text

    results, task = Path(config.results_dir), config.report.task
    out = None if config.report.out is None else Path(config.report.out)
    for path, what in ((results, "results folder"), (out, "report folder (--out)")):
        if path is not None and path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: is a file, not a {what}")
    if config.report.recalibrate:
        from mdmt.model_card import recalibrate

        settings = config.calibration
        count = recalibrate(results, settings, progress=True)
        console.print(f"rescored {count} run(s) from their prediction files, calibrated again ({settings.method}, "
                      f"threshold {settings.threshold}, alpha {settings.alpha})")
    elif config.report.rescore:
        from mdmt.evaluate.scoring import rescore

        console.print(f"rescored {rescore(results, progress=True)} run(s) from their prediction files")
    data = collect(results, task)
    path = build_report(results, out, task=task, data=data)
    _say(headline_table_text(results, task, data))
    _say(f"report: {path}", style="green")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mdmt.demo import run_demo

    if args.config is None:
        args.config = CONFIGS_DIR / ("demo3.yaml" if args.datasets == 3 else "demo.yaml")
    config = training_config(args)
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
    from mdmt.tasks import TASKS
    from mdmt.train.callbacks import CALLBACKS
    from mdmt.train.strategies import STRATEGIES, describe
    from mdmt.weighting import WEIGHTINGS

    config = resolve_config(args)
    console.print(f"mdmt {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    table = Table(title="plug-ins ({name, params} in a config)")
    for column in ("kind", "name", "what", "params"):
        table.add_column(column)
    for registry in (DATASETS, TASKS, BACKBONES, HEADS, WEIGHTINGS, STRATEGIES, CALLBACKS):
        for name, summary, params in registry.describe():
            table.add_row(registry.kind, name, summary, params)
    console.print(table)
    strategies = Table(title="strategies of this config")
    strategies.add_column("name")
    strategies.add_column("what")
    for name, summary in describe(config):
        strategies.add_row(name, summary)
    console.print(strategies)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from mdmt.config import to_dict

    config = resolve_config(args)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def _films(args: argparse.Namespace, module: str, function: str, verb: str, written: Callable[[Any], str],
           infer_keys: tuple[str, ...] = ()) -> int:
    """Apply ``mdmt.infer.<module>.<function>`` of the run to the films, with the ``infer`` section's batch size,
    clinical sheet and the fields ``infer_keys`` as keywords (the config is checked before the heavy import); print
    each skipped film with its reason (standard error: unreadable, or refused by the guard as not a frontal chest
    film), one warning line when the run was trained on synthetic data, the guard's notes (out-of-distribution
    films), then ``written(result)``: what was written. Exit code 1 when no film was scored."""
    config = device_config(args)
    infer = config.infer
    from mdmt.model_card import synthetic_warning

    apply = getattr(importlib.import_module(f"mdmt.infer.{module}"), function)
    result = apply(args.run, args.paths, args.out, batch_size=infer.batch_size, device=config.runtime.device,
                   clinical=infer.clinical, clinical_id=infer.clinical_id,
                   **{key: getattr(infer, key) for key in infer_keys})
    for row in result.skipped.itertuples(index=False):
        _say(f"skipped {row.path}: {row.reason}", err=True)
    if result.table.empty:
        _say(f"no film {verb}: all {len(result.skipped)} file(s) skipped, each for the reason above", style="red",
             err=True)
        return 1
    warning = synthetic_warning(args.run)
    if warning is not None:
        _say(warning, style="yellow", err=True)
    for note in result.notes:
        _say(note, style="yellow", err=True)
    _say(f"{len(result.table)} film(s) {verb}, {len(result.skipped)} skipped → {written(result)}", style="green")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    return _films(args, "predict", "predict_files", "predicted",
                  lambda result: f"{result.written[0]} (and predictions.json, skipped.csv)")


def cmd_explain(args: argparse.Namespace) -> int:
    return _films(args, "explain", "explain_files", "explained",
                  lambda result: f"{args.out} (overlays, contact sheets, predictions.csv)",
                  infer_keys=("explain_map", "cam_layer"))


def cmd_export(args: argparse.Namespace) -> int:
    config = device_config(args)
    from mdmt.infer.export import export_run

    for path in export_run(args.run, args.format, args.out, device=config.runtime.device):
        console.print(f"[green]wrote {escape(str(path))}")
    return 0


def _add_infer(sub: Any, name: str, help: str, out: str, paths: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR", help="a finished run folder (holds DONE)")
    if paths:
        p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM, PNG or JPEG files, or folders")
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    _add_options(p, name)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="mdmt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic data → caches → STL/FT/MDMT grid → statistics → report")
    _add_options(p, "demo")
    p.add_argument("--datasets", type=int, choices=(2, 3), default=2,
                   help="3: add the twin's third dataset and compare MDMT over three datasets with two (demo3)")
    p.add_argument("--out", default=None, help="output folder (default demo-output, or demo-output-3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synth", help="write the synthetic AIforCOVID + BrixIA twin in the real formats")
    p.add_argument("synth.out", nargs="?", default=None, metavar="OUT", help="output folder [synth.out]")
    _add_options(p, "synth", positional=("synth.out",))
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="preprocess each dataset once into the image cache")
    _add_options(p, "prepare")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="one run: strategy × backbone × protocol × fold × seed")
    _add_options(p, "train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("grid", help="run every missing run of the configured study")
    _add_options(p, "grid")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="tables, statistics and figures rebuilt from a results folder")
    p.add_argument("results_dir", nargs="?", default=None, metavar="RESULTS",
                   help="results folder (holds runs/) [results_dir]")
    _add_options(p, "report", positional=("results_dir",))
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("info", help="versions, device, every plug-in, tasks and the config's strategies")
    _add_options(p, "info")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the resolved config (a shipped one: --config paper)")
    _add_options(p, "config")
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


def _say(text: str, style: str | None = None, err: bool = False) -> None:
    """Print ``text`` as it is (to standard error with ``err``): no markup, no highlighting, lines never wrapped (a
    path or an id stays whole)."""
    (err_console if err else console).print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _error(message: str) -> int:
    """Print ``error: <message>`` as one line on standard error (no markup, no wrapping) and return exit code 2."""
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
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
