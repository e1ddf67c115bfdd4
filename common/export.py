"""Export a run to ONNX for torch-free serving (`medimaging export`), optionally int8-quantised.

    from common.export import export_onnx
    out = export_onnx("runs/all14")                    # runs/all14/export/{model.onnx, model.json}
    out = export_onnx("runs/all14", int8=True)         # + model.int8.onnx, calibrated on dev images

The folder holds everything serving needs, so `common.onnx_predict` never opens the run:

    model.onnx        input "image" float32 [batch, C, S, S] (dynamic batch) -> "logits" [batch, L];
                      CNNs with a global-average-pooled head also output "features" [batch, C', h, w]
    model.int8.onnx   (--int8) static QDQ quantisation, per-channel weights, activations calibrated
                      (INT8_RECIPE) on the run's dev split (or given images); dynamic
                      quantisation when static fails
    model.json        labels, thresholds, preprocessing ("input"), outputs, Grad-CAM method, parity
                      measured at export, the int8 report and recipe, versions, whether the run's
                      data was synthetic
    head.npz          the head's weights, for Grad-CAM in numpy (CNNs only)
    .ort-optimized/   ONNX Runtime's optimised graphs for this machine (a cache: onnx_predict.open_session)
    .lock             held while one process writes the folder

The file names are `common.serving`'s (the folder's layout, with its one freshness rule). The fp32
graph is checked against torch at export time (logits within 1e-4, else ExportError).
`export_model` does the same for a model in memory (pruned or distilled); `quantize_int8` quantises
any exported model; `ensure_export` exports a run only when its export is missing or stale.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import runs
from common.cache import file_lock
from common.images import UnreadableImage
from common.io import atomic_write_bytes, commit_staged, discard_staged, full_disk_hint, save_json, staged_path
from common.onnx_predict import _NumpyHead, open_session, session_options
from common.serving import (EXPORT_DIR, EXPORT_LOCK, FP32, HEAD_NPZ, INT8, ONNX_META, OPT_CACHE, expand_inputs,
                            load_image, prepare, sigmoid, stale_reason)
from common.splits import split_paths

FORMAT = "medimaging-onnx"
FORMAT_VERSION = 1
PARITY_ATOL = 1e-4  # fp32 ONNX logits vs torch: the bound


class ExportError(RuntimeError):
    """Export or quantisation could not produce a faithful model; the message says why and what to do."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------- Grad-CAM


def head_layers(head) -> tuple[list[dict], dict[str, np.ndarray]] | None:
    """The head as numpy layers ([{"op": ...}], weights) or None if it has a layer numpy cannot run.

    Supported: Linear, ReLU, LeakyReLU; Dropout and Identity are no-ops in eval mode.
    """
    from torch import nn

    layers: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    leaves = [m for m in head.modules() if not list(m.children())]
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Linear):
            w, b = f"layer{i}_weight", (f"layer{i}_bias" if m.bias is not None else None)
            arrays[w] = m.weight.detach().cpu().numpy().astype(np.float32)
            if b:
                arrays[b] = m.bias.detach().cpu().numpy().astype(np.float32)
            layers.append({"op": "linear", "weight": w, "bias": b})
        elif isinstance(m, nn.LeakyReLU):
            layers.append({"op": "leaky_relu", "negative_slope": float(m.negative_slope)})
        elif isinstance(m, nn.ReLU):
            layers.append({"op": "relu"})
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            layers.append({"op": "identity"})
        else:
            return None
    return layers, arrays


def cam_support(model, input_cfg: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Can Grad-CAM of this model run in numpy from the exported feature map? ({"method", ...}, weights).

    Yes when forward_features gives [B, C, h, w], the pooled features feeding the head are exactly
    their spatial mean (timm's avg pool, no norm after it), and the head is Linear/activation layers.
    """
    import torch

    size, chans = int(input_cfg["image_size"]), int(input_cfg.get("in_chans", 3))
    x = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.forward_features(x)
        if feats.ndim != 4:
            return {"method": "torch", "reason": f"features are tokens {tuple(feats.shape)}, not a [C, h, w] map"}, {}
        pooled = model.backbone.forward_head(feats, pre_logits=True)
        mean = feats.mean(dim=(2, 3))
        if pooled.shape != mean.shape or not torch.allclose(pooled, mean, rtol=1e-4, atol=1e-5):
            return {"method": "torch", "reason": "the head is not on plain global-average-pooled features"}, {}
        spec = head_layers(model.head)
        if spec is None:
            return {"method": "torch", "reason": "the head has layers other than Linear/ReLU/LeakyReLU/Dropout"}, {}
        layers, arrays = spec
        logits = model.head(pooled).numpy()
    with tempfile.TemporaryDirectory() as tmp:  # check the numpy head reproduces torch's
        np.savez(Path(tmp) / HEAD_NPZ, **arrays)
        head = _NumpyHead(layers, Path(tmp) / HEAD_NPZ)
        diff = max(float(np.abs(head.forward(p)[0] - lg).max()) for p, lg in zip(mean.numpy(), logits))
    if diff > PARITY_ATOL:
        return {"method": "torch", "reason": f"numpy head differs from torch by {diff:.2g}"}, {}
    return {"method": "numpy", "head": HEAD_NPZ, "layers": layers, "feature_shape": list(feats.shape[1:])}, arrays


# ----------------------------------------------------------------------------------------- export


def _graph_module(model, with_features: bool):
    import torch

    class OnnxGraph(torch.nn.Module):
        """image -> logits (+ the last feature map for Grad-CAM)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, image):
            feats = self.model.forward_features(image)
            logits = self.model.forward_from_features(feats)
            return (logits, feats) if with_features else logits

    return OnnxGraph().eval()


def _torch_export(module, example, path: Path, outputs: list[str], opset: int | None,
                  log: Callable[[str], None]) -> str:
    """torch.onnx.export with the dynamo exporter; the TorchScript one if dynamo fails. Returns which."""
    import torch

    chatter = io.StringIO()  # the dynamo exporter prints its progress to stdout
    try:
        with contextlib.redirect_stdout(chatter), _quiet_export_warnings():
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, input_names=["image"], output_names=outputs,
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=opset, verbose=False)
            program.save(str(path))
        return "dynamo"
    except OSError:  # the disk, not the model: no other exporter can help
        raise
    except Exception as err:  # an architecture torch.export cannot trace: the older exporter often can
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log(f"export: the dynamo exporter failed ({type(err).__name__}: {first[:200]}); "
            "trying the TorchScript exporter")
    dyn = {name: {0: "batch"} for name in ["image", *outputs]}
    try:
        with contextlib.redirect_stdout(chatter), _quiet_export_warnings():
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["image"],
                              output_names=outputs, dynamic_axes=dyn, opset_version=opset or 17)
    except Exception as err:
        raise ExportError(f"{path}: neither ONNX exporter could export this model "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    return "torchscript"


@contextlib.contextmanager
def _quiet_export_warnings():
    """Scoped: the exporters warn about tracing details (TracerWarning, deprecations) users cannot act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            from torch.jit import TracerWarning

            warnings.simplefilter("ignore", category=TracerWarning)
        except ImportError:  # pragma: no cover
            pass
        yield


def _check_images(input_cfg: dict, n: int = 3, seed: int = 0) -> np.ndarray:
    """n deterministic grey test images through the real preprocessing: [n, C, S, S]."""
    rng = np.random.default_rng(seed)
    size = int(input_cfg["image_size"])
    # smooth random images (blurred noise): closer to radiographs than white noise
    base = rng.integers(0, 256, size=(n, max(4, size // 8), max(4, size // 8)), dtype=np.uint8)
    return np.stack([prepare(b, input_cfg) for b in base])


def _onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def _export_checked(model, out: Path, input_cfg: dict, with_features: bool, opset: int | None,
                    log: Callable[[str], None]) -> tuple[str, float, int]:
    """Stage out/model.onnx (`common.io.staged_path`) only if its logits match torch's within PARITY_ATOL:
    (exporter, max diff, images)."""
    import onnxruntime as ort
    import torch

    outputs = ["logits", "features"] if with_features else ["logits"]
    example = torch.from_numpy(_check_images(input_cfg, n=2, seed=1))
    fd, tmp_name = tempfile.mkstemp(prefix=".model.", suffix=".onnx", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        exporter = _torch_export(_graph_module(model, with_features), example, tmp, outputs, opset, log)
        # parity on a batch size other than the example's: also proves the batch axis is dynamic
        x = _check_images(input_cfg, n=3)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        sess = ort.InferenceSession(str(tmp), session_options(), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"image": x})[0]
        diff = float(np.abs(got - ref).max())
        if not np.isfinite(diff) or diff > PARITY_ATOL:
            name = getattr(model, "build_kwargs", {}).get("model_name", "this model")
            raise ExportError(
                f"{out / FP32}: ONNX logits differ from torch by {diff:.3g} (> {PARITY_ATOL}); the export is "
                f"not faithful for {name} with the {exporter} "
                "exporter. Try another --opset, or report the model name.")
        os.replace(tmp, staged_path(out / FP32))
    finally:
        tmp.unlink(missing_ok=True)
    return exporter, diff, int(len(x))


def _export_meta(labels: list[str], thresholds: dict[str, float] | None, input_cfg: dict, cam: dict,
                 exporter: str, opset: int, diff: float, n_checked: int, meta: dict | None) -> dict:
    """model.json's content (before the int8 report): everything serving needs besides the graph."""
    import onnxruntime as ort
    import torch

    with_features = cam["method"] == "numpy"
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "labels": labels,
        "thresholds": {k: float((thresholds or {}).get(k, 0.5)) for k in labels},
        "input": {"image_size": int(input_cfg["image_size"]), "mean": list(input_cfg["mean"]),
                  "std": list(input_cfg["std"]), "in_chans": int(input_cfg.get("in_chans", 3))},
        "input_name": "image",
        "outputs": {"logits": "logits", **({"features": "features"} if with_features else {})},
        "cam": cam,
        "exporter": exporter, "opset": opset,
        "parity": {"max_abs_logit_diff": diff, "atol": PARITY_ATOL, "n_images": n_checked},
        "int8": None,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(meta or {}),
    }


def export_model(
    model,
    out_dir: str | os.PathLike,
    input_cfg: dict,
    labels: Sequence[str],
    thresholds: dict[str, float] | None = None,
    meta: dict | None = None,
    int8: bool = False,
    calibration_images: Sequence[str | os.PathLike] | None = None,
    opset: int | None = None,
    n_calibration: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export a MedImagingModel (in memory) to out_dir; see the module docstring for the files.

    meta: extra entries for model.json (run_dir, model kwargs, synthetic). Raises ExportError when
    the ONNX logits differ from torch by more than 1e-4.
    """
    log = log or _stderr
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if int8 and not calibration_images:
        raise ExportError(f"{out}: --int8 needs calibration images (dev-split images of the run's data, "
                          "or a folder: --calibration DIR)")
    model = model.cpu().eval()
    cam, head_arrays = cam_support(model, input_cfg)
    with_features = cam["method"] == "numpy"
    # files are staged, then renamed into place: a failure leaves the previous export whole; one exporter at a time
    with file_lock(out / EXPORT_LOCK):
        try:
            exporter, diff, n_checked = _export_checked(model, out, input_cfg, with_features, opset, log)
            if with_features:  # head.npz: the head's weights for the numpy Grad-CAM
                buf = io.BytesIO()
                np.savez(buf, **head_arrays)
                atomic_write_bytes(staged_path(out / HEAD_NPZ), buf.getvalue())
            opset = _onnx_opset(staged_path(out / FP32))
            info = _export_meta(list(labels), thresholds, input_cfg, cam, exporter, opset, diff, n_checked, meta)
            if int8:
                info["int8"] = {**quantize_int8(staged_path(out / FP32), staged_path(out / INT8), calibration_images,
                                                info["input"], n_calibration=n_calibration, log=log), "file": INT8}
            save_json(staged_path(out / ONNX_META), info)
        except BaseException as err:
            discard_staged(out, [FP32, INT8, HEAD_NPZ, ONNX_META])
            if isinstance(err, OSError):  # a full disk above all
                raise ExportError(f"{out}: cannot write the export ({os.strerror(err.errno) if err.errno else err}); "
                                  f"the previous export there, if any, is unchanged.{full_disk_hint(err)}") from err
            raise
        written = [FP32] + ([HEAD_NPZ] if with_features else []) + ([INT8] if int8 else [])
        commit_staged(out, written + [ONNX_META], remove=[n for n in (HEAD_NPZ, INT8) if n not in written])
    log(f"export: {out / FP32} ({exporter} exporter, opset {opset}); "
        f"max |logit difference| vs torch {diff:.2g} (bound {PARITY_ATOL})")
    # optimised graphs cached for the old files are stale now; make this machine's once, here
    shutil.rmtree(out / OPT_CACHE, ignore_errors=True)
    for name in (FP32, INT8) if int8 else (FP32,):
        open_session(out / name)
    return out


# ------------------------------------------------------------------------------------ quantisation


def _calibration_batches(paths: Sequence[str | os.PathLike], input_cfg: dict, n: int,
                         log: Callable[[str], None]) -> list[np.ndarray]:
    batches, skipped = [], 0
    for p in paths:
        if len(batches) >= n:
            break
        try:
            batches.append(prepare(load_image(p), input_cfg)[None])
        except UnreadableImage:
            skipped += 1
    if skipped:
        log(f"int8: {skipped} unreadable calibration image(s) skipped")
    return batches


# The int8 recipe, recorded in model.json's int8 report (the app shows it). Bump `version` with any
# change: `ensure_export` re-quantises exports whose recorded recipe differs. Measured on the
# synthetic default (quick): Percentile / moving-average ranges, more images, fp32 depthwise / stem /
# head nodes or Conv-only quantisation did not make int8 EfficientNet-B0 / MobileNetV3 follow their
# fp32 ranking any better (the AUROC changes they gave were noise); 16-bit activations did, but ran
# 3-4x slower than fp32, ResNet included.
INT8_RECIPE = {
    "version": 1,
    "format": "QDQ",
    "weights": "QInt8 per-channel",
    "activations": "QUInt8",  # QUInt8 | QInt8 | QUInt16 (onnxruntime QuantType)
    "calibration": "MinMax",  # MinMax | Percentile | Entropy (onnxruntime CalibrationMethod)
    "percentile": None,  # Percentile only: the share of each activation's |values| its range covers
    "moving_average": False,  # MinMax only: ranges averaged over images instead of the extremes
    "calibration_images": 64,  # default count; the report's n_calibration says how many were used
    "op_types": None,  # None: every op ONNX Runtime can quantise
    # nodes kept fp32: "stem" (the first conv), "head" (all after global pooling), "depthwise" (grouped convs)
    "exclude": [],
}
CALIBRATION_CHUNK = 16  # images per calibration pass: bounds the memory of the collected activations


def _excluded_nodes(model_path: Path, parts: Sequence[str]) -> list[str]:
    """Names of the nodes that `parts` ("stem", "head", "depthwise") of a recipe keep in fp32."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    names: list[str] = []
    if "depthwise" in parts:
        names += [n.name for n in graph.node if n.op_type == "Conv"
                  and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    if "stem" in parts:
        inputs = {i.name for i in graph.input}
        names += [n.name for n in graph.node if n.op_type == "Conv" and n.input[0] in inputs][:1]
    if "head" in parts:
        pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool")]
        if pools:
            # every node downstream of the last global pooling, up to the logits
            consumers: dict[str, list] = {}
            for n in graph.node:
                for i in n.input:
                    consumers.setdefault(i, []).append(n)
            seen, todo = set(), list(pools[-1].output)
            while todo:
                for n in consumers.get(todo.pop(), []):
                    if n.name not in seen:
                        seen.add(n.name)
                        names.append(n.name)
                        todo += list(n.output)
            names.append(pools[-1].name)
    return names


def _int8_recipe(recipe: dict | None) -> dict:
    """INT8_RECIPE updated by `recipe`; ValueError for an unknown key or setting."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    unknown = set(recipe or {}) - set(INT8_RECIPE)
    if unknown:
        raise ValueError(f"quantize_int8: unknown recipe keys {sorted(unknown)}; known: {sorted(INT8_RECIPE)}")
    recipe = {**INT8_RECIPE, **(recipe or {})}
    bad = [f"{k}={recipe[k]!r}" for k, ok in (
        ("activations", hasattr(QuantType, str(recipe["activations"]))),
        ("calibration", hasattr(CalibrationMethod, str(recipe["calibration"]))),
        ("exclude", set(recipe["exclude"]) <= {"stem", "head", "depthwise"})) if not ok]
    if bad:
        raise ValueError(f"quantize_int8: unknown recipe settings {', '.join(bad)}")
    return recipe


def _calibration_reader(batches: list[np.ndarray]):
    """ONNX Runtime's calibration data reader over the batches, read in chunks (see CALIBRATION_CHUNK)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def __len__(self):
            return len(batches)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(batches[start_index:end_index])

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x}

    return Reader()


def _pre_processed(fp32_path: Path, work: Path, log: Callable[[str], None]) -> Path:
    """Shape inference + basic fusions first, as ONNX Runtime recommends; the raw model if that fails."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = work / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        return pre
    except Exception as err:  # symbolic shape inference fails on some graphs; quantise the raw one
        log(f"int8: pre-processing skipped ({type(err).__name__}: {str(err)[:120]})")
        return fp32_path


def _quantize(source: Path, target: Path, batches: list[np.ndarray], recipe: dict, out_path: Path,
              log: Callable[[str], None]) -> tuple[str, str | None, list[str]]:
    """Static QDQ quantisation of source into target; dynamic when static fails: (method, static error, excluded)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    # onnxruntime collects every activation of a pass in memory; chunks must divide the count
    chunk = max(d for d in range(1, min(CALIBRATION_CHUNK, len(batches)) + 1) if len(batches) % d == 0)
    excluded: list[str] = []
    try:
        excluded = _excluded_nodes(source, recipe["exclude"])
        extra = {"CalibTensorRangeSymmetric": False, "CalibStridedMinMax": chunk}
        if recipe["calibration"] == "Percentile" and recipe["percentile"]:
            extra["CalibPercentile"] = float(recipe["percentile"])
        if recipe["calibration"] == "MinMax" and recipe["moving_average"]:
            extra["CalibMovingAverage"] = True
        quantize_static(str(source), str(target), _calibration_reader(batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=getattr(QuantType, recipe["activations"]),
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, recipe["calibration"]),
                        op_types_to_quantize=recipe["op_types"], nodes_to_exclude=excluded, extra_options=extra)
        ort.InferenceSession(str(target), session_options(), providers=["CPUExecutionProvider"])
        return "static-qdq", None, excluded
    except Exception as err:
        error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        log(f"int8: static quantisation failed ({error}); falling back to dynamic quantisation")
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as err2:
        raise ExportError(f"{out_path}: int8 quantisation failed (static: {error}; dynamic: "
                          f"{type(err2).__name__}: {err2})") from err2
    return "dynamic", error, []


def _int8_report(fp32_path: Path, out_path: Path, batches: list[np.ndarray], method: str, error: str | None,
                 recipe: dict, excluded: list[str]) -> dict:
    """How the int8 model was made and how close its probabilities are to fp32's on the calibration images."""
    import onnxruntime as ort

    s32 = ort.InferenceSession(str(fp32_path), session_options(), providers=["CPUExecutionProvider"])
    s8 = ort.InferenceSession(str(out_path), session_options(), providers=["CPUExecutionProvider"])
    x = np.concatenate(batches[:16])
    diff = np.abs(sigmoid(s8.run(["logits"], {"image": x})[0]) - sigmoid(s32.run(["logits"], {"image": x})[0]))
    return {"file": out_path.name, "method": method, "recipe": recipe, "excluded_nodes": excluded,
            "n_calibration": len(batches), "max_abs_prob_diff_vs_fp32": float(diff.max()),
            "mean_abs_prob_diff_vs_fp32": float(diff.mean()), "n_compared": int(len(x)), "static_error": error,
            "size_mb": round(out_path.stat().st_size / 1e6, 2), "fp32_size_mb": round(fp32_path.stat().st_size / 1e6, 2)}


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_images: Sequence[str | os.PathLike],
    input_cfg: dict,
    n_calibration: int | None = None,
    log: Callable[[str], None] | None = None,
    recipe: dict | None = None,
) -> dict:
    """Quantise an ONNX model to int8 with `recipe` (INT8_RECIPE, updated by the given keys).

    Static QDQ, per-channel weights, activations calibrated on up to n_calibration images (default:
    the recipe's). Falls back to dynamic quantisation (weights only) when static quantisation fails
    for an architecture. Returns a JSON-able report: method, recipe, images used, agreement with fp32.
    """
    log = log or _stderr
    recipe = _int8_recipe(recipe)
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    n_calibration = int(n_calibration or recipe["calibration_images"])
    batches = _calibration_batches(calibration_images, input_cfg, n_calibration, log)
    if not batches:
        raise ExportError(f"{out_path}: no readable calibration image among {len(calibration_images)} given")
    fd, tmp_name = tempfile.mkstemp(prefix=".model.int8.", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tempfile.TemporaryDirectory() as work:
            source = _pre_processed(fp32_path, Path(work), log)
            method, error, excluded = _quantize(source, tmp, batches, recipe, out_path, log)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    report = _int8_report(fp32_path, out_path, batches, method, error, recipe, excluded)
    log(f"int8: {out_path} ({method}, {len(batches)} calibration images): probabilities within "
        f"{report['max_abs_prob_diff_vs_fp32']:.3f} of fp32 (mean {report['mean_abs_prob_diff_vs_fp32']:.4f}); "
        f"{report['size_mb']} MB vs {report['fp32_size_mb']} MB")
    return report


def calibration_paths(run_dir: str | os.PathLike, n: int | None = None, seed: int = 0) -> list[str]:
    """Up to n image paths (default: the int8 recipe's calibration_images) from the run's dev split
    (`common.splits.split_paths`: the split `fit` stored, or recomputed for an older run), shuffled.

    Raises ExportError when the split cannot be read (the run's data folders are gone) or is empty.
    """
    try:
        dev = [str(p) for p in split_paths(run_dir, "dev")]
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(f"{run_dir}: cannot find the run's data for int8 calibration ({err}); "
                          "pass images with --calibration DIR") from None
    if not dev:
        raise ExportError(f"{run_dir}: the run's dev split is empty; pass images with --calibration DIR")
    rng = np.random.default_rng(seed)
    return [dev[i] for i in rng.permutation(len(dev))[:int(n or INT8_RECIPE["calibration_images"])]]


def export_onnx(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    int8: bool = False,
    calibration_images: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    opset: int | None = None,
    n_calibration: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export a run directory to ONNX (default out: RUN/export/); returns the export folder.

    int8: also write model.int8.onnx, calibrated on `calibration_images` (paths or a folder) or,
    when None, on dev-split images of the run's data.
    """
    log = log or _stderr
    run_dir = Path(run_dir)
    run = runs.load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    calib: list[str] | None = None
    if int8:
        if calibration_images is None:
            calib = calibration_paths(run_dir, n=n_calibration)
            log(f"int8: calibrating on {len(calib)} dev-split images of the run's data")
        else:
            items = [calibration_images] if isinstance(calibration_images, (str, os.PathLike)) else calibration_images
            files, bad = expand_inputs(items)
            for path, reason in bad:
                log(f"int8: {path}: {reason}")
            calib = [str(f) for f in files]
    meta = {"run_dir": str(run_dir.resolve()), "model": run.config["model"],
            "synthetic": bool(run.config.get("synthetic", False)),
            "untrained": bool(run.config.get("untrained", False)),
            "task": (run.config.get("train") or {}).get("task")}
    return export_model(run.model, out, run.config["input"], run.labels, run.thresholds, meta=meta, int8=int8,
                        calibration_images=calib, opset=opset, n_calibration=n_calibration, log=log)


def ensure_export(run_dir: str | os.PathLike, int8: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """RUN/export, exported (with model.int8.onnx when int8) only when `common.serving.stale_reason`
    says so: a file missing, older than the run's weights, or int8 quantised with another recipe
    than INT8_RECIPE. Otherwise the folder is reused as it is."""
    log = log or _stderr
    run_dir = Path(run_dir)
    out = run_dir / EXPORT_DIR
    reason = stale_reason(out, run_dir=run_dir, int8=int8, recipe=INT8_RECIPE if int8 else None)
    if reason is not None:
        log(f"export: {out}: {reason}; exporting")
        export_onnx(run_dir, out, int8=int8, log=log)
    return out
