"""int8: post-training quantisation of a run into an ONNX export folder (fp32 + int8).

ONNX Runtime static QDQ quantisation with per-channel weights, activation ranges calibrated on
dev-split images (`common.export.INT8_RECIPE`), dynamic quantisation as the fallback:
`common.export` does it; the result is an export folder (`model.onnx`, `model.int8.onnx`,
`model.json`) that `medimaging predict --onnx --int8` and the app serve.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from common import runs
from common.compress.base import log_stderr, write_report
from common.export import export_onnx
from common.serving import EXPORT_DIR, FP32, INT8, ONNX_META


def quantize_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 calibration_images: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
                 n_calibration: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Post-training int8 of a run: an export folder with model.onnx and model.int8.onnx.

    Static QDQ, per-channel weights, calibrated on the run's dev-split images (or the given ones);
    dynamic quantisation when static fails (all in `common.export`). Default out: RUN/export.
    """
    log = log or log_stderr
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    export_onnx(run_dir, out, int8=True, calibration_images=calibration_images, n_calibration=n_calibration, log=log)
    meta = runs.load_json(out / ONNX_META)
    fp32_mb, int8_mb = (out / FP32).stat().st_size / 1e6, (out / INT8).stat().st_size / 1e6
    report = {"method": "int8", "source": str(run_dir.resolve()), "quantization": meta.get("int8"),
              "fp32_mb": round(fp32_mb, 3), "int8_mb": round(int8_mb, 3), "size_ratio": round(fp32_mb / int8_mb, 2),
              "serve": f"medimaging predict IMAGE --run {out} --onnx --int8"}
    log(f"int8: {out / INT8}: {int8_mb:.2f} MB vs {fp32_mb:.2f} MB fp32 ({report['size_ratio']}x smaller)")
    write_report(out, report)
    return out
