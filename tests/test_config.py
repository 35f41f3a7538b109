"""Config: YAML onto typed dataclasses, overrides, errors naming the key, round trip."""

import pytest
import yaml

from mdmt.cli import DATA_OPTIONS, RUN_OPTIONS, build_parser, resolve_config
from mdmt.config import Config, load_config, parse_override, save_config, to_dict
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
    c = resolve_config(args, DATA_OPTIONS + RUN_OPTIONS)
    assert (c.run.strategy, c.model.backbone.name, c.run.fold, c.seed) == ("ft", "resnet34", 3, 7)
    assert c.data.image_size == 128 and c.train.lr == 0.002


def test_shipped_configs_ship_inside_the_package_and_load():
    from mdmt.cli import CONFIGS_DIR, config_path

    names = sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))
    assert names == ["demo.yaml", "demo3.yaml", "demo_clinical.yaml", "paper.yaml"]
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
