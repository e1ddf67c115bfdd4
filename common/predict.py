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

This module owns the torch backend (`TorchPredictor`) and `load_predictor`, which picks it or
`common.onnx_predict.OnnxPredictor`; both build on the torch-free `common.serving.Predictor`, whose
names (`Prediction`, `load_image`, `expand_inputs`, `write_predictions_csv`, ...) are importable
from here as before. No torch at module level: `load_predictor(..., onnx=True)` never imports it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common import runs
from common.onnx_predict import OnnxPredictor
from common.serving import (ONNX_META, ImageInput, Prediction, Predictor, expand_inputs, is_onnx_dir, load_image,
                            positives, prediction_json, prepare, sigmoid, write_predictions_csv)

__all__ = [
    "TorchPredictor", "load_predictor", "create_untrained_run",
    # common.serving's names, imported from here by the CLI, explain, train, the tests and notebooks
    "ONNX_META", "ImageInput", "Prediction", "Predictor", "expand_inputs", "is_onnx_dir", "load_image",
    "positives", "prediction_json", "prepare", "sigmoid", "write_predictions_csv",
]


class TorchPredictor(Predictor):
    """A run directory's model in PyTorch (eval mode, no gradients)."""

    backend = "torch"

    def __init__(self, run_dir: str | os.PathLike, device: str = "cpu", which: str = "best"):
        run = runs.load_run(run_dir, which=which, device=device)
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


def load_predictor(run: str | os.PathLike, onnx: bool = False, int8: bool = False, **kwargs) -> Predictor:
    """A predictor for a run directory (torch) or an export folder (ONNX Runtime).

    onnx=True on a run directory uses its `export/` folder (made by `medimaging export`); int8 picks
    model.int8.onnx. The ONNX branch imports no torch.
    """
    if onnx or int8 or is_onnx_dir(run):
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
    import torch  # heavy: only for making a run, never for serving one

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
