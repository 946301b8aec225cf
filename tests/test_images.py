"""loraforge.data.images: decoding every awkward file kind to 8-bit RGB, hashing, resizing, JSONL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from loraforge.data.images import (
    ImageRejected,
    decode_image,
    lanczos_upscale,
    parse_color,
    pixel_hash,
    read_jsonl,
    resize_cover_crop,
    save_png,
    write_jsonl,
)

WHITE = (255, 255, 255)
MAGENTA = (255, 0, 255)


def noisy(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image of random pixels (compresses badly, so truncation bites)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


# --- parse_color ---------------------------------------------------------------------------


def test_parse_color() -> None:
    assert parse_color("#ffffff") == (255, 255, 255)
    assert parse_color("#1A2b3C") == (0x1A, 0x2B, 0x3C)
    for bad in ("ffffff", "#fff", "#gggggg", "#ffffff00", ""):
        with pytest.raises(ValueError, match="#rrggbb"):
            parse_color(bad)


# --- decode_image: rejects ---------------------------------------------------------------


def test_zero_byte_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageRejected) as e:
        decode_image(path, WHITE)
    assert e.value.reason == "empty file"


def test_text_named_jpg_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("a red circle on a yellow background\n")
    with pytest.raises(ImageRejected, match="not an image"):
        decode_image(path, WHITE)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file_is_rejected(tmp_path: Path, fmt: str, suffix: str) -> None:
    buf = io.BytesIO()
    noisy((64, 64)).save(buf, format=fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageRejected, match="cannot decode"):
        decode_image(path, WHITE)


def test_float_mode_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(ImageRejected, match="unsupported pixel mode F"):
        decode_image(path, WHITE)


# --- decode_image: normalisation ---------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    img = noisy((20, 10))
    path = tmp_path / "rgb.png"
    img.save(path)
    out = decode_image(path, WHITE)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.array_equal(pixels(out), pixels(img))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    out = decode_image(path, WHITE)
    assert out.mode == "RGB"
    with Image.open(path) as opened:
        reference = np.asarray(opened.convert("RGB"))  # Pillow's own CMYK → RGB conversion
    assert np.array_equal(pixels(out), reference)
    assert np.abs(reference[8, 8].astype(int) - (255, 0, 0)).max() < 15  # pure red, up to JPEG loss


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 64, 257 * 128, 257 * 200, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # really a 16-bit file
    out = decode_image(path, WHITE)
    assert out.mode == "RGB"
    # Clipping would give [0, 255, 255, 255, 255].
    assert pixels(out)[0, :, 0].tolist() == [0, 64, 128, 200, 255]
    assert np.array_equal(pixels(out)[..., 0], pixels(out)[..., 2])  # gray stays gray


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (3, 3), 77).save(path)
    out = decode_image(path, WHITE)
    assert out.mode == "RGB" and pixels(out)[1, 1].tolist() == [77, 77, 77]


def test_palette_with_transparency_is_flattened_on_background(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, 1 red
    img.putpixel((1, 1), 1)
    path = tmp_path / "palette.png"
    img.save(path, transparency=0)  # black is transparent
    out = decode_image(path, MAGENTA)
    assert out.mode == "RGB"
    assert pixels(out)[0, 0].tolist() == list(MAGENTA)
    assert pixels(out)[1, 1].tolist() == [255, 0, 0]


def test_rgba_is_composited_on_background(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))  # opaque blue
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    path = tmp_path / "rgba.png"
    img.save(path)
    out = decode_image(path, WHITE)
    p = pixels(out)
    assert p[0, 0].tolist() == [0, 0, 255]
    assert p[3, 3].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in p[0, 1])  # 50% black over white


def test_la_is_composited_on_background(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (2, 2), (0, 0)).save(path)
    assert pixels(decode_image(path, (10, 20, 30)))[0, 0].tolist() == [10, 20, 30]


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    out = decode_image(path, WHITE)
    assert out.size == (20, 40)  # width and height swapped
    # Turned clockwise, the left half (red) ends up on top, the right half (blue) below.
    top, bottom = pixels(out)[5, 10], pixels(out)[35, 10]
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_srgb_icc_profile_keeps_pixels(tmp_path: Path) -> None:
    img = noisy((8, 8))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "tagged.png"
    img.save(path, icc_profile=srgb)
    assert np.array_equal(pixels(decode_image(path, WHITE)), pixels(img))


def test_rgb_icc_profile_is_applied(tmp_path: Path) -> None:
    # An sRGB profile under another name takes the transform path; sRGB → sRGB stays close.
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert b"sRGB built-in" in icc or "sRGB built-in".encode("utf-16-be") in icc
    icc = icc.replace(b"sRGB built-in", b"XYZW built-in").replace(
        "sRGB built-in".encode("utf-16-be"), "XYZW built-in".encode("utf-16-be")
    )
    img = noisy((8, 8))
    path = tmp_path / "renamed.png"
    img.save(path, icc_profile=icc)
    assert np.abs(pixels(decode_image(path, WHITE)) - pixels(img)).max() <= 2


def test_broken_icc_profile_is_ignored(tmp_path: Path) -> None:
    img = noisy((8, 8))
    path = tmp_path / "broken.png"
    img.save(path, icc_profile=b"not a profile")
    assert np.array_equal(pixels(decode_image(path, WHITE)), pixels(img))


# --- hashing and saving ------------------------------------------------------------------


def test_pixel_hash_ignores_file_format_and_sees_size() -> None:
    img = noisy((6, 4))
    assert pixel_hash(img) == pixel_hash(img.copy())
    assert len(pixel_hash(img)) == 32
    same_bytes_other_shape = Image.frombytes("RGB", (4, 6), img.tobytes())
    assert pixel_hash(same_bytes_other_shape) != pixel_hash(img)


def test_save_png_is_lossless_and_metadata_free(tmp_path: Path) -> None:
    img = noisy((10, 10))
    img.info["comment"] = "should not be written"
    path = tmp_path / "out.png"
    save_png(img, path)
    back = Image.open(path)
    assert back.format == "PNG" and np.array_equal(pixels(back), pixels(img))
    assert "comment" not in back.info


# --- resizing ----------------------------------------------------------------------------


def test_lanczos_upscale_short_side_reaches_min_side() -> None:
    assert lanczos_upscale(noisy((50, 100)), 128).size == (128, 256)
    assert lanczos_upscale(noisy((100, 50)), 128).size == (256, 128)
    assert lanczos_upscale(noisy((96, 96)), 128).size == (128, 128)
    assert min(lanczos_upscale(noisy((97, 131)), 128).size) == 128


def test_lanczos_upscale_never_downscales() -> None:
    img = noisy((300, 200))
    assert lanczos_upscale(img, 128) is img
    assert lanczos_upscale(img, 200) is img
    with pytest.raises(ValueError, match="min_side"):
        lanczos_upscale(img, 0)


def test_resize_cover_crop_landscape() -> None:
    img = noisy((300, 100))
    out, crop, original = resize_cover_crop(img, 128, 128)
    assert out.size == (128, 128)
    assert original == (100, 300)  # (height, width)
    assert crop == (0, (384 - 128) // 2)  # resized to 384 x 128, cropped in the middle


def test_resize_cover_crop_portrait_and_exact() -> None:
    out, crop, original = resize_cover_crop(noisy((100, 300)), 64, 96)
    assert out.size == (64, 96) and original == (300, 100)
    assert crop == ((192 - 96) // 2, 0)  # resized to 64 x 192
    img = noisy((64, 96))
    out, crop, _ = resize_cover_crop(img, 64, 96)
    assert crop == (0, 0) and np.array_equal(pixels(out), pixels(img))


def test_resize_cover_crop_keeps_centre_content() -> None:
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (90, 40, 110, 60))  # a white square in the middle
    out, _, _ = resize_cover_crop(img, 50, 50)
    assert pixels(out)[25, 25].tolist() == [255, 255, 255]
    assert pixels(out)[2, 2].tolist() == [0, 0, 0]


# --- JSONL -------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"source": "é/a b.png", "caption": None}, {"n": 1}]
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert "é" in path.read_text(encoding="utf-8")


def test_read_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"ok": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(path)
