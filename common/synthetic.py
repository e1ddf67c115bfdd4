"""A deterministic synthetic chest X-ray dataset: the suite's embedded default when no data is present.

`generate(out_dir, layout="nih")` writes NIH's official layout (`Data_Entry_2017_v2020.csv` with
all of NIH's columns, several follow-ups per patient, `images/*.png`); `layout="cardiomegaly"` the
original project's binary layout (`train/ test/ train.csv test.csv`). Same arguments → same bytes.

Images are radiograph-like (body outline, lung fields with vascular markings, ribs, clavicles,
spine and mediastinum, heart silhouette, diaphragm, noise) and each of the 14 findings changes
them in its own learnable way, loosely after its radiological sign:

    Cardiomegaly        wider heart silhouette (cardiothoracic ratio > 0.55)
    Effusion            blunted costophrenic angle: a basal opacity with a meniscus
    Nodule              2-4 small bright round blobs in the lungs
    Mass                one larger bright blob
    Pneumothorax        a dark lucent rim without lung markings along one lung's edge, pleural line
    Emphysema           hyperlucent, enlarged lungs, flattened diaphragm, sparse markings
    Hernia              a retrocardiac gas bubble with an air-fluid level
    Infiltration        patchy, ill-defined mid-zone opacities
    Consolidation       a dense homogeneous lower-lobe opacity with air bronchograms
    Pneumonia           several soft round (fluffy) opacities in one lung
    Edema               symmetric perihilar haze ("bat wings") with Kerley B lines at the bases
    Atelectasis         elevated hemidiaphragm and a plate-like horizontal band
    Fibrosis            fine reticular net in the upper and peripheral zones
    Pleural_Thickening  a smooth bright band along the lateral chest wall and an apical cap

The NIH layout also gets NIH's `BBox_List_2017.csv` (same columns and number format) with a box
where each finding drawn in one place was drawn (`BOXED_FINDINGS`: one per nodule, per effusion
side, around a pneumonia's opacities, the heart for Cardiomegaly, ...), in the pixels of the image
itself (NIH's are in its 1024-pixel images), so Grad-CAM localisation can be scored on it. The
diffuse or bilateral findings (Infiltration, Edema, Emphysema, Fibrosis, Pleural_Thickening) get
none. The boxes record what is drawn: the images are the same with or without them.

Every dataset folder gets a `SYNTHETIC.json` marker, so `load_dataset` sets `is_synthetic` and
every table and plot made from it can say SYNTHETIC.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.labels import LABELS, NO_FINDING

GENERATOR_VERSION = 1
DEFAULT_SIZES = {"nih": 800, "cardiomegaly": 400}
# Patient id ranges far above NIH's (1..30805), one per layout, so synthetic patients never
# collide with real ones or with each other when datasets are combined.
_PATIENT_BASE = {"nih": 90_000_000, "cardiomegaly": 95_000_000}
BBOX_CSV = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # NIH's header line, verbatim
# Findings `render` draws in one place, and so records a box for.
BOXED_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
                  "Consolidation", "Hernia")
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


# ------------------------------------------------------------------------------------- drawing
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow warnings for large |x|


@dataclass
class _Grid:
    u: np.ndarray  # x / width in [0, 1], image left = patient's right
    v: np.ndarray  # y / height in [0, 1], down
    size: int


def _grid(size: int) -> _Grid:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return _Grid(u=np.broadcast_to(c[None, :], (size, size)), v=np.broadcast_to(c[:, None], (size, size)), size=size)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: a random cells x cells grid upsampled bicubically."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def _ellipse(g: _Grid, cx, cy, ax, ay, edge=0.01) -> np.ndarray:
    """Soft mask of an ellipse (edge: blur width in image units)."""
    r = np.sqrt(((g.u - cx) / ax) ** 2 + ((g.v - cy) / ay) ** 2)
    return _sigmoid((1.0 - r) * min(ax, ay) / edge)


def _blob(img: np.ndarray, g: _Grid, cx: float, cy: float, r: float, amp: float, sharp: float = 3.0) -> None:
    """Add a round opacity (amp > 0 brighter) in place, computed on its bounding box only."""
    s = g.size
    x0, x1 = max(0, int((cx - 2.5 * r) * s)), min(s, int((cx + 2.5 * r) * s) + 1)
    y0, y1 = max(0, int((cy - 2.5 * r) * s)), min(s, int((cy + 2.5 * r) * s) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    d = np.sqrt((g.u[y0:y1, x0:x1] - cx) ** 2 + (g.v[y0:y1, x0:x1] - cy) ** 2) / r
    img[y0:y1, x0:x1] += amp * _sigmoid((1.0 - d) * sharp * 2.0)


def _segment(g: _Grid, x0, y0, x1, y1, width) -> np.ndarray:
    """Soft band of half-width `width` around the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((g.u - x0) * dx + (g.v - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d = np.sqrt((g.u - x0 - t * dx) ** 2 + (g.v - y0 - t * dy) ** 2)
    return _sigmoid((width - d) / (width * 0.3))


@dataclass
class _Anatomy:
    """One patient's body: shared by all follow-ups, jittered slightly per visit."""

    cx: float
    body_w: float
    lung_dx: float
    lung_hx: float
    lung_cy: float
    lung_hy: float
    dome: float
    heart_w: float
    heart_cy: float
    rib_spacing: float
    rib_phase: float
    tissue: float
    age: int
    sex: str


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    sex = "M" if rng.random() < 0.56 else "F"
    return _Anatomy(
        cx=0.5 + rng.normal(0, 0.01), body_w=rng.uniform(0.40, 0.46), lung_dx=rng.uniform(0.165, 0.19),
        lung_hx=rng.uniform(0.125, 0.145), lung_cy=rng.uniform(0.43, 0.47), lung_hy=rng.uniform(0.27, 0.31),
        dome=rng.uniform(0.67, 0.71), heart_w=rng.uniform(0.10, 0.115), heart_cy=rng.uniform(0.58, 0.61),
        rib_spacing=rng.uniform(0.062, 0.072), rib_phase=rng.uniform(0, 1), tissue=rng.uniform(0.5, 0.6),
        age=int(np.clip(rng.normal(47, 17), 2, 94)), sex=sex,
    )


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x, y, w, h) in pixels of where a soft mask is over one half, or None when it nowhere is."""
    rows, cols = np.nonzero(mask > 0.5)
    if not len(rows):
        return None
    x0, y0 = int(cols.min()), int(rows.min())
    return float(x0), float(y0), float(cols.max() + 1 - x0), float(rows.max() + 1 - y0)


def _blobs_box(blobs: list[tuple[float, float, float]], size: int) -> tuple[float, float, float, float] | None:
    """(x, y, w, h) in pixels around round opacities (cx, cy, r in image units) out to their
    half-amplitude radius r, clipped to the image."""
    x0 = max(0.0, min(cx - r for cx, _, r in blobs) * size)
    y0 = max(0.0, min(cy - r for _, cy, r in blobs) * size)
    x1 = min(float(size), max(cx + r for cx, _, r in blobs) * size)
    y1 = min(float(size), max(cy + r for _, cy, r in blobs) * size)
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def render(rng: np.random.Generator, anat: _Anatomy, findings: set[str], size: int = 256,
           boxes: list | None = None) -> np.ndarray:
    """Draw one synthetic radiograph (uint8, size x size) with the given findings.

    boxes: a list to append (finding, x, y, w, h) to, in pixels of this image, for every finding
    drawn in one place (see `BOXED_FINDINGS`): where its mask is over one half, or a blob out to its
    half-amplitude radius. Recording them draws nothing and takes no random numbers: the image is
    the same with or without.
    """
    def record(name: str, box: tuple[float, float, float, float] | None) -> None:
        if boxes is not None and box is not None:
            boxes.append((name, *box))

    g = _grid(size)
    u, v = g.u, g.v
    f = findings
    # separate streams: a finding never shifts the anatomy or the noise of the same image seed
    rng_base, rng_find, rng_acq = rng.spawn(3)
    cx = anat.cx + rng_base.normal(0, 0.008)
    emph = "Emphysema" in f
    lung_scale = 1.1 if emph else 1.0
    hx, hy = anat.lung_hx * lung_scale, anat.lung_hy * lung_scale
    dome = anat.dome + (0.06 if emph else 0.0) + rng_base.normal(0, 0.006)
    dome_curve = 0.07 if not emph else 0.025  # emphysema flattens the diaphragm
    # atelectasis: one side loses volume (its hemidiaphragm rises)
    atel_side = int(rng_find.integers(2)) if "Atelectasis" in f else -1

    # body (soft tissue), brightest in the middle where it is thickest
    body = _sigmoid((anat.body_w - np.abs(u - cx) * (1.0 + 0.25 * np.clip(0.25 - v, 0, None) * 8)) / 0.012)
    body *= _sigmoid((v - 0.04) / 0.02)
    img = body * (anat.tissue + 0.12 * (1.0 - np.abs(u - cx) / anat.body_w))

    lungs, lung_side = [], []
    atel_lost = None  # the lung the raised hemidiaphragm takes away (part of the Atelectasis box)
    for side in (0, 1):  # 0 = image left (patient's right lung), 1 = image right
        sgn = -1.0 if side == 0 else 1.0
        lcx = cx + sgn * anat.lung_dx
        d = dome - (0.07 if side == atel_side else 0.0) - (0.015 if side == 1 else 0.0)
        ell = _ellipse(g, lcx, anat.lung_cy + 0.06, hx, hy + 0.06, edge=0.008)
        # diaphragm dome: highest mid-lung, lowest at the lateral recess (the costophrenic angle)
        lat = np.clip((u - lcx) * sgn / hx, -1.0, 1.0)
        dome_v = d - dome_curve * (1.0 - lat ** 2) + 0.03 * np.clip(lat, 0, None)
        under = _sigmoid((dome_v - v) / 0.006)
        if side == atel_side:
            atel_lost = ell * (_sigmoid((dome_v + 0.07 - v) / 0.006) - under)
        lungs.append(ell * under)
        lung_side.append(lcx)
    lung = np.maximum(lungs[0], lungs[1])

    # vascular markings: strongest near the hila, fading to the periphery
    markings = np.zeros_like(img)
    for side in (0, 1):
        hil_x, hil_y = lung_side[side] - (-1 if side == 0 else 1) * 0.07, anat.lung_cy + 0.05
        rad = np.sqrt((u - hil_x) ** 2 + (v - hil_y) ** 2)
        markings += lungs[side] * np.exp(-rad / 0.12)
    tex = _smooth_noise(rng_base, size, 40) * 0.6 + _smooth_noise(rng_base, size, 80) * 0.4
    vessel = np.clip(tex, 0, None) ** 1.5
    lucency = 0.36 + (0.1 if emph else 0.0) + rng_base.normal(0, 0.015)
    mark_amp = 0.07 * (0.4 if emph else 1.0)
    img = img - lung * lucency + lung * markings * vessel * mark_amp + lung * 0.04 * tex

    # ribs: posterior arcs, curving down laterally, a periodic band in a warped coordinate
    w = v - 0.35 * (u - cx) ** 2 * 4.0 - 0.08 * np.abs(u - cx)
    ribs = (0.5 + 0.5 * np.cos(2 * math.pi * (w / anat.rib_spacing - anat.rib_phase))) ** 8
    thorax = _sigmoid((anat.body_w - 0.02 - np.abs(u - cx)) / 0.01) * _sigmoid((dome + 0.02 - v) / 0.02)
    img += ribs * thorax * (0.025 + 0.05 * lung)
    # clavicles
    for sgn in (-1.0, 1.0):
        img += 0.12 * _segment(g, cx + sgn * 0.05, 0.19, cx + sgn * 0.30, 0.13, 0.014)

    # mediastinum and spine (vertebrae as a faint periodic texture)
    med = _sigmoid((0.055 - np.abs(u - cx)) / 0.008) * _sigmoid((v - 0.08) / 0.02)
    img = img * (1 - med) + med * (anat.tissue + 0.15)
    spine = _sigmoid((0.03 - np.abs(u - cx)) / 0.004) * (0.05 + 0.03 * np.cos(2 * math.pi * v / 0.045))
    img += spine

    # heart: a soft-tissue silhouette shifted to the patient's left (image right)
    heart_w = anat.heart_w * (1.5 if "Cardiomegaly" in f else 1.0) * rng_base.uniform(0.96, 1.04)
    heart_h = 0.11 * (1.12 if "Cardiomegaly" in f else 1.0)
    heart = _ellipse(g, cx + 0.035, anat.heart_cy + (0.01 if "Cardiomegaly" in f else 0.0), heart_w, heart_h, edge=0.008)
    heart *= _sigmoid((anat.dome + 0.03 - v) / 0.01)  # the anatomical dome: emphysema must not widen it
    img = img * (1 - heart) + heart * (anat.tissue + 0.16)
    if "Cardiomegaly" in f:
        record("Cardiomegaly", _mask_box(heart))
    tissue = anat.tissue + 0.12  # the level an opacity (fluid, consolidation) tends to

    def opacify(mask: np.ndarray, strength: float) -> None:
        # move towards soft-tissue density rather than add, so overlapping findings never saturate
        nonlocal img
        img = img + mask * strength * (tissue - img)

    # ------------------------------------------------------------------------- findings
    sides = [int(rng_find.integers(2)) for _ in range(8)]  # which lung each finding prefers
    if "Effusion" in f:
        for side in ({sides[0]} if rng_find.random() < 0.6 else {0, 1}):
            sgn = -1.0 if side == 0 else 1.0
            lat = (u - lung_side[side]) * sgn / hx
            level = dome - rng_find.uniform(0.10, 0.16) - 0.08 * np.clip(lat, 0, 1)  # meniscus rises laterally
            fluid = lungs[side] * _sigmoid((v - level) / 0.012)
            opacify(fluid, 0.9)
            record("Effusion", _mask_box(fluid))
    if "Nodule" in f:
        for _ in range(int(rng_find.integers(2, 5))):
            side = int(rng_find.integers(2))
            nx = lung_side[side] + rng_find.uniform(-0.6, 0.6) * hx
            ny = anat.lung_cy + rng_find.uniform(-0.6, 0.35) * hy
            r = rng_find.uniform(0.011, 0.017)
            _blob(img, g, nx, ny, r, 0.28)
            record("Nodule", _blobs_box([(nx, ny, r)], size))  # one box per nodule, as radiologists draw them
    if "Mass" in f:
        side = sides[1]
        mx = lung_side[side] + rng_find.uniform(-0.4, 0.4) * hx
        my = anat.lung_cy + rng_find.uniform(-0.5, 0.2) * hy
        r = rng_find.uniform(0.045, 0.065)
        _blob(img, g, mx, my, r, 0.30, sharp=4.0)
        record("Mass", _blobs_box([(mx, my, r)], size))
    if "Pneumothorax" in f:
        side = sides[2]
        sgn = -1.0 if side == 0 else 1.0
        inner = _ellipse(g, lung_side[side] - sgn * 0.02, anat.lung_cy + 0.05, hx * 0.72, (hy + 0.06) * 0.8, edge=0.004)
        rim = lungs[side] * (1.0 - inner)
        record("Pneumothorax", _mask_box(rim))
        # no lung markings in the rim; darker (air only); a thin bright visceral pleural line
        img -= rim * (lung * markings * vessel * mark_amp + 0.04 * tex + 0.14)
        line = inner * (1 - _ellipse(g, lung_side[side] - sgn * 0.02, anat.lung_cy + 0.05,
                                      hx * 0.72 - 0.006, (hy + 0.06) * 0.8 - 0.006, edge=0.003))
        img += line * lungs[side] * 0.12
    if "Hernia" in f:
        bx, by, br = cx + rng_find.uniform(-0.01, 0.04), anat.heart_cy + rng_find.uniform(0.0, 0.03), rng_find.uniform(0.035, 0.05)
        bubble = _ellipse(g, bx, by, br, br * 0.85, edge=0.004)
        record("Hernia", _mask_box(bubble))
        gas = bubble * _sigmoid((by + br * 0.2 - v) / 0.003)  # air above the fluid level
        img -= gas * 0.28
        img += (bubble - _ellipse(g, bx, by, br - 0.006, br * 0.85 - 0.006, edge=0.003)) * 0.10
    if "Infiltration" in f:
        patch = _smooth_noise(rng_find, size, 10)
        zone = lung * np.exp(-((v - anat.lung_cy - rng_find.uniform(-0.03, 0.05)) / 0.12) ** 2)
        opacify(zone * _sigmoid((patch - 0.3) / 0.15), 0.55)
    if "Consolidation" in f:
        side = sides[3]
        top = dome - rng_find.uniform(0.17, 0.22)
        region = lungs[side] * _sigmoid((v - top) / 0.008)  # sharp upper edge (a fissure)
        record("Consolidation", _mask_box(region))
        bronch = (0.5 + 0.5 * np.cos(2 * math.pi * (u * 9 + v * 3 + rng_find.random()))) ** 12
        opacify(region * (1.0 - 0.6 * bronch), 0.85)
    if "Pneumonia" in f:
        side = sides[4]
        blobs = []
        for _ in range(int(rng_find.integers(3, 6))):
            px = lung_side[side] + rng_find.uniform(-0.5, 0.5) * hx
            py = anat.lung_cy + rng_find.uniform(-0.1, 0.5) * hy
            r = rng_find.uniform(0.03, 0.045)
            _blob(img, g, px, py, r, 0.2, sharp=1.2)
            blobs.append((px, py, r))
        record("Pneumonia", _blobs_box(blobs, size))  # one box around the fluffy opacities of one lung
    if "Edema" in f:
        for side in (0, 1):
            hil_x = lung_side[side] - (-1 if side == 0 else 1) * 0.06
            haze = np.exp(-(((u - hil_x) / 0.09) ** 2 + ((v - anat.lung_cy - 0.06) / 0.14) ** 2))
            opacify(lungs[side] * haze, 0.6)
            # Kerley B lines: short horizontal lines at the lateral lung bases
            sgn = -1.0 if side == 0 else 1.0
            edge_x = lung_side[side] + sgn * hx * 0.8
            kb = (0.5 + 0.5 * np.cos(2 * math.pi * v / 0.02)) ** 10
            zone = np.exp(-((u - edge_x) / 0.03) ** 2) * _sigmoid((v - dome + 0.15) / 0.01)
            img += lungs[side] * zone * kb * 0.12
    if "Atelectasis" in f:
        side = atel_side
        by = dome - 0.07 - rng_find.uniform(0.08, 0.12)
        band = _segment(g, lung_side[side] - 0.6 * hx, by, lung_side[side] + 0.6 * hx, by + rng_find.uniform(-0.02, 0.02), 0.010)
        opacify(band * lungs[side], 0.9)
        record("Atelectasis", _mask_box(np.maximum(band * lungs[side], atel_lost)))  # the band and the volume lost
    if "Fibrosis" in f:
        net = np.abs(np.sin(2 * math.pi * (u * 38 + 0.3 * _smooth_noise(rng_find, size, 16)))) < 0.22
        net2 = np.abs(np.sin(2 * math.pi * (v * 38 + 0.3 * _smooth_noise(rng_find, size, 16)))) < 0.22
        reticular = (net | net2).astype(np.float32)
        zone = _sigmoid((anat.lung_cy - v + 0.05) / 0.05)  # upper zones
        img += lung * zone * reticular * 0.10
    if "Pleural_Thickening" in f:
        for side in ({sides[5]} if rng_find.random() < 0.6 else {0, 1}):
            sgn = -1.0 if side == 0 else 1.0
            lcx = lung_side[side]
            inner = _ellipse(g, lcx - sgn * 0.012, anat.lung_cy + 0.07, hx - 0.014, hy + 0.045, edge=0.003)
            band = lungs[side] * (1.0 - inner) * _sigmoid(((u - lcx) * sgn) / 0.01)
            cap = lungs[side] * _sigmoid((anat.lung_cy - hy + 0.045 - v) / 0.005)  # apical cap
            opacify(np.maximum(band, cap), 0.9)

    # acquisition: exposure, contrast, smooth illumination and quantum noise
    img = img * rng_acq.uniform(0.9, 1.08) + rng_acq.normal(0, 0.02)
    img += 0.03 * _smooth_noise(rng_acq, size, 4) + 0.018 * rng_acq.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img, 0.0, 1.0) ** rng_acq.uniform(0.9, 1.1)
    return (img * 255.0 + 0.5).astype(np.uint8)


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
    (out / "SYNTHETIC.json").write_text(json.dumps({
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
    anat = _anatomy(np.random.default_rng(anat_key))
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


def generate(out_dir: str | os.PathLike, layout: str = "nih", n_images: int | None = None,
             image_size: int = 256, seed: int = 0, progress: bool = True, workers: int | None = None) -> Path:
    """Write a synthetic dataset in `layout` ("nih" or "cardiomegaly") to `out_dir`; return its path.

    Deterministic: the same arguments give byte-identical files (whatever `workers` is: every image
    has its own random stream). `out_dir` must be empty or absent.
    """
    from tqdm.auto import tqdm

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
    jobs: list[tuple] = []
    if layout == "nih":
        (out / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for p, count in enumerate(counts):
            anat_key = [seed, code, 1, p]
            anat = _anatomy(np.random.default_rng(anat_key))
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
                spacing = 0.143 * 2500 / image_size
                rows.append([image_id, _findings_text(findings), visit, pid, min(anat.age + visit, 95), anat.sex,
                             view, image_size, image_size, f"{spacing:.6g}", f"{spacing:.6g}"])
        tables = {"Data_Entry_2017_v2020.csv": (NIH_COLUMNS, rows)}
    else:
        # the binary set: Cardiomegaly or No Finding only; ~20% of patients held out as test/
        test_patients = set(np.flatnonzero(plan_rng.random(len(counts)) < 0.2).tolist())
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
        tables = {f"{k}.csv": (("imageID", "disease"), r) for k, r in split_rows.items()}

    from common.cache import default_workers

    workers = default_workers() if workers is None else max(1, int(workers))
    boxes: list[list[tuple]] = []
    with tqdm(total=len(jobs), desc=f"synthetic {layout} images", unit="img", disable=not progress,
              leave=False) as bar:
        if workers == 1 or len(jobs) < 64:
            for job in jobs:
                boxes.append(_render_job(job))
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork: see common.cache (spawn would re-run an unguarded caller script in each worker)
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as ex:
                for found in ex.map(_render_job, jobs, chunksize=16):
                    boxes.append(found)
                    bar.update(1)
    for name, (header, rows) in tables.items():
        with open(out / name, "w", newline="") as fh:
            wr = csv.writer(fh, lineterminator="\n")
            wr.writerow(header)
            wr.writerows(rows)
    if layout == "nih":
        _write_bboxes(out / BBOX_CSV, jobs, boxes)
    _write_marker(out, layout, n_images, image_size, seed)
    return out


def synthetic_root() -> Path:
    """Where the embedded default lives: cache_root()/synthetic-v<GENERATOR_VERSION>."""
    from common.cache import cache_root

    return cache_root() / f"synthetic-v{GENERATOR_VERSION}"


def _complete(folders: list[Path]) -> bool:
    """Every folder finished (its marker is written last); the NIH one has its box file, which a
    default generated before boxes existed lacks (it is then made again: the same images)."""
    return all((p / "SYNTHETIC.json").is_file() and (p.name != "nih" or (p / BBOX_CSV).is_file()) for p in folders)


def ensure_default(progress: bool = True) -> list[Path]:
    """The embedded default datasets ([nih, cardiomegaly]), generated once, atomically, and reused."""
    import shutil
    import tempfile

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
