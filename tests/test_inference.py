"""Turning a user's image file into a Fashion-MNIST-style 28x28 image, and the errors on the way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hpo.learn.inference import ImageError, read_image


def item() -> np.ndarray:
    """A light 'garment' on a black background, like Fashion-MNIST."""
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 8:20] = 200
    return img


def test_a_28x28_grey_png_is_read_unchanged(tmp_path):
    Image.fromarray(item()).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), item())


def test_a_large_colour_jpeg_on_white_is_inverted_and_resized(tmp_path):
    big = 255 - np.kron(item(), np.ones((10, 10), np.uint8))  # dark object on white, 280x280
    Image.fromarray(big).convert("RGB").save(tmp_path / "b.jpg", quality=95)
    got = read_image(tmp_path / "b.jpg")
    assert got.shape == (28, 28) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - item()).mean() < 8  # the same picture, up to JPEG and resampling


def test_a_wide_image_is_padded_to_a_square_not_stretched(tmp_path):
    wide = np.zeros((28, 56), np.uint8)
    wide[:, 20:36] = 255
    Image.fromarray(wide).save(tmp_path / "w.png")
    got = read_image(tmp_path / "w.png")
    assert got[:7].max() < 30 and got[21:].max() < 30  # padding above and below
    assert got[10:18, 12:16].min() > 200  # the bar stays in the middle


def test_transparency_counts_as_background(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (20, 20, 20, 255)  # a dark square; the rest is transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    got = read_image(tmp_path / "t.png")
    assert got[0, 0] == 0 and got[14, 14] > 200  # laid on white, then inverted like a product photo


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR garbage", "corrupt image data"),
        (b"just text", "not an image PIL can read"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, message):
    (tmp_path / "x").write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(tmp_path / "x")


def test_a_truncated_jpeg_is_corrupt(tmp_path):
    Image.fromarray(item()).save(tmp_path / "c.jpg")
    payload = (tmp_path / "c.jpg").read_bytes()
    (tmp_path / "c.jpg").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(ImageError, match="corrupt image data"):
        read_image(tmp_path / "c.jpg")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)
