"""Compression of a trained run, and the one table that says what it costs and what it buys.

    from common import compress
    compress.quantize_run("runs/all14", "runs/all14-int8")                 # ONNX export folder (fp32 + int8)
    compress.prune_run("runs/all14", "runs/all14-prune50", sparsity=0.5)   # a run dir, fine-tuned
    compress.distill_run("runs/all14", "runs/all14-student",
                         student="mobilenetv3_small_100", student_image_size=160)   # a run dir
    table = compress.measure_table(compress.variants_for(...), out_dir=...)

- int8: ONNX Runtime static QDQ quantisation with per-channel weights, calibrated on dev-split
  images, dynamic quantisation as the fallback: `common.export` does it; the result is an export
  folder (`model.onnx`, `model.int8.onnx`, `model.json`) that `medimaging predict --onnx --int8`
  and the app serve.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common import runs
from common.labels import LABELS, TASKS

COMPRESSION_JSON = "compression.json"
DISTILL_LOSS_CSV = "distill_loss.csv"
EXPORT_DIR = "export"  # the same name common.onnx_predict uses for a run's export folder
METHODS = ("int8", "prune", "distill")
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
    from common.train import TrainConfig

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
                 n_calibration: int = 64, log: Callable[[str], None] | None = None) -> Path:
    """Post-training int8 of a run: an export folder with model.onnx and model.int8.onnx.

    Static QDQ, per-channel weights, calibrated on the run's dev-split images (or the given ones);
    dynamic quantisation when static fails (all in `common.export`). Default out: RUN/export.
    """
    from common.export import export_onnx
    from common.onnx_predict import FP32, INT8

    log = log or _stderr
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    export_onnx(run_dir, out, int8=True, calibration_images=calibration_images, n_calibration=n_calibration, log=log)
    meta = runs.load_json(out / "model.json")
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
        from common.onnx_predict import FP32

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
    """`FitHooks.loss` for distillation; keeps each micro-batch's loss parts in `history`."""

    teacher: TeacherOnBatch
    temperature: float = 2.0
    alpha: float = 0.5
    history: list[dict] = field(default_factory=list)

    def __call__(self, hard, logits, targets, inputs):
        from common.distill import distillation_loss

        total, parts = distillation_loss(hard, logits, self.teacher(inputs), self.temperature, self.alpha)
        self.history.append({"micro_batch": len(self.history), **parts})
        return total


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
            f"{h['micro_batch']},{h['hard']:.6g},{h['soft']:.6g},{h['total']:.6g}" for h in loss.history]
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
    `fit` uses (`load_dataset`, `combine`, `select_task`, `patient_split`).
    """
    from common.data import combine, default_data_dirs, load_dataset, patient_split
    from common.train import select_task

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
    frame, labels = select_task(combine(sets).frame, task)
    if list(labels) != list(cfg["labels"]):
        raise ValueError(f"{run_dir}: task {task!r} gives outputs {labels}, the run has {cfg['labels']}")
    fractions = tuple(float(f) for f in train.get("split_fractions", (0.7, 0.1, 0.2)))
    which = patient_split(frame, seed=int(train.get("seed", 49)), fractions=fractions).to_numpy() == split
    chosen = frame.loc[which]
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
    """RUN/export with model.onnx (and model.int8.onnx); exported only when missing or older than the weights."""
    from common.export import export_onnx
    from common.onnx_predict import FP32, INT8

    run_dir = Path(run_dir)
    out = run_dir / EXPORT_DIR
    weights = run_dir / runs.BEST
    needed = [out / FP32, out / "model.json"] + ([out / INT8] if int8 else [])
    fresh = all(p.is_file() for p in needed) and (
        not weights.is_file() or min(p.stat().st_mtime for p in needed) >= weights.stat().st_mtime)
    if not fresh:
        export_onnx(run_dir, out, int8=int8, log=log or _stderr)
    return out


_CHILD_MARK = "MEDIMAGING-MEASURE "


def measure_served(export_dir: str | os.PathLike, int8: bool, images: Sequence[str | os.PathLike],
                   threads: int = 2, repeats: int = 30, e2e_repeats: int = 20, warmup: int = 5,
                   timeout: float = 900) -> dict:
    """Latency and memory of an export as served, in a fresh torch-free process (`python -m common.compress`).

    model_ms: median of `repeats` ONNX Runtime runs on one preprocessed image (batch 1, `threads`
    intra-op threads). e2e_ms: median over `e2e_repeats` predictions from the image file (decode,
    resize, normalise, model). peak_rss_mb: the process's peak resident memory at the end.
    """
    if not images:
        raise ValueError("measure_served: no image to time with")
    spec = {"export_dir": str(export_dir), "int8": bool(int8), "images": [str(p) for p in images],
            "threads": int(threads), "repeats": int(repeats), "e2e_repeats": int(e2e_repeats), "warmup": int(warmup)}
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
    import resource
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
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"model_ms": float(np.median(model) * 1e3), "model_ms_min": float(np.min(model) * 1e3),
            "e2e_ms": float(np.median(e2e) * 1e3), "peak_rss_mb": rss_kb / 1024.0, "load_s": load_s,
            "threads": spec["threads"], "torch_imported": "torch" in sys.modules,
            "model_file": predictor.model_file.name}


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


def speed_source(row: dict, base: dict | None) -> str:
    """A short, honest note on where a row's speed-up comes from (or why there is none)."""
    dense = 1.0 - float(row.get("depthwise_share") or 0.0)
    if row["method"] == "fp32":
        return "reference (fp32)"
    parts = []
    if row["method"] == "distill" and base is not None:
        parts.append(f"{base['gmacs'] / max(row['gmacs'], 1e-12):.1f}x fewer MACs (smaller net, {row['image_size']} px)")
    if row["method"] == "prune":
        parts.append("none expected: the zeros are still multiplied by dense kernels"
                     + ("; zeroed channels are not removed" if row.get("structured") else "")
                     + " (smaller only when zipped)")
    if row["int8"]:
        note = f"int8 kernels on dense conv/GEMM ({dense:.0%} of MACs)"
        if dense < 0.95:
            note += f"; depthwise ({1 - dense:.0%}) and QDQ steps gain nothing"
        parts.append(note)
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
    rounds > 1 repeats the timing and keeps each row's fastest median (the least disturbed
    by other work on a shared machine). score=False skips AUROC (random-init benchmarks).
    """
    from tqdm.auto import tqdm

    log = log or _stderr
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique: {names}")
    stats_cache: dict[str, dict] = {}
    split_cache: dict[str, SplitImages] = {}
    rows = []
    for v in tqdm(variants, desc="measure", unit="model", disable=not progress):
        run_key = str(Path(v.run_dir).resolve())
        if run_key not in stats_cache:
            stats_cache[run_key] = model_stats(v.run_dir)
        stats = stats_cache[run_key]
        ensure_export(v.run_dir, int8=v.int8, log=log)
        from common.onnx_predict import FP32, INT8

        report = read_report(v.run_dir) or {}
        row = {"name": v.name, "backbone": v.backbone or stats["model_name"], "method": v.method, "detail": v.detail,
               "int8": v.int8, "baseline": v.baseline, "structured": bool(report.get("structured", False)),
               **{k: stats[k] for k in ("params", "nonzero_params", "gmacs", "depthwise_share", "image_size")},
               **file_stats(v.export_dir / (INT8 if v.int8 else FP32))}
        if score:
            key = run_key
            if key not in split_cache:
                split_cache[key] = split_images(v.run_dir, "test")
            split = split_cache[key]
            row.update(score_served(v.export_dir, v.int8, split, threads=threads, progress=False))
            row["synthetic"] = split.synthetic
            images = list(timing_images or split.paths[:max(e2e_repeats, 1)])
        else:
            row.update(mean_auroc=None, mean_accuracy=None, n_images=0)
            row["synthetic"] = bool(runs.read_config(v.run_dir).get("synthetic", False))
            images = list(timing_images or [])
        best = None
        for _ in range(max(1, rounds)):
            m = measure_served(v.export_dir, v.int8, images, threads=threads, repeats=repeats, e2e_repeats=e2e_repeats)
            if best is None or m["model_ms"] < best["model_ms"]:
                best = {**m, "e2e_ms": min(m["e2e_ms"], best["e2e_ms"]) if best else m["e2e_ms"]}
        row.update({k: best[k] for k in ("model_ms", "e2e_ms", "peak_rss_mb", "torch_imported")})
        rows.append(row)
        log(f"measure: {v.name}: {row['file_mb']:.2f} MB, {row['model_ms']:.1f} ms model, {row['e2e_ms']:.1f} ms "
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
    for name, run in backbone_runs.items():
        variants.append(Variant(f"{name} fp32", Path(run), False, "fp32", name))
        fp32_row[str(Path(run).resolve())] = f"{name} fp32"
        if int8:
            variants.append(Variant(f"{name} int8", Path(run), True, "int8", name, baseline=f"{name} fp32"))

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
        variants.append(Variant(f"{base.rsplit(' ', 1)[0]} pruned {detail}", run, False, "prune",
                                base.rsplit(" ", 1)[0], detail, base))
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
    synthetic = any(r.get("synthetic") for r in rows)
    return (("SYNTHETIC data: " if synthetic else "")
            + f"Compression trade-offs: size, speed (batch 1, {threads} CPU threads, ONNX Runtime) and test AUROC")


def table_note(rows: Sequence[dict]) -> str:
    """What the columns mean and where speed does (not) come from, for under the table."""
    return (
        "Ratios (size x, speed x, AUROC change) compare each row with its baseline: an int8 row with its own fp32 "
        "row, a pruned or distilled row with the fp32 run it came from. model ms: median ONNX Runtime latency of "
        "one preprocessed image; end-to-end ms: image file decode + resize + normalise + model; peak RSS: the "
        "serving process (torch-free). Mean accuracy is at 0.5, the original study's metric. "
        "Where speed comes from: int8 kernels (VNNI / AMX on x86) speed up dense convolutions and matrix "
        "products; depthwise convolutions (most MACs of EfficientNet and MobileNet) are memory-bound and gain "
        "nothing, and each quantise / dequantise step costs time, so depthwise nets are smaller but not faster "
        "in int8. Pruned weights are zeros stored densely: the same dense kernels multiply them, so pruning "
        "alone saves no time and only shrinks the zipped file; structured pruning would be faster only after "
        "removing the zeroed channels, which changes the architecture. Distillation is faster because the "
        "student does fewer MACs (a smaller network at a lower resolution)."
    )


def check_targets(rows: Sequence[dict], teacher: str | None = None) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (None: not measurable).

    int8 >= 3x smaller than fp32 for every backbone; >= 2.5x faster for ResNet-50; mean AUROC
    lower by <= 0.01. The best compressed model >= 3x faster model-only than the fp32 `teacher`
    row (default: the EfficientNet-B0 fp32 row) with mean AUROC lower by <= 0.02.
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
        best, best_speed = None, 0.0
        for r in rows:
            if r["method"] == "fp32" or r["name"] == t["name"]:
                continue
            d = None if None in (r.get("mean_auroc"), t.get("mean_auroc")) else r["mean_auroc"] - t["mean_auroc"]
            speed = t["model_ms"] / r["model_ms"]
            if (d is None or d >= -0.02) and speed > best_speed:
                best, best_speed = (r, d), speed
        if best is not None:
            r, d = best
            out.append({"target": f"best compressed ({r['name']}) >= 3x faster than {t['name']}",
                        "measured": best_speed, "met": best_speed >= 3.0})
            out.append({"target": f"best compressed ({r['name']}) mean AUROC lower by <= 0.02 vs {t['name']}",
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


if __name__ == "__main__":  # the measuring child of `measure_served`
    print(_CHILD_MARK + json.dumps(_measure_child(json.loads(sys.argv[1]))), flush=True)
