"""Batched augmentation: determinism, identity at p = 0, label-consistent flips, geometry, intensity; network input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from mdmt.config import AugmentConfig
from mdmt.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugmenter,
    gaussian_blur,
    to_network_input,
)
from mdmt.errors import ConfigError
from mdmt.tasks import get_task

TASKS = [get_task("prognosis"), get_task("severity_regions"), get_task("severity_global4"), get_task("severity_lung4")]
ONLY_FLIP = AugmentConfig(p=1.0, shift=0.0, zoom=0.0, rotation=0.0, flip=True, elastic=False)


def batch(n: int = 6, size: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(7))
    targets = {
        "prognosis": torch.ones(n, 1),
        "severity_regions": torch.arange(n * 6, dtype=torch.float32).view(n, 6),
        "severity_global4": torch.full((n, 1), 2.0),
        "severity_lung4": torch.tensor([[0.0, 3.0]]).repeat(n, 1),
    }
    return images, targets


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_generator_seed_same_output():
    images, targets = batch()
    augment = BatchAugmenter(AugmentConfig(p=0.7), TASKS)
    first = augment(images, targets, generator(3))
    again = augment(images, targets, generator(3))
    other = augment(images, targets, generator(4))
    assert torch.equal(first[0], again[0]) and all(torch.equal(first[1][k], again[1][k]) for k in targets)
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], images)


@pytest.mark.parametrize("cfg", [AugmentConfig(p=0.0), AugmentConfig(enabled=False, p=1.0)])
def test_p_zero_or_disabled_is_identity(cfg):
    images, targets = batch()
    out, out_targets = BatchAugmenter(cfg, TASKS)(images, targets, generator(0))
    assert torch.equal(out, images) and all(torch.equal(out_targets[k], targets[k]) for k in targets)


def test_flip_mirrors_and_permutes_regional_targets():
    images, targets = batch()
    out, out_targets = BatchAugmenter(ONLY_FLIP, TASKS)(images, targets, generator(0))
    assert torch.equal(out, images.flip(-1))
    regions = targets["severity_regions"]
    assert torch.equal(out_targets["severity_regions"], regions[:, [3, 4, 5, 0, 1, 2]])  # A↔D, B↔E, C↔F
    assert torch.equal(out_targets["severity_lung4"], targets["severity_lung4"][:, [1, 0]])
    assert torch.equal(out_targets["severity_global4"], targets["severity_global4"])
    assert torch.equal(out_targets["prognosis"], targets["prognosis"])
    assert torch.equal(targets["severity_regions"], regions) and not torch.equal(out, images)  # inputs untouched


def test_flip_permutes_only_flipped_samples():
    images, targets = batch(n=64)
    out, out_targets = BatchAugmenter(dataclasses.replace(ONLY_FLIP, p=0.5), TASKS)(images, targets, generator(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    assert 16 < flipped.sum() < 48
    assert torch.equal(out[~flipped], images[~flipped])
    regions = targets["severity_regions"]
    expected = torch.where(flipped[:, None], regions[:, [3, 4, 5, 0, 1, 2]], regions)
    assert torch.equal(out_targets["severity_regions"], expected)


def test_rotation_keeps_a_centred_disc():
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    disc = ((yy**2 + xx**2) <= 16**2).float().expand(8, 1, size, size)
    cfg = AugmentConfig(p=1.0, shift=0.0, zoom=0.0, rotation=10.0, flip=False, elastic=False)
    out, _ = BatchAugmenter(cfg, TASKS)(disc, {}, generator(0))
    assert not torch.equal(out, disc)  # interpolation at the rim: the rotation did fire
    assert torch.allclose(out.sum(dim=(1, 2, 3)), disc.sum(dim=(1, 2, 3)), rtol=0.01)
    assert (out - disc).abs().max() < 1.0  # the rim moves by less than a pixel


def test_shift_and_zoom_move_the_content_by_the_configured_amount():
    size = 64
    square = torch.zeros(32, 1, size, size)
    square[:, :, 24:40, 24:40] = 1.0
    shift_cfg = AugmentConfig(p=1.0, shift=0.1, zoom=0.0, rotation=0.0, flip=False, elastic=False)
    out, _ = BatchAugmenter(shift_cfg, TASKS)(square, {}, generator(0))
    xs = torch.arange(size, dtype=torch.float32)
    centre_x = (out.sum(dim=2)[:, 0] * xs).sum(1) / out.sum(dim=(1, 2, 3))
    moved = centre_x - (size - 1) / 2
    assert moved.abs().max() <= 0.1 * size + 0.5 and moved.abs().max() > 0.05 * size
    zoom_cfg = AugmentConfig(p=1.0, shift=0.0, zoom=0.1, rotation=0.0, flip=False, elastic=False)
    out, _ = BatchAugmenter(zoom_cfg, TASKS)(square, {}, generator(0))
    area_ratio = out.sum(dim=(1, 2, 3)) / square.sum(dim=(1, 2, 3))
    assert area_ratio.min() >= 0.9**2 - 0.02 and area_ratio.max() <= 1.1**2 + 0.02 and area_ratio.std() > 0.02


def test_elastic_displacement_scales_with_alpha():
    size = 64
    images = torch.rand(4, 1, size, size, generator=generator(2))
    base = AugmentConfig(p=1.0, shift=0.0, zoom=0.0, rotation=0.0, flip=False, elastic=True)
    weak, _ = BatchAugmenter(dataclasses.replace(base, elastic_alpha=(2.0, 2.0)), TASKS)(images, {}, generator(0))
    strong, _ = BatchAugmenter(dataclasses.replace(base, elastic_alpha=(40.0, 40.0)), TASKS)(images, {}, generator(0))
    assert 0 < (weak - images).abs().mean() < (strong - images).abs().mean()


NO_GEOMETRY = dataclasses.replace(ONLY_FLIP, flip=False)


def test_gamma_raises_each_image_to_one_power_in_range_and_keeps_the_targets():
    """``gamma``: every image (p = 1) is ``x ** g`` for one g per image in [1 / (1 + gamma), 1 + gamma], the g differ,
    and no target moves."""
    images, targets = batch(n=64)
    out, out_targets = BatchAugmenter(dataclasses.replace(NO_GEOMETRY, gamma=0.5), TASKS)(images, targets,
                                                                                          generator(1))
    powers = (out.clamp_min(1e-6).log() / images.clamp_min(1e-6).log()).flatten(1)
    inside = (images.flatten(1) > 0.05) & (images.flatten(1) < 0.95)
    per_image = torch.stack([row[keep].median() for row, keep in zip(powers, inside)])
    torch.testing.assert_close(powers.where(inside, per_image[:, None]), per_image[:, None].expand_as(powers),
                               atol=1e-3, rtol=1e-3)
    assert per_image.min() >= 1 / 1.5 - 1e-3 and per_image.max() <= 1.5 + 1e-3
    assert per_image.max() - per_image.min() > 0.5  # spread over the range, not one fixed curve
    assert all(torch.equal(out_targets[k], targets[k]) for k in targets)


def test_contrast_scales_each_image_about_its_mean():
    """``contrast``: an image without clipping keeps its mean and has its spread about it scaled by one factor in
    [1 - contrast, 1 + contrast]; the factors differ between images."""
    images, targets = batch(n=64)
    images = 0.4 + 0.2 * images  # in [0.4, 0.6]: a factor of at most 1.3 never clips
    out, _ = BatchAugmenter(dataclasses.replace(NO_GEOMETRY, contrast=0.3), TASKS)(images, targets, generator(2))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)))
    factor = out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))
    centred = images - images.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out - out.mean(dim=(1, 2, 3), keepdim=True), factor[:, None, None, None] * centred,
                               atol=1e-5, rtol=1e-4)
    assert factor.min() >= 0.7 - 1e-4 and factor.max() <= 1.3 + 1e-4 and factor.max() - factor.min() > 0.3


def test_blur_matches_scipy():
    fields = torch.rand(2, 2, 40, 40, generator=generator(0))
    expected = gaussian_filter(fields.numpy(), sigma=(0, 0, 3.0, 3.0), mode="nearest", truncate=3.0)
    assert np.allclose(gaussian_blur(fields, 3.0).numpy(), expected, atol=1e-5)


def test_augmenter_rejects_uint8_and_bad_settings():
    with pytest.raises(ValueError, match="float"):
        BatchAugmenter(AugmentConfig(), TASKS)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), {}, generator(0))
    with pytest.raises(ConfigError, match="augment.p"):
        BatchAugmenter(AugmentConfig(p=1.5), TASKS)
    with pytest.raises(ConfigError, match="elastic_sigma"):
        BatchAugmenter(AugmentConfig(elastic_sigma=0.0), TASKS)


# ------------------------------------------------------------------------------------------ network input
def test_network_input_replicates_gray_and_normalises():
    constant = torch.full((2, 1, 16, 16), 128, dtype=torch.uint8)
    x = to_network_input(constant)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert np.allclose(x.mean(dim=(0, 2, 3)).numpy(), expected, atol=1e-6)
    float_input = to_network_input(constant.float() / 255)
    assert torch.allclose(float_input, x)


def test_network_input_channels_are_the_image_not_a_scrambled_copy():
    image = torch.randint(0, 256, (1, 1, 12, 12), dtype=torch.uint8, generator=generator(0))
    x = to_network_input(image)
    unnormalised = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    for channel in range(3):
        assert torch.allclose(unnormalised[0, channel], image[0, 0].float() / 255, atol=1e-6)
    scrambled = np.stack([image[0, 0].numpy()] * 3, axis=-1).reshape(3, 12, 12)  # the official bug
    assert not np.allclose(unnormalised[0, 0].numpy(), scrambled[0] / 255, atol=1e-3)


def test_network_input_resizes_to_the_training_size():
    image = torch.full((3, 1, 32, 32), 200, dtype=torch.uint8)
    x = to_network_input(image, input_size=16)
    assert x.shape == (3, 3, 16, 16)
    assert torch.allclose(x, to_network_input(image[:, :, :16, :16]), atol=1e-5)
    assert to_network_input(image, input_size=32).shape == (3, 3, 32, 32)


def test_network_input_uses_the_backbones_statistics():
    image = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=generator(1))
    x = to_network_input(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(x, (image.float() / 255 * 2 - 1).expand(-1, 3, -1, -1), atol=1e-6)
    assert torch.equal(to_network_input(image, None, IMAGENET_MEAN, IMAGENET_STD), to_network_input(image))
