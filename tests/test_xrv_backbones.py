"""torchxrayvision's chest X-ray backbones, offline: weight files in torchxrayvision's own formats give the features
of torchxrayvision's own models, its normalisation is applied exactly, the input size is enforced, a weight set
missing from the cache is one clear line, and nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import torchxrayvision as xrv  # noqa: E402
from torch import nn  # noqa: E402

from mdmt.config import ModelConfig, PluginRef  # noqa: E402
from mdmt.data.augment import to_network_input  # noqa: E402
from mdmt.errors import ConfigError  # noqa: E402
from mdmt.losses import task_losses  # noqa: E402
from mdmt.models.backbones import build_backbone, list_backbones  # noqa: E402
from mdmt.models.multitask import build_model, check_input_size  # noqa: E402
from mdmt.models.xrv import XRV_MEAN, XRV_STD  # noqa: E402
from mdmt.tasks import get_task  # noqa: E402

RESNET_SET = "resnet50-res512-all"
DENSENET_SET = "densenet121-res224-all"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def downloads(monkeypatch, tmp_path) -> list[str]:
    """torchxrayvision's cache moved to an empty folder and the network blocked; the URLs it tried to fetch."""
    tried: list[str] = []

    def blocked(session, method, url, *args, **kwargs):
        tried.append(url)
        raise requests.ConnectionError("network blocked in the tests")

    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path / "xrv-cache") + "/")
    monkeypatch.setattr(requests.Session, "request", blocked)
    return tried


def _cached_file(weight_set: str) -> str:
    url = xrv.models.model_urls[weight_set]["weights_url"]
    return os.path.join(xrv.utils.get_cache_dir(), url.rsplit("/", 1)[-1])


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every float parameter and buffer drawn anew (variances positive), so a misplaced tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.1
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def _film(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _xrv_input(film: np.ndarray) -> torch.Tensor:
    """torchxrayvision's own input: ``xrv.datasets.normalize`` of the 8-bit film, one channel."""
    return torch.from_numpy(xrv.datasets.normalize(film, 255))[None, None]


def _mdmt_features(backbone, film: np.ndarray, size: int) -> torch.Tensor:
    x = to_network_input(torch.from_numpy(film)[None, None], size, backbone.mean, backbone.std)
    with torch.no_grad():
        return backbone.module.eval()(x)


def test_normalisation_is_torchxrayvisions_on_every_channel():
    backbone = build_backbone("xrv_densenet121")
    assert (backbone.mean, backbone.std) == (XRV_MEAN, XRV_STD)
    film = _film(64)
    x = to_network_input(torch.from_numpy(film)[None, None], None, backbone.mean, backbone.std)
    assert x.shape == (1, 3, 64, 64)
    reference = _xrv_input(film)[0, 0]
    for channel in range(3):
        assert torch.equal(x[0, channel], reference)


@pytest.mark.parametrize("saved", ["pickled model", "state dict"])
def test_densenet_weight_file_gives_torchxrayvisions_own_features(tmp_path, downloads, saved):
    """torchxrayvision's DenseNet files are the pickled model (read weights-only here); a state dict works too."""
    reference = _randomise(xrv.models.DenseNet(weights=None), seed=1)
    path = tmp_path / "densenet.pt"
    torch.save(reference if saved == "pickled model" else reference.state_dict(), path)
    torch.manual_seed(2)
    backbone = build_backbone("xrv_densenet121", str(path))
    assert backbone.feature_dim == 1024
    film = _film(224)
    with torch.no_grad():
        expected = reference.features2(_xrv_input(film))
    torch.testing.assert_close(_mdmt_features(backbone, film, 224), expected, rtol=1e-4, atol=1e-4)
    assert downloads == []


def test_named_weight_set_is_loaded_by_torchxrayvision_from_its_cache(downloads):
    """The ResNet-50 file as torchxrayvision publishes it (the state dict of torchvision's ResNet-50 with a
    one-channel stem), placed in its cache: torchxrayvision's ResNet and mdmt's backbone give the same features."""
    inner = torchvision.models.resnet50(num_classes=18)
    inner.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    os.makedirs(xrv.utils.get_cache_dir())
    torch.save(_randomise(inner, seed=3).state_dict(), _cached_file(RESNET_SET))
    reference = xrv.models.ResNet(weights=RESNET_SET)
    backbone = build_backbone("xrv_resnet50", RESNET_SET)
    assert backbone.feature_dim == 2048
    film = _film(512, seed=4)
    with torch.no_grad():
        expected = reference.features(_xrv_input(film))
    torch.testing.assert_close(_mdmt_features(backbone, film, 512), expected, rtol=1e-4, atol=1e-4)
    assert downloads == []


def test_uncached_weight_set_is_one_line_and_downloads_nothing(monkeypatch, downloads):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as offline:
        build_backbone("xrv_densenet121", DENSENET_SET)
    message = str(offline.value)
    assert "\n" not in message and _cached_file(DENSENET_SET) in message
    assert "HF_HUB_OFFLINE=0" in message and "model.weights" in message
    assert downloads == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # downloads allowed, but there is no network
    with pytest.raises(ConfigError) as failed:
        build_backbone("xrv_densenet121", DENSENET_SET)
    message = str(failed.value)
    assert "\n" not in message and "could not download" in message and "ConnectionError" in message
    assert _cached_file(DENSENET_SET) in message
    assert downloads == [xrv.models.model_urls[DENSENET_SET]["weights_url"]]
    assert not os.path.exists(_cached_file(DENSENET_SET))


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("xrv_densenet121", "imagenet", "no ImageNet weights"),
        ("xrv_densenet121", RESNET_SET, r"a densenet121-res224-\* weight set or a path"),
        ("xrv_densenet121", "densenet121-res224-everything", "known: densenet121-res224-all, "),
        ("xrv_resnet50", DENSENET_SET, r"a resnet50-res512-\* weight set"),
    ],
)
def test_weights_that_do_not_fit_are_refused(name, weights, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(name, weights)


@pytest.mark.parametrize(("name", "size", "wrong"), [("xrv_densenet121", 224, 256), ("xrv_resnet50", 512, 224)])
def test_input_size_other_than_the_weights_is_refused_before_training(name, size, wrong):
    assert name in list_backbones()
    model = build_model(ModelConfig(backbone=PluginRef(name), input_size=wrong), [get_task("prognosis")])
    with pytest.raises(ConfigError, match=f"reads {size}×{size} inputs.*set model.input_size: {size}"):
        check_input_size(model, wrong)


def test_a_training_step_at_the_input_size():
    torch.manual_seed(0)
    tasks = [get_task("prognosis"), get_task("severity_global4")]
    model = build_model(ModelConfig(backbone=PluginRef("xrv_densenet121"), input_size=224), tasks).train()
    check_input_size(model, 224)
    films = torch.from_numpy(np.stack([_film(224, seed) for seed in (5, 6)]))[:, None]
    x = to_network_input(films, 224, *model.normalization)
    targets = {"prognosis": torch.tensor([[0.0], [1.0]]), "severity_global4": torch.tensor([[2.0], [float("nan")]])}
    present = {"prognosis": torch.tensor([True, True]), "severity_global4": torch.tensor([True, False])}
    stem = model.backbone.features.conv0.weight
    assert stem.shape == (64, 1, 7, 7)
    before = stem.detach().clone()
    losses = task_losses(model(x), targets, present, tasks)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    torch.optim.Adam(model.parameters(), lr=1e-3).step()
    assert stem.grad.abs().sum() > 0 and not torch.equal(before, stem.detach())
