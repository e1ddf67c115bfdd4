"""The measuring child: latency, memory and where the time goes, of an export as it is served.

`measure_served` runs `python -m common.compress` (whose `__main__` is `measure_child`) in a fresh
process per measurement: numpy, Pillow and ONNX Runtime only, no torch, so the peak RSS it
reports is the serving process's own. This is why importing `common.compress` must stay light.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.onnx_predict import OnnxPredictor, session_options

CHILD_MARK = "MEDIMAGING-MEASURE "


def measure_served(export_dir: str | os.PathLike, int8: bool, images: Sequence[str | os.PathLike],
                   threads: int = 2, repeats: int = 30, e2e_repeats: int = 20, warmup: int = 5,
                   profile: bool = True, timeout: float = 900) -> dict:
    """Latency and memory of an export as served, in a fresh torch-free process (`measure_child`).

    model_ms: median of `repeats` ONNX Runtime runs on one preprocessed image (batch 1, `threads`
    intra-op threads). e2e_ms: median over `e2e_repeats` predictions from the image file (decode,
    resize, normalise, model). peak_rss_mb: the process's peak resident memory at the end.
    """
    if not images:
        raise ValueError("measure_served: no image to time with")
    spec = {"export_dir": str(export_dir), "int8": bool(int8), "images": [str(p) for p in images],
            "threads": int(threads), "repeats": int(repeats), "e2e_repeats": int(e2e_repeats), "warmup": int(warmup),
            "profile": bool(profile)}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "common.compress", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{export_dir}: measuring {'int8' if int8 else 'fp32'} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1][len(CHILD_MARK):])


def measure_child(spec: dict) -> dict:
    """The child's side of `measure_served`: only numpy, Pillow and ONNX Runtime are imported."""
    started = time.perf_counter()
    predictor = OnnxPredictor(spec["export_dir"], int8=spec["int8"], threads=spec["threads"])
    load_s = time.perf_counter() - started
    images = spec["images"]
    x = predictor.prepare(predictor.load(images[0]))[None].astype(np.float32)
    for _ in range(spec["warmup"]):
        predictor.logits(x)
    model = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        predictor.logits(x)
        model.append(time.perf_counter() - t)
    e2e = []
    for i in range(spec["e2e_repeats"]):
        t = time.perf_counter()
        predictor.predict(images[i % len(images)])
        e2e.append(time.perf_counter() - t)
    peak_mb = _peak_rss_mb()  # before the profiling session below adds its own memory
    shares = time_shares(predictor.model_file, x, threads=spec["threads"]) if spec.get("profile", True) else None
    return {"model_ms": float(np.median(model) * 1e3), "model_ms_min": float(np.min(model) * 1e3),
            "e2e_ms": float(np.median(e2e) * 1e3), "peak_rss_mb": peak_mb, "load_s": load_s,
            "threads": spec["threads"], "torch_imported": "torch" in sys.modules,
            "model_file": predictor.model_file.name, "time_shares": shares}


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    VmHWM (Linux) is reset by exec; getrusage's ru_maxrss is not, so a child started from a big
    parent would report the parent's peak. ru_maxrss is the fallback elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource  # Unix only, and only needed where /proc is missing

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, kB elsewhere


# ONNX Runtime kernel names (after its graph optimisations) by what int8 can do for them.
_CONV_OPS = {"Conv", "FusedConv", "NhwcFusedConv", "QLinearConv", "ConvInteger", "NhwcConv"}
_GEMM_OPS = {"Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulInteger",
             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "Attention"}
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def time_shares(model_file: str | os.PathLike, x: np.ndarray, threads: int = 2, runs_: int = 10) -> dict:
    """Where a model's time goes on ONNX Runtime's CPU kernels (from its profiler), as shares of the total.

    "dense": convolutions and matrix products that int8 kernels accelerate; "depthwise": depthwise /
    grouped k x k convolutions (memory-bound, not accelerated); "qdq": quantise / dequantise steps;
    "other": activations, squeeze-excite products, BatchNorms (which ONNX Runtime may run as 1 x 1
    per-channel convolutions), pooling, concatenation, layout changes. "top": the three most
    expensive op types. Depthwise convolutions are told apart by their weight shape, which int8
    kernels hide (pre-packed), so in an int8 model they count as "dense".
    """
    import onnxruntime as ort  # as in common.onnx_predict: loaded when a session is made

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(runs_):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals = {"dense": 0.0, "depthwise": 0.0, "qdq": 0.0, "other": 0.0}
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args") or {}
        op, dur = str(args.get("op_name", "?")), float(e.get("dur", 0))
        by_op[op] = by_op.get(op, 0.0) + dur
        if op in _CONV_OPS:
            shapes = [next(iter(t.values())) for t in args.get("input_type_shape") or [] if t]
            weight = shapes[1] if len(shapes) > 1 else []
            grouped = len(weight) == 4 and weight[1] == 1 and weight[0] > 1 and op not in ("QLinearConv", "ConvInteger")
            if grouped and weight[2] * weight[3] == 1:
                totals["other"] += dur  # a per-channel scale + shift: a BatchNorm ONNX Runtime runs as a conv
            else:
                totals["depthwise" if grouped else "dense"] += dur
        elif op in _GEMM_OPS:
            totals["dense"] += dur
        elif op in _QDQ_OPS:
            totals["qdq"] += dur
        else:
            totals["other"] += dur
    total = sum(totals.values()) or 1.0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:3]
    return {**{k: v / total for k, v in totals.items()}, "top": [[op, t / total] for op, t in top]}
