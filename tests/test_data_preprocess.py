"""ADM centre crop, RGB conversion, bad-file detection and scaling against independent references."""

import io

import numpy as np
import pytest
from PIL import Image

from udit_jax.data import preprocess


def reference_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """SPEC section 5, written from its description: BOX-halve while min side >= 2*size, BICUBIC
    resize so the short side is `size` (long side rounded), crop the centre (offsets floored)."""
    width, height = image.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), Image.Resampling.BOX)
    factor = size / min(width, height)
    width, height = round(width * factor), round(height * factor)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


def random_image(width, height, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4, "CMYK": 4}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("width,height,size", [
    (37, 23, 16), (23, 37, 16), (101, 67, 16), (67, 101, 32), (255, 129, 32), (513, 301, 64),
    (64, 64, 16), (15, 9, 16), (33, 32, 16), (17, 200, 8)])
def test_center_crop_matches_adm_description(width, height, size):
    image = random_image(width, height, seed=width * height)
    out = preprocess.center_crop_arr(image, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_center_crop(image, size))


def test_center_crop_grayscale_keeps_a_channel_axis():
    image = random_image(40, 31, "L")
    out = preprocess.center_crop_arr(image, 16)
    np.testing.assert_array_equal(out[..., 0], reference_center_crop(image, 16))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "1", "LA"])
def test_decode_converts_to_rgb_like_torchvision(mode):
    base = random_image(20, 18, "RGB" if mode in ("P", "1", "LA") else mode, seed=3)
    image = base.convert(mode) if mode in ("P", "1", "LA") else base
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encoded(image, fmt)
    out = preprocess.decode_image(data)
    assert out.mode == "RGB" and out.size == (20, 18)
    # torchvision's pil_loader: Image.open(f).convert("RGB")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_palette_with_transparency_converts():
    image = random_image(12, 12, seed=5).convert("P")
    image.info["transparency"] = 0
    out = preprocess.decode_image(encoded(image, "PNG"))
    assert out.mode == "RGB"


def sixteen_bit_png() -> bytes:
    return encoded(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, I am not an image\n" * 10, "cannot decode"),
    (encoded(random_image(40, 40), "JPEG")[:300], "cannot decode"),
    (sixteen_bit_png(), "more than 8 bits"),
    (encoded(random_image(5, 30), "PNG"), "too small"),
    (encoded(random_image(90, 90), "PNG"), "too large"),
])
def test_bad_files_raise_bad_image_error(data, reason):
    with pytest.raises(preprocess.BadImageError, match=reason):
        preprocess.decode_image(data, min_side=8, max_pixels=80 * 80)


def test_unit_range_and_flip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = preprocess.to_unit_range(pixels)
    assert x.dtype == np.float32
    # ToTensor (p/255) then Normalize(0.5, 0.5), computed in float64 here.
    np.testing.assert_allclose(x, (pixels / 255.0 - 0.5) / 0.5, rtol=0, atol=1e-6)
    assert x.min() == -1.0 and x.max() == 1.0
    flipped = preprocess.hflip(x)
    np.testing.assert_array_equal(flipped[0, 3, :, 0], x[0, 3, ::-1, 0])


def test_pad_to_centres_on_black():
    pixels = np.full((28, 28, 1), 255, np.uint8)
    out = preprocess.pad_to(pixels, 32)
    assert out.shape == (32, 32, 1)
    assert out[2:30, 2:30].min() == 255 and out.sum() == 255 * 28 * 28
    assert preprocess.to_unit_range(out)[0, 0, 0] == -1.0
    with pytest.raises(ValueError, match="cannot pad"):
        preprocess.pad_to(pixels, 16)
