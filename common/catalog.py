"""Which trained models a front end can offer, what each one is, and which to open first.

    entries = catalog(model_roots())       # no settings: the run cache, runs/ and results/
    first = default_entry(entries)          # the best stage-2 run by test mean AUROC, real data first
    for e in entries:
        print(e.label)                      # "multi task: stage 2 | efficientnet_b0, 64 px | SYNTHETIC | ..."

A model is a run directory with weights (`common.runs.find_runs`) or an export folder
(`common.serving`'s layout) that is not its run's own `export/`. What a run *is* (its experiment and
role: stage 1, stage 2, stage 2 without stage 1, an ablation row, a compressed variant) comes from
the experiment records `medimaging reproduce` writes (OUT/tables/<notebook>.json, see
`common.experiments.records`), matched by the run folder's name, which holds the run's key (so a
moved run cache still matches). A run no record names is described from its own files: the
Cardiomegaly task is a stage 1, 14 labels started from another run a stage 2, a compressed variant
has its compression report. Torch-free: the app lists models without importing it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.compress.base import COMPRESSION_JSON
from common.experiments.notebooks import (DEFAULT_OUT, RESULTS_DIR, STAGE1, STAGE2, TABLES_DIR, WITHOUT_STAGE1,
                                          in_reproduce_order, is_compressed, runs_dir)
from common.paths import REPO_ROOT
from common.runs import CONFIG, METRICS_JSON, find_runs
from common.serving import FP32, ONNX_META

RUNS_DIR = "runs"  # where `medimaging train --out runs/NAME` puts a run by the README's examples
DEFAULT_ROOTS = (RUNS_DIR, RESULTS_DIR)  # searched in the working directory and the checkout, after the run cache

# What a model is, in the order the app lists a group's entries (and picks the first from).
KINDS = ("stage 2", "without stage 1", "stage 1", "ablation row", "compressed variant", "run", "export folder")
_ROLE_KINDS = {STAGE2: "stage 2", WITHOUT_STAGE1: "without stage 1", STAGE1: "stage 1"}
CARDIOMEGALY_TASK = "cardiomegaly"  # common.labels.TASKS: the stage-1 task


@dataclass(frozen=True)
class Role:
    """One run as one experiment record names it."""

    experiment: str  # the notebook's name: OUT/tables/<experiment>.json
    role: str  # the record's role: "stage 2", "ResNet-50", "EfficientNet-B0 pruned 50%", ...

    @property
    def text(self) -> str:
        return f"{self.experiment.replace('_', ' ')}: {self.role}"


@dataclass(frozen=True)
class ModelEntry:
    """A model the app can serve, described by meaning."""

    path: Path  # the run directory or export folder (resolved)
    kind: str  # one of KINDS
    role: Role | None  # what the experiment records call it (None: no record names it)
    also: tuple[Role, ...]  # the other records that use the same run
    model_name: str
    task: str | None  # the training task (config.json), None for an export folder
    image_size: int | None
    data: str  # "SYNTHETIC" or the data folders' names
    synthetic: bool
    test_auroc: float | None  # test mean AUROC from metrics.json
    made: str  # "YYYY-MM-DD HH:MM", local time, when the run (or export) was made

    @property
    def name(self) -> str:
        """What it is: "multi task: stage 2", or "runs/first (all14 run)" when no record names it."""
        if self.role is not None:
            return self.role.text
        kind = f"{self.task} run" if self.kind == "run" and self.task else self.kind
        return f"{self.path.parent.name}/{self.path.name} ({kind})"

    @property
    def label(self) -> str:
        """One line for a picker: what it is, the model, its data, test mean AUROC and date."""
        size = f", {self.image_size} px" if self.image_size else ""
        auroc = "n/a" if self.test_auroc is None else f"{self.test_auroc:.3f}"
        return f"{self.name} | {self.model_name}{size} | {self.data} | test AUROC {auroc} | {self.made}"

    @property
    def details(self) -> str:
        """The rest: where it lies and the other experiments that use the same run."""
        text = f"{self.kind}; {self.path}"
        if self.also:
            text += "; also " + ", ".join(r.text for r in self.also)
        return text


def model_roots(spec: str | None = None) -> list[Path]:
    """Folders to search: `spec` (paths separated by the OS path separator, e.g. $MEDIMAGING_RUNS),
    else the run cache (`common.experiments.runcache.runs_dir`), then runs/ and results/ in the
    working directory and in the checkout, each folder once."""
    if spec:
        return [Path(p) for p in spec.split(os.pathsep) if p]
    roots = [runs_dir()] + [Path(n) for n in DEFAULT_ROOTS] + [REPO_ROOT / n for n in DEFAULT_ROOTS]
    return _unique(roots)


def record_folders() -> list[Path]:
    """Where reproduce's records are looked for: OUT folders in the working directory and in the
    checkout, a user's own reproduction (results/local) before the committed results."""
    names = (DEFAULT_OUT, RESULTS_DIR)
    return _unique([Path(n) for n in names] + [REPO_ROOT / n for n in names])


def _unique(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def model_stamp(path: Path) -> float:
    """When a model was made: its config.json (run) or model.json (export) file's mtime.

    Not the folder's own mtime: exporting a run on first use adds a folder inside it, which
    would change the model's label (and a selection made by it) between two looks."""
    for name in (CONFIG, ONNX_META):
        if (path / name).is_file():
            return (path / name).stat().st_mtime
    return path.stat().st_mtime


def find_models(roots: Sequence[Path]) -> list[Path]:
    """Run directories (with weights) and stand-alone export folders under roots, newest first."""
    found: dict[Path, float] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for run in find_runs(root):
            found[run.resolve()] = model_stamp(run)
        for meta in root.rglob(ONNX_META):
            folder = meta.parent.resolve()
            if (folder / FP32).is_file() and not (folder.parent / CONFIG).is_file():
                found[folder] = model_stamp(folder)
    return sorted(found, key=lambda p: -found[p])


def recorded_roles(folders: Sequence[Path] | None = None) -> dict[str, list[Role]]:
    """Run folder name -> the roles experiment records give it, in reproduce order.

    An unreadable record is passed over: it names no run, and the list still shows every model."""
    roles: dict[str, list[Role]] = {}
    for folder in record_folders() if folders is None else folders:
        files = {p.stem: p for p in sorted((Path(folder) / TABLES_DIR).glob("*.json"))}
        for name in in_reproduce_order(files):
            try:
                runs = json.loads(files[name].read_text()).get("runs") or {}
                pairs = [(role, Path(d["run_dir"]).name) for role, d in runs.items()]
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                continue
            for role, run_name in pairs:
                r = Role(name, str(role))
                if r not in roles.setdefault(run_name, []):
                    roles[run_name].append(r)
    return roles


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _kind(role: Role, path: Path) -> str:
    if role.role in _ROLE_KINDS:
        return _ROLE_KINDS[role.role]
    return "compressed variant" if is_compressed(path) else "ablation row"


def _inferred_kind(path: Path, info: dict) -> str:
    """What a run no record names is, from its own files."""
    if (path / CONFIG).is_file():
        if is_compressed(path) or (path / COMPRESSION_JSON).is_file():
            return "compressed variant"
        train = info.get("train") or {}
        if train.get("task") == CARDIOMEGALY_TASK:
            return "stage 1"
        if train.get("init_from") and len(info.get("labels") or []) > 1:
            return "stage 2"
        return "run"
    return "export folder"


def _describe_data(info: dict) -> str:
    if info.get("synthetic"):
        return "SYNTHETIC"
    roots = [d.get("root") for d in info.get("data") or [] if isinstance(d, dict) and d.get("root")]
    roots = roots or list((info.get("train") or {}).get("data") or [])
    return " + ".join(Path(r).name for r in roots) or "data not recorded"


def _made(info: dict, path: Path) -> str:
    try:
        when = _dt.datetime.fromisoformat(info["created"]).astimezone()
    except (KeyError, TypeError, ValueError):
        when = _dt.datetime.fromtimestamp(model_stamp(path)).astimezone()
    return when.strftime("%Y-%m-%d %H:%M")


def _test_auroc(path: Path) -> float | None:
    value = _read_json(path / METRICS_JSON).get("mean_auroc")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def model_entry(path: str | os.PathLike, roles: Sequence[Role] = ()) -> ModelEntry:
    """Describe one model (a run or an export folder) given the roles records give it."""
    path = Path(path).resolve()
    is_run = (path / CONFIG).is_file()
    info = _read_json(path / (CONFIG if is_run else ONNX_META))
    primary = None
    if roles:
        ranked = sorted(enumerate(roles), key=lambda ir: (KINDS.index(_kind(ir[1], path)), ir[0]))
        primary = ranked[0][1]
    kind = _kind(primary, path) if primary else _inferred_kind(path, info)
    if primary is not None and not is_run:
        kind = "export folder"  # an export of a recorded run: its role says of which
    size = (info.get("input") or {}).get("image_size")
    return ModelEntry(
        path=path, kind=kind, role=primary, also=tuple(r for r in roles if r != primary),
        model_name=(info.get("model") or {}).get("model_name", "?"), task=(info.get("train") or {}).get("task"),
        image_size=int(size) if size else None,
        data=_describe_data(info), synthetic=bool(info.get("synthetic")),
        test_auroc=_test_auroc(path if is_run else Path(info.get("run_dir") or path)), made=_made(info, path))


def describe_model(path: str | os.PathLike) -> str:
    """One line naming a model from its own files (no records): `ModelEntry.label`."""
    return model_entry(path).label


def catalog(roots: Sequence[Path] | None = None, records: Sequence[Path] | None = None) -> list[ModelEntry]:
    """Every model under `roots` (default `model_roots()`), grouped: the experiments in reproduce
    order (each group's entries by kind, then best test AUROC first), then models no record names,
    newest first."""
    roles = recorded_roles(records)
    entries = []
    for path in find_models(model_roots() if roots is None else roots):
        key = path.name
        if not (path / CONFIG).is_file():  # an export folder: named by the run it was exported from
            key = Path(_read_json(path / ONNX_META).get("run_dir") or path).name
        entries.append(model_entry(path, roles.get(key, ())))
    order = {name: i for i, name in enumerate(in_reproduce_order(sorted({e.role.experiment for e in entries if e.role})))}
    recorded = sorted((e for e in entries if e.role), key=lambda e: (
        order[e.role.experiment], KINDS.index(e.kind), -(e.test_auroc if e.test_auroc is not None else -1.0)))
    return recorded + [e for e in entries if not e.role]  # find_models: newest first


def default_entry(entries: Sequence[ModelEntry]) -> ModelEntry | None:
    """The model to open on: the best stage-2 run by test mean AUROC, real data before synthetic
    (a stage 2 without a test AUROC last); with no stage-2 run, the best of the others the same way."""
    if not entries:
        return None
    pool = [e for e in entries if e.kind == "stage 2"] or list(entries)
    return max(pool, key=lambda e: (not e.synthetic, e.test_auroc is not None,
                                    e.test_auroc if e.test_auroc is not None else 0.0, e.made))
