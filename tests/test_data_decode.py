"""``read_rgb`` / ``read_mask``: the one decoder training and inference share."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from functional_seg.data import DataError, read_mask, read_rgb


def _gradient(h: int = 6, w: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trips(tmp_path):
    a = _gradient()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 10, 3)
    assert np.array_equal(out, a)


def test_16_bit_png_scales_to_8_bit(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(values * 257).save(tmp_path / "g16.png")  # 8-bit v stored as v * 257
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_rgb(tmp_path / "g16.png")
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out[..., 0], values.astype(np.uint8))  # not clipped to white
    assert np.array_equal(out[..., 0], out[..., 2])
    # A dark 16-bit image stays dark: the scale is fixed, not the image's own maximum.
    Image.fromarray(np.full((4, 4), 2570, dtype=np.uint16)).save(tmp_path / "dark.png")
    assert (read_rgb(tmp_path / "dark.png") == 10).all()


def test_exif_rotated_jpeg_comes_out_rotated(tmp_path):
    a = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high; bright left half
    a[:, :20] = 255
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_rgb(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)  # displayed upright: 20 wide, 40 high
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the bright half is now on top


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "L", "1"])
def test_modes_become_rgb(tmp_path, mode):
    a = _gradient()
    img = Image.fromarray(a)
    img = img.quantize(16) if mode == "P" else img.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (6, 10, 3)
    if mode in ("L", "LA", "1"):
        assert np.array_equal(out[..., 0], out[..., 1])
    if mode == "RGBA":
        assert np.array_equal(out, a)


def test_bomb_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    Image.fromarray(_gradient(30, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,200 px: PIL warns
    with pytest.raises(DataError, match=r"big\.png: image has 1,200 pixels, above .*MAX_IMAGE_PIXELS = 1,000"):
        read_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit: PIL raises
    with pytest.raises(DataError, match=r"big\.png: image has 1,200 pixels, .*MAX_IMAGE_PIXELS = 100;"):
        read_rgb(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png: mask has 1,200 pixels"):
        read_mask(tmp_path / "big.png")


def test_missing_corrupt_and_truncated(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jpg: image is missing; expected a readable JPEG"):
        read_rgb(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all" * 10)
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode image \(UnidentifiedImageError"):
        read_rgb(tmp_path / "bad.jpg")
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.jpg: cannot decode image \(OSError: image file is truncated"):
        read_rgb(tmp_path / "t.jpg")


def test_read_mask_keeps_palette_indices(tmp_path):
    idx = np.array([[0, 1, 2], [20, 255, 3]], dtype=np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)])
    pal.save(tmp_path / "p.png")
    out = read_mask(tmp_path / "p.png")
    assert out.dtype == np.uint8 and np.array_equal(out, idx)
    Image.fromarray(idx).save(tmp_path / "l.png")
    assert np.array_equal(read_mask(tmp_path / "l.png"), idx)


def test_read_mask_refuses_16_bit_and_colour(tmp_path):
    Image.fromarray(np.ones((4, 4), dtype=np.uint16)).save(tmp_path / "m16.png")
    with pytest.raises(DataError, match=r"m16\.png: mask is a 16-bit image \(mode I;16\); expected an 8-bit"):
        read_mask(tmp_path / "m16.png")
    Image.fromarray(_gradient()).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png: mask has mode RGB; expected an 8-bit single-channel PNG"):
        read_mask(tmp_path / "rgb.png")
