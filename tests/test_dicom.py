"""Image decoding: DICOM photometrics, bit depths, rescale, syntaxes, bad files; Pillow/npy; normalisation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers.dicom_fixtures import write_dicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import convert_color_space
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from mdmt.errors import ImageReadError
from mdmt.images import image_info, normalize_intensity, read_image

RNG = np.random.default_rng(0)
CODECS_INSTALLED = all(importlib.util.find_spec(m) for m in ("pylibjpeg", "libjpeg", "openjpeg"))


def random_image(bits: int, shape=(32, 32), dtype=np.uint16) -> np.ndarray:
    return RNG.integers(0, 2**bits, shape).astype(dtype)


def local_testdata(name: str) -> str:
    """A file shipped with pydicom (never downloaded); skip when this pydicom lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return path


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", ImplicitVRLittleEndian, RLELossless])
def test_monochrome2_round_trips_exactly_for_any_depth_and_syntax(tmp_path: Path, bits: int, syntax: str):
    pixels = random_image(bits, dtype=np.uint8 if bits == 8 else np.uint16)
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=bits, transfer_syntax=syntax)
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (32, 32)
    np.testing.assert_array_equal(image, pixels.astype(np.float32))


@pytest.mark.parametrize("bits", [12, 16])
def test_monochrome1_is_inverted_over_the_bits_stored_range(tmp_path: Path, bits: int):
    truth = random_image(bits)
    stored = (2**bits - 1) - truth
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", bits_stored=bits)
    np.testing.assert_array_equal(read_image(path), truth.astype(np.float32))


def test_monochrome1_signed_pixels_invert_over_the_signed_range(tmp_path: Path):
    stored = RNG.integers(-2000, 2000, (16, 16)).astype(np.int16)
    path = write_dicom(tmp_path / "s.dcm", stored, photometric="MONOCHROME1", bits_stored=16)
    np.testing.assert_array_equal(read_image(path), (-32768 + 32767) - stored.astype(np.float32))


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path):
    stored = random_image(12)
    path = write_dicom(tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024, RescaleType="US")
    np.testing.assert_allclose(read_image(path), stored * 2.0 - 1024.0)


def test_rescale_then_monochrome1_inversion_keeps_the_bright_is_dense_order(tmp_path: Path):
    stored = random_image(12)
    path = write_dicom(tmp_path / "r1.dcm", stored, photometric="MONOCHROME1", RescaleSlope=0.5, RescaleIntercept=10)
    low, high = 0 * 0.5 + 10, 4095 * 0.5 + 10
    np.testing.assert_allclose(read_image(path), (low + high) - (stored * 0.5 + 10))


def test_rgb_is_averaged_to_gray(tmp_path: Path):
    rgb = random_image(8, (24, 20, 3), np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    image = read_image(path)
    assert image.shape == (24, 20)
    np.testing.assert_allclose(image, rgb.astype(np.float32).mean(axis=-1), rtol=1e-6)


def test_ybr_is_converted_to_rgb_before_the_mean(tmp_path: Path):
    rgb = random_image(8, (16, 16, 3), np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL", bits_stored=8)
    expected = rgb.astype(np.float32).mean(axis=-1)
    assert np.abs(read_image(path) - expected).max() <= 2.0
    assert np.abs(ybr[..., 0].astype(np.float32) - expected).max() > 2.0  # the Y channel alone would differ


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", RLELossless])
def test_multiframe_gives_the_first_frame(tmp_path: Path, syntax: str):
    frames = random_image(12, (3, 16, 16))
    path = write_dicom(tmp_path / "mf.dcm", frames, transfer_syntax=syntax)
    np.testing.assert_array_equal(read_image(path), frames[0].astype(np.float32))


def test_dicom_is_detected_by_signature_whatever_the_name(tmp_path: Path):
    pixels = random_image(12)
    path = write_dicom(tmp_path / "12345678901234567890", pixels)
    renamed = path.rename(tmp_path / "scan.png")
    np.testing.assert_array_equal(read_image(renamed), pixels.astype(np.float32))


def test_truncated_dicom_raises_naming_the_file(tmp_path: Path):
    path = write_dicom(tmp_path / "full.dcm", random_image(12, (64, 64)))
    data = path.read_bytes()
    truncated = tmp_path / "P_9.dcm"
    truncated.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError) as info:
        read_image(truncated)
    assert info.value.path == str(truncated)
    assert "pixel data" in info.value.reason and str(truncated) in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("content", [b"", b"not a dicom at all" * 20, b"\x00" * 128 + b"DICM" + b"\xff" * 40])
def test_garbage_files_raise_image_read_error(tmp_path: Path, content: bytes):
    path = tmp_path / "bad.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path) and info.value.reason


def test_missing_file_and_folder_raise(tmp_path: Path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.dcm")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)


def test_jpeg2000_decodes_or_asks_for_the_codecs_extra():
    path = local_testdata("JPEG2000.dcm")
    try:
        image = read_image(path)
    except ImageReadError as error:
        assert "mdmt[codecs]" in error.reason and "JPEG 2000" in error.reason
    else:
        assert image.shape == (1024, 256) and np.isfinite(image).all() and image.std() > 0


def test_jpeg_ls_without_plugins_names_the_syntax_and_the_codecs_extra():
    compressed = local_testdata("MR_small_jpeg_ls_lossless.dcm")
    if CODECS_INSTALLED:
        reference = read_image(local_testdata("MR_small.dcm"))
        np.testing.assert_array_equal(read_image(compressed), reference)
        return
    with pytest.raises(ImageReadError) as info:
        read_image(compressed)
    reason = info.value.reason
    assert "JPEG-LS Lossless" in reason and "1.2.840.10008.1.2.4.80" in reason
    assert "pip install 'mdmt[codecs]'" in reason and "pylibjpeg-libjpeg" in reason


def test_rle_test_file_matches_its_uncompressed_twin():
    rle, uncompressed = local_testdata("MR_small_RLE.dcm"), local_testdata("MR_small.dcm")
    np.testing.assert_array_equal(read_image(rle), read_image(uncompressed))


def test_png_16_bit_keeps_full_depth(tmp_path: Path):
    pixels = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = read_image(tmp_path / "x.png")
    np.testing.assert_array_equal(image, pixels.astype(np.float32))
    assert image.max() == 65520


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_colour_image_files_are_averaged(tmp_path: Path, suffix: str):
    rgb = random_image(8, (20, 30, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / f"x{suffix}")
    np.testing.assert_allclose(read_image(tmp_path / f"x{suffix}"), rgb.astype(np.float32).mean(axis=-1), rtol=1e-6)


def test_jpeg_and_npy_files(tmp_path: Path):
    gray = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    Image.fromarray(gray).save(tmp_path / "x.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "x.jpg") - gray).mean() < 3
    array = RNG.normal(size=(8, 9))
    np.save(tmp_path / "x.npy", array)
    np.testing.assert_allclose(read_image(tmp_path / "x.npy"), array.astype(np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(ImageReadError, match="2-D"):
        read_image(tmp_path / "bad.npy")


def test_unreadable_image_file_raises(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with pytest.raises(ImageReadError, match="cannot read image"):
        read_image(tmp_path / "x.png")


def test_normalize_intensity_clips_percentiles_and_scales():
    image = np.arange(1000, dtype=np.float32).reshape(25, 40) * 3.0 + 7.0
    out = normalize_intensity(image)
    low, high = np.percentile(image, [2, 98])
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert (out[image <= low] == 0).all() and (out[image >= high] == 1).all()
    middle = image[12, 20]
    assert out[12, 20] == pytest.approx((middle - low) / (high - low), rel=1e-5)
    np.testing.assert_allclose(normalize_intensity(image * 5 - 100), out, atol=1e-6)  # any bit depth / offset


def test_normalize_intensity_degenerate_inputs():
    assert (normalize_intensity(np.full((8, 8), 123.0)) == 0).all()
    mostly_flat = np.zeros((20, 20))
    mostly_flat[:2, :2] = 9.0  # 1% of the pixels: the 2nd and 98th percentiles coincide
    out = normalize_intensity(mostly_flat)
    assert out.max() == 1.0 and out[:2, :2].min() == 1.0 and out.sum() == 4.0
    with_nan = np.arange(16, dtype=np.float32).reshape(4, 4)
    with_nan[0, 0] = np.nan
    out = normalize_intensity(with_nan, 0, 100)
    assert np.isfinite(out).all() and out[0, 0] == 0 and out.max() == 1.0
    with pytest.raises(ValueError, match="percentiles"):
        normalize_intensity(with_nan, 60, 40)


def test_image_info_reads_only_the_header(tmp_path: Path):
    path = write_dicom(tmp_path / "a.dcm", random_image(14, (40, 24)), photometric="MONOCHROME1", bits_stored=14,
                       transfer_syntax=RLELossless, Manufacturer="AGFA-Gevaert")
    info = image_info(path)
    assert info == {"rows": 40, "cols": 24, "photometric": "MONOCHROME1", "bits_stored": 14,
                    "transfer_syntax": "RLE Lossless", "manufacturer": "AGFA-Gevaert"}
    uncompressed = write_dicom(tmp_path / "b.dcm", random_image(12, (64, 64)))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(uncompressed.read_bytes()[:-4000])
    assert image_info(cut)["rows"] == 64  # pixels are never touched
    Image.fromarray(np.zeros((10, 12), np.uint16)).save(tmp_path / "p.png")
    assert image_info(tmp_path / "p.png") == {"rows": 10, "cols": 12, "photometric": "I;16", "bits_stored": 16,
                                              "transfer_syntax": "PNG", "manufacturer": None}
