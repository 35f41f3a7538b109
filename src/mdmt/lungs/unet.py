"""A compact U-Net lung segmenter: model, augmentation, deterministic training, shipped weights, inference.

The segmenter sees a [0, 1] film squashed to ``WORK_SIZE × WORK_SIZE`` and gives, per pixel, the
probability of lung (both lungs, the part behind the heart included). ``mdmt.lungs.locate`` turns that map
into the crop box and its quality flag. The weights ship in ``weights/lung_unet.pt``;
``scripts/train_lung_segmenter.py`` rebuilds them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from torch import nn

from mdmt.errors import ConfigError, load_refusal

WORK_SIZE = 128
"""Side (px) of the square, squashed copy of the film the segmenter sees."""
BASE_SIZE = 2 * WORK_SIZE
"""Side (px) training films are stored at; augmentation samples them and averages 2 × 2 down to WORK_SIZE."""
CHANNELS = (8, 16, 32, 64, 128)
"""Feature channels per U-Net level (WORK_SIZE down to WORK_SIZE / 16)."""
WEIGHTS_DIR = Path(__file__).with_name("weights")
WEIGHTS_FILE = WEIGHTS_DIR / "lung_unet.pt"
"""The shipped weights."""
HOLDOUT_FILE = WEIGHTS_DIR / "lung_unet_holdout.json"
"""The real films (and patients) the shipped weights were NOT trained on, for out-of-sample tests."""
REBUILD_COMMAND = "python scripts/train_lung_segmenter.py"
WEIGHTS_FORMAT = 1


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net: each input image is standardised (zero mean, unit variance), then 4 poolings down and up."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS):
        super().__init__()
        self.channels = tuple(channels)
        self.encoders = nn.ModuleList(_block(1 if i == 0 else channels[i - 1], c) for i, c in enumerate(channels))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in range(len(channels) - 1)
        )
        self.decoders = nn.ModuleList(_block(2 * channels[i], channels[i]) for i in range(len(channels) - 1))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` of images ``(B, 1, H, W)`` in [0, 1]; H and W multiples of 16."""
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True)
        x = (x - mean) / (std + 1e-3)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](torch.cat([self.ups[level](x), skips[level]], dim=1))
        return self.head(x)


# ---------------------------------------------------------------------------------------------- augmentation
TEXT_WORDS = ("AP", "PA", "L", "R", "PORTABLE", "SUPINE", "ERECT", "UPRIGHT", "SEMI-ERECT", "BEDSIDE", "1",
              "2020-03-14", "08:42", "ICU", "A2", "B1", "MOBILE", "LEFT", "RIGHT", "T", "D", "x", "CLINO")


def text_stamps(rng: np.random.Generator, count: int = 48) -> list[np.ndarray]:
    """Boolean masks of burned-in words in random sizes (the markers and captions of real films)."""
    stamps = []
    for _ in range(count):
        word = str(rng.choice(TEXT_WORDS))
        font = ImageFont.load_default(size=int(rng.integers(6, 18)))
        left, top, right, bottom = font.getbbox(word)
        canvas = Image.new("L", (right + 2, bottom + 2))
        ImageDraw.Draw(canvas).text((1, 1), word, fill=255, font=font)
        stamps.append(np.asarray(canvas)[top:, left:] > 96)
    return stamps


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of the training augmentation (all drawn per film)."""

    rotation: float = 15.0
    zoom: tuple[float, float] = (0.75, 1.35)
    aspect: float = 0.15
    shift: float = 0.12
    flip: float = 0.5
    fill_gray: float = 0.4
    borders: float = 0.3
    border_size: float = 0.15
    text: float = 0.6
    wires: float = 0.3
    opacity: float = 0.35
    gamma: tuple[float, float] = (0.5, 2.0)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.15
    blur: float = 0.25
    noise: float = 0.5
    noise_sd: float = 0.05


def _affine(rng: np.random.Generator, count: int, aug: AugmentSettings) -> torch.Tensor:
    """``(count, 2, 3)`` sampling matrices: rotation, zoom, aspect, shift and a left/right flip."""
    thetas = []
    for _ in range(count):
        angle = math.radians(rng.uniform(-aug.rotation, aug.rotation)) if rng.random() < 0.8 else 0.0
        zoom = math.exp(rng.uniform(math.log(aug.zoom[0]), math.log(aug.zoom[1])))
        aspect = math.exp(rng.uniform(-aug.aspect, aug.aspect))
        sx = (-1.0 if rng.random() < aug.flip else 1.0) / (zoom * math.sqrt(aspect))
        sy = math.sqrt(aspect) / zoom
        tx, ty = rng.uniform(-aug.shift, aug.shift, 2)
        cos, sin = math.cos(angle), math.sin(angle)
        thetas.append([[cos * sx, -sin * sy, tx], [sin * sx, cos * sy, ty]])
    return torch.tensor(thetas, dtype=torch.float32)


def _opacity(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth blotchy field inside the lungs, heavier towards their bases (consolidation)."""
    field = ndimage.zoom(rng.normal(size=(12, 12)), mask.shape[0] / 12, order=1)
    field = ndimage.gaussian_filter(field, 3.0)
    patchy = np.clip((field - np.quantile(field, rng.uniform(0.3, 0.8))) * 4.0, 0.0, 1.0)
    rows = np.nonzero(mask.any(axis=1))[0]
    if not len(rows):
        return np.zeros_like(mask, dtype=np.float32)
    ramp = np.clip((np.arange(mask.shape[0]) - rows[0]) / max(1, rows[-1] - rows[0]), 0.0, 1.0)[:, None]
    inside = ndimage.gaussian_filter(ndimage.binary_dilation(mask, iterations=2).astype(np.float32), 1.5)
    return (patchy * inside * (0.3 + 0.7 * ramp)).astype(np.float32)


def _burn_in(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, stamps: list[np.ndarray],
             aug: AugmentSettings) -> None:
    """In place: collimation borders, burned-in text, wires and electrodes, consolidation."""
    size = img.shape[0]
    if rng.random() < aug.opacity:
        img += rng.uniform(0.3, 0.8) * _opacity(mask > 0, rng) * (1.0 - img)
    if rng.random() < aug.borders:
        edge = (rng.uniform(0, aug.border_size, 4) * size * (rng.random(4) < 0.5)).astype(int)
        keep = np.zeros_like(mask, dtype=bool)
        keep[edge[0] : size - edge[1], edge[2] : size - edge[3]] = True
        img[~keep] = 0.0 if rng.random() < 0.8 else rng.uniform(0.5, 1.0)
        mask[~keep] = 0
    if rng.random() < aug.text:
        for _ in range(int(rng.integers(1, 5))):
            stamp = stamps[int(rng.integers(len(stamps)))]
            h, w = min(stamp.shape[0], size), min(stamp.shape[1], size)
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            img[y : y + h, x : x + w][stamp[:h, :w]] = 0.0 if rng.random() < 0.15 else rng.uniform(0.8, 1.0)
    if rng.random() < aug.wires:
        canvas = Image.new("L", (size, size))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            points = [tuple(p) for p in rng.uniform(-0.1, 1.1, (int(rng.integers(2, 5)), 2)) * size]
            draw.line(points, fill=255, width=int(rng.integers(1, 3)))
        for _ in range(int(rng.integers(0, 5))):
            cx, cy, r = *rng.uniform(0, size, 2), rng.uniform(1.5, 4.0)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        wire = np.asarray(canvas) > 0
        img[wire] = rng.uniform(0.7, 1.0)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator,
                  stamps: list[np.ndarray], aug: AugmentSettings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented ``(B, 1, WORK_SIZE, WORK_SIZE)`` images and 0/1 masks from ``(B, 1, BASE_SIZE, BASE_SIZE)`` ones.

    Geometry (rotation, zoom in = cut-off edges, zoom out = borders of black or gray, aspect, shift,
    left/right flip that swaps the lungs) acts on image and mask alike; intensity (gamma, contrast,
    brightness, blur, noise) and burned-in text, wires, borders and consolidation act on the image.
    """
    aug = aug or AugmentSettings()
    count = images.shape[0]
    grid = F.affine_grid(_affine(rng, count, aug), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = F.grid_sample(torch.ones_like(images), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fills = torch.tensor(
        [0.0 if rng.random() >= aug.fill_gray else rng.uniform(0.2, 1.0) for _ in range(count)]
    ).view(-1, 1, 1, 1)
    warped = warped + fills * (1.0 - valid)
    lungs = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.avg_pool2d(warped, 2).numpy()[:, 0].copy()
    y = (F.avg_pool2d(lungs, 2).numpy()[:, 0] >= 0.5).astype(np.float32)
    for i in range(count):
        img = x[i]
        _burn_in(img, y[i], rng, stamps, aug)
        gamma = math.exp(rng.uniform(math.log(aug.gamma[0]), math.log(aug.gamma[1])))
        img[:] = np.clip(img, 0.0, 1.0) ** gamma
        img[:] = (img - 0.5) * rng.uniform(*aug.contrast) + 0.5 + rng.uniform(-aug.brightness, aug.brightness)
        if rng.random() < aug.blur:
            img[:] = ndimage.gaussian_filter(img, rng.uniform(0.5, 1.2))
        if rng.random() < aug.noise:
            img += rng.normal(0.0, rng.uniform(0.005, aug.noise_sd), img.shape).astype(np.float32)
        np.clip(img, 0.0, 1.0, out=img)
    return torch.from_numpy(x[:, None]), torch.from_numpy(y[:, None])


# -------------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainSettings:
    """Schedule of ``train_segmenter``; the same settings, films and thread count give the same weights."""

    seed: int = 0
    steps: int = 450
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    real_share: float = 0.75
    """Share of each batch drawn from the real films (the rest from the synthetic twin)."""
    threads: int = 2


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Fixed torch thread count and deterministic kernels for the duration; restores both afterwards."""
    old_threads, old_flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_flag)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + soft Dice (per image, averaged)."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1.0)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def train_segmenter(images: np.ndarray, masks: np.ndarray, real: np.ndarray, settings: TrainSettings | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Train a ``LungUNet`` from scratch; returns its state dict.

    ``images``: ``(N, BASE_SIZE, BASE_SIZE)`` float32 films in [0, 1]; ``masks``: the same shape, lung > 0;
    ``real``: ``(N,)`` bool, True for real films (``settings.real_share`` of each batch), False for twin films.
    Seeded (numpy and torch), fixed thread count, deterministic kernels: same inputs and settings → same weights.
    """
    settings = settings or TrainSettings()
    real = np.asarray(real, dtype=bool)
    if images.shape[1:] != (BASE_SIZE, BASE_SIZE) or masks.shape != images.shape or len(real) != len(images):
        raise ValueError(f"need (N, {BASE_SIZE}, {BASE_SIZE}) images and masks and N flags, got "
                         f"{images.shape}, {masks.shape}, {real.shape}")
    pools = [np.flatnonzero(real), np.flatnonzero(~real)]
    n_real = round(settings.batch_size * settings.real_share) if len(pools[1]) else settings.batch_size
    if not len(pools[0]):
        n_real = 0
    image_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    mask_t = torch.from_numpy((np.asarray(masks) > 0).astype(np.float32))[:, None]
    with _deterministic(settings.threads):
        torch.manual_seed(settings.seed)
        rng = np.random.default_rng(settings.seed)
        stamps = text_stamps(rng)
        model = LungUNet()
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps,
                                                       pct_start=0.15)
        model.train()
        for step in range(settings.steps):
            batch = np.concatenate([rng.choice(pools[0], n_real) if n_real else np.empty(0, int),
                                    rng.choice(pools[1], settings.batch_size - n_real)
                                    if settings.batch_size > n_real else np.empty(0, int)])
            x, y = augment_batch(image_t[batch], mask_t[batch], rng, stamps)
            loss = _loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress and (step % 50 == 0 or step == settings.steps - 1):
                print(f"step {step + 1}/{settings.steps} loss {loss.item():.4f}", flush=True)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ weights on disk
def save_weights(state: dict[str, torch.Tensor], path: str | Path, settings: TrainSettings,
                 trained_on: dict[str, Any]) -> None:
    """Write the weights with the settings and what they were trained on (atomic: tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": WEIGHTS_FORMAT, "work_size": WORK_SIZE, "channels": list(CHANNELS),
               "settings": asdict(settings), "trained_on": trained_on, "state_dict": state}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _bad_weights(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path}: {why}; rebuild the lung segmenter weights with `{REBUILD_COMMAND}`")


def read_weights(path: str | Path = WEIGHTS_FILE) -> dict[str, Any]:
    """The saved payload (``torch.load(weights_only=True)``); ConfigError naming the file and the rebuild command."""
    path = Path(path)
    if not path.is_file():
        raise _bad_weights(path, "lung segmenter weights not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle raise many types (UnpicklingError, RuntimeError, EOFError...)
        why = f"cannot read the lung segmenter weights ({type(exc).__name__}: {load_refusal(exc)[:160]})"
        raise _bad_weights(path, why) from exc
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT or "state_dict" not in payload:
        raise _bad_weights(path, f"not lung segmenter weights of format {WEIGHTS_FORMAT}")
    if payload.get("work_size") != WORK_SIZE:
        raise _bad_weights(path, f"weights for working size {payload.get('work_size')}, this version uses {WORK_SIZE}")
    return payload


@functools.lru_cache(maxsize=4)
def _model(path: str, identity: tuple[int, int]) -> LungUNet:
    payload = read_weights(path)
    model = LungUNet(tuple(payload.get("channels", CHANNELS)))
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise _bad_weights(Path(path), f"weights do not fit the segmenter ({exc})") from exc
    return model.eval()


def load_segmenter(path: str | Path = WEIGHTS_FILE) -> LungUNet:
    """The segmenter with the weights at ``path`` (cached per file version), in eval mode."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise _bad_weights(path, "lung segmenter weights not found") from None
    return _model(str(path), (stat.st_size, stat.st_mtime_ns))


def weights_fingerprint(path: str | Path = WEIGHTS_FILE) -> str:
    """sha256 (16 hex digits) of the weights file, for cache keys; ConfigError when missing."""
    path = Path(path)
    if not path.is_file():
        raise _bad_weights(path, "lung segmenter weights not found")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- inference
def squash(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear (PIL) resize of a 2-D float image to ``size × size``, aspect not kept."""
    return np.asarray(Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize((size, size),
                                                                                           Image.BILINEAR))


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """torch on one thread for the duration: the small U-Net gains little from more, and a process forked
    from one that ran torch on several threads (the cache's worker pool) deadlocks in a multi-threaded kernel."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


def segment(img01: np.ndarray, weights: str | Path = WEIGHTS_FILE) -> np.ndarray:
    """Lung probability map (``WORK_SIZE × WORK_SIZE`` float32) of a [0, 1] film squashed to the working size."""
    x = torch.from_numpy(np.clip(squash(img01, WORK_SIZE), 0.0, 1.0)[None, None].copy())
    with _single_thread():
        model = load_segmenter(weights)
        with torch.inference_mode():
            return torch.sigmoid(model(x))[0, 0].numpy()
