"""The compression experiment (notebooks/compression.ipynb): one trade-off table of the study's
backbones, their int8 versions, a pruned and a distilled teacher, measured by `common.compress`.

The backbones are trained (or reused from the run cache) exactly as the backbone ablation trains
them: all 14 labels, the profile's recipe (`common.experiments.stages.stage2_run`). Each is
exported fp32 and int8; the teacher is pruned at each level and distilled into a student. Pruned
and distilled runs are cached like trainings, in RUNS/<source run>--<method>-<key of the recipe>
(`common.experiments.runcache.compressed_run_dir`), and made again only when not finished. Every
row is scored on the teacher's stored test split; an optional second table times random-init
models at 224 px, where size and speed ratios do not depend on training.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from common import runs
from common.compress.base import FineTune
from common.compress.distill import DEFAULT_STUDENT, distill_run
from common.compress.measure import measure_table, split_images
from common.compress.prune import PRUNE_LR_FACTOR, prune_run
from common.compress.table import (
    SPEED_COLUMNS,
    TABLE_COLUMNS,
    check_targets,
    format_cell,
    format_measured,
    table_note,
    table_title,
)
from common.compress.variants import Variant, random_init_variants, variants_for
from common.experiments.ablations import choose_backbones
from common.experiments.datasets import title
from common.experiments.profiles import Knobs, compression_plan
from common.experiments.records import Experiment
from common.experiments.runcache import RunRef, compressed_run_dir, reuse_or_make
from common.experiments.stages import Setup, setup, stage2_run
from common.experiments.tables import Table
from common.splits import split_paths

SPEED_MODELS = ("resnet50", "densenet121", "efficientnet_b0", "mobilenetv3_large_100")  # the 224 px table
SPEED_IMAGE_SIZE, SPEED_STUDENT_SIZE = 224, 160
TIMING_FILES = 20  # end-to-end latency is timed on the test split's largest files
CALIBRATION_IMAGES = 32  # dev images that calibrate the 224 px table's int8 models


@dataclass(frozen=True)
class CompressionKnobs:
    """What the compression experiment adds to the shared `Knobs` (None: the profile's plan, `compression_plan`)."""

    backbones: Sequence[str] | None = None  # row or timm names of the table's backbones
    teacher: str = "EfficientNet-B0"  # the backbone that is pruned and distilled; "best": the best dev mean AUROC
    sparsities: Sequence[float] | None = None  # unstructured pruning levels
    structured_sparsities: Sequence[float] | None = None  # shares of conv channels pruned
    student: str = DEFAULT_STUDENT  # the distilled student, any timm name
    student_image_size: int | None = None  # its input side
    temperature: float = 2.0  # softens teacher and student outputs in the soft-target term
    alpha: float = 0.5  # weight of the soft-target term next to the labels' BCE
    threads: int = 2  # ONNX Runtime intra-op threads for every latency
    speed_at_224: bool = True  # also time random-init models at 224 px (not in smoke)
    calibration_images: Sequence[str] = ()  # int8 calibration of the 224 px table; (): the teacher's dev images
    progress: bool = True


_OWN_KNOBS = {f.name for f in dataclasses.fields(CompressionKnobs)}


def cached_compress(method: str, source: Path, params: dict, runs_root: Path,
                    make: Callable[[Path], Path]) -> tuple[Path, bool]:
    """RUNS/<source run>--<method>-<key of params>, made by `make(out)` unless it already finished.

    Returns (run dir, reused). An interrupted one is made again (its fine-tune resumes).
    """
    out = compressed_run_dir(source, method, params, runs_root)
    return out, reuse_or_make(out, make, method)


def cached_distill(teacher_run: Path, runs_root: Path, student: str, image_size: int, temperature: float,
                   alpha: float, epochs: int, max_steps: int | None, lr: float, pretrained,
                   **fit_common) -> tuple[Path, bool]:
    """`distill_run` through the run cache, keyed by the student recipe (the compression notebook's
    student and bench/bench_distill.py's students share one key, so each reuses the other's)."""
    params = {"student": student, "image_size": image_size, "temperature": float(temperature), "alpha": float(alpha),
              "epochs": epochs, "max_steps": max_steps, "lr": lr, "pretrained": pretrained}
    return cached_compress("distill", teacher_run, params, runs_root, lambda out: distill_run(
        teacher_run, out, student=student, student_image_size=image_size, temperature=temperature, alpha=alpha,
        tune=FineTune(epochs=epochs, max_steps=max_steps, lr=lr), pretrained=pretrained, **fit_common))


def compression_experiment(ck: CompressionKnobs | None = None, knobs: Knobs | None = None, **kw: Any) -> Experiment:
    """The compression notebook's experiment: one trade-off table (and, optionally, a 224 px speed table).

    Keywords set fields of `CompressionKnobs` or of the shared `Knobs` (profile, smoke, data_full, ...).
    The backbones are trained or reused as the backbone ablation trains them; `teacher` (one of
    them, or "best") is pruned at each sparsity and distilled into `student`.
    """
    ck = dataclasses.replace(ck or CompressionKnobs(), **{k: kw.pop(k) for k in list(kw) if k in _OWN_KNOBS})
    s = setup(Knobs.of(knobs, **kw))
    plan = compression_plan(s.profile)
    exp = Experiment("compression", "Compression: int8, pruning and distillation", s.label, s.data)
    backbone_runs = _backbone_runs(s, exp, ck.backbones or plan["backbones"])
    teacher_name = _teacher(backbone_runs, ck.teacher)
    teacher_run = backbone_runs[teacher_name]
    fit_common = {"progress": ck.progress, "num_workers": s.profile.num_workers, "n_boot": s.profile.n_boot}
    levels = [*((x, False) for x in (ck.sparsities if ck.sparsities is not None else plan["sparsities"])),
              *((x, True) for x in (ck.structured_sparsities if ck.structured_sparsities is not None
                                    else plan["structured"]))]
    pruned = _pruned_runs(s, exp, teacher_name, teacher_run, levels, fit_common)
    student_run = _student_run(s, exp, ck, teacher_run, int(ck.student_image_size or plan["student_image_size"]),
                               fit_common)
    timing = _trained_tables(exp, ck, variants_for(backbone_runs, pruned, [student_run]), teacher_name, teacher_run,
                             s.profile.smoke)
    if ck.speed_at_224 and not s.profile.smoke:
        _speed_tables(exp, ck, teacher_run, timing)
    return exp


def _backbone_runs(s: Setup, exp: Experiment, backbones: Sequence[str]) -> dict[str, Path]:
    """The table's backbones trained or reused, by row name (the trained model added when it differs)."""
    seen: set[str] = set()
    out: dict[str, Path] = {}
    for row_name, timm_name in choose_backbones(backbones):
        model = s.profile.model_for(timm_name)
        if model in seen:  # smoke maps several names to one tiny model: one row each
            continue
        seen.add(model)
        run = stage2_run(s, timm_name, None, row_name, as_named=True)
        exp.runs[row_name] = run
        out[f"{row_name} ({model})" if model != timm_name else row_name] = run.run_dir
    return out


def _teacher(backbone_runs: dict[str, Path], teacher: str) -> str:
    """The row name of the teacher: the named backbone, or ("best") the best dev mean AUROC."""
    if teacher == "best":
        def dev_auroc(path: Path) -> float:
            dev = (runs.load_json(path / runs.METRICS_JSON).get("dev") or {}).get("mean_auroc")
            return -1.0 if dev is None else float(dev)

        return max(backbone_runs, key=lambda n: dev_auroc(backbone_runs[n]))
    matches = [n for n in backbone_runs if n == teacher or n.startswith(f"{teacher} (")]
    if not matches:
        raise ValueError(f"teacher {teacher!r} is not one of the table's backbones {list(backbone_runs)}; "
                         "add it to Backbones or use 'best'")
    return matches[0]


def _pruned_runs(s: Setup, exp: Experiment, teacher_name: str, teacher_run: Path,
                 levels: Sequence[tuple[float, bool]], fit_common: dict) -> list[Path]:
    """The teacher pruned at each (sparsity, structured) level and fine-tuned, through the run cache."""
    pruned = []
    for sparsity, structured in levels:
        params = {"sparsity": float(sparsity), "structured": structured, "epochs": 1,
                  "max_steps": s.profile.max_steps, "lr": (s.knobs.lr or s.profile.lr) * PRUNE_LR_FACTOR}
        run_dir, reused = cached_compress("prune", teacher_run, params, s.runs, lambda out, p=params: prune_run(
            teacher_run, out, p["sparsity"], structured=p["structured"], scope="layer" if p["structured"] else "global",
            tune=FineTune(epochs=p["epochs"], max_steps=p["max_steps"], lr=p["lr"]), **fit_common))
        pruned.append(run_dir)
        role = f"{teacher_name} pruned {sparsity:.0%}" + (" channels" if structured else "")
        exp.runs[role] = RunRef(role, run_dir, teacher_name, runs.read_config(run_dir)["model"]["model_name"], reused)
    return pruned


def _student_run(s: Setup, exp: Experiment, ck: CompressionKnobs, teacher_run: Path, image_size: int,
                 fit_common: dict) -> Path:
    """The student distilled from the teacher with the profile's recipe, through the run cache."""
    model = s.profile.model_for(ck.student)
    run_dir, reused = cached_distill(teacher_run, s.runs, model, image_size, ck.temperature, ck.alpha,
                                     s.knobs.epochs or s.profile.epochs, s.profile.max_steps,
                                     s.knobs.lr or s.profile.lr, s.profile.pretrained_for(model), **fit_common)
    exp.runs[f"student ({model})"] = RunRef(f"student ({model})", run_dir, ck.student, model, reused)
    return run_dir


def _trained_tables(exp: Experiment, ck: CompressionKnobs, variants: Sequence[Variant], teacher_name: str,
                    teacher_run: Path, smoke: bool) -> list[str]:
    """The trade-off table of the trained runs and its targets; returns the images latency was timed on."""
    test = split_images(teacher_run, "test")
    # end-to-end on the largest test files: a full-size radiograph's decode is what serving pays
    timing = sorted(test.paths, key=lambda f: Path(f).stat().st_size, reverse=True)[:TIMING_FILES]
    timing_size = _image_size_text(timing[0]) if timing else "no image"
    # smoke: the code path only, so fewer timed repeats
    repeats = {"repeats": 5, "e2e_repeats": 5} if smoke else {"repeats": 30, "e2e_repeats": 20, "rounds": 2}
    rows = measure_table(variants, timing_images=timing, threads=ck.threads, progress=ck.progress, **repeats)
    main_title = table_title(rows, ck.threads).removeprefix("SYNTHETIC DATA - ")
    exp.tables.append(Table(title(main_title, exp.synthetic or any(r["synthetic"] for r in rows)),
                            table_frame(rows, TABLE_COLUMNS), table_note(rows)
                            + f" Teacher of the pruned and distilled rows: {teacher_name}. Test split: "
                            f"{rows[0]['n_images']} images; end-to-end timed on its {len(timing)} largest image "
                            f"files (the largest: {timing_size})."))
    # the comparison is with the fp32 EfficientNet-B0 teacher; without such a row, our teacher
    has_b0 = any(r["method"] == "fp32" and r["backbone"].split(".")[0] == "efficientnet_b0" for r in rows)
    checks = check_targets(rows, teacher=None if has_b0 else f"{teacher_name} fp32")
    exp.tables.append(Table(exp.title_for("Compression targets (issue 6) on the trained runs"),
                            targets_frame(checks), "AUROC changes on a small test split are noise-sized; "
                            "sizes and speeds are measured."))
    exp.headline = {"rows": rows, "targets": checks, "teacher": teacher_name}
    return timing


def _speed_tables(exp: Experiment, ck: CompressionKnobs, teacher_run: Path, timing: Sequence[str]) -> None:
    """Size and speed of random-init models at 224 px (int8 calibrated on this data), and their targets."""
    calib = list(ck.calibration_images) or split_paths(teacher_run, "dev")[:CALIBRATION_IMAGES]
    with tempfile.TemporaryDirectory(prefix="compress-224-") as tmp:
        # no pruned copies here: the trained table shows what pruning does (bench/ has them at 224)
        variants = random_init_variants(tmp, list(SPEED_MODELS), SPEED_IMAGE_SIZE, ck.student, SPEED_STUDENT_SIZE,
                                        calib, prune_model_name=None)
        rows = measure_table(variants, timing_images=timing, threads=ck.threads, score=False, rounds=2,
                             progress=ck.progress)
    exp.tables.append(Table(exp.title_for(f"Size and speed at 224 px, random initialisation (batch 1, {ck.threads} "
                                          "CPU threads; int8 calibrated on this data's images)"),
                            table_frame(rows, SPEED_COLUMNS), table_note(rows)
                            + " Random weights: no AUROC here; ratios of size and speed do not depend on training."))
    checks = [c for c in check_targets(rows) if "AUROC" not in c["target"]]
    exp.tables.append(Table(exp.title_for("Compression targets (issue 6) at 224 px, random initialisation"),
                            targets_frame(checks)))
    exp.headline.update(speed_rows=rows, speed_targets=checks)


def table_frame(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """Measured rows as the notebook's table: one formatted cell per column (`common.compress.table`)."""
    return pd.DataFrame([{h: format_cell(r.get(k), f, k) for k, h, f in columns} for r in rows])


def targets_frame(checks: Sequence[dict]) -> pd.DataFrame:
    """Target checks as the notebook's table: target, measured, met."""
    return pd.DataFrame([{"Target": c["target"], "Measured": format_measured(c),
                          "Met": {True: "yes", False: "NO", None: "n/a"}[c["met"]]} for c in checks])


def _image_size_text(path: str | os.PathLike) -> str:
    with Image.open(path) as im:
        return f"{im.size[0]}x{im.size[1]} {im.format or 'image'}"
