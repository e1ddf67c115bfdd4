"""Read any chest X-ray file into one 2-D uint8 grayscale array, or say exactly why not.

Numpy and Pillow only (no torch): the cache's worker processes, the app and the ONNX path use it.

Handled: 8-bit and 16-bit grayscale, 1-bit, RGB, RGBA / LA (composited over black, the X-ray
background), palette (with or without transparency), JPEG (EXIF orientation applied), 32-bit
integer / float images. Anything that cannot be decoded raises `UnreadableImage(path, reason)`;
callers skip the file and report it, they never stop on it.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images above this many pixels before decoding them: NIH images are 1024x1024 (1 MP) and
# the largest chest radiographs are ~4300x4300 (18 MP); a PNG header can claim 100,000x100,000 in a
# few hundred bytes and decoding it would exhaust memory (a "decompression bomb").
MAX_PIXELS = 50_000_000

ImageSource = Union[str, os.PathLike, bytes, BinaryIO]


class UnreadableImage(Exception):
    """A file that is not a readable image: `.path` names it, `.reason` says why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across process pools with both arguments
        return (type(self), (self.path, self.reason))


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or "<in-memory image>"


def _open(source: ImageSource, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and check the declared size before any pixel is decoded."""
    where = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            st = os.stat(source)
        except FileNotFoundError:
            raise UnreadableImage(where, "file not found") from None
        except OSError as err:
            raise UnreadableImage(where, f"cannot access file: {err.strerror or err}") from None
        if not os.path.isfile(source):
            raise UnreadableImage(where, "not a regular file")
        if st.st_size == 0:
            raise UnreadableImage(where, "empty file (0 bytes)")
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as err:
            raise UnreadableImage(where, f"cannot read file: {err.strerror or err}") from None
        fp: BinaryIO = io.BytesIO(data)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnreadableImage(where, "empty file (0 bytes)")
        fp = io.BytesIO(bytes(source))
    else:
        fp = source
    try:
        # Pillow warns (and above 2x its limit raises) on huge headers; our own, lower limit below
        # turns both into a refusal, so the warning is recorded here rather than shown.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as err:
        raise UnreadableImage(where, f"image too large, refused as a decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise UnreadableImage(where, "not an image (format not recognised)") from None
    except Exception as err:  # a malformed header raises many types (SyntaxError, ValueError, ...)
        raise UnreadableImage(where, f"corrupt image header: {err}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise UnreadableImage(where, f"invalid image dimensions {w}x{h}")
    if w * h > max_pixels:
        raise UnreadableImage(
            where,
            f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit "
            "(refused as a possible decompression bomb)",
        )
    return im


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map a high-bit-depth image to 0..255 by its own range (16-bit X-rays rarely use all 16 bits)."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        # a constant image: keep its level if it fits in 8 bits, else mid-grey
        return np.full(a.shape, int(lo) if 0 <= lo <= 255 else 128, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_gray(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I, F
        return _scale_to_uint8(np.asarray(im))
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        la = np.asarray(im.convert("LA"), dtype=np.uint16)
        # composite over black, the background of a radiograph; opaque pixels are unchanged
        return ((la[..., 0] * la[..., 1] + 127) // 255).astype(np.uint8)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    return np.asarray(im.convert("L"), dtype=np.uint8)


def read_grayscale(source: ImageSource, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file (path, bytes or binary file object) to a 2-D uint8 grayscale array.

    Raises `UnreadableImage` (with `.path` and `.reason`) for a missing, empty, corrupt, truncated
    or non-image file, and for one whose header declares more than `max_pixels` pixels.
    """
    where = _describe(source)
    im = _open(source, max_pixels)
    try:
        with im:
            im.load()  # decode now, so truncation surfaces here with a clear reason
            if im.format in ("JPEG", "MPO", "TIFF", "WEBP"):
                transposed = ImageOps.exif_transpose(im)
                if transposed is not None:
                    im = transposed
            gray = _to_gray(im)
    except UnreadableImage:
        raise
    except Exception as err:
        text = str(err) or type(err).__name__
        kind = "truncated image data" if "truncat" in text.lower() else "corrupt image data"
        raise UnreadableImage(where, f"{kind}: {text}") from None
    if gray.ndim != 2 or gray.size == 0:
        raise UnreadableImage(where, f"unexpected decoded shape {gray.shape}")
    return np.ascontiguousarray(gray)


def read_resized(path: str, size: int) -> tuple[bytes | None, str | None]:
    """Decode + resize for the image cache's worker processes: (pixels, None) or (None, reason)."""
    from common.preprocess import resize_gray

    try:
        return resize_gray(read_grayscale(path), size).tobytes(), None
    except UnreadableImage as err:
        return None, err.reason
    except Exception as err:  # never let one file kill a worker pool; report it instead
        return None, f"unexpected error while decoding: {type(err).__name__}: {err}"


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})
