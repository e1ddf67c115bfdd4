"""Read any chest X-ray file into one 2-D uint8 grayscale array, or say exactly why not.

Numpy and Pillow only (no torch; pydicom only for DICOM; OpenCV, when installed, for the 8-bit
grayscale PNGs NIH ships, the same pixels ~15-20% faster): the cache's worker processes, the app
and the ONNX path use it.

Handled: 8-bit and 16-bit grayscale, 1-bit, RGB, RGBA / LA (composited over black, the X-ray
background), palette (with or without transparency), JPEG (EXIF orientation applied), 32-bit
integer / float images, and DICOM when pydicom is installed (`read_dicom`: its LUTs applied,
MONOCHROME1 inverted; without pydicom a DICOM file is unreadable, with the reason). Anything that
cannot be decoded raises `UnreadableImage(path, reason)`; callers skip the file and report it,
they never stop on it.
"""
from __future__ import annotations

import importlib.util
import io
import os
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.preprocess import resize_gray

# Refuse images above this many pixels before decoding them: NIH images are 1024x1024 (1 MP) and
# the largest chest radiographs are ~4300x4300 (18 MP); a PNG header can claim 100,000x100,000 in a
# few hundred bytes and decoding it would exhaust memory (a "decompression bomb").
MAX_PIXELS = 50_000_000

# A file with one of these names is read as DICOM (`read_dicom`), whatever its first bytes.
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
# The image files a folder contributes (datasets: `common.data.index_images`; `medimaging predict DIR`):
# DICOM too, so a folder of .dcm files is indexed like one of PNGs.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"}) | DICOM_EXTENSIONS
DICOM_PREAMBLE = 128  # a DICOM file: 128 bytes of preamble, then "DICM"

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


def _read_bytes(source: ImageSource, where: str) -> bytes:
    """The encoded file: read from a path (with the reason when it cannot be), bytes, or a file object."""
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
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        data = source.read()
    if len(data) == 0:
        raise UnreadableImage(where, "empty file (0 bytes)")
    return data


def _open(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and check the declared size before any pixel is decoded."""
    try:
        # Pillow warns (and above 2x its limit raises) on huge headers; our own, lower limit below
        # turns both into a refusal, so the warning is recorded here rather than shown.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise UnreadableImage(where, f"image too large, refused as a decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise UnreadableImage(where, "not an image (format not recognised)") from None
    except Exception as err:  # a malformed header raises many types (SyntaxError, ValueError, ...)
        raise UnreadableImage(where, f"corrupt image header: {err}") from None
    _check_size(im.size[0], im.size[1], where, max_pixels)
    return im


def _check_size(w: int, h: int, where: str, max_pixels: int) -> None:
    if w <= 0 or h <= 0:
        raise UnreadableImage(where, f"invalid image dimensions {w}x{h}")
    if w * h > max_pixels:
        raise UnreadableImage(
            where,
            f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP limit "
            "(refused as a possible decompression bomb)",
        )


# ------------------------------------------------------------------------------------- DICOM


def dicom_available() -> bool:
    """True when pydicom is installed, so DICOM files can be read (`pip install pydicom`)."""
    return importlib.util.find_spec("pydicom") is not None


def is_dicom(data: bytes, name: str = "") -> bool:
    """A DICOM file: the "DICM" marker after its 128-byte preamble, or a .dcm / .dicom name."""
    return data[DICOM_PREAMBLE:DICOM_PREAMBLE + 4] == b"DICM" or Path(name).suffix.lower() in DICOM_EXTENSIONS


def read_dicom(data: bytes, where: str = "<in-memory image>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A DICOM file → 2-D uint8: modality and VOI LUTs applied, MONOCHROME1 inverted (so bone is
    white, as in the PNGs), 8- to 16-bit values scaled by their own range; the first frame of a
    multi-frame file. Raises `UnreadableImage`, also when pydicom is not installed."""
    if not dicom_available():
        raise UnreadableImage(where, "DICOM files need pydicom (pip install pydicom); or convert it to PNG")
    import pydicom  # optional, and only DICOM needs it
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as err:
        raise UnreadableImage(where, f"not a readable DICOM file ({err})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableImage(where, "DICOM file without an image (no Pixel Data element: a report, a "
                                     "structured document or a header-only file)")
    _check_size(int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0), where, max_pixels)
    try:
        arr = ds.pixel_array
        if arr.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
            arr = arr[0]  # multi-frame: the first frame
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    except Exception as err:
        raise UnreadableImage(where, f"DICOM pixel data cannot be decoded ({err}); it may need a codec plugin") from None
    if arr.ndim == 3:
        arr = arr.mean(axis=2)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() - arr
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise UnreadableImage(where, "DICOM image is blank (constant pixel values)")
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# ------------------------------------------------------------------------------- other images


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_cv2 = None  # OpenCV, imported on first use (None: not tried yet, False: not installed)


def _opencv():
    global _cv2
    if _cv2 is None:
        try:
            import cv2

            _cv2 = cv2
        except ImportError:
            _cv2 = False
    return _cv2


def _png_intact(data: bytes) -> bool:
    """Every chunk complete with a matching CRC-32, up to IEND: a truncated or damaged file goes to
    Pillow, which names the problem, instead of libpng, which would also print to stderr (~0.2 ms a
    megabyte)."""
    view, pos, end = memoryview(data), 8, len(data)
    while pos + 12 <= end:
        length = int.from_bytes(view[pos:pos + 4], "big")
        stop = pos + 8 + length
        if stop + 4 > end or zlib.crc32(view[pos + 4:stop]) != int.from_bytes(view[stop:stop + 4], "big"):
            return False
        if view[pos + 4:pos + 8] == b"eXIf":  # an orientation to apply: Pillow's path does that
            return False
        if view[pos + 4:pos + 8] == b"IEND":
            return True
        pos = stop + 4
    return False


def _read_gray_png(data: bytes, max_pixels: int) -> np.ndarray | None:
    """An 8-bit grayscale PNG (NIH's kind) decoded by OpenCV when it is installed, else None.

    OpenCV's libpng decodes such a file ~15-20% faster than Pillow, to the same pixels (a lossless
    format, nothing to interpret: no palette, alpha or 16-bit; a file with an EXIF chunk goes to Pillow). Only that case, read from the
    IHDR chunk; anything else, or anything OpenCV does not decode to exactly the declared shape
    (truncated, corrupt, a transparency key), returns None and Pillow decides, with its reasons.
    Installing OpenCV is optional (opencv-python-headless); without it every file takes Pillow.
    """
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[24] != 8 or data[25] != 0 or not 0 < w * h <= max_pixels:  # bit depth 8, colour type 0 (gray)
        return None
    cv2 = _opencv()
    if not cv2 or not _png_intact(data):
        return None
    try:
        gray = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception:  # cv2.error
        return None
    if gray is None or gray.dtype != np.uint8 or gray.shape != (h, w):
        return None
    return gray


def read_grayscale(source: ImageSource, max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode an image file (path, bytes or binary file object) to a 2-D uint8 grayscale array.

    DICOM files (by their marker or a .dcm / .dicom name) go through `read_dicom` (needs pydicom).
    name: what errors call the source (default: its path, or the file object's name). Raises
    `UnreadableImage` (with `.path` and `.reason`) for a missing, empty, corrupt, truncated or
    non-image file, and for one whose header declares more than `max_pixels` pixels.
    """
    where = name or _describe(source)
    data = _read_bytes(source, where)
    if is_dicom(data, where):
        return read_dicom(data, where, max_pixels)
    gray = _read_gray_png(data, max_pixels)
    if gray is not None:
        return gray
    im = _open(data, where, max_pixels)
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
    try:
        return resize_gray(read_grayscale(path), size).tobytes(), None
    except UnreadableImage as err:
        return None, err.reason
    except Exception as err:  # never let one file kill a worker pool; report it instead
        return None, f"unexpected error while decoding: {type(err).__name__}: {err}"

