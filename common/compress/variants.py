"""The rows of a compression table: which export each row serves and what it is compared with.

`variants_for` makes the rows of trained runs (each backbone fp32 and int8, each pruned run, each
student); `random_init_variants` makes untrained runs of a list of models, at one input size, to
show size and speed ratios that do not depend on training.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import runs
from common.compress.base import COMPRESSION_JSON, log_stderr, read_report, write_report
from common.compress.distill import DEFAULT_STUDENT
from common.compress.prune import prune_model, sparsity_report
from common.export import export_onnx
from common.predict import create_untrained_run
from common.serving import EXPORT_DIR


@dataclass
class Variant:
    """One row of the table: a model as it is served (an export folder, fp32 or int8)."""

    name: str  # row label, e.g. "resnet50 int8"
    run_dir: Path  # the run the export was made from (parameters, MACs, test split)
    int8: bool = False
    method: str = "fp32"  # "fp32" | "int8" | "prune" | "distill"
    backbone: str = ""
    detail: str = ""  # e.g. "50% unstructured", "T=2, alpha=0.5, 160 px"
    baseline: str | None = None  # the row this one is compared with (size x, speed x, AUROC change)

    @property
    def export_dir(self) -> Path:
        return Path(self.run_dir) / EXPORT_DIR


def variants_for(backbone_runs: dict[str, str | os.PathLike], pruned_runs: Sequence[str | os.PathLike] = (),
                 student_runs: Sequence[str | os.PathLike] = (), int8: bool = True) -> list[Variant]:
    """The table's rows: each backbone fp32 (+ int8), each pruned run, each student (fp32 + int8).

    A pruned or distilled run is compared with the fp32 row of the run it came from (its
    compression.json "source"); that run must be one of `backbone_runs`.
    """
    variants: list[Variant] = []
    fp32_row = {}
    model_of = {}
    for name, run in backbone_runs.items():
        model = runs.read_config(run)["model"]["model_name"]
        variants.append(Variant(f"{name} fp32", Path(run), False, "fp32", model))
        fp32_row[str(Path(run).resolve())] = f"{name} fp32"
        model_of[f"{name} fp32"] = model
        if int8:
            variants.append(Variant(f"{name} int8", Path(run), True, "int8", model, baseline=f"{name} fp32"))

    def baseline_of(run: Path, report: dict) -> str | None:
        src = report.get("source")
        if src and str(Path(src).resolve()) in fp32_row:
            return fp32_row[str(Path(src).resolve())]
        raise ValueError(f"{run}: its source run {src} is not one of the backbone runs {list(backbone_runs)}")

    for run in map(Path, pruned_runs):
        rep = read_report(run) or {}
        if rep.get("method") != "prune":
            raise ValueError(f"{run}: not a pruned run ({COMPRESSION_JSON} missing or method != 'prune')")
        base = baseline_of(run, rep)
        kind = f"channels L{rep['norm']}" if rep["structured"] else f"unstructured {rep['scope']}"
        detail = f"{rep['sparsity']:.0%} {kind}"
        variants.append(Variant(f"{base.rsplit(' ', 1)[0]} pruned {detail}", run, False, "prune", model_of[base],
                                detail, base))
    for run in map(Path, student_runs):
        rep = read_report(run) or {}
        if rep.get("method") != "distill":
            raise ValueError(f"{run}: not a distilled run ({COMPRESSION_JSON} missing or method != 'distill')")
        base = baseline_of(run, rep)
        detail = f"from {rep['teacher']}, {rep['student_image_size']} px, T={rep['temperature']:g}, alpha={rep['alpha']:g}"
        variants.append(Variant(f"{rep['student']} student fp32", run, False, "distill", rep["student"], detail, base))
        if int8:
            variants.append(Variant(f"{rep['student']} student int8", run, True, "distill", rep["student"], detail,
                                    base))
    return variants


def random_init_variants(work_dir: str | os.PathLike, models: Sequence[str], image_size: int = 224,
                         student: str | None = DEFAULT_STUDENT, student_image_size: int = 160,
                         calibration_images: Sequence[str | os.PathLike] = (), prune_model_name: str | None = "resnet50",
                         log: Callable[[str], None] | None = None) -> list[Variant]:
    """Untrained runs of each model (fp32 + int8), a pruned copy of one, and a small student, exported.

    What size and speed ratios look like at a given input size, independent of training: the
    weights are random (`common.predict.create_untrained_run`), int8 is calibrated on
    `calibration_images`. The pruned copies (50% unstructured, 30% of channels, no fine-tune) show
    what zeros alone do to speed. Student rows are compared with the efficientnet_b0 row when there
    is one, else with the first model.
    """
    log = log or log_stderr
    work = Path(work_dir)
    calib = [str(p) for p in calibration_images]
    if not calib:
        raise ValueError("random_init_variants: int8 needs calibration images (e.g. a few real X-ray PNGs)")
    variants: list[Variant] = []
    for name in models:
        run = create_untrained_run(work / name, name, image_size=image_size)
        export_onnx(run, run / EXPORT_DIR, int8=True, calibration_images=calib, log=log)
        variants += [Variant(f"{name} fp32", run, False, "fp32", name, "random init"),
                     Variant(f"{name} int8", run, True, "int8", name, "random init", f"{name} fp32")]
    if prune_model_name and prune_model_name in models:
        for sparsity, structured in ((0.5, False), (0.3, True)):
            kind = "channels" if structured else "unstructured"
            out = work / f"{prune_model_name}-prune-{kind}"
            src = runs.load_run(work / prune_model_name)
            masks = prune_model(src.model, sparsity, structured=structured, scope="layer" if structured else "global")
            runs.save_weights(src.model.state_dict(), out / runs.BEST)
            runs.save_json(out / runs.CONFIG, runs.read_config(work / prune_model_name))
            write_report(out, {"method": "prune", "source": str(work / prune_model_name), "sparsity": sparsity,
                                "structured": structured, "scope": "layer" if structured else "global", "norm": 1,
                                "safetensors": sparsity_report(src.model.state_dict(), masks)})
            export_onnx(out, out / EXPORT_DIR, log=log)
            variants.append(Variant(f"{prune_model_name} pruned {sparsity:.0%} {kind}", out, False, "prune",
                                    prune_model_name, f"{sparsity:.0%} {kind}, no fine-tune", f"{prune_model_name} fp32"))
    if student:
        base = "efficientnet_b0 fp32" if "efficientnet_b0" in models else variants[0].name
        run = create_untrained_run(work / f"student-{student}", student, image_size=student_image_size)
        export_onnx(run, run / EXPORT_DIR, int8=True, calibration_images=calib, log=log)
        detail = f"{student_image_size} px, random init (a student's size and speed)"
        variants += [Variant(f"{student} @{student_image_size} fp32", run, False, "distill", student, detail, base),
                     Variant(f"{student} @{student_image_size} int8", run, True, "distill", student, detail, base)]
    return variants
