"""A deterministic synthetic chest X-ray dataset: the suite's embedded default when no data is present.

`generate(out_dir, layout="nih")` writes NIH's official layout (`Data_Entry_2017_v2020.csv` with
all of NIH's columns, several follow-ups per patient, `images/*.png`); `layout="cardiomegaly"` the
original project's binary layout (`train/ test/ train.csv test.csv`). Same arguments → same bytes.

Images are drawn by `common.synthetic.drawing.render` (its docstring says how each of the 14
findings looks).

The NIH layout also gets NIH's `BBox_List_2017.csv` (same columns and number format) with a box
where each finding drawn in one place was drawn (`BOXED_FINDINGS`: one per nodule, per effusion
side, around a pneumonia's opacities, the heart for Cardiomegaly, ...), in the pixels of the image
itself (NIH's are in its 1024-pixel images), so Grad-CAM localisation can be scored on it. The
diffuse or bilateral findings (Infiltration, Edema, Emphysema, Fibrosis, Pleural_Thickening) get
none. The boxes record what is drawn: the images are the same with or without them.

Every dataset folder gets a `SYNTHETIC.json` marker (`SYNTHETIC_MARKER`), so `load_dataset` sets
`is_synthetic` and every table and plot made from it can say SYNTHETIC.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from common.cache import cache_root, default_workers
from common.labels import LABELS, NO_FINDING
from common.paths import SYNTHETIC_MARKER
from common.synthetic.drawing import BOXED_FINDINGS, random_anatomy, render

__all__ = [
    "GENERATOR_VERSION", "DEFAULT_SIZES", "SYNTHETIC_MARKER", "BBOX_CSV", "BBOX_HEADER", "NIH_COLUMNS",
    "generate", "synthetic_root", "ensure_default",
    # common.synthetic.drawing's names, imported from here by the tests
    "BOXED_FINDINGS", "random_anatomy", "render",
]

GENERATOR_VERSION = 1
DEFAULT_SIZES = {"nih": 800, "cardiomegaly": 400}
# Patient id ranges far above NIH's (1..30805), one per layout, so synthetic patients never
# collide with real ones or with each other when datasets are combined.
_PATIENT_BASE = {"nih": 90_000_000, "cardiomegaly": 95_000_000}
BBOX_CSV = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # NIH's header line, verbatim
NIH_COLUMNS = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)

# Relative weights of each finding, and pairs that co-occur more often (as in NIH's statistics).
_WEIGHTS = {
    "Atelectasis": 1.3, "Cardiomegaly": 1.0, "Effusion": 1.3, "Infiltration": 1.6, "Mass": 0.9,
    "Nodule": 1.0, "Pneumonia": 0.75, "Pneumothorax": 1.05, "Consolidation": 0.9, "Edema": 0.8,
    "Emphysema": 0.8, "Fibrosis": 0.8, "Pleural_Thickening": 0.9, "Hernia": 0.8,
}
_PAIRS = [
    ("Effusion", "Atelectasis"), ("Effusion", "Cardiomegaly"), ("Edema", "Effusion"),
    ("Edema", "Cardiomegaly"), ("Infiltration", "Pneumonia"), ("Consolidation", "Pneumonia"),
    ("Infiltration", "Consolidation"), ("Mass", "Nodule"), ("Emphysema", "Pneumothorax"),
    ("Fibrosis", "Pleural_Thickening"), ("Infiltration", "Atelectasis"),
]
_CHRONIC = ("Cardiomegaly", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "Nodule")
_NO_FINDING_SHARE = 0.25
_N_FINDINGS_P = (0.35, 0.3, 0.22, 0.13)  # 1, 2, 3 or 4 findings on an abnormal image


# ---------------------------------------------------------------------------------- sampling
def _sample_findings(rng: np.random.Generator) -> set[str]:
    if rng.random() < _NO_FINDING_SHARE:
        return set()
    k = int(rng.choice(len(_N_FINDINGS_P), p=_N_FINDINGS_P)) + 1
    chosen: list[str] = []
    for _ in range(k):
        w = np.array([0.0 if n in chosen else _WEIGHTS[n] for n in LABELS])
        for a, b in _PAIRS:
            if a in chosen and b not in chosen:
                w[LABELS.index(b)] *= 3.0
            if b in chosen and a not in chosen:
                w[LABELS.index(a)] *= 3.0
        chosen.append(LABELS[int(rng.choice(len(LABELS), p=w / w.sum()))])
    return set(chosen)


def _findings_text(findings: set[str]) -> str:
    return "|".join(n for n in LABELS if n in findings) or NO_FINDING


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_marker(out: Path, layout: str, n_images: int, image_size: int, seed: int) -> None:
    (out / SYNTHETIC_MARKER).write_text(json.dumps({
        "synthetic": True, "generator": "common.synthetic", "version": GENERATOR_VERSION,
        "layout": layout, "n_images": n_images, "image_size": image_size, "seed": seed,
        "note": "Synthetic images, not real radiographs: results on them say nothing about real data.",
    }, indent=2) + "\n")


def _visits(rng: np.random.Generator, n_images: int) -> list[int]:
    """Images per patient (1-4 follow-ups, mean ~2), summing to n_images."""
    counts = []
    while sum(counts) < n_images:
        counts.append(int(rng.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.18, 0.12])))
    counts[-1] -= sum(counts) - n_images
    return counts


def _render_job(job: tuple) -> list[tuple]:
    """Render one planned image and write it; return its boxes (run in worker processes; all inputs
    are in `job`)."""
    path, rng_key, anat_key, findings, size = job
    anat = random_anatomy(np.random.default_rng(anat_key))
    boxes: list[tuple] = []
    img = render(np.random.default_rng(rng_key), anat, set(findings), size, boxes=boxes)
    Path(path).write_bytes(_png_bytes(img))
    return boxes


def _write_bboxes(path: Path, jobs: list[tuple], boxes: list[list[tuple]]) -> None:
    """NIH's BBox_List_2017.csv: its header, then `image,finding,x,y,w,h` (at most 15 significant
    digits, integers without a decimal point, as NIH writes them), in image order."""
    lines = [BBOX_HEADER]
    for job, found in zip(jobs, boxes):
        name = Path(job[0]).name
        for finding, *xywh in found:
            lines.append(",".join([name, finding, *(format(float(c), ".15g") for c in xywh)]))
    path.write_text("\n".join(lines) + "\n")


def _plan_nih(out: Path, seed: int, code: int, counts: list[int], image_size: int) -> tuple[list[tuple], dict]:
    """The render jobs and the Data_Entry table of the NIH layout: several follow-ups per patient,
    chronic findings usually persisting across them."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs: list[tuple] = []
    rows = []
    spacing = 0.143 * 2500 / image_size
    for p, count in enumerate(counts):
        anat_key = [seed, code, 1, p]
        anat = random_anatomy(np.random.default_rng(anat_key))
        pid = _PATIENT_BASE["nih"] + p + 1
        chronic: set[str] = set()
        for visit in range(count):
            frng = np.random.default_rng([seed, code, 3, p, visit])
            findings = _sample_findings(frng)
            if visit == 0:
                chronic = findings & set(_CHRONIC)
            else:  # chronic findings usually persist across follow-ups
                findings |= {c for c in sorted(chronic) if frng.random() < 0.8}
            image_id = f"{pid:08d}_{visit:03d}.png"
            view = "PA" if frng.random() < 0.65 else "AP"
            jobs.append((str(out / "images" / image_id), [seed, code, 2, p, visit], anat_key,
                         tuple(sorted(findings)), image_size))
            rows.append([image_id, _findings_text(findings), visit, pid, min(anat.age + visit, 95), anat.sex,
                         view, image_size, image_size, f"{spacing:.6g}", f"{spacing:.6g}"])
    return jobs, {"Data_Entry_2017_v2020.csv": (NIH_COLUMNS, rows)}


def _plan_cardiomegaly(out: Path, seed: int, code: int, counts: list[int], plan_rng: np.random.Generator,
                       image_size: int) -> tuple[list[tuple], dict]:
    """The render jobs and train/test tables of the binary set: Cardiomegaly or No Finding only,
    ~20% of patients held out as test/."""
    test_patients = set(np.flatnonzero(plan_rng.random(len(counts)) < 0.2).tolist())
    jobs: list[tuple] = []
    split_rows: dict[str, list] = {"train": [], "test": []}
    for split in split_rows:
        (out / split).mkdir(parents=True, exist_ok=True)
    for p, count in enumerate(counts):
        anat_key = [seed, code, 1, p]
        pid = _PATIENT_BASE["cardiomegaly"] + p + 1
        cardio = np.random.default_rng([seed, code, 3, p]).random() < 0.38
        split = "test" if p in test_patients else "train"
        for visit in range(count):
            image_id = f"{pid:08d}_{visit:03d}.png"
            jobs.append((str(out / split / image_id), [seed, code, 2, p, visit], anat_key,
                         ("Cardiomegaly",) if cardio else (), image_size))
            split_rows[split].append([image_id, "Cardiomegaly" if cardio else NO_FINDING])
    return jobs, {f"{k}.csv": (("imageID", "disease"), r) for k, r in split_rows.items()}


def _render_all(jobs: list[tuple], workers: int, desc: str, progress: bool) -> list[list[tuple]]:
    """Render and write every planned image (in worker processes when there are many); their boxes
    in job order."""
    boxes: list[list[tuple]] = []
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        if workers == 1 or len(jobs) < 64:
            for job in jobs:
                boxes.append(_render_job(job))
                bar.update(1)
        else:
            # fork: see common.cache (spawn would re-run an unguarded caller script in each worker)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as ex:
                for found in ex.map(_render_job, jobs, chunksize=16):
                    boxes.append(found)
                    bar.update(1)
    return boxes


def _write_tables(out: Path, tables: dict) -> None:
    for name, (header, rows) in tables.items():
        with open(out / name, "w", newline="") as fh:
            wr = csv.writer(fh, lineterminator="\n")
            wr.writerow(header)
            wr.writerows(rows)


def generate(out_dir: str | os.PathLike, layout: str = "nih", n_images: int | None = None,
             image_size: int = 256, seed: int = 0, progress: bool = True, workers: int | None = None) -> Path:
    """Write a synthetic dataset in `layout` ("nih" or "cardiomegaly") to `out_dir`; return its path.

    Deterministic: the same arguments give byte-identical files (whatever `workers` is: every image
    has its own random stream). `out_dir` must be empty or absent.
    """
    if layout not in DEFAULT_SIZES:
        raise ValueError(f"layout must be one of {sorted(DEFAULT_SIZES)}, got {layout!r}")
    n_images = DEFAULT_SIZES[layout] if n_images is None else int(n_images)
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: folder is not empty; generate() writes into an empty or new folder")
    code = {"nih": 1, "cardiomegaly": 2}[layout]
    plan_rng = np.random.default_rng([seed, code, 0])
    counts = _visits(plan_rng, n_images)
    # plan everything first (cheap, sequential), then render the images in parallel
    if layout == "nih":
        jobs, tables = _plan_nih(out, seed, code, counts, image_size)
    else:
        jobs, tables = _plan_cardiomegaly(out, seed, code, counts, plan_rng, image_size)
    workers = default_workers() if workers is None else max(1, int(workers))
    boxes = _render_all(jobs, workers, f"synthetic {layout} images", progress)
    _write_tables(out, tables)
    if layout == "nih":
        _write_bboxes(out / BBOX_CSV, jobs, boxes)
    _write_marker(out, layout, n_images, image_size, seed)  # last: it marks the folder complete
    return out


def synthetic_root() -> Path:
    """Where the embedded default lives: cache_root()/synthetic-v<GENERATOR_VERSION>."""
    return cache_root() / f"synthetic-v{GENERATOR_VERSION}"


def _complete(folders: list[Path]) -> bool:
    """Every folder finished (its marker is written last); the NIH one has its box file, which a
    default generated before boxes existed lacks (it is then made again: the same images)."""
    return all((p / SYNTHETIC_MARKER).is_file() and (p.name != "nih" or (p / BBOX_CSV).is_file()) for p in folders)


def ensure_default(progress: bool = True) -> list[Path]:
    """The embedded default datasets ([nih, cardiomegaly]), generated once, atomically, and reused."""
    root = synthetic_root()
    wanted = [root / "nih", root / "cardiomegaly"]
    if _complete(wanted):
        return wanted
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for p in wanted:
            generate(tmp / p.name, layout=p.name, progress=progress)
        if root.exists():  # an incomplete earlier attempt, or a concurrent generator finished first
            if _complete(wanted):
                return wanted
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _complete(wanted):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return wanted
