"""Every upload shape backend/images.py must survive; all files are generated here, none are committed."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, features

from backend.errors import BadImage
from backend.images import ImageLimits, describe_limits, fit_within, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG; zlib shrinks its ~width*height/8 bytes of rows about 1000x."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(bytes((1 + (width + 7) // 8) * height), 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def two_colour(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """Left half `left`, right half `right`, so rotations and frames are visible in the pixels."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> None:
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)), (actual, expected)


# --- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "str", "path", "pil"])
def test_every_source_kind_gives_the_same_rgb_image(tmp_path: Path, kind: str) -> None:
    img = two_colour((8, 4), RED, BLUE)
    data = encode(img, "PNG")
    path = write(tmp_path, "upload.png", data)
    source = {"bytes": data, "str": str(path), "path": path, "pil": img}[kind]
    out = load_image(source)
    assert (out.mode, out.size) == ("RGB", (8, 4))
    assert (out.getpixel((0, 0)), out.getpixel((7, 3))) == (RED, BLUE)


def test_pil_source_is_copied_not_modified() -> None:
    src = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA" and src.getpixel((0, 0)) == (0, 0, 0, 0)
    assert out.getpixel((0, 0)) == WHITE


def test_no_upload_is_a_bad_image() -> None:
    with pytest.raises(BadImage, match="No image was given"):
        load_image(None)


def test_zero_byte_file(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match=r"The file is empty \(0 bytes\)\."):
        load_image(write(tmp_path, "empty.png", b""))
    with pytest.raises(BadImage, match="empty"):
        load_image(b"")


def test_missing_file_names_only_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match=r"The file 'gone\.png' does not exist") as info:
        load_image(tmp_path / "gone.png")
    assert str(tmp_path) not in str(info.value)  # server paths are not the user's business


def test_directory_is_reported_as_unreadable(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="could not be read"):
        load_image(tmp_path)


def test_file_over_max_bytes_names_size_and_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "huge.png", bytes(25 * 2**20))
    with pytest.raises(BadImage, match=r"The file is 25 MiB; the limit is 20 MiB\."):
        load_image(path)


def test_bytes_over_custom_max_bytes() -> None:
    data = encode(Image.effect_noise((64, 64), 80).convert("RGB"), "PNG")
    with pytest.raises(BadImage, match=r"the limit is 1 KiB"):
        load_image(data, ImageLimits(max_bytes=1024))


# --- not images, broken images, bombs ------------------------------------------------------------


def test_text_file_named_png(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.png", "just some text, café\n".encode() * 100)
    with pytest.raises(
        BadImage, match=r"not an image PIL can read \(\.png name, but the content is text\)\."
    ):
        load_image(path)


def test_random_binary_bytes() -> None:
    with pytest.raises(
        BadImage, match=r"PIL can read \(the content is in none of the supported formats: PNG"
    ):
        load_image(bytes(range(256)) * 4)


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "TGA", "PPM"])
def test_formats_outside_the_allow_list_are_refused(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, f"upload.{fmt.lower()}", encode(Image.new("RGB", (8, 8), RED), fmt))
    with pytest.raises(BadImage, match=rf"not an image PIL can read \(\.{fmt.lower()} name, but the content"):
        load_image(path)


def test_mpo_from_a_phone_camera_is_accepted() -> None:
    frames = [Image.new("RGB", (16, 8), RED), Image.new("RGB", (16, 8), BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = load_image(data)
    assert out.size == (16, 8)
    assert_close(out.getpixel((8, 4)), RED)


def test_tiff_is_accepted() -> None:
    out = load_image(encode(two_colour((8, 4), RED, BLUE), "TIFF", compression="tiff_lzw"))
    assert (out.mode, out.getpixel((0, 0)), out.getpixel((7, 0))) == ("RGB", RED, BLUE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused_and_pil_globals_untouched(fmt: str) -> None:
    data = encode(Image.effect_noise((128, 128), 60).convert("RGB"), fmt)
    with pytest.raises(BadImage, match=r"The image data is truncated or corrupt\."):
        load_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_bomb(30_000, 30_000)
    assert len(bomb) < 200_000  # ~110 KB claiming 900 megapixels

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # what makes a bomb slow: never reached
    with pytest.raises(BadImage, match=r"The image is 900 megapixels; the limit is 50 megapixels\."):
        load_image(bomb)


def test_bomb_under_pils_limit_is_refused_by_ours_with_its_dimensions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(
        BadImage, match=r"The image is 10000×6000 = 60 megapixels; the limit is 50 megapixels"
    ):
        load_image(png_bomb(10_000, 6_000))


def test_pil_bomb_warning_turned_error_still_becomes_bad_image() -> None:
    # Only when the limits allow more than PIL's MAX_IMAGE_PIXELS and warnings are errors (pytest -W error).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(BadImage, match=r"100 megapixels; the limit is 89\.5 megapixels"):
            load_image(png_bomb(10_000, 10_000), ImageLimits(max_pixels=200_000_000))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it skips
def test_mutated_files_only_ever_raise_bad_image() -> None:
    rng = random.Random(0)
    base = Image.effect_noise((24, 16), 60).convert("RGB")
    originals = [encode(base, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF")]
    for _ in range(400):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            out = load_image(bytes(data[: rng.randint(8, len(data))]))
        except BadImage:
            continue
        assert out.mode == "RGB" and max(out.size) <= 2048


# --- sizes ---------------------------------------------------------------------------------------


def test_huge_legal_jpeg_is_downscaled_keeping_aspect() -> None:
    out = load_image(encode(Image.new("RGB", (5000, 3000), (30, 120, 200)), "JPEG"))
    assert (out.mode, out.size) == ("RGB", (2048, 1229))
    assert_close(out.getpixel((1000, 600)), (30, 120, 200))


def test_tall_png_is_downscaled_to_custom_max_side() -> None:
    out = load_image(encode(Image.new("L", (300, 900), 77), "PNG"), ImageLimits(max_side=128))
    assert (out.mode, out.size, out.getpixel((20, 100))) == ("RGB", (43, 128), (77, 77, 77))


def test_big_jpeg_is_decoded_at_reduced_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def spy(self: JpegImagePlugin.JpegImageFile):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    out = load_image(encode(Image.new("RGB", (1600, 800), RED), "JPEG"), ImageLimits(max_side=100))
    assert out.size == (100, 50) and decoded[0] == (200, 100)  # draft: 1/8 scale, still >= 2x the target
    assert_close(out.getpixel((50, 25)), RED)


def test_one_by_one_image() -> None:
    out = load_image(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"))
    assert (out.mode, out.size, out.getpixel((0, 0))) == ("RGB", (1, 1), (9, 8, 7))


def test_fit_within_never_upscales() -> None:
    assert fit_within((10, 5), 2048) == (10, 5)
    assert fit_within((100_000, 1), 2048) == (2048, 1)


# --- modes and formats ---------------------------------------------------------------------------


def test_cmyk_jpeg_pure_cyan() -> None:
    data = encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.mode == "RGB"
    assert_close(out.getpixel((4, 4)), (0, 255, 255))


def test_16_bit_png_is_scaled_not_clipped() -> None:
    img = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32768, 65535)):
        img.putpixel((x, 0), value)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = load_image(data)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_32_bit_integer_image_with_16_bit_values() -> None:
    img = Image.new("I", (2, 1), 65535)
    img.putpixel((1, 0), 257 * 100)
    out = load_image(img)
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == (WHITE, (100, 100, 100))


def test_rgba_transparency_becomes_white_not_black() -> None:
    img = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    out = load_image(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == (WHITE, RED)
    assert_close(out.getpixel((2, 0)), (255, 127, 127), tol=1)


def test_la_transparency_becomes_white() -> None:
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    out = load_image(encode(img, "PNG"))
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == (WHITE, (50, 50, 50))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str) -> None:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.putpixel((1, 0), 1)
    out = load_image(encode(img, fmt, transparency=0))
    assert (out.mode, out.getpixel((0, 0)), out.getpixel((1, 0))) == ("RGB", WHITE, RED)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = load_image(data)
    assert (out.mode, out.size, out.getpixel((2, 2))) == ("RGB", (4, 4), RED)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90° clockwise to display"
    data = encode(two_colour((40, 20), RED, BLUE), "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data)
    assert out.size == (20, 40)
    assert_close(out.getpixel((10, 5)), RED, tol=30)  # the left half is now on top
    assert_close(out.getpixel((10, 35)), BLUE, tol=30)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp() -> None:
    out = load_image(encode(two_colour((8, 4), RED, BLUE), "WEBP", lossless=True))
    assert (out.mode, out.getpixel((0, 0)), out.getpixel((7, 0))) == ("RGB", RED, BLUE)


def test_bmp() -> None:
    out = load_image(encode(two_colour((8, 4), RED, BLUE), "BMP"))
    assert (out.mode, out.getpixel((0, 0)), out.getpixel((7, 0))) == ("RGB", RED, BLUE)


def test_grayscale_l() -> None:
    out = load_image(encode(Image.new("L", (5, 5), 100), "PNG"))
    assert (out.mode, out.getpixel((2, 2))) == ("RGB", (100, 100, 100))


def test_one_bit_image() -> None:
    out = load_image(encode(two_colour((8, 2), (0,), (1,), mode="1"), "PNG"))
    assert (out.mode, out.getpixel((0, 0)), out.getpixel((7, 0))) == ("RGB", (0, 0, 0), WHITE)


# --- limits --------------------------------------------------------------------------------------


def test_describe_default_limits() -> None:
    assert describe_limits(ImageLimits()) == (
        "Images up to 20 MiB and 50 megapixels; larger sides are scaled to 2048 px."
    )


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels", "max_side"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ImageLimits(**{field: 0})
