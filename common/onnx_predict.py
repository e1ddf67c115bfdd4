"""Torch-free serving: an exported run (`medimaging export`) answered by ONNX Runtime.

    from common.onnx_predict import OnnxPredictor
    predictor = OnnxPredictor("runs/all14/export")       # or the run dir: its export/ is used
    predictor.predict("image.png").positive
    cam, prob = predictor.gradcam(gray_image, "Cardiomegaly")   # CNNs: Grad-CAM without torch

Only numpy, Pillow and onnxruntime (plus `common.serving`, the torch-free predictor base and
the export folder's layout). Nothing on this path may import torch, pandas or matplotlib: `medimaging
predict --onnx` must start in well under a second and stay small in memory (the tests check
`'torch' not in sys.modules` in a fresh process).

Grad-CAM without torch: for a CNN whose head sits on globally average-pooled features, the
exported graph also outputs the last feature map A [C, h, w]; the head (Linear / LeakyReLU / ReLU
layers, weights in head.npz) is differentiated here in numpy, so d logit / d A = (d logit / d
pooled) / (h * w) and the Grad-CAM is exact, not an approximation. Other models (ViTs, ConvNeXt's
pooled LayerNorm, ...) say `cam_method == "torch"` and the caller uses `common.explain`.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from common.serving import (EXPORT_DIR, FP32, HEAD_NPZ, INT8, ONNX_META, OPT_CACHE, OnnxModelError, Predictor,
                            resolve_export_dir, sigmoid, stale_reason)

__all__ = [
    "OnnxPredictor", "open_session", "session_options", "cam_from_features",
    # the export folder's layout, named in common.serving; importable from here as before
    "EXPORT_DIR", "FP32", "HEAD_NPZ", "INT8", "ONNX_META", "OPT_CACHE", "OnnxModelError", "resolve_export_dir",
]


def session_options(threads: int | None = None):
    """ONNX Runtime options for a small CPU (2 cores): all graph optimisations, one inter-op thread.

    intra-op threads default to the CPU count (2 here): one image's convolutions are split across
    the cores. Spinning is off: a waiting worker thread would otherwise burn a core that the
    decode thread (or the app's web server) needs on a 2-core machine, for ~no latency gain.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # warnings about unused initialisers etc. are noise for users
    return so


def _machine_key(model_file: Path) -> str:
    """What an optimised model depends on: ONNX Runtime, this CPU's features, the source model."""
    import hashlib
    import platform

    import onnxruntime as ort

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    st = model_file.stat()
    text = "|".join([ort.__version__, platform.machine(), flags, model_file.name, str(st.st_size), str(st.st_mtime_ns)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_session(model_file: str | os.PathLike, threads: int | None = None, cache: bool = True):
    """An ONNX Runtime session; (session, path of the optimised model used or written, or None).

    With cache=True the fully optimised graph (ORT_ENABLE_ALL: fusions and this CPU's blocked
    layouts) is saved once under `.ort-optimized/` beside the model, keyed by ONNX Runtime version,
    CPU features and the model file, and later loads skip the optimisation passes (~80 ms of the
    ~0.4 s cold start for EfficientNet-B0). Such a graph is only valid on the same kind of machine,
    hence the key; a read-only folder or an unreadable cache falls back to the plain model.
    """
    import onnxruntime as ort

    model_file = Path(model_file)
    providers = ["CPUExecutionProvider"]
    cached = None
    if cache and model_file.stat().st_size < 1_500_000_000:  # beyond that ORT needs external data files
        cached = model_file.parent / OPT_CACHE / f"{model_file.stem}.{_machine_key(model_file)}.onnx"
        if cached.is_file():
            so = session_options(threads)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # already done offline
            try:
                return ort.InferenceSession(str(cached), so, providers=providers), cached
            except Exception:  # a damaged cache file: rebuild it below
                cached.unlink(missing_ok=True)
    so = session_options(threads)
    tmp = None
    if cached is not None:
        try:
            cached.parent.mkdir(exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            so.optimized_model_filepath = str(tmp)
        except OSError:  # read-only export folder: no cache
            tmp = None
    try:
        session = ort.InferenceSession(str(model_file), so, providers=providers)
    except Exception:
        if tmp is None:
            raise
        # writing the optimised copy failed (a full disk): serve the model without the cache
        Path(tmp).unlink(missing_ok=True)
        tmp = None
        session = ort.InferenceSession(str(model_file), session_options(threads), providers=providers)
    if tmp is not None:
        try:
            os.replace(tmp, cached)  # atomic: concurrent first loads each write their own temp file
            return session, cached
        except OSError:
            Path(tmp).unlink(missing_ok=True)
    return session, None


_REEXPORT = "make the export again with `medimaging export --run RUN`"


def _read_meta(meta_path: Path) -> dict:
    """model.json, checked for what serving needs; OnnxModelError naming the file otherwise."""
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OnnxModelError(f"{meta_path}: not valid JSON ({err}); {_REEXPORT}") from None
    if not isinstance(meta, dict):
        raise OnnxModelError(f"{meta_path}: not an export description (a JSON object); {_REEXPORT}")
    for key in ("labels", "input", "thresholds", "outputs"):
        if key not in meta:
            raise OnnxModelError(f"{meta_path}: missing key {key!r}; {_REEXPORT}")
    labels, inp = meta["labels"], meta["input"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise OnnxModelError(f"{meta_path}: 'labels' must be a non-empty list of names; {_REEXPORT}")
    if not isinstance(inp, dict) or not isinstance(inp.get("image_size"), int) or \
            not all(isinstance(inp.get(k), list) for k in ("mean", "std")):
        raise OnnxModelError(f"{meta_path}: 'input' must give image_size, mean and std; {_REEXPORT}")
    if not isinstance(meta["thresholds"], dict) or not isinstance(meta["outputs"], dict):
        raise OnnxModelError(f"{meta_path}: 'thresholds' and 'outputs' must be objects; {_REEXPORT}")
    return meta


class OnnxPredictor(Predictor):
    """An export folder (or a run dir with export/) served by ONNX Runtime: no torch."""

    backend = "onnx"

    def __init__(self, path: str | os.PathLike, int8: bool = False, threads: int | None = None,
                 fast_jpeg: bool = True, cache: bool = True):
        self.source = resolve_export_dir(path)
        meta = _read_meta(self.source / ONNX_META)
        self.meta = meta
        self.labels = list(meta["labels"])
        self.thresholds = {k: float(meta["thresholds"].get(k, 0.5)) for k in self.labels}
        self.input = dict(meta["input"])
        self.synthetic = bool(meta.get("synthetic", False))
        self.model_name = meta.get("model", {}).get("model_name", "?")
        self.fast_jpeg = fast_jpeg
        self.int8 = bool(int8)
        model_file = self.source / (INT8 if int8 else FP32)
        if not model_file.is_file():
            hint = " --int8" if int8 else ""
            raise OnnxModelError(f"{model_file}: not found; run `medimaging export --run RUN{hint}`"
                                 + (f" (run: {meta.get('run_dir')})" if meta.get("run_dir") else ""))
        self.model_file = model_file
        try:
            self.session, self.optimized_file = open_session(model_file, threads, cache=cache)
        except Exception as err:  # onnxruntime's InvalidProtobuf, Fail, ...: a truncated or damaged file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise OnnxModelError(f"{model_file}: not a loadable ONNX model ({first}); the file is damaged or "
                                 f"incomplete: {_REEXPORT}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_shapes()
        self._head: _NumpyHead | None = None

    @functools.cached_property
    def stale(self) -> bool:
        """Whether the export is older than its run's weights (`common.serving.stale_reason`): read
        when asked (predict's warning), not at every load."""
        return stale_reason(self.source, int8=self.int8) is not None

    def _check_shapes(self) -> None:
        """model.json must describe this graph: its labels one per logit, its input size and channels."""
        meta_path = self.source / ONNX_META
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        logits = self.meta["outputs"].get("logits")
        if logits not in outputs:
            raise OnnxModelError(f"{meta_path} names the output {logits!r}, which {self.model_file.name} does not "
                                 f"have (it has {sorted(outputs)}): {_REEXPORT}")
        n = outputs[logits][-1] if outputs[logits] else None
        if isinstance(n, int) and n != len(self.labels):
            raise OnnxModelError(f"{meta_path} lists {len(self.labels)} labels but {self.model_file.name} outputs "
                                 f"{n} logits: the folder mixes files of two exports; {_REEXPORT}")
        shape = self.session.get_inputs()[0].shape
        want = [int(self.input.get("in_chans", 3)), int(self.input["image_size"]), int(self.input["image_size"])]
        got = list(shape[1:]) if len(shape) == 4 else shape
        if len(shape) != 4 or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise OnnxModelError(f"{meta_path} describes inputs [batch, {', '.join(map(str, want))}] but "
                                 f"{self.model_file.name} takes {shape}: {_REEXPORT}")

    # -- prediction
    def logits(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self.meta["outputs"]["logits"]], {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return out[0]

    # -- Grad-CAM without torch
    @property
    def cam_method(self) -> str:
        """'numpy' when this export supports torch-free Grad-CAM, else 'torch' (see common.explain)."""
        cam = self.meta.get("cam") or {}
        return "numpy" if cam.get("method") == "numpy" and "features" in self.output_names else "torch"

    @property
    def cam_note(self) -> str:
        return (self.meta.get("cam") or {}).get("reason", "")

    def _numpy_head(self) -> _NumpyHead:
        if self._head is None:
            self._head = _NumpyHead(self.meta["cam"]["layers"], self.source / self.meta["cam"].get("head", HEAD_NPZ))
        return self._head

    def gradcam(self, image, label: str) -> tuple[np.ndarray, float]:
        """Grad-CAM [h, w] (ReLU'd, unnormalised) for `label` and its probability, without torch.

        `image`: a path, bytes or array (decoded like `predict`). Exact for global-average-pooled
        CNN heads; raises ValueError when `cam_method != "numpy"` (use common.explain then).
        """
        if self.cam_method != "numpy":
            raise ValueError(f"{self.source}: this model ({self.model_name}) has no torch-free Grad-CAM "
                             f"({self.cam_note or 'not exported'}); use common.explain (torch)")
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not an output of this model; choose one of {self.labels}")
        k = self.labels.index(label)
        x = self.prepare(self.load(image))[None]
        logits, feats = self.session.run([self.meta["outputs"]["logits"], "features"], {self.input_name: x})
        cam, _ = cam_from_features(feats[0], self._numpy_head(), k)
        return cam, float(sigmoid(logits[0, k]))


class _NumpyHead:
    """The classification head as numpy layers, with forward and the gradient of one logit."""

    def __init__(self, layers: list[dict], weights: Path):
        if not weights.is_file():
            raise OnnxModelError(f"{weights}: head weights for Grad-CAM not found; re-run `medimaging export`")
        try:
            with np.load(weights) as npz:  # allow_pickle=False: an object array is refused, never run
                self.arrays = {k: npz[k].astype(np.float64) for k in npz.files}
        except Exception as err:  # truncated zip, pickled arrays, ...
            raise OnnxModelError(f"{weights}: head weights for Grad-CAM cannot be read ({err}); "
                                 "re-run `medimaging export`") from None
        self.layers = layers
        for layer in layers:
            if layer["op"] not in ("linear", "relu", "leaky_relu", "identity"):
                raise OnnxModelError(f"{weights}: unsupported head layer {layer['op']!r}")

    def forward(self, pooled: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """pooled [C] → (logits [L], the input of each layer)."""
        z = np.asarray(pooled, dtype=np.float64)
        inputs = []
        for layer in self.layers:
            inputs.append(z)
            op = layer["op"]
            if op == "linear":
                z = self.arrays[layer["weight"]] @ z
                if layer.get("bias"):
                    z = z + self.arrays[layer["bias"]]
            elif op == "relu":
                z = np.maximum(z, 0.0)
            elif op == "leaky_relu":
                z = np.where(z > 0, z, z * float(layer["negative_slope"]))
        return z, inputs

    def grad(self, pooled: np.ndarray, k: int) -> tuple[np.ndarray, float]:
        """(d logit_k / d pooled [C], logit_k): backpropagation through the layers."""
        logits, inputs = self.forward(pooled)
        g = np.zeros_like(logits)
        g[k] = 1.0
        for layer, z in zip(reversed(self.layers), reversed(inputs)):
            op = layer["op"]
            if op == "linear":
                g = self.arrays[layer["weight"]].T @ g
            elif op == "relu":
                g = g * (z > 0)
            elif op == "leaky_relu":
                g = g * np.where(z > 0, 1.0, float(layer["negative_slope"]))  # torch's rule at 0
        return g, float(logits[k])


def cam_from_features(features: np.ndarray, head: _NumpyHead, k: int) -> tuple[np.ndarray, float]:
    """Grad-CAM of output k from a feature map [C, h, w] under global average pooling.

    alpha_c = mean_ij d y / d A_cij = (d y / d pooled_c) / (h w);  cam = ReLU(sum_c alpha_c A_c).
    Returns (cam [h, w] float32, logit_k).
    """
    a = np.asarray(features, dtype=np.float64)
    c, h, w = a.shape
    g, logit = head.grad(a.mean(axis=(1, 2)), k)
    alpha = g / (h * w)
    cam = np.maximum(np.tensordot(alpha, a, axes=(0, 0)), 0.0)
    return cam.astype(np.float32), logit
