"""distill: knowledge distillation for multi-label sigmoid outputs, and of a whole run.

loss = masked BCE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), where p_T =
sigmoid(logit / T) per label and KL is the Bernoulli KL divergence averaged over images and
labels. The soft term covers every label of every image, including labels the image's source
never annotated (NaN), which is where a teacher trained on the fully labelled NIH set adds the
most. T^2 keeps the soft term's gradient on the same scale as the hard term's as T grows
(Hinton et al. 2015). The KL form equals BCE against the teacher minus the teacher's entropy:
the same gradients, but zero when the student matches the teacher, so its value reads directly.

`distill_run` trains a smaller timm model (often at a lower resolution) with `common.train.fit` on
the teacher run's data and split, with `DistillLoss` as `FitHooks.loss`; the teacher sees the same
augmented batch, resized to its own input (`TeacherOnBatch`). The student run is a normal run
directory; its per-micro-batch loss parts are in `distill_loss.csv`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from common import runs
from common.compress.base import FineTune, source_train_config, write_report
from common.export import export_onnx
from common.labels import TASKS
from common.models import build_model, model_input_config
from common.serving import EXPORT_DIR
from common.train import BatchTransform, FitHooks, fit

DISTILL_LOSS_CSV = "distill_loss.csv"
DISTILL_LOSS_COLUMNS = ("micro_batch", "hard", "soft", "total")
DEFAULT_STUDENT = "mobilenetv3_small_100"


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * mean Bernoulli KL(sigmoid(teacher / T) || sigmoid(student / T)) over images and labels."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the student must have the teacher's labels, in the same order"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    s = student_logits.float() / t
    q = teacher_logits.detach().float() / t
    p_teacher = torch.sigmoid(q)
    cross = F.binary_cross_entropy_with_logits(s, p_teacher, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(q, p_teacher, reduction="none")
    return (cross - entropy).mean() * (t * t)


def distillation_terms(
    hard_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard_loss + alpha * soft, soft) as tensors: nothing is read back from the device.

    `hard_loss` is the training engine's own masked BCE on the labels (the loss every run uses),
    so a distilled run differs from a normal one only by the soft term.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return hard_loss + float(alpha) * soft, soft


class TeacherOnBatch:
    """A teacher run's logits for the student's training batch.

    The batch arrives normalised for the student (its mean / std / channels / size); the grey
    image is recovered, resized to the teacher's input size (bilinear, antialiased, as
    `common.preprocess` resizes) and normalised by `common.train.BatchTransform` for the teacher.
    """

    def __init__(self, run_dir: str | os.PathLike, student_input: dict):
        run = runs.load_run(run_dir)
        self.run_dir = Path(run_dir)
        self.model = run.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.labels = list(run.labels)
        self.input = dict(run.input)
        self.student_input = dict(student_input)
        self._transform = None
        self._device = None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        device = inputs.device
        if self._device != device:
            self.model.to(device)
            self._transform = BatchTransform(self.input, device)
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
    """`FitHooks.loss` for distillation (`distillation_terms`); keeps each micro-batch's
    (hard, soft, total) in `history` as a tensor on the training device, so no micro-batch waits for
    the GPU to read them (`fit` syncs its own loss only every few steps); `parts()` reads them once."""

    teacher: TeacherOnBatch
    temperature: float = 2.0
    alpha: float = 0.5
    history: list = field(default_factory=list)

    def __call__(self, hard, logits, targets, inputs):
        total, soft = distillation_terms(hard, logits, self.teacher(inputs), self.temperature, self.alpha)
        self.history.append(torch.stack([hard.detach().float(), soft.detach(), total.detach().float()]))
        return total

    def parts(self) -> list[dict]:
        """[{"micro_batch", "hard", "soft", "total"}] as floats, one per micro-batch so far."""
        rows = torch.stack(self.history).cpu().tolist() if self.history else []
        return [{"micro_batch": i, "hard": h, "soft": s, "total": t} for i, (h, s, t) in enumerate(rows)]


def distill_run(
    teacher_run: str | os.PathLike,
    out: str | os.PathLike,
    student: str = DEFAULT_STUDENT,
    student_image_size: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    tune: FineTune = FineTune(),
    **train_overrides,
) -> Path:
    """Train `student` (any timm name) on the teacher run's data and split, distilling the teacher.

    loss = masked BCE(labels) + alpha * T^2 * KL(sigmoid(teacher / T) || sigmoid(student / T)).
    The student run is a normal run directory (predict, evaluate, export, the app); its
    per-micro-batch loss parts are in distill_loss.csv and the settings in compression.json.
    student_image_size None: the teacher's input size. `tune`: epochs, steps, lr (None: the
    teacher's), data folders, export.
    """
    log = tune.logger
    teacher_run, out = Path(teacher_run), Path(out)
    if out.resolve() == teacher_run.resolve():
        raise ValueError(f"--out {out} is the teacher run itself; give a new folder for the student")
    t_cfg = runs.read_config(teacher_run)
    size = int(student_image_size or t_cfg["input"]["image_size"])
    cfg = source_train_config(teacher_run, out, data=tune.data, model_name=student, image_size=size,
                              epochs=tune.epochs, max_steps=tune.max_steps, lr=tune.lr, freeze=0, **train_overrides)
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
        _write_distill_loss(out, loss.parts())
    report = {"method": "distill", **init, "student": student, "student_image_size": size,
              "train": {"epochs": cfg.epochs, "max_steps": cfg.max_steps, "lr": cfg.lr}}
    if tune.export:
        export_onnx(out, out / EXPORT_DIR, int8=True, log=log)
    write_report(out, report)
    return out


def _write_distill_loss(run_dir: Path, parts: Sequence[dict]) -> None:
    lines = [",".join(DISTILL_LOSS_COLUMNS)] + [
        f"{h['micro_batch']},{h['hard']:.6g},{h['soft']:.6g},{h['total']:.6g}" for h in parts]
    runs.atomic_write_text(run_dir / DISTILL_LOSS_CSV, "\n".join(lines) + "\n")


def read_distill_loss(run_dir: str | os.PathLike) -> list[dict]:
    """The per-micro-batch loss parts a distillation wrote (distill_loss.csv)."""
    path = Path(run_dir) / DISTILL_LOSS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a distilled run (medimaging compress --method distill)?")
    rows = path.read_text().strip().splitlines()
    keys = rows[0].split(",")
    return [{k: (int(v) if k == "micro_batch" else float(v)) for k, v in zip(keys, r.split(","))} for r in rows[1:]]
