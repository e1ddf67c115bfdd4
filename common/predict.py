"""Predict findings for X-ray images with a trained run: probabilities + findings above threshold.

    from common.predict import load_predictor
    predictor = load_predictor("runs/all14")             # torch; an export folder or onnx=True: ONNX Runtime
    p = predictor.predict("00000001_000.png")            # Prediction(image, probabilities, positive)
    for image, pred, error in predictor.iter_predict(paths):   # batched, decoded in a thread pool
        ...

The run (config.json, weights, thresholds.json) is loaded once. Preprocessing is exactly
`common.preprocess`: decode to 8-bit grayscale (`common.images.read_grayscale`), `resize_gray` to
the run's input size, `to_model_input` with the run's mean / std / channels. Unreadable files are
reported (`UnreadableImage`) and skipped, never fatal.

This module imports no torch at module level: `common.onnx_predict` builds on the shared part
(`Predictor`, `Prediction`, `load_image`, `expand_inputs`, `write_predictions_csv`), and the
ONNX serving path must never import torch. Only `TorchPredictor` imports it, when built.
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
from common.preprocess import resize_gray, to_model_input

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]

# The export folder's metadata file (common.export writes it; common.onnx_predict reads it).
ONNX_META = "model.json"


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


def positives(probabilities: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Labels whose probability is at or above their threshold, in label order."""
    return [name for name, p in probabilities.items() if p >= thresholds.get(name, 0.5)]


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


class TorchPredictor(Predictor):
    """A run directory's model in PyTorch (eval mode, no gradients)."""

    backend = "torch"

    def __init__(self, run_dir: str | os.PathLike, device: str = "cpu", which: str = "best"):
        from common.runs import load_run

        run = load_run(run_dir, which=which, device=device)
        self.run = run
        self.model = run.model
        self.device = device
        self.source = Path(run_dir)
        self.labels = list(run.labels)
        self.thresholds = dict(run.thresholds)
        self.input = dict(run.config["input"])
        self.synthetic = bool(run.config.get("synthetic", False))
        self.model_name = run.config["model"].get("model_name", "?")

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()


def is_onnx_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by `medimaging export` (model.json + model.onnx)."""
    path = Path(path)
    return (path / ONNX_META).is_file() and (path / "model.onnx").is_file()


def load_predictor(run: str | os.PathLike, onnx: bool = False, int8: bool = False, **kwargs) -> Predictor:
    """A predictor for a run directory (torch) or an export folder (ONNX Runtime).

    onnx=True on a run directory uses its `export/` folder (made by `medimaging export`); int8 picks
    model.int8.onnx. The ONNX branch imports no torch.
    """
    if onnx or int8 or is_onnx_dir(run):
        from common.onnx_predict import OnnxPredictor

        return OnnxPredictor(run, int8=int8, **kwargs)
    return TorchPredictor(run, **kwargs)


def create_untrained_run(
    out: str | os.PathLike,
    model_name: str,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
    head: str = "mlp",
    in_chans: int = 3,
    thresholds: dict[str, float] | None = None,
    synthetic: bool = False,
    seed: int = 0,
) -> Path:
    """A run directory holding a randomly initialised model, written through `common.runs`.

    For timing a backbone before any training (bench/bench_infer.py) and for serving smoke tests:
    config.json ("model", "labels", "input"), best.safetensors and thresholds.json, exactly as
    `common.train.fit` lays them out, but nothing was learnt: its probabilities mean nothing.
    """
    import torch

    from common import runs
    from common.labels import LABELS
    from common.models import build_model, model_input_config

    out = Path(out)
    labels = list(labels or LABELS)
    torch.manual_seed(seed)
    kwargs = {"model_name": model_name, "num_labels": len(labels), "head": head, "in_chans": in_chans,
              "image_size": image_size}
    model = build_model(**kwargs, pretrained=None).eval()  # None: random init is the point here
    kwargs = dict(model.build_kwargs)
    runs.save_weights(model.state_dict(), out / runs.BEST)
    runs.save_json(out / runs.THRESHOLDS, {k: float((thresholds or {}).get(k, 0.5)) for k in labels})
    runs.save_json(out / runs.CONFIG, {
        "model": kwargs, "labels": labels, "input": model_input_config(model, image_size),
        "synthetic": bool(synthetic), "untrained": True, "data": [],
    })
    return out


def write_predictions_csv(rows: Iterable[Prediction], labels: Sequence[str], path: str | os.PathLike) -> int:
    """`Image Index` (file name) + one probability column per label: what `medimaging evaluate` reads.

    Written atomically; returns the number of rows.
    """
    from common.runs import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Image Index", *labels])
    n = 0
    for pred in rows:
        writer.writerow([Path(pred.image).name, *(f"{pred.probabilities[label]:.6g}" for label in labels)])
        n += 1
    atomic_write_text(path, buf.getvalue())
    return n


def prediction_json(pred: Prediction) -> str:
    """One JSON line for `predict --json`."""
    return json.dumps(pred.to_dict())
