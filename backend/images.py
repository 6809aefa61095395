"""Turn whatever a user uploads into a safe, bounded RGB image, or raise BadImage saying what was wrong.

PIL only (no torch, no Gradio) so the UI can validate uploads before any model is involved.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from backend.errors import BadImage, BadInput

ImageSource: TypeAlias = bytes | bytearray | str | os.PathLike | Image.Image
WHITE = (255, 255, 255)
Image.init()
# Only everyday web formats: fewer decoders to attack, and EPS would even run Ghostscript on load.
# (JPEG's opener also yields MPO, the multi-picture JPEG many phones write.)
FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)
# Everything Pillow's decoders raise on malformed data; anything else is a bug and should surface.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, KeyError)
BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageLimits:
    """What the server accepts; checked before decoding so one upload cannot exhaust memory."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    max_side: int = 2048
    max_images: int = 8  # per request: every image of the conversation is read again for each reply

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImageLimits.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ConversationImages:
    """A conversation's images in the order they were sent, each where it was sent.

    `by_turn[i]` holds the images sent with user turn i: the history's turns in order, then the new
    message last (so there are len(history) + 1 entries). What VisionBackend.visual_chat takes in place
    of a single image.
    """

    by_turn: tuple[tuple[ImageSource, ...], ...]

    @classmethod
    def of(cls, by_turn) -> ConversationImages:
        return cls(tuple(tuple(images) for images in by_turn))

    @property
    def count(self) -> int:
        return sum(len(images) for images in self.by_turn)

    @property
    def new(self) -> tuple[ImageSource, ...]:
        """The images of the new message."""
        return self.by_turn[-1] if self.by_turn else ()

    def newest(self) -> ImageSource | None:
        return next((images[-1] for images in reversed(self.by_turn) if images), None)

    def loaded(self, turns: int, limits: ImageLimits) -> ConversationImages:
        """Every image checked and decoded by `load_image`, after the count and the shape are checked."""
        if len(self.by_turn) != turns + 1:
            raise BadInput(
                f"The images are given for {len(self.by_turn)} user turns; the conversation has {turns + 1}."
            )
        check_image_count(self.count, limits)
        if not self.count:
            raise BadImage("No image was given; please upload one.")
        return ConversationImages.of([load_image(one, limits) for one in images] for images in self.by_turn)


def check_image_count(count: int, limits: ImageLimits) -> None:
    """Raise BadInput when one request carries more images than `limits.max_images`."""
    if count > limits.max_images:
        raise BadInput(
            f"The conversation has {count} images; the limit is {limits.max_images} images per request "
            "(every image sent so far is read again for each reply). Start a new chat or send fewer."
        )


def describe_limits(limits: ImageLimits) -> str:
    return (
        f"Images up to {_human_bytes(limits.max_bytes)} and {_megapixels(limits.max_pixels)} megapixels; "
        f"larger sides are scaled to {limits.max_side} px."
    )


def load_image(source: ImageSource | None, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Return `source` as a new RGB image no larger than `limits.max_side`; raise BadImage otherwise."""
    if source is None:
        raise BadImage("No image was given; please upload one.")
    data, name = (b"", "") if isinstance(source, Image.Image) else _read_bytes(source, limits)
    try:
        # Image.open parses only the header, so the size is checked before any pixel is decoded.
        img = source if isinstance(source, Image.Image) else Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w * h > limits.max_pixels:
            raise BadImage(_too_many_pixels(w * h, limits.max_pixels, f"{w}×{h} = "))
        target = fit_within(img.size, limits.max_side)
        if target != img.size:
            img.draft(None, (target[0] * 2, target[1] * 2))  # JPEG decodes at 1/2..1/8 scale; no-op elsewhere
        img.load()  # full decode now, so truncation surfaces here rather than later in the model
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # skip exif_transpose's full copy if upright
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except UnidentifiedImageError as e:
        raise BadImage(_not_an_image(data, name)) from e
    except BOMBS as e:
        raise BadImage(_bomb_message(e, limits)) from e
    except DECODE_ERRORS as e:
        raise BadImage("The image data is truncated or corrupt.") from e
    target = fit_within(rgb.size, limits.max_side)
    return rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0) if target != rgb.size else rgb


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Scale `size` down so its longer side is `max_side`, keeping the aspect ratio; never upscale."""
    w, h = size
    if max(w, h) <= max_side:
        return size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto white (plain convert gives black)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit_gray(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        if img.mode == "La":  # premultiplied La converts to RGBA only via LA
            img = img.convert("LA")
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        rgb = Image.new("RGB", img.size, WHITE)
        rgb.paste(rgba, mask=rgba)  # alpha blend; ~10x faster than alpha_composite on 50 MP images
        return rgb
    return img.convert("RGB")


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """Map 16/32-bit and float grayscale onto 0-255; Pillow's convert("L") clips everything above 255."""
    f = img.convert("F")
    lo, hi = f.getextrema()
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        lo, hi = 0.0, 65535.0  # 16-bit PNGs open as "I;16" or, in older Pillow, "I"
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0  # already 8-bit range: keep brightness instead of stretching
    scale = 255 / (hi - lo) if hi > lo else 0.0
    return f.point(lambda v: v * scale + (0.5 - lo * scale)).convert("L")  # +0.5: F->L truncates


def _read_bytes(source: bytes | bytearray | str | os.PathLike, limits: ImageLimits) -> tuple[bytes, str]:
    """Return the upload's bytes and its file name ("" for raw bytes), enforcing `max_bytes` first."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), ""
        size = len(data)
    else:
        path = Path(source)
        name = path.name
        try:
            size = path.stat().st_size  # check before reading, so a huge file is never pulled into memory
            data = path.read_bytes() if 0 < size <= limits.max_bytes else b""
        except FileNotFoundError as e:
            raise BadImage(f"The file {name!r} does not exist (it may have been removed).") from e
        except OSError as e:
            raise BadImage(f"The file {name!r} could not be read ({e.strerror or e}).") from e
    if size == 0:
        raise BadImage("The file is empty (0 bytes).")
    if size > limits.max_bytes:
        raise BadImage(f"The file is {_human_bytes(size)}; the limit is {_human_bytes(limits.max_bytes)}.")
    return data, name


def _not_an_image(data: bytes, name: str) -> str:
    suffix = f"{Path(name).suffix} name, but " if Path(name).suffix else ""
    known = ", ".join(FORMATS)
    content = "text" if _looks_like_text(data[:512]) else f"in none of the supported formats: {known}"
    return f"This file is not an image PIL can read ({suffix}the content is {content})."


def _looks_like_text(head: bytes) -> bool:
    decoded = head.decode("utf-8", errors="replace")
    return "\0" not in decoded and decoded.count("\ufffd") <= 1  # one: the sample may cut a character


def _bomb_message(error: Exception, limits: ImageLimits) -> str:
    # PIL names the sizes only in its text: "Image size (900000000 pixels) exceeds limit of 178956970 pixels"
    numbers = [int(n) for n in re.findall(r"\d+", str(error))]
    return _too_many_pixels(numbers[0] if numbers else None, min([limits.max_pixels, *numbers[1:2]]))


def _too_many_pixels(pixels: int | None, limit: int, dims: str = "") -> str:
    size = f"{dims}{_megapixels(pixels)} megapixels" if pixels else "too many pixels"
    return f"The image is {size}; the limit is {_megapixels(limit)} megapixels."


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}".removesuffix(".0")


def _human_bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"
