"""Backbone registry: the 18 paper backbones and their feature widths, params and normalisation statistics,
weights handling, errors."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
import time  # noqa: E402
from urllib.error import URLError  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mdmt.config import PluginRef  # noqa: E402
from mdmt.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mdmt.errors import ConfigError  # noqa: E402
from mdmt.models.backbones import (  # noqa: E402
    BACKBONES,
    PAPER_BACKBONES,
    TinyCNN,
    build_backbone,
    list_backbones,
)

# The feature dimension F of each paper backbone after the classifier is removed.
PAPER_WIDTHS = {
    "densenet121": 1024, "densenet161": 2208, "densenet169": 1664, "densenet201": 1920,
    "googlenet": 1024, "mobilenet_v2": 1280,
    "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "wide_resnet50_2": 2048,
    "shufflenet_v2_x0_5": 1024, "shufflenet_v2_x1_0": 1024,
    "efficientnet_b0": 1280, "efficientnet_b1_pruned": 1280, "efficientnet_es": 1280,
    "efficientnet_es_pruned": 1280, "efficientnet_lite0": 1280,
}  # fmt: skip
HEAVY = {"densenet161", "densenet169", "densenet201", "resnet101", "wide_resnet50_2"}
TIMM_NAMES = [n for n in PAPER_WIDTHS if n.startswith("efficientnet")]
TORCHVISION_NAMES = [n for n in PAPER_WIDTHS if n not in TIMM_NAMES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def _train_step(name: str, size: int = 32) -> None:
    """Build with random weights, check the width, one SGD step at ``size`` px with batch 2."""
    torch.manual_seed(0)
    backbone = build_backbone(name, "none")
    assert backbone.feature_dim == PAPER_WIDTHS[name] and backbone.name == name
    module = backbone.module.train()
    before = [p.detach().clone() for p in module.parameters()]
    features = module(torch.randn(2, 3, size, size))
    assert isinstance(features, torch.Tensor) and features.shape == (2, PAPER_WIDTHS[name])
    features.pow(2).mean().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    assert changed > len(before) // 2
    with torch.no_grad():
        assert module.eval()(torch.randn(1, 3, size, size)).shape == (1, PAPER_WIDTHS[name])


def test_paper_list_is_the_18_of_the_method():
    assert len(PAPER_BACKBONES) == 18 and set(PAPER_BACKBONES) == set(PAPER_WIDTHS)
    names = list_backbones()
    assert len(names) == len(set(names))
    assert set(PAPER_BACKBONES) | {"tiny_cnn", "vgg11", "convnext_tiny"} <= set(names)


@pytest.mark.parametrize("name", _params(TORCHVISION_NAMES))
def test_torchvision_paper_backbone_trains_with_declared_width(name):
    _train_step(name)


@pytest.mark.parametrize("name", ["mobilenet_v2", "googlenet", "resnet18", "densenet121", "shufflenet_v2_x0_5"])
def test_classifier_and_its_dropout_are_gone(name):
    module = build_backbone(name).module
    assert not any(isinstance(m, (nn.Linear, nn.Dropout)) for m in module.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_paper_backbone_trains_with_declared_width(name):
    pytest.importorskip("timm")
    _train_step(name)


@pytest.mark.parametrize("name", ["squeezenet1_0", "mobilenet_v3_small", "mnasnet0_5"])
def test_other_torchvision_models_report_their_true_width(name):
    backbone = build_backbone(name)
    with torch.no_grad():
        out = backbone.module.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, backbone.feature_dim)


def test_timm_prefix_builds_timm_model():
    pytest.importorskip("timm")
    backbone = build_backbone("timm/resnet18")
    assert type(backbone.module).__module__.startswith("timm") and backbone.feature_dim == 512
    with pytest.raises(ConfigError, match="efficientnet_b0"):
        build_backbone("timm/efficientnet_b00")


def test_tiny_cnn_widths():
    assert build_backbone("tiny_cnn").feature_dim == 64
    wide = build_backbone(PluginRef("tiny_cnn", {"width": 2.0}))
    assert wide.feature_dim == 128
    assert wide.module(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    convs = [m.out_channels for m in build_backbone("tiny_cnn").module.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 64, 64]


# ----------------------------------------------------------------------------------------- params and statistics
def test_torchvision_and_tiny_cnn_use_imagenet_statistics_unless_overridden():
    for name in ("resnet18", "tiny_cnn"):
        backbone = build_backbone(name)
        assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)
    gray = build_backbone({"name": "tiny_cnn", "params": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    assert (gray.mean, gray.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_torchvision_constructor_arguments_pass_through():
    wide = build_backbone({"name": "mobilenet_v2", "params": {"kwargs": {"width_mult": 2.0}}})
    assert wide.feature_dim == 2560  # the last layer's 1280 channels scaled by width_mult
    with pytest.raises(ConfigError, match=r"params\.kwargs.*no_such_argument"):
        build_backbone(PluginRef("resnet18", {"kwargs": {"no_such_argument": 1}}))


def test_timm_backbone_gets_its_kwargs_and_its_own_statistics():
    pytest.importorskip("timm")
    backbone = build_backbone(PluginRef("timm/test_resnet", {"kwargs": {"drop_rate": 0.3}}), "none")
    assert backbone.module.drop_rate == 0.3
    assert (backbone.mean, backbone.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # its pretrained_cfg, not ImageNet's
    assert build_backbone("timm/resnet18").mean == IMAGENET_MEAN  # a timm model trained with ImageNet's
    override = build_backbone(PluginRef("timm/test_resnet", {"mean": [0.1, 0.2, 0.3]}))
    assert (override.mean, override.std) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "tiny_cnn", "params": {"widht": 2.0}}, r"unknown key\(s\) widht"),
        ({"name": "tiny_cnn", "params": {"width": "wide"}}, r"params\.width: expected float"),
        ({"name": "resnet18", "params": {"mean": [0.5, 0.5]}}, r"params\.mean: expected 3 values"),
        ({"name": "resnet18", "params": {"std": [0.2, 0.0, 0.2]}}, r"params\.std must be positive"),
        ({"name": "resnet18", "params": {"kwargs": ["drop_rate"]}}, r"params\.kwargs: expected a mapping"),
    ],
)
def test_params_errors_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(entry)


def test_describe_lists_every_backbone_and_the_families():
    rows = BACKBONES.describe()
    singles = [name for name, _, _ in rows if name != "(family)"]
    assert sorted(singles) == sorted([*PAPER_BACKBONES, "tiny_cnn", "xrv_densenet121", "xrv_resnet50"])
    families = [summary for name, summary, _ in rows if name == "(family)"]
    timm_installed = importlib.util.find_spec("timm") is not None
    assert [f.split()[1] for f in families] == ["torchvision", *(["timm"] if timm_installed else [])]
    assert {name: params for name, _, params in rows}["tiny_cnn"] == "mean=None, std=None, width=1.0"


# ----------------------------------------------------------------------------------------- errors
def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError, match="resnet18"):
        build_backbone("resnet181")
    with pytest.raises(ConfigError, match="densenet121"):
        build_backbone("densenet12")


def test_missing_timm_asks_for_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ConfigError, match=r"mdmt\[timm\]"):
        build_backbone("efficientnet_b0")


def test_bad_weights_value():
    with pytest.raises(ConfigError, match="none, imagenet or a path"):
        build_backbone("resnet18", "imagenet1k")
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("tiny_cnn", "/nonexistent/weights.pth")
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_backbone("tiny_cnn", "imagenet")


def test_offline_torchvision_imagenet_is_a_clear_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet18", "imagenet")
    message = str(info.value)
    assert "no network" in message and "model.weights: /path/to/file.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "resnet18-" in message
    assert time.perf_counter() - started < 20


def test_offline_timm_imagenet_is_a_clear_config_error(monkeypatch, tmp_path):
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touches the network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ConfigError) as info:
        build_backbone("efficientnet_b0", "imagenet")
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "no network" in str(info.value)


# ----------------------------------------------------------------------------------------- local weights
def test_local_weights_roundtrip_strips_prefixes_and_ignores_the_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("resnet18").module.state_dict()
    state = {f"module.{k}": v for k, v in source.items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)
    torch.manual_seed(1)
    loaded = build_backbone("resnet18", str(path)).module.state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_local_weights_from_an_mdmt_checkpoint_and_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    source = TinyCNN().state_dict()
    model_state = {**{f"backbone.{k}": v for k, v in source.items()}, "heads.prognosis.2.weight": torch.ones(2, 64)}
    checkpoint = {"model": model_state}
    torch.save(checkpoint, tmp_path / "best.pt")
    safetensors.save_file(source, str(tmp_path / "tiny.safetensors"))
    for file in ("best.pt", "tiny.safetensors"):
        torch.manual_seed(1)
        loaded = build_backbone("tiny_cnn", str(tmp_path / file)).module.state_dict()
        assert all(torch.equal(loaded[k], source[k]) for k in source), file


def test_local_weights_mismatch_names_the_keys(tmp_path):
    state = TinyCNN().state_dict()
    state.pop("features.1.running_var")
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"features\.1\.running_var") as info:
        build_backbone("tiny_cnn", str(tmp_path / "bad.pth"))
    assert "extra.weight" in str(info.value) and "bad.pth" in str(info.value)
    wrong_shape = {k: v[:1] if k == "features.0.weight" else v for k, v in TinyCNN().state_dict().items()}
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match="features.0.weight"):
        build_backbone("tiny_cnn", str(tmp_path / "shape.pth"))


def test_a_timm_model_with_a_pre_logits_head_reports_the_width_it_outputs():
    pytest.importorskip("timm")
    backbone = build_backbone("timm/mobilenetv3_small_050")
    backbone.module.eval()
    with torch.no_grad():
        out = backbone.module(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, backbone.feature_dim) and backbone.feature_dim == 1024


def test_a_tiny_cnn_run_never_imports_torchvision():
    """torchvision costs a second to import in every grid worker; a run whose backbone is not one of its models (the
    demo's tiny_cnn) must not pay it. A torchvision backbone imports it when built."""
    import subprocess

    script = ("import sys; from mdmt.config import ModelConfig; from mdmt.models.multitask import build_model; "
              "from mdmt.tasks import get_task; import mdmt.train.run, mdmt.experiments.grid; "
              "build_model(ModelConfig(backbone='tiny_cnn', input_size=32), [get_task('prognosis')]); "
              "print('torchvision' in sys.modules); "
              "build_model(ModelConfig(backbone='resnet18', input_size=32), [get_task('prognosis')]); "
              "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
