"""Config: YAML onto typed dataclasses, overrides, errors naming the key, round trip."""

import argparse
import typing

import pytest
import yaml

from mdmt.cli import COMMAND_KEYS, build_parser, resolve_config
from mdmt.config import (
    Config,
    config_fields,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from mdmt.errors import ConfigError


def test_defaults_are_the_papers_hyperparameters():
    c = Config()
    assert (c.train.lr, c.train.weight_decay, c.train.batch_size) == (1e-3, 1e-5, 128)
    assert (c.train.warmup_epochs, c.train.early_stopping, c.train.max_epochs) == (40, 65, 300)
    assert (c.train.scheduler_patience, c.train.scheduler_factor) == (15, 0.65)
    assert c.model.weights == "none"


def test_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.5, "batch_size": 7}, "data": {"clip_percentiles": [1, 99]}}))
    c = load_config(path, [parse_override("train.lr=0.25")])
    assert c.train.lr == 0.25 and c.train.batch_size == 7
    assert c.data.clip_percentiles == (1.0, 99.0)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"train": {"lrr": 1}}, "lrr"),
        ({"train": {"batch_size": "many"}}, "config.train.batch_size"),
        ({"loss": {"variant": "fancy"}}, "config.loss.variant"),
        ({"data": {"clip_percentiles": [1, 2, 3]}}, "config.data.clip_percentiles"),
    ],
)
def test_bad_values_name_the_key(tmp_path, values, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    c = load_config(None, [parse_override("model.backbone=densenet121"), parse_override("grid.seeds=[1,2]")])
    save_config(c, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(c)
    assert again.grid.seeds == [1, 2]


def test_cli_options_map_to_config_keys():
    args = build_parser().parse_args(
        ["train", "--strategy", "ft", "--backbone", "resnet34", "--fold", "3", "--seed", "7",
         "--image-size", "128", "--set", "train.lr=0.002"]
    )
    c = resolve_config(args)
    assert (c.run.strategy, c.model.backbone.name, c.run.fold, c.seed) == ("ft", "resnet34", 3, 7)
    assert c.data.image_size == 128 and c.train.lr == 0.002


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_takes_config_and_set_and_its_options_are_the_flagged_fields():
    fields = {key: (f, tp) for key, f, tp in config_fields()}
    parsers = _subparsers()
    assert sorted(parsers) == sorted(COMMAND_KEYS)
    seen = set()
    for name, parser in parsers.items():
        dests = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
        assert "--config" in dests and "--set" in dests, name
        for flag, action in dests.items():
            if action.dest not in fields:
                continue
            f, tp = fields[action.dest]
            assert f.metadata["flag"] == flag and f"[{action.dest}" in action.help, (name, flag)
            seen.add(action.dest)
            literal = next((t for t in (tp, *typing.get_args(tp)) if typing.get_origin(t) is typing.Literal), None)
            check = f.metadata.get("check")
            for allowed in (typing.get_args(literal) if literal else ()) + ((check.allowed,) if check else ()):
                assert allowed in action.help, (name, flag, allowed)
    assert seen == {key for key, (f, _) in fields.items() if "flag" in f.metadata}  # every flag is some command's
    crop = next(a for a in parsers["train"]._actions if a.dest == "data.crop")
    assert "lungs_classical" in crop.help and "boxes" in crop.help


def test_seed_means_seed_everywhere_and_synth_seed_the_twins():
    parse = build_parser().parse_args
    demo = resolve_config(parse(["demo", "--config", "demo", "--seed", "5"]))
    assert (demo.seed, demo.synth.seed) == (5, 5)  # the twin follows the seed unless synth.seed is set
    pinned = resolve_config(parse(["demo", "--config", "demo", "--seed", "5", "--synth-seed", "2"]))
    assert (pinned.seed, pinned.synth.seed) == (5, 2)
    synth = resolve_config(parse(["synth", "out", "--synth-seed", "3"]))
    assert (synth.seed, synth.synth.seed, synth.synth.out) == (0, 3, "out")
    assert resolve_config(parse(["train", "--seed", "4"])).seed == 4
    assert not any(a.dest == "synth.seed" for a in _subparsers()["train"]._actions)


def test_report_takes_config_set_and_maps_its_options_to_keys(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "report": {"task": "severity_regions"}}))
    parse = build_parser().parse_args
    c = resolve_config(parse(["report", "--config", str(path), "--set", "report.rescore=true"]))
    assert (c.results_dir, c.report.task, c.report.rescore, c.report.out) == (str(tmp_path / "results"),
                                                                             "severity_regions", True, None)
    c = resolve_config(parse(["report", "elsewhere", "--config", str(path), "--task", "prognosis", "--out", "r"]))
    assert (c.results_dir, c.report.task, c.report.out, c.report.recalibrate) == ("elsewhere", "prognosis", "r", False)
    c = resolve_config(parse(["report", "--recalibrate", "--set", "calibration.threshold=youden"]))
    assert (c.report.recalibrate, c.calibration.threshold) == (True, "youden")


def test_a_bad_set_is_never_hidden_by_an_option():
    args = build_parser().parse_args(["train", "--set", "train=5", "--epochs", "3"])
    with pytest.raises(ConfigError, match=r"^--set train=5: config\.train: expected a mapping, got 5$"):
        resolve_config(args)
    args = build_parser().parse_args(["train", "--set", "train.max_epochs=7", "--epochs", "3"])
    assert resolve_config(args).train.max_epochs == 3  # options come last


def test_shipped_configs_ship_inside_the_package_and_load():
    from mdmt.cli import CONFIGS_DIR, config_path

    names = sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))
    assert names == ["demo.yaml", "demo3.yaml", "demo_clinical.yaml", "paper.yaml", "real_severity.yaml"]
    assert CONFIGS_DIR.parent.name == "mdmt"  # inside the package, not beside it
    for name in names:
        assert isinstance(load_config(CONFIGS_DIR / name), Config)
    assert config_path("paper") == CONFIGS_DIR / "paper.yaml"


def test_a_plugin_entry_is_a_name_or_name_and_params():
    c = load_config(None, [parse_override("model.backbone={name: tiny_cnn, params: {width: 8}}"),
                           parse_override("loss.weighting=dwa")])
    assert (c.model.backbone.name, c.model.backbone.params) == ("tiny_cnn", {"width": 8})
    assert (c.loss.weighting.name, c.loss.weighting.params) == ("dwa", {})


def test_strategy_entries_merge_into_the_built_in_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"strategies": {"mine": {"params": {"datasets": ["x"], "tasks": ["prognosis"]}},
                                                   "mdmt": {"params": {"start_from": ["stl_prognosis"]}}}}))
    c = load_config(path)
    assert {"stl_prognosis", "stl_severity", "ft", "mdmt", "mdmt_permuted", "mine"} <= set(c.strategies)
    assert c.strategies["mdmt"].params["datasets"] == ["aiforcovid", "brixia"]  # kept from the built-in entry
    assert c.strategies["mdmt"].params["start_from"] == ["stl_prognosis"]


def test_a_plugin_file_named_in_the_config_is_imported(tmp_path):
    plugin = tmp_path / "my_weighting.py"
    plugin.write_text(
        "from mdmt.registry import NoParams\n"
        "from mdmt.weighting import WEIGHTINGS, FixedWeighting\n"
        "@WEIGHTINGS.register('halved_test_rule', NoParams, 'test')\n"
        "def build(params, task_names, task_weights, seed):\n"
        "    return FixedWeighting(task_names, {t: 0.5 for t in task_names})\n"
    )
    load_config(None, [parse_override(f"plugins=[{plugin}]")])
    from mdmt.weighting import WEIGHTINGS

    assert "halved_test_rule" in WEIGHTINGS
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, [parse_override(f"plugins=[{tmp_path / 'missing.py'}]")])


def test_a_run_folder_config_of_an_older_mdmt_still_loads(tmp_path):
    """Run folders written before the runtime section and the estimators keep loading (predict, rescore), while
    a user's config with the old keys is refused."""
    from mdmt.config import load_run_config

    old = tmp_path / "config.yaml"
    old.write_text("data: {workers: 2}\ntrain: {device: cpu, threads: 1, num_workers: 0, lr: 0.003}\n"
                   "infer: {device: cpu}\nsynth: {workers: 2}\n"
                   "strategies:\n  clinical_only: {params: {datasets: [aiforcovid], tasks: [prognosis],"
                   " clinical: [Age], image: false}}\n  mdmt: {params: {datasets: [aiforcovid, brixia],"
                   " tasks: [prognosis, severity], image: true}}\n")
    config = load_run_config(old)
    assert config.train.lr == 0.003
    assert config.strategies["clinical_only"].params["estimator"] == "clinical_logistic"
    assert config.strategies["mdmt"].params["estimator"] == "network"
    with pytest.raises(ConfigError, match=r"data\.workers is now runtime\.workers"):
        load_config(old)
