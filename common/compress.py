"""Compression of a trained run, and the one table that says what it costs and what it buys.

    from common import compress
    compress.quantize_run("runs/all14", "runs/all14-int8")                 # ONNX export folder (fp32 + int8)
    compress.prune_run("runs/all14", "runs/all14-prune50", sparsity=0.5)   # a run dir, fine-tuned
    compress.distill_run("runs/all14", "runs/all14-student",
                         student="mobilenetv3_small_100", student_image_size=160)   # a run dir
    rows = compress.measure_table(compress.variants_for({"efficientnet_b0": "runs/all14"},
                                                        pruned_runs=["runs/all14-prune50"],
                                                        student_runs=["runs/all14-student"]))
    print(compress.table_markdown(rows))                  # notebooks: compression_experiment(...)

- int8: ONNX Runtime static QDQ quantisation with per-channel weights, activation ranges calibrated
  on dev-split images (`common.export.INT8_RECIPE`), dynamic quantisation as the fallback:
  `common.export` does it; the result is an export folder (`model.onnx`, `model.int8.onnx`,
  `model.json`) that `medimaging predict --onnx --int8` and the app serve.
- prune: magnitude pruning (`common.prune`) of the run's best weights, then a short fine-tune by
  `common.train.fit` with the masks held fixed (`FitHooks.on_model`), so the zeros are in
  best.safetensors and in the exported ONNX initialisers; achieved sparsity is measured in both.
- distill: a smaller timm model (often at a lower resolution) trained by `fit` on the teacher's
  data and split, with loss = masked BCE + alpha * T^2 * KL(teacher_T || student_T) (`FitHooks.loss`,
  `common.distill`); the teacher sees the same augmented batch, resized to its own input.

Every output folder also gets `compression.json`: method, source, knobs, and what was measured.

The table (`measure_table`): ONNX file size (and zipped, where pruning's zeros pay off), parameters,
conv/linear MACs and their depthwise share, model-only latency (batch 1, 2 threads), end-to-end
latency (PNG decode + preprocessing + model), peak RSS (each measured in a fresh torch-free process,
as served), mean AUROC and mean accuracy on the run's test split, ratios against the row's
baseline, and a plain note on where any speed comes from.

Importing this module is cheap (no torch at module level): `python -m common.compress` is the
measuring child process, and it must not carry torch's memory into the peak RSS it reports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import runs
from common.labels import TASKS
from common.onnx_predict import EXPORT_DIR, FP32, INT8
from common.predict import ONNX_META

COMPRESSION_JSON = "compression.json"
DISTILL_LOSS_CSV = "distill_loss.csv"
DEFAULT_STUDENT = "mobilenetv3_small_100"
PRUNE_LR_FACTOR = 0.1  # fine-tuning a pruned model: a tenth of the source run's learning rate


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------ configuration


def source_train_config(run_dir: str | os.PathLike, out: str | os.PathLike, data: Sequence[str] | None = None,
                        **overrides):
    """The TrainConfig of a derived run: the source run's own configuration, with `out` and overrides.

    Data, task, split seed and fractions stay the source's, so the derived run sees the same
    patient split and its test metrics compare like with like. A source made without `fit`
    (e.g. `common.predict.create_untrained_run`) gets its model and input from config.json and
    the default data (or `data`).
    """
    from common.train_config import TrainConfig

    cfg = runs.read_config(run_dir)
    base = dict(cfg.get("train") or {})
    if not base:
        model = cfg["model"]
        labels = list(cfg["labels"])
        task = next((name for name, names in TASKS.items() if list(names) == labels), None)
        if task is None:
            raise ValueError(f"{Path(run_dir) / runs.CONFIG}: outputs {labels} match no task {sorted(TASKS)}; "
                             "cannot derive a training configuration")
        base = {"task": task, "model_name": model["model_name"], "head": model.get("head", "mlp"),
                "head_dropout": model.get("head_dropout", 0.3), "in_chans": model.get("in_chans", 3),
                "image_size": int(cfg["input"]["image_size"])}
    if data is not None:
        base["data"] = [str(d) for d in data]
    # the derived run's weights come from the compression step, never from the hub or init_from
    base.update(pretrained=False, init_from=None, out=str(out))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(base)


def _write_report(out: Path, report: dict) -> None:
    runs.save_json(out / COMPRESSION_JSON, report)


def read_report(path: str | os.PathLike) -> dict | None:
    """The `compression.json` of a compressed run or export folder (None when there is none)."""
    p = Path(path) / COMPRESSION_JSON
    return runs.load_json(p) if p.is_file() else None


# ------------------------------------------------------------------------------------- int8


def quantize_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 calibration_images: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
                 n_calibration: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Post-training int8 of a run: an export folder with model.onnx and model.int8.onnx.

    Static QDQ, per-channel weights, calibrated on the run's dev-split images (or the given ones);
    dynamic quantisation when static fails (all in `common.export`). Default out: RUN/export.
    """
    from common.export import export_onnx
    log = log or _stderr
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    export_onnx(run_dir, out, int8=True, calibration_images=calibration_images, n_calibration=n_calibration, log=log)
    meta = runs.load_json(out / ONNX_META)
    fp32_mb, int8_mb = (out / FP32).stat().st_size / 1e6, (out / INT8).stat().st_size / 1e6
    report = {"method": "int8", "source": str(run_dir.resolve()), "quantization": meta.get("int8"),
              "fp32_mb": round(fp32_mb, 3), "int8_mb": round(int8_mb, 3), "size_ratio": round(fp32_mb / int8_mb, 2),
              "serve": f"medimaging predict IMAGE --run {out} --onnx --int8"}
    log(f"int8: {out / INT8}: {int8_mb:.2f} MB vs {fp32_mb:.2f} MB fp32 ({report['size_ratio']}x smaller)")
    _write_report(out, report)
    return out


# ------------------------------------------------------------------------------------ pruning


def prune_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    sparsity: float,
    structured: bool = False,
    scope: str = "global",
    norm: int = 1,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float | None = None,
    data: Sequence[str] | None = None,
    export: bool = True,
    log: Callable[[str], None] | None = None,
    **train_overrides,
) -> Path:
    """Prune a run's best weights by magnitude, fine-tune with the masks fixed; return the new run dir.

    sparsity: share of the prunable conv/linear weights zeroed (unstructured, `scope` "global" or
    "layer") or of their output channels (structured, by L`norm` norm). The fine-tune is `fit`
    with the source's configuration (same data and split) for `epochs` / `max_steps` at `lr`
    (default: a tenth of the source's); max_steps=0 keeps the pruned weights as they are and
    only scores them. The achieved sparsity of best.safetensors (and of RUN/export/model.onnx when
    `export`) is measured and written to compression.json; a mask that did not hold is an error.
    """
    import torch

    from common.prune import keep_masks_fixed, onnx_weight_sparsity, prune_model, sparsity_report
    from common.train import FitHooks, fit

    log = log or _stderr
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the source run itself; give a new folder for the pruned run")
    source = runs.load_run(run_dir)
    src_cfg = runs.read_config(run_dir)
    base_lr = float((src_cfg.get("train") or {}).get("lr", 5e-4))
    cfg = source_train_config(run_dir, out, data=data, epochs=epochs, max_steps=max_steps,
                              lr=lr if lr is not None else base_lr * PRUNE_LR_FACTOR, **train_overrides)
    masks = prune_model(source.model, sparsity, structured=structured, scope=scope, norm=norm)
    pruned_state = {k: v.detach().clone() for k, v in source.model.state_dict().items()}
    before = sparsity_report(pruned_state, masks)
    kind = f"{'structured L' + str(norm) + ' channel' if structured else 'unstructured L1 ' + scope}"
    log(f"prune: {kind} at {sparsity:.0%}: {len(masks)} layers, {before['pruned_zeros']:,} of "
        f"{before['pruned_params']:,} prunable weights are zero ({before['pruned_sparsity']:.2%})")
    init = {"source": str(run_dir.resolve()), "method": "prune", "sparsity": float(sparsity), "structured": structured,
            "scope": scope, "norm": norm}

    def on_model(model: torch.nn.Module, fit_log: Callable[[str], None]) -> dict:
        model.load_state_dict(pruned_state)  # strict: the same architecture as the source
        keep_masks_fixed(model, masks)
        fit_log(f"pruned weights of {run_dir} loaded ({kind} {sparsity:.0%}); masks held fixed while fine-tuning")
        return init

    fit(cfg, hooks=FitHooks(on_model=on_model))
    saved = runs.load_weights(out / runs.BEST)
    achieved = sparsity_report(saved, masks)
    broken = [name for name, m in masks.items() if bool((saved[name][~m.to(saved[name].device)] != 0).any())]
    if broken:
        raise RuntimeError(f"{out / runs.BEST}: pruned weights became non-zero during the fine-tune in "
                           f"{len(broken)} layer(s) ({broken[:3]}); the masks did not hold")
    report = {"method": "prune", **init, "layers": len(masks), "safetensors": achieved,
              "fine_tune": {"epochs": cfg.epochs, "max_steps": cfg.max_steps, "lr": cfg.lr}}
    log(f"prune: {out / runs.BEST}: {achieved['pruned_sparsity']:.2%} of the prunable weights are zero "
        f"({achieved['overall_sparsity']:.2%} of all parameters)")
    if export:
        from common.export import export_onnx
        exp = export_onnx(out, out / EXPORT_DIR, log=log)
        report["onnx"] = onnx_weight_sparsity(exp / FP32)
        log(f"prune: {exp / FP32}: {report['onnx']['weight_sparsity']:.2%} of the weight tensors' values are zero")
    _write_report(out, report)
    return out


# ------------------------------------------------------------------------------- distillation


class TeacherOnBatch:
    """A teacher run's logits for the student's training batch.

    The batch arrives normalised for the student (its mean / std / channels / size); the grey
    image is recovered, resized to the teacher's input size (bilinear, antialiased, as
    `common.preprocess` resizes) and normalised by `common.train.BatchTransform` for the teacher.
    """

    def __init__(self, run_dir: str | os.PathLike, student_input: dict):
        from common.train import BatchTransform

        run = runs.load_run(run_dir)
        self.run_dir = Path(run_dir)
        self.model = run.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.labels = list(run.labels)
        self.input = dict(run.input)
        self.student_input = dict(student_input)
        self._transform_cls = BatchTransform
        self._transform = None
        self._device = None

    def __call__(self, inputs):
        import torch
        import torch.nn.functional as F

        device = inputs.device
        if self._device != device:
            self.model.to(device)
            self._transform = self._transform_cls(self.input, device)
            self._device = device
        s_mean = float(self.student_input["mean"][0])
        s_std = float(self.student_input["std"][0])
        grey = inputs[:, :1].float() * s_std + s_mean  # every channel holds the same grey image
        size = int(self.input["image_size"])
        if grey.shape[-1] != size or grey.shape[-2] != size:
            grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = self._transform(grey.clamp(0.0, 1.0) * 255.0)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return self.model(x).float()


@dataclass
class DistillLoss:
    """`FitHooks.loss` for distillation (`common.distill.distillation_terms`); keeps each micro-batch's
    (hard, soft, total) in `history` as a tensor on the training device, so no micro-batch waits for
    the GPU to read them (`fit` syncs its own loss only every few steps); `parts()` reads them once."""

    teacher: TeacherOnBatch
    temperature: float = 2.0
    alpha: float = 0.5
    history: list = field(default_factory=list)

    def __call__(self, hard, logits, targets, inputs):
        import torch

        from common.distill import distillation_terms

        total, soft = distillation_terms(hard, logits, self.teacher(inputs), self.temperature, self.alpha)
        self.history.append(torch.stack([hard.detach().float(), soft.detach(), total.detach().float()]))
        return total

    def parts(self) -> list[dict]:
        """[{"micro_batch", "hard", "soft", "total"}] as floats, one per micro-batch so far."""
        import torch

        rows = torch.stack(self.history).cpu().tolist() if self.history else []
        return [{"micro_batch": i, "hard": h, "soft": s, "total": t} for i, (h, s, t) in enumerate(rows)]


def distill_run(
    teacher_run: str | os.PathLike,
    out: str | os.PathLike,
    student: str = DEFAULT_STUDENT,
    student_image_size: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    epochs: int | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    data: Sequence[str] | None = None,
    export: bool = True,
    log: Callable[[str], None] | None = None,
    **train_overrides,
) -> Path:
    """Train `student` (any timm name) on the teacher run's data and split, distilling the teacher.

    loss = masked BCE(labels) + alpha * T^2 * KL(sigmoid(teacher / T) || sigmoid(student / T)).
    The student run is a normal run directory (predict, evaluate, export, the app); its
    per-micro-batch loss parts are in distill_loss.csv and the settings in compression.json.
    student_image_size None: the teacher's input size. epochs None: the teacher's.
    """
    from common.models import build_model, model_input_config
    from common.train import FitHooks, fit

    log = log or _stderr
    teacher_run, out = Path(teacher_run), Path(out)
    if out.resolve() == teacher_run.resolve():
        raise ValueError(f"--out {out} is the teacher run itself; give a new folder for the student")
    t_cfg = runs.read_config(teacher_run)
    size = int(student_image_size or t_cfg["input"]["image_size"])
    cfg = source_train_config(teacher_run, out, data=data, model_name=student, image_size=size, epochs=epochs,
                              max_steps=max_steps, lr=lr, freeze=0, **train_overrides)
    # the student's own preprocessing (timm's mean / std for it), as fit will compute it
    probe = build_model(student, num_labels=len(t_cfg["labels"]), head=cfg.head, pretrained=None,
                        in_chans=cfg.in_chans, image_size=size)
    s_input = model_input_config(probe, size)
    del probe
    teacher = TeacherOnBatch(teacher_run, s_input)
    loss = DistillLoss(teacher, temperature=float(temperature), alpha=float(alpha))
    log(f"distill: teacher {t_cfg['model']['model_name']} at {teacher.input['image_size']} px -> student {student} "
        f"at {size} px; T={temperature}, alpha={alpha}")
    init = {"source": str(teacher_run.resolve()), "method": "distill", "teacher": t_cfg["model"]["model_name"],
            "teacher_image_size": int(teacher.input["image_size"]), "temperature": float(temperature),
            "alpha": float(alpha)}

    def on_model(model, fit_log):
        if list(teacher.labels) != list(TASKS[cfg.task]):
            raise ValueError(f"teacher {teacher_run} outputs {teacher.labels}, the student's task {cfg.task!r} "
                             f"has {list(TASKS[cfg.task])}")
        return init

    fit(cfg, hooks=FitHooks(on_model=on_model, loss=loss))
    if loss.history:  # empty when the run had already finished
        lines = ["micro_batch,hard,soft,total"] + [
            f"{h['micro_batch']},{h['hard']:.6g},{h['soft']:.6g},{h['total']:.6g}" for h in loss.parts()]
        runs.atomic_write_text(out / DISTILL_LOSS_CSV, "\n".join(lines) + "\n")
    report = {"method": "distill", **init, "student": student, "student_image_size": size,
              "train": {"epochs": cfg.epochs, "max_steps": cfg.max_steps, "lr": cfg.lr}}
    if export:
        from common.export import export_onnx

        export_onnx(out, out / EXPORT_DIR, int8=True, log=log)
    _write_report(out, report)
    return out


def read_distill_loss(run_dir: str | os.PathLike) -> list[dict]:
    """The per-micro-batch loss parts a distillation wrote (distill_loss.csv)."""
    path = Path(run_dir) / DISTILL_LOSS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a distilled run (medimaging compress --method distill)?")
    rows = path.read_text().strip().splitlines()
    keys = rows[0].split(",")
    return [{k: (int(v) if k == "micro_batch" else float(v)) for k, v in zip(keys, r.split(","))} for r in rows[1:]]


# ------------------------------------------------------------------------------------ measuring


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


@dataclass
class SplitImages:
    """A run's split as image paths and labels (1 / 0 / NaN), in the run's label order."""

    paths: list[str]
    y: np.ndarray
    labels: list[str]
    synthetic: bool


def split_images(run_dir: str | os.PathLike, split: str = "test", data: Sequence[str] | None = None) -> SplitImages:
    """The images of a run's `split` ("train" / "dev" / "test"), as `fit` split them.

    The run's data folders, task, seed and fractions (config.json) go through the same functions
    `fit` uses (`load_dataset`, `combine`, `task_split`).
    """
    from common.data import combine, default_data_dirs, load_dataset, task_split

    cfg = runs.read_config(run_dir)
    train = cfg.get("train") or {}
    roots = [str(d) for d in data] if data else (
        [d["root"] for d in cfg.get("data") or [] if isinstance(d, dict) and d.get("root")] or list(train.get("data") or []))
    if not roots:
        found, _ = default_data_dirs()
        roots = [str(r) for r in found]
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: the run's data folder(s) {missing} are gone; pass data=[...] "
                                "(CLI --data) with the folders it was trained on")
    sets = [load_dataset(r, quiet=True) for r in roots]
    task = train.get("task") or next((t for t, names in TASKS.items() if list(names) == list(cfg["labels"])), "all14")
    fractions = tuple(float(f) for f in train.get("split_fractions", (0.7, 0.1, 0.2)))
    frame, labels = task_split(combine(sets).frame, task, seed=int(train.get("seed", 49)), fractions=fractions)
    if list(labels) != list(cfg["labels"]):
        raise ValueError(f"{run_dir}: task {task!r} gives outputs {labels}, the run has {cfg['labels']}")
    chosen = frame.loc[frame["split"] == split]
    synthetic = bool(cfg.get("synthetic")) or any(bool(getattr(s, "is_synthetic", False)) for s in sets)
    return SplitImages(chosen["path"].astype(str).tolist(), chosen[list(labels)].to_numpy(np.float32), list(labels),
                       synthetic)


def count_macs(model, input_cfg: dict) -> dict:
    """Multiply-accumulates of one image through the conv and linear layers (batch 1).

    Returns {"gmacs", "depthwise_gmacs", "depthwise_share"}. Depthwise / grouped convolutions are
    counted apart: int8 kernels speed up dense convolutions and GEMMs, not those. Attention's
    matrix products (ViTs) are not counted; for CNNs this is all of the arithmetic that matters.
    """
    import torch
    from torch import nn

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


def ensure_export(run_dir: str | os.PathLike, int8: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """RUN/export with model.onnx (and model.int8.onnx); exported only when missing, older than the
    weights, or (int8) quantised with another recipe than common.export.INT8_RECIPE."""
    from common.export import INT8_RECIPE, export_onnx
    run_dir = Path(run_dir)
    out = run_dir / EXPORT_DIR
    weights = run_dir / runs.BEST
    needed = [out / FP32, out / ONNX_META] + ([out / INT8] if int8 else [])
    fresh = all(p.is_file() for p in needed) and (
        not weights.is_file() or min(p.stat().st_mtime for p in needed) >= weights.stat().st_mtime)
    if fresh and int8:
        report = runs.load_json(out / ONNX_META).get("int8") or {}
        fresh = report.get("recipe") == INT8_RECIPE
    if not fresh:
        export_onnx(run_dir, out, int8=int8, log=log or _stderr)
    return out


_CHILD_MARK = "MEDIMAGING-MEASURE "


def measure_served(export_dir: str | os.PathLike, int8: bool, images: Sequence[str | os.PathLike],
                   threads: int = 2, repeats: int = 30, e2e_repeats: int = 20, warmup: int = 5,
                   profile: bool = True, timeout: float = 900) -> dict:
    """Latency and memory of an export as served, in a fresh torch-free process (`python -m common.compress`).

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
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{export_dir}: measuring {'int8' if int8 else 'fp32'} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1][len(_CHILD_MARK):])


def _measure_child(spec: dict) -> dict:
    """The child's side of `measure_served`: only numpy, Pillow and ONNX Runtime are imported."""
    import time

    from common.onnx_predict import OnnxPredictor

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
    import resource

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
    import tempfile

    import onnxruntime as ort

    from common.onnx_predict import session_options

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


def score_served(export_dir: str | os.PathLike, int8: bool, split: SplitImages, threads: int = 2,
                 progress: bool = True) -> dict:
    """Mean AUROC and mean accuracy (at 0.5, the study's metric) of an export on a split's images."""
    from common.metrics import evaluate_predictions
    from common.onnx_predict import OnnxPredictor

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


def _shares_text(shares: dict | None) -> str:
    if not shares:
        return "time split not measured"
    top = ", ".join(f"{op} {t:.0%}" for op, t in shares.get("top", [])[:2])
    return (f"time: {shares['dense']:.0%} dense conv/GEMM, {shares['depthwise']:.0%} depthwise conv, "
            f"{shares['other'] + shares['qdq']:.0%} other ops (top: {top})")


def speed_source(row: dict, base: dict | None) -> str:
    """A short, honest note on where a row's speed-up comes from (or why there is none).

    Built from what was measured: the fp32 model's time split by kernel type (ONNX Runtime's
    profiler), the MACs, and for int8 the share its (de)quantise steps take.
    """
    if row["method"] == "fp32":
        return "reference; " + _shares_text(row.get("time_shares"))
    parts = []
    if row["method"] == "distill" and base is not None:
        parts.append(f"{base['gmacs'] / max(row['gmacs'], 1e-12):.1f}x fewer MACs (smaller net at {row['image_size']} px)")
    if row["method"] == "prune":
        parts.append("none expected: the zeros are still multiplied by dense kernels"
                     + ("; zeroed channels are not removed" if row.get("structured") else "")
                     + " (smaller only when zipped)")
    if row["int8"]:
        ref = (base or {}).get("time_shares") if row["method"] == "int8" else None
        if ref:
            # Amdahl: only the dense share can get faster; int8 GEMM kernels give at most ~4x on it
            bound = 1.0 / ((1.0 - ref["dense"]) + ref["dense"] / 4.0)
            parts.append(f"int8 kernels speed up only dense conv/GEMM: {ref['dense']:.0%} of the fp32 time "
                         f"(at most ~{bound:.1f}x overall)")
        else:
            parts.append("int8 kernels on dense conv/GEMM")
        own = row.get("time_shares")
        if own:
            parts.append(f"(de)quantise steps take {own['qdq']:.0%} of the int8 time, other int8 ops "
                         f"{own['other']:.0%}")
    return "; ".join(parts)


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
    from tqdm.auto import tqdm

    log = log or _stderr
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique: {names}")
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
    # Timing: whole-table rounds, each row in a fresh process per round, so a burst of other work
    # on a shared machine hits different rows in different rounds; each row keeps its fastest
    # round. The kernel-time profile is taken in the first round only (it costs extra runs).
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
    return rows


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


# ------------------------------------------------------------------------------------- the table

TABLE_COLUMNS = (
    # (key, header, format)
    ("name", "model", "{}"),
    ("detail", "how", "{}"),
    ("file_mb", "file MB", "{:.2f}"),
    ("size_x", "size x", "{:.1f}x"),
    ("zipped_mb", "zipped MB", "{:.2f}"),
    ("params", "params M", "{:.2f}"),
    ("nonzero_params", "non-zero M", "{:.2f}"),
    ("gmacs", "GMACs", "{:.3f}"),
    ("depthwise_share", "depthwise MACs", "{:.0%}"),
    ("model_ms", "model ms", "{:.2f}"),
    ("speed_x", "speed x", "{:.2f}x"),
    ("e2e_ms", "end-to-end ms", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("mean_auroc", "mean AUROC", "{:.4f}"),
    ("d_auroc", "AUROC change", "{:+.4f}"),
    ("mean_accuracy", "mean accuracy", "{:.4f}"),
    ("speed_from", "where speed comes from", "{}"),
)


def _cell(value, fmt: str, key: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if key in ("params", "nonzero_params"):
        value = value / 1e6
    return fmt.format(value).replace("|", "/")


def table_markdown(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """The rows as one markdown table (ratios and AUROC change against each row's baseline)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), f, k) for k, _, f in columns) + " |")
    return "\n".join(lines)


def table_title(rows: Sequence[dict], threads: int = 2) -> str:
    """The table's title; says SYNTHETIC when any row was scored on synthetic data."""
    text = f"Compression trade-offs: size, speed (batch 1, {threads} CPU threads, ONNX Runtime) and test AUROC"
    # the suite's convention for every table title (common.experiments.title)
    return f"SYNTHETIC DATA - {text}" if any(r.get("synthetic") for r in rows) else text


def table_note(rows: Sequence[dict]) -> str:
    """What the columns mean and where speed does (not) come from, for under the table."""
    return (
        "Ratios (size x, speed x, AUROC change) compare each row with its baseline: an int8 row with its own fp32 "
        "row, a pruned or distilled row with the fp32 run it came from. model ms: median ONNX Runtime latency of "
        "one preprocessed image (batch 1); end-to-end ms: image file decode + resize + normalise + model; peak RSS: "
        "the serving process (torch-free, measured in a fresh process). Mean accuracy is at 0.5, the original "
        "study's metric. Where speed comes from (the last column is measured: ONNX Runtime's profiler splits each "
        "fp32 model's time by kernel type): int8 kernels (VNNI / AMX on x86) speed up dense convolutions and matrix "
        "products only. Depthwise convolutions are a few percent of EfficientNet's and MobileNet's MACs but, being "
        "memory-bound, a large share of their time, like their activations and squeeze-excite products; those gain "
        "nothing from int8 and each quantise / dequantise step adds time, so depthwise nets get smaller in int8 but "
        "not faster. Pruned weights are zeros stored densely: the same dense kernels multiply them, so pruning alone "
        "saves no time and only shrinks the zipped file; channel pruning would be faster only after removing the "
        "zeroed channels, which changes the architecture. Distillation is faster because the student does fewer "
        "MACs (a smaller network at a lower resolution)."
    )


def check_targets(rows: Sequence[dict], teacher: str | None = None) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (None: not measurable).

    int8 >= 3x smaller than fp32 for every backbone; >= 2.5x faster for ResNet-50; mean AUROC
    lower by <= 0.01. The best compressed model (the fastest whose mean AUROC is at most 0.02 below
    the fp32 `teacher` row, default: the EfficientNet-B0 fp32 row) >= 3x faster model-only; when
    the fastest compressed model of all is another one, it is listed too, with its AUROC cost.
    """
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        if r["method"] != "int8" or not r.get("baseline"):
            continue
        out.append({"target": f"{r['backbone']}: int8 >= 3x smaller", "measured": r["size_x"],
                    "met": r["size_x"] >= 3.0})
        if r["backbone"].split(".")[0] == "resnet50":
            out.append({"target": "resnet50: int8 >= 2.5x faster (model only)", "measured": r["speed_x"],
                        "met": r["speed_x"] >= 2.5})
        d = r.get("d_auroc")
        out.append({"target": f"{r['backbone']}: int8 mean AUROC lower by <= 0.01", "measured": d,
                    "met": None if d is None else d >= -0.01})
    if teacher is None:
        teacher = next((n for n, r in by_name.items() if r["method"] == "fp32"
                        and r["backbone"].split(".")[0] == "efficientnet_b0"), None)
    t = by_name.get(teacher) if teacher else None
    if t is not None:
        scored = []
        for r in rows:
            if r["method"] == "fp32" or r["name"] == t["name"]:
                continue
            d = None if None in (r.get("mean_auroc"), t.get("mean_auroc")) else r["mean_auroc"] - t["mean_auroc"]
            scored.append((t["model_ms"] / r["model_ms"], d, r))
        # the best compressed model: the fastest within the AUROC budget; and, when that is another
        # model, the fastest of all with what it costs, so the trade-off is in plain sight
        within = [x for x in scored if x[1] is None or x[1] >= -0.02]
        picks = []
        if within:
            picks.append(("best compressed", max(within, key=lambda x: x[0])))
        if scored:
            fastest = max(scored, key=lambda x: x[0])
            if not picks or fastest[2] is not picks[0][1][2]:
                picks.append(("fastest compressed", fastest))
        for label, (speed, d, r) in picks:
            out.append({"target": f"{label} ({r['name']}) >= 3x faster than {t['name']}", "measured": speed,
                        "met": speed >= 3.0})
            out.append({"target": f"{label} ({r['name']}) mean AUROC lower by <= 0.02 vs {t['name']}",
                        "measured": d, "met": None if d is None else d >= -0.02})
    return out


def targets_markdown(checks: Sequence[dict]) -> str:
    """The target checks as a small markdown table."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for c in checks:
        m = c["measured"]
        shown = "n/a" if m is None else (f"{m:+.4f}" if "AUROC" in c["target"] else f"{m:.2f}x")
        met = {True: "yes", False: "NO", None: "n/a (no AUROC)"}[c["met"]]
        lines.append(f"| {c['target']} | {shown} | {met} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- random-init speed table


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
    from common.export import export_onnx
    from common.predict import create_untrained_run
    from common.prune import prune_model, sparsity_report

    log = log or _stderr
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
            _write_report(out, {"method": "prune", "source": str(work / prune_model_name), "sparsity": sparsity,
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


SPEED_COLUMNS = tuple(c for c in TABLE_COLUMNS if c[0] not in ("mean_auroc", "d_auroc", "mean_accuracy"))


# ----------------------------------------------------------------------------- the experiment

# Per profile: the backbones of the table (row names or timm names of common.experiments.BACKBONES),
# pruning levels (unstructured, then channel-structured), the student and its input side.
PLANS = {
    "paper": {"backbones": ("ResNet-50", "DenseNet-121 (CheXNet)", "EfficientNet-B0", "mobilenetv3_large_100"),
              "sparsities": (0.3, 0.5, 0.7), "structured": (0.3,), "student_image_size": 160},
    # quick: DenseNet-121 is the slowest to train on a CPU; its int8 ratios are in the 224 px table
    "quick": {"backbones": ("ResNet-50", "EfficientNet-B0", "mobilenetv3_large_100"),
              "sparsities": (0.5,), "structured": (0.3,), "student_image_size": 48},
    "smoke": {"backbones": ("EfficientNet-B0",), "sparsities": (0.5,), "structured": (), "student_image_size": 24},
}


def _key(params: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cached_compress(method: str, source: Path, params: dict, runs_root: Path,
                    make: Callable[[Path], Path]) -> tuple[Path, bool]:
    """RUNS/<source run>--<method>-<key of params>, made by `make(out)` unless it already finished.

    Returns (run dir, reused). An interrupted one is made again (its fine-tune resumes).
    """
    out = runs_root / f"{source.name}--{method}-{_key({'source': str(source), **params})}"
    if (out / COMPRESSION_JSON).is_file() and (out / EXPORT_DIR / ONNX_META).is_file():
        print(f"{method}: reusing the finished {out}", file=sys.stderr)
        from common.experiments import touch_used

        touch_used(out)
        return out, True
    return make(out), False


def cached_distill(teacher_run: Path, runs_root: Path, student: str, image_size: int, temperature: float,
                   alpha: float, epochs: int, max_steps: int | None, lr: float, pretrained,
                   **fit_common) -> tuple[Path, bool]:
    """`distill_run` through the run cache, keyed by the student recipe (the compression notebook's
    student and bench/bench_distill.py's students share one key, so each reuses the other's)."""
    params = {"student": student, "image_size": image_size, "temperature": float(temperature), "alpha": float(alpha),
              "epochs": epochs, "max_steps": max_steps, "lr": lr, "pretrained": pretrained}
    return cached_compress("distill", teacher_run, params, runs_root, lambda out: distill_run(
        teacher_run, out, student=student, student_image_size=image_size, temperature=temperature, alpha=alpha,
        epochs=epochs, max_steps=max_steps, lr=lr, pretrained=pretrained, **fit_common))


def compression_experiment(profile: str = "quick", smoke: bool = False, data_full=None, data_cardiomegaly=None,
                           runs_dir: str | os.PathLike | None = None, backbones: Sequence[str] | None = None,
                           teacher: str = "EfficientNet-B0", sparsities: Sequence[float] | None = None,
                           structured_sparsities: Sequence[float] | None = None, student: str = DEFAULT_STUDENT,
                           student_image_size: int | None = None, temperature: float = 2.0, alpha: float = 0.5,
                           threads: int = 2, speed_at_224: bool = True, calibration_images: Sequence[str] = (),
                           progress: bool = True):
    """The compression notebook's experiment: one trade-off table (and, optionally, a 224 px speed table).

    Backbones are trained (or reused from the run cache, exactly as the backbone ablation trains
    them: all 14 labels, the profile's recipe) by `common.experiments`; each is exported fp32 and
    int8; `teacher` (a backbone of the list, or "best": the best dev mean AUROC) is pruned at each
    sparsity and distilled into `student`. Returns a `common.experiments.Experiment`.
    """
    import tempfile

    from common import experiments as ex

    prof = ex.get_profile(profile, smoke)
    plan = PLANS["smoke" if prof.smoke else prof.name]
    data = ex.resolve_data(data_full, data_cardiomegaly)
    if not data.dirs():
        raise ValueError("no data: give DataFull and/or DataCardiomegaly, or leave both None for the defaults")
    root = ex.runs_dir(runs_dir)
    exp = ex.Experiment("compression", "Compression: int8, pruning and distillation", prof.label,
                        data)
    chosen = ex._choose_backbones(backbones or plan["backbones"])
    seen: dict[str, str] = {}
    backbone_runs: dict[str, Path] = {}
    for row_name, timm_name in chosen:
        cfg = ex.train_config(prof, timm_name, "all14", data)
        if cfg.model_name in seen:  # smoke maps several names to one tiny model: one row each
            continue
        run = ex.cached_fit(cfg, row_name, timm_name, root)
        exp.runs[row_name] = run
        seen[cfg.model_name] = row_name
        backbone_runs[f"{row_name} ({cfg.model_name})" if cfg.model_name != timm_name else row_name] = run.run_dir
    if teacher == "best":
        def dev_auroc(path: Path) -> float:
            dev = (runs.load_json(path / runs.METRICS_JSON).get("dev") or {}).get("mean_auroc")
            return -1.0 if dev is None else float(dev)

        teacher_name = max(backbone_runs, key=lambda n: dev_auroc(backbone_runs[n]))
    else:
        matches = [n for n in backbone_runs if n == teacher or n.startswith(f"{teacher} (")]
        if not matches:
            raise ValueError(f"teacher {teacher!r} is not one of the table's backbones {list(backbone_runs)}; "
                             "add it to Backbones or use 'best'")
        teacher_name = matches[0]
    teacher_run = backbone_runs[teacher_name]
    size = int(student_image_size or plan["student_image_size"])
    student_model = prof.model_for(student)
    fit_common = {"progress": progress, "num_workers": prof.num_workers, "n_boot": prof.n_boot}
    pruned: list[Path] = []
    for s_, structured in [*[(s, False) for s in (sparsities if sparsities is not None else plan["sparsities"])],
                           *[(s, True) for s in (structured_sparsities if structured_sparsities is not None
                                                 else plan["structured"])]]:
        params = {"sparsity": float(s_), "structured": structured, "epochs": 1, "max_steps": prof.max_steps,
                  "lr": prof.lr * PRUNE_LR_FACTOR}
        run_dir, reused = cached_compress("prune", teacher_run, params, root, lambda out, p=params: prune_run(
            teacher_run, out, p["sparsity"], structured=p["structured"], scope="layer" if p["structured"] else "global",
            epochs=p["epochs"], max_steps=p["max_steps"], lr=p["lr"], **fit_common))
        pruned.append(run_dir)
        role = f"{teacher_name} pruned {s_:.0%}" + (" channels" if structured else "")
        exp.runs[role] = ex.RunRef(role, run_dir, teacher_name, runs.read_config(run_dir)["model"]["model_name"], reused)
    student_run, reused = cached_distill(teacher_run, root, student_model, size, temperature, alpha, prof.epochs,
                                         prof.max_steps, prof.lr, prof.pretrained_for(student_model), **fit_common)
    exp.runs[f"student ({student_model})"] = ex.RunRef(f"student ({student_model})", student_run, student,
                                                       student_model, reused)
    variants = variants_for(backbone_runs, pruned, [student_run])
    split = split_images(teacher_run, "test")
    # end-to-end on the largest test files: a full-size radiograph's decode is what serving pays
    timing = sorted(split.paths, key=lambda f: Path(f).stat().st_size, reverse=True)[:20]
    timing_size = _image_size_text(timing[0]) if timing else "no image"
    # smoke: the code path only, so fewer timed repeats
    repeats = {"repeats": 5, "e2e_repeats": 5} if prof.smoke else {"repeats": 30, "e2e_repeats": 20, "rounds": 2}
    rows = measure_table(variants, timing_images=timing, threads=threads, progress=progress, **repeats)
    main_title = table_title(rows, threads).removeprefix("SYNTHETIC DATA - ")
    exp.tables.append(ex.Table(ex.title(main_title, data.synthetic or any(r["synthetic"] for r in rows)),
                               _display_frame(rows, TABLE_COLUMNS), table_note(rows)
                               + f" Teacher of the pruned and distilled rows: {teacher_name}. Test split: "
                               f"{rows[0]['n_images']} images; end-to-end timed on its {len(timing)} largest image "
                               f"files (the largest: {timing_size})."))
    # the comparison is with the fp32 EfficientNet-B0 teacher; without such a row, our teacher
    has_b0 = any(r["method"] == "fp32" and r["backbone"].split(".")[0] == "efficientnet_b0" for r in rows)
    checks = check_targets(rows, teacher=None if has_b0 else f"{teacher_name} fp32")
    exp.tables.append(ex.Table(ex.title("Compression targets (issue 6) on the trained runs", data.synthetic),
                               _targets_frame(checks), "AUROC changes on a small test split are noise-sized; "
                               "sizes and speeds are measured."))
    exp.headline = {"rows": rows, "targets": checks, "teacher": teacher_name}
    if speed_at_224 and not prof.smoke:
        calib = list(calibration_images) or split_images(teacher_run, "dev").paths[:32]
        with tempfile.TemporaryDirectory(prefix="compress-224-") as tmp:
            # no pruned copies here: the trained table shows what pruning does (bench/ has them at 224)
            speed_rows = measure_table(random_init_variants(tmp, ["resnet50", "densenet121", "efficientnet_b0",
                                                                  "mobilenetv3_large_100"], 224, student, 160, calib,
                                                            prune_model_name=None),
                                       timing_images=timing, threads=threads, score=False, rounds=2,
                                       progress=progress)
        exp.tables.append(ex.Table(ex.title(f"Size and speed at 224 px, random initialisation (batch 1, {threads} CPU "
                                            "threads; int8 calibrated on this data's images)", data.synthetic),
                                   _display_frame(speed_rows, SPEED_COLUMNS), table_note(speed_rows)
                                   + " Random weights: no AUROC here; ratios of size and speed do not depend on training."))
        speed_checks = [c for c in check_targets(speed_rows) if "AUROC" not in c["target"]]
        exp.tables.append(ex.Table(ex.title("Compression targets (issue 6) at 224 px, random initialisation",
                                            data.synthetic),
                                   _targets_frame(speed_checks)))
        exp.headline.update(speed_rows=speed_rows, speed_targets=speed_checks)
    return exp


def _image_size_text(path: str | os.PathLike) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return f"{im.size[0]}x{im.size[1]} {im.format or 'image'}"


def _display_frame(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]):
    import pandas as pd

    return pd.DataFrame([{h: _cell(r.get(k), f, k) for k, h, f in columns} for r in rows])


def _targets_frame(checks: Sequence[dict]):
    import pandas as pd

    def shown(c):
        m = c["measured"]
        return "n/a" if m is None else (f"{m:+.4f}" if "AUROC" in c["target"] else f"{m:.2f}x")

    return pd.DataFrame([{"Target": c["target"], "Measured": shown(c),
                          "Met": {True: "yes", False: "NO", None: "n/a"}[c["met"]]} for c in checks])


if __name__ == "__main__":  # the measuring child of `measure_served`
    print(_CHILD_MARK + json.dumps(_measure_child(json.loads(sys.argv[1]))), flush=True)
