"""What every predictor shares, torch-free: decoding, batching, the export folder and the output files.

    Predictor            the base of `common.predict.TorchPredictor` and `common.onnx_predict.OnnxPredictor`:
                         labels, thresholds, input config, decoding and batching; `logits` is the one
                         method a backend implements
    Prediction           one image's probabilities and the findings at/above threshold
    load_image, prepare  an image (path, bytes, array) -> 2-D uint8 -> the model input (`common.preprocess`)
    expand_inputs        files and folders -> image files, and the inputs that are not usable

The export folder (`medimaging export`, read by the ONNX predictor, the app and compression) is
named here once, with the one rule for whether it must be made again (`stale_reason`):

    RUN/export/          EXPORT_DIR: a run's default export folder
      model.onnx         FP32
      model.int8.onnx    INT8
      model.json         ONNX_META: labels, thresholds, input, outputs, Grad-CAM, int8 report, run_dir
      head.npz           HEAD_NPZ: the head's weights for the numpy Grad-CAM
      .ort-optimized/    OPT_CACHE: ONNX Runtime's optimised graphs for this machine

The predictions CSV (`medimaging predict --csv`, a run's test_predictions.csv, what `medimaging
evaluate` reads) is `PREDICTIONS_IMAGE_COLUMN` (the file name) then one probability column per label.

Numpy and Pillow only: the ONNX serving path must never import torch or pandas (the tests check
`sys.modules` in a fresh process).
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from common.images import IMAGE_EXTENSIONS, MAX_PIXELS, UnreadableImage, read_grayscale
from common.io import atomic_write_text
from common.preprocess import resize_gray, to_model_input
from common.runs import BEST, CONFIG

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]

EXPORT_DIR = "export"
FP32 = "model.onnx"
INT8 = "model.int8.onnx"
ONNX_META = "model.json"
HEAD_NPZ = "head.npz"
OPT_CACHE = ".ort-optimized"
EXPORT_LOCK = ".lock"  # held while one process writes the folder

PREDICTIONS_IMAGE_COLUMN = "Image Index"  # NIH's name for the image column, so label files and predictions join


# ------------------------------------------------------------------------------- predictions


@dataclass
class Prediction:
    """One image's result: probabilities in the run's label order and the labels at/above threshold."""

    image: str
    probabilities: dict[str, float]
    positive: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `medimaging predict --json` prints."""
        return {"image": self.image, "probabilities": dict(self.probabilities), "positive": list(self.positive)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float64 inside, so large logits do not overflow)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def positives(probabilities: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Labels whose probability is at or above their threshold, in label order."""
    return [name for name, p in probabilities.items() if p >= thresholds.get(name, 0.5)]


def write_predictions_csv(rows: Iterable[Prediction], labels: Sequence[str], path: str | os.PathLike) -> int:
    """`Image Index` (file name) + one probability column per label: what `medimaging evaluate` reads.

    Written atomically; returns the number of rows.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([PREDICTIONS_IMAGE_COLUMN, *labels])
    n = 0
    for pred in rows:
        writer.writerow([Path(pred.image).name, *(f"{pred.probabilities[label]:.6g}" for label in labels)])
        n += 1
    atomic_write_text(path, buf.getvalue())
    return n


def prediction_json(pred: Prediction) -> str:
    """One JSON line for `predict --json`."""
    return json.dumps(pred.to_dict())


# ------------------------------------------------------------------------------------ images


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, np.ndarray):
        return "<array>"
    return getattr(source, "name", None) or "<in-memory image>"


def _read_jpeg_reduced(source: str | os.PathLike | bytes, size: int) -> np.ndarray | None:
    """A JPEG decoded straight at a reduced scale (libjpeg's DCT scaling), or None if not a JPEG.

    `Image.draft` decodes 1/2, 1/4 or 1/8 of the pixels; we keep at least twice the model's input
    size so the final bilinear (antialiased) resize sees the same detail. Anything unusual returns
    None and the caller takes the exact path, which also reports unreadable files properly.
    """
    from PIL import Image, ImageOps

    try:
        fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
    except OSError:
        return None
    try:
        with fp, Image.open(fp) as im:
            if im.format != "JPEG" or im.size[0] * im.size[1] > MAX_PIXELS or im.mode not in ("L", "RGB", "YCbCr"):
                return None
            im.draft("L", (2 * size, 2 * size))
            im.load()
            im = ImageOps.exif_transpose(im) or im
            gray = np.asarray(im.convert("L") if im.mode != "L" else im, dtype=np.uint8)
    except Exception:  # truncated / odd JPEGs: the exact reader decides and explains
        return None
    return np.ascontiguousarray(gray) if gray.ndim == 2 and gray.size else None


def load_image(source: ImageInput, size: int | None = None, fast_jpeg: bool = False) -> np.ndarray:
    """An image (path, encoded bytes or array) as a 2-D uint8 grayscale array at its own resolution.

    A 2-D uint8 array is used as is; an (H, W, 3|4) uint8 array is converted with Pillow's "L".
    fast_jpeg=True with `size` decodes JPEGs at a reduced scale (>= 2 x size; about 4x faster, pixel
    values within a grey level or two of the exact path). Raises `UnreadableImage`.
    """
    if isinstance(source, np.ndarray):
        if source.ndim == 2 and source.dtype == np.uint8:
            return source
        if source.ndim == 3 and source.shape[2] in (3, 4) and source.dtype == np.uint8:
            from PIL import Image

            return np.asarray(Image.fromarray(source[..., :3]).convert("L"))
        raise UnreadableImage("<array>", f"expected a 2-D uint8 grayscale or (H, W, 3) uint8 array, got "
                                         f"shape {source.shape} dtype {source.dtype}")
    if fast_jpeg and size:
        gray = _read_jpeg_reduced(source, size)
        if gray is not None:
            return gray
    return read_grayscale(source)


def prepare(gray: np.ndarray, input_cfg: dict) -> np.ndarray:
    """A grayscale image → the model input [in_chans, S, S] float32 (common.preprocess, run's config)."""
    small = resize_gray(gray, int(input_cfg["image_size"]))
    return to_model_input(small, input_cfg["mean"], input_cfg["std"], int(input_cfg.get("in_chans", 3)))


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files and folders → (image files in order, [(input, reason)] for inputs that are not usable).

    A folder contributes its image files (by extension, `common.images.IMAGE_EXTENSIONS`),
    recursively, sorted by path. A named file is kept whatever its extension: if it is not an
    image, decoding reports that.
    """
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                missing.append((str(path), f"folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            missing.append((str(path), "file not found"))
    return files, missing


# --------------------------------------------------------------------------------- predictor


class Predictor:
    """What every predictor shares: labels, thresholds, input config, decoding and batching.

    Subclasses implement `logits(batch)`: float32 [B, C, S, S] → [B, L].
    """

    labels: list[str]
    thresholds: dict[str, float]
    input: dict
    synthetic: bool = False
    source: Path
    fast_jpeg: bool = False
    backend: str = "?"

    def logits(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return int(self.input["image_size"])

    def load(self, image: ImageInput) -> np.ndarray:
        """Decode one image to full-resolution grayscale (see `load_image`)."""
        return load_image(image, self.image_size, self.fast_jpeg)

    def prepare(self, gray: np.ndarray) -> np.ndarray:
        return prepare(gray, self.input)

    def predict_proba(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Probabilities [N, L] (run's label order) for images (paths, bytes or arrays).

        Raises `UnreadableImage` for the first image that cannot be decoded; `iter_predict` skips.
        """
        if not len(images):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        batch = np.stack([self.prepare(self.load(im)) for im in images])
        return sigmoid(self.logits(batch)).astype(np.float32)

    def to_prediction(self, name: str, probs: np.ndarray) -> Prediction:
        values = {label: float(p) for label, p in zip(self.labels, probs)}
        return Prediction(name, values, positives(values, self.thresholds))

    def predict(self, image: ImageInput, name: str | None = None) -> Prediction:
        """One image → `Prediction`. Raises `UnreadableImage` if it cannot be decoded."""
        return self.to_prediction(name or _describe(image), self.predict_proba([image])[0])

    def iter_predict(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 16, workers: int = 2, progress: bool = True
    ) -> Iterator[tuple[str, Prediction | None, str | None]]:
        """(path, Prediction, None) or (path, None, reason) per path, in order.

        Decoding runs in a thread pool ahead of the model (Pillow releases the GIL while it
        decodes), so a folder costs about max(decode, model) per image instead of their sum.
        """
        def decode(path):
            try:
                return self.prepare(self.load(path)), None
            except UnreadableImage as err:
                return None, err.reason

        paths = list(paths)
        bar = None
        if progress and len(paths) > 1:
            from tqdm.auto import tqdm  # only when shown: importing it costs ~0.1 s of a cold start

            bar = tqdm(total=len(paths), desc="predict", unit="img")
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="decode") as pool:
            pending: deque[tuple[str, Future]] = deque()
            it = iter(paths)
            for path in it:  # keep up to two batches decoding ahead of the model
                pending.append((str(path), pool.submit(decode, path)))
                if len(pending) >= 2 * batch_size:
                    break
            while pending:
                chunk = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                for path in it:
                    pending.append((str(path), pool.submit(decode, path)))
                    if len(pending) >= 2 * batch_size:
                        break
                decoded = [(path, *fut.result()) for path, fut in chunk]
                good = [x for _, x, _ in decoded if x is not None]
                probs = sigmoid(self.logits(np.stack(good))).astype(np.float32) if good else None
                k = 0
                for path, x, reason in decoded:
                    if x is None:
                        yield path, None, reason
                    else:
                        yield path, self.to_prediction(path, probs[k]), None
                        k += 1
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------- export folder


class OnnxModelError(FileNotFoundError):
    """The export folder is missing or incomplete; the message says which command makes it."""


def is_onnx_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by `medimaging export` (model.json + model.onnx)."""
    path = Path(path)
    return (path / ONNX_META).is_file() and (path / FP32).is_file()


def resolve_export_dir(path: str | os.PathLike) -> Path:
    """An export folder, or a run directory whose `export/` holds one."""
    path = Path(path)
    if (path / ONNX_META).is_file():
        return path
    if (path / EXPORT_DIR / ONNX_META).is_file():
        return path / EXPORT_DIR
    if (path / CONFIG).is_file():
        raise OnnxModelError(
            f"{path}: this run has no ONNX export yet; make one with `medimaging export --run {path}` "
            f"(writes {path / EXPORT_DIR}/{FP32}), or predict with torch (without --onnx)")
    raise OnnxModelError(f"{path}: neither an ONNX export folder ({ONNX_META} + {FP32}) nor a run directory; "
                         "make one with `medimaging train ...` then `medimaging export --run RUN`")


def stale_reason(export_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None, int8: bool = False,
                 recipe: dict | None = None) -> str | None:
    """Why an export folder must be made (again), or None when it can be served as it is.

    The one freshness rule (predict's warning, the app's first-use export, `common.export.ensure_export`):
    a file serving needs is missing (model.onnx, model.json, and model.int8.onnx with int8); the
    run's weights (run_dir, default: the run recorded in model.json) are newer than any of them
    (retrained in place); with int8 and a `recipe`, the int8 model was quantised with another one.
    """
    export_dir = Path(export_dir)
    needed = [export_dir / FP32, export_dir / ONNX_META] + ([export_dir / INT8] if int8 else [])
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        meta = json.loads((export_dir / ONNX_META).read_text())
    except (OSError, ValueError):
        return f"{ONNX_META} unreadable"
    run_dir = run_dir if run_dir is not None else meta.get("run_dir")
    weights = Path(run_dir) / BEST if run_dir else None
    if weights is not None and weights.is_file() and \
            weights.stat().st_mtime > min(p.stat().st_mtime for p in needed):
        return f"older than the run's weights ({weights})"
    if int8 and recipe is not None and (meta.get("int8") or {}).get("recipe") != recipe:
        return "the int8 model was quantised with another recipe"
    return None


def needs_export(path: str | os.PathLike) -> bool:
    """A run directory whose export is missing or stale (`stale_reason`, fp32). An export folder on
    its own has no run to export from: False. Raises `OnnxModelError` for a folder that is neither."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        resolve_export_dir(path)
        return False
    return stale_reason(path / EXPORT_DIR, run_dir=path) is not None
