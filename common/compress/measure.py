"""Measuring a compression table: each row's size, parameters and MACs, its test AUROC as served,
its latency and memory (in a fresh process, `common.compress.timing`), and its ratios against the
row it is compared with.

The table (`measure_table`): ONNX file size (and zipped, where pruning's zeros pay off), parameters,
conv/linear MACs and their depthwise share, model-only latency (batch 1, 2 threads), end-to-end
latency (image decode + preprocessing + model), peak RSS, mean AUROC and mean accuracy on the
run's stored test split, ratios against the row's baseline, and a plain note on where any speed
comes from (`common.compress.table.speed_source`).
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common import runs
from common.compress.base import log_stderr, read_report
from common.compress.table import speed_source
from common.compress.timing import measure_served
from common.compress.variants import Variant
from common.export import ensure_export
from common.metrics import evaluate_predictions
from common.onnx_predict import OnnxPredictor
from common.serving import FP32, INT8
from common.splits import run_split


@dataclass
class SplitImages:
    """A run's split as image paths and labels (1 / 0 / NaN), in the run's label order."""

    paths: list[str]
    y: np.ndarray
    labels: list[str]
    synthetic: bool


def split_images(run_dir: str | os.PathLike, split: str = "test", data: Sequence[str] | None = None) -> SplitImages:
    """The images of a run's `split` ("train" / "dev" / "test") as `fit` stored it (`common.splits`);
    `data`: the run's data folders, when they moved."""
    cfg = runs.read_config(run_dir)
    labels = list(cfg["labels"])
    frame = run_split(run_dir, data)
    chosen = frame.loc[frame["split"] == split]
    return SplitImages(chosen["path"].astype(str).tolist(), chosen[labels].to_numpy(np.float32), labels,
                       bool(cfg.get("synthetic")))


def count_macs(model, input_cfg: dict) -> dict:
    """Multiply-accumulates of one image through the conv and linear layers (batch 1).

    Returns {"gmacs", "depthwise_gmacs", "depthwise_share"}. Depthwise / grouped convolutions are
    counted apart: int8 kernels speed up dense convolutions and GEMMs, not those. Attention's
    matrix products (ViTs) are not counted; for CNNs this is all of the arithmetic that matters.
    """
    totals = {"all": 0, "grouped": 0}

    def conv_hook(module, _inp, out):
        macs = out.numel() * (module.in_channels // module.groups) * int(np.prod(module.kernel_size))
        totals["all"] += macs
        if module.groups > 1:
            totals["grouped"] += macs

    def linear_hook(module, _inp, out):
        totals["all"] += out.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    size, chans = int(input_cfg["image_size"]), int(input_cfg.get("in_chans", 3))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, chans, size, size))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    total = totals["all"]
    return {"gmacs": total / 1e9, "depthwise_gmacs": totals["grouped"] / 1e9,
            "depthwise_share": totals["grouped"] / total if total else 0.0}


def model_stats(run_dir: str | os.PathLike) -> dict:
    """Parameters (all and non-zero), MACs and input size of a run's best weights."""
    run = runs.load_run(run_dir)
    params = [p.detach() for p in run.model.parameters()]
    total = sum(int(p.numel()) for p in params)
    nonzero = sum(int(p.count_nonzero()) for p in params)
    return {"params": total, "nonzero_params": nonzero, "image_size": int(run.input["image_size"]),
            "model_name": run.config["model"]["model_name"], **count_macs(run.model, run.input)}


def file_stats(path: str | os.PathLike) -> dict:
    """Size on disk and zlib-compressed size (MB): zeros from pruning only pay off compressed."""
    data = Path(path).read_bytes()
    return {"file_mb": len(data) / 1e6, "zipped_mb": len(zlib.compress(data, 6)) / 1e6}


def score_served(export_dir: str | os.PathLike, int8: bool, split: SplitImages, threads: int = 2,
                 progress: bool = True) -> dict:
    """Mean AUROC and mean accuracy (at 0.5, the study's metric) of an export on a split's images."""
    predictor = OnnxPredictor(export_dir, int8=int8, threads=threads)
    if list(predictor.labels) != list(split.labels):
        raise ValueError(f"{export_dir}: outputs {predictor.labels} differ from the split's labels {split.labels}")
    probs, keep = [], []
    for i, (_, pred, _reason) in enumerate(predictor.iter_predict(split.paths, batch_size=16, progress=progress)):
        if pred is not None:
            probs.append([pred.probabilities[name] for name in split.labels])
            keep.append(i)
    if not keep:
        return {"mean_auroc": None, "mean_accuracy": None, "n_images": 0}
    result = evaluate_predictions(split.y[keep], np.asarray(probs), split.labels, thresholds=predictor.thresholds,
                                  n_boot=0)
    return {"mean_auroc": result["mean_auroc"], "mean_accuracy": result["mean_accuracy"], "n_images": len(keep)}


def measure_table(
    variants: Sequence[Variant],
    timing_images: Sequence[str | os.PathLike] | None = None,
    threads: int = 2,
    repeats: int = 30,
    e2e_repeats: int = 20,
    rounds: int = 1,
    score: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measure every variant; one dict per row, ratios against each row's `baseline` row.

    timing_images: PNGs for the end-to-end latency (default: the first run's test images).
    rounds > 1 times the whole table again (row after row, each in a fresh process) and keeps each
    row's fastest median: the least disturbed by other work on a shared machine. score=False
    skips AUROC (random-init benchmarks).
    """
    log = log or log_stderr
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique: {names}")
    rows, timing = _static_rows(variants, timing_images, threads, e2e_repeats, score, progress, log)
    _time_rows(rows, variants, timing, threads, repeats, e2e_repeats, rounds, progress, log)
    _compare_rows(rows)
    return rows


def _static_rows(variants: Sequence[Variant], timing_images, threads: int, e2e_repeats: int, score: bool,
                 progress: bool, log: Callable[[str], None]) -> tuple[list[dict], list[list]]:
    """Each row's export, sizes, parameters, MACs and (score) test AUROC; and the images to time it on."""
    stats_cache: dict[str, dict] = {}
    split_cache: dict[str, SplitImages] = {}
    rows, timing = [], []
    for v in tqdm(variants, desc="export + score", unit="model", disable=not progress):
        run_key = str(Path(v.run_dir).resolve())
        if run_key not in stats_cache:
            stats_cache[run_key] = model_stats(v.run_dir)
        stats = stats_cache[run_key]
        # one export per run, with int8 when any row of that run needs it
        ensure_export(v.run_dir, int8=any(w.int8 for w in variants if Path(w.run_dir) == Path(v.run_dir)), log=log)
        report = read_report(v.run_dir) or {}
        row = {"name": v.name, "backbone": v.backbone or stats["model_name"], "method": v.method, "detail": v.detail,
               "int8": v.int8, "baseline": v.baseline, "structured": bool(report.get("structured", False)),
               **{k: stats[k] for k in ("params", "nonzero_params", "gmacs", "depthwise_share", "image_size")},
               **file_stats(v.export_dir / (INT8 if v.int8 else FP32))}
        if score:
            if run_key not in split_cache:
                split_cache[run_key] = split_images(v.run_dir, "test")
            split = split_cache[run_key]
            row.update(score_served(v.export_dir, v.int8, split, threads=threads, progress=False))
            row["synthetic"] = split.synthetic
            timing.append(list(timing_images or split.paths[:max(e2e_repeats, 1)]))
        else:
            row.update(mean_auroc=None, mean_accuracy=None, n_images=0)
            row["synthetic"] = bool(runs.read_config(v.run_dir).get("synthetic", False))
            timing.append(list(timing_images or []))
        rows.append(row)
    return rows, timing


def _time_rows(rows: list[dict], variants: Sequence[Variant], timing: list[list], threads: int, repeats: int,
               e2e_repeats: int, rounds: int, progress: bool, log: Callable[[str], None]) -> None:
    """Latency and peak memory of each row, as served.

    Whole-table rounds, each row in a fresh process per round, so a burst of other work on a
    shared machine hits different rows in different rounds; each row keeps its fastest round. The
    kernel-time profile is taken in the first round only (it costs extra runs).
    """
    got: list[list[dict]] = [[] for _ in rows]
    total = max(1, rounds) * len(rows)
    with tqdm(total=total, desc="time", unit="model", disable=not progress) as bar:
        for i in range(max(1, rounds)):
            for k, v in enumerate(variants):
                got[k].append(measure_served(v.export_dir, v.int8, timing[k], threads=threads, repeats=repeats,
                                             e2e_repeats=e2e_repeats, profile=i == 0))
                bar.update(1)
    for row, ms in zip(rows, got):
        row.update(model_ms=min(m["model_ms"] for m in ms), model_ms_min=min(m["model_ms_min"] for m in ms),
                   e2e_ms=min(m["e2e_ms"] for m in ms), peak_rss_mb=max(m["peak_rss_mb"] for m in ms),
                   torch_imported=any(m["torch_imported"] for m in ms), time_shares=ms[0]["time_shares"])
        log(f"measure: {row['name']}: {row['file_mb']:.2f} MB, {row['model_ms']:.1f} ms model, {row['e2e_ms']:.1f} ms "
            f"end-to-end, {row['peak_rss_mb']:.0f} MB peak RSS"
            + (f", mean AUROC {row['mean_auroc']:.4f}" if row.get("mean_auroc") is not None else ""))


def _compare_rows(rows: list[dict]) -> None:
    """Each row's ratios and AUROC change against its baseline row, and where its speed comes from."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        if r["baseline"] and base is None:
            raise ValueError(f"row {r['name']!r}: baseline {r['baseline']!r} is not a row of the table")
        r["size_x"] = base["file_mb"] / r["file_mb"] if base else None
        r["zipped_size_x"] = base["zipped_mb"] / r["zipped_mb"] if base else None
        r["speed_x"] = base["model_ms"] / r["model_ms"] if base else None
        r["e2e_speed_x"] = base["e2e_ms"] / r["e2e_ms"] if base else None
        r["d_auroc"] = (r["mean_auroc"] - base["mean_auroc"]) if base and None not in (
            r.get("mean_auroc"), base.get("mean_auroc")) else None
        r["speed_from"] = speed_source(r, base)
