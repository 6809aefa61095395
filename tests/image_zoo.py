"""Every kind of upload the image issue names, generated on the fly: good ones and bad ones."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import ExifTags, Image


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG; zlib shrinks its ~width*height/8 bytes of rows about 1000x."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(bytes((1 + (width + 7) // 8) * height), 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def good_images() -> dict[str, bytes]:
    """name -> file content; each must give a caption."""
    photo = Image.new("RGB", (64, 48), (200, 60, 40))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    frames = [Image.new("RGB", (24, 24), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "one-pixel.png": encode(Image.new("RGB", (1, 1), "red"), "PNG"),
        "cmyk.jpg": encode(Image.new("CMYK", (40, 30), (255, 0, 0, 0)), "JPEG"),
        "sixteen-bit.png": encode(Image.new("I;16", (40, 30), 40000), "PNG"),
        "rgba.png": encode(Image.new("RGBA", (40, 30), (0, 255, 0, 0)), "PNG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "animated.gif": gif.getvalue(),
        "exif-rotated.jpg": encode(photo, "JPEG", exif=exif),
        "picture.webp": encode(photo, "WEBP"),
        "picture.bmp": encode(photo, "BMP"),
        "grayscale.png": encode(Image.new("L", (40, 30), 128), "PNG"),
        "huge.jpg": encode(Image.new("RGB", (5000, 3000), (20, 120, 200)), "JPEG", quality=70),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file content, words the refusal must contain)."""
    png = encode(Image.new("RGB", (64, 64), "blue"), "PNG")
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    return {
        "empty.png": (b"", "empty"),
        "truncated.png": (png[: len(png) // 2], "truncated or corrupt"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated or corrupt"),
        "text.png": (b"hello, I am not a picture\n" * 20, "not an image"),
        "bomb.png": (png_bomb(30_000, 30_000), "megapixels"),
    }


def write_all(folder: Path, files: dict[str, bytes]) -> dict[str, Path]:
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths
