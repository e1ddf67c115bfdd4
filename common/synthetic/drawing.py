"""Drawing one synthetic radiograph: `render(rng, anatomy, findings)` (the dataset around it is
`common.synthetic`).

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

An image is drawn in steps: the patient's anatomy on this visit (`_draw_chest`), each finding on
top in a fixed order (`_FINDING_DRAWERS`), then the acquisition (`_acquire`). Three random streams
(anatomy, findings, acquisition) keep a finding from shifting the anatomy or the noise of the same
image seed. The generated datasets' bytes depend on every number and every draw here: a change
is a new `common.synthetic.GENERATOR_VERSION`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Findings `render` draws in one place, and so records a box for.
BOXED_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
                  "Consolidation", "Hernia")


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
class Anatomy:
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


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    sex = "M" if rng.random() < 0.56 else "F"
    return Anatomy(
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


@dataclass
class _Chest:
    """One radiograph being drawn: the anatomy as placed on this visit and the layers the findings
    draw relative to. The findings change `img` and append to `boxes`."""

    g: _Grid
    anat: Anatomy
    img: np.ndarray
    cx: float  # body midline on this visit
    hx: float  # lung half-width
    hy: float  # lung half-height
    dome: float  # diaphragm level
    lungs: list[np.ndarray]  # per side (0 = image left): soft mask of the lung field above its hemidiaphragm
    lung_side: list[float]  # per side: the lung's centre x
    lung: np.ndarray  # both lungs
    atel_side: int  # the side an atelectasis takes volume from, -1 without one
    atel_lost: np.ndarray | None  # the lung the raised hemidiaphragm takes away
    markings: np.ndarray  # vascular markings, strongest at the hila
    vessel: np.ndarray  # the markings' texture
    tex: np.ndarray  # the lungs' band-limited texture
    mark_amp: float
    tissue: float  # the level an opacity (fluid, consolidation) tends to
    boxes: list | None

    def record(self, name: str, box: tuple[float, float, float, float] | None) -> None:
        if self.boxes is not None and box is not None:
            self.boxes.append((name, *box))

    def opacify(self, mask: np.ndarray, strength: float) -> None:
        # move towards soft-tissue density rather than add, so overlapping findings never saturate
        self.img = self.img + mask * strength * (self.tissue - self.img)


def _soft_tissue(g: _Grid, anat: Anatomy, cx: float) -> np.ndarray:
    """The body (soft tissue), brightest in the middle where it is thickest."""
    u, v = g.u, g.v
    body = _sigmoid((anat.body_w - np.abs(u - cx) * (1.0 + 0.25 * np.clip(0.25 - v, 0, None) * 8)) / 0.012)
    body *= _sigmoid((v - 0.04) / 0.02)
    return body * (anat.tissue + 0.12 * (1.0 - np.abs(u - cx) / anat.body_w))


def _lung_fields(g: _Grid, anat: Anatomy, cx: float, hx: float, hy: float, dome: float, dome_curve: float,
                 atel_side: int) -> tuple[list[np.ndarray], list[float], np.ndarray | None]:
    """(lungs, lung_side, atel_lost): each lung field above its diaphragm dome, its centre x, and the
    lung an atelectasis' raised hemidiaphragm takes away (part of the Atelectasis box)."""
    u, v = g.u, g.v
    lungs, lung_side = [], []
    atel_lost = None
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
    return lungs, lung_side, atel_lost


def _vascular_markings(g: _Grid, anat: Anatomy, lungs: list[np.ndarray], lung_side: list[float]) -> np.ndarray:
    """Vascular markings: strongest near the hila, fading to the periphery."""
    markings = np.zeros_like(lungs[0])
    for side in (0, 1):
        hil_x, hil_y = lung_side[side] - (-1 if side == 0 else 1) * 0.07, anat.lung_cy + 0.05
        rad = np.sqrt((g.u - hil_x) ** 2 + (g.v - hil_y) ** 2)
        markings += lungs[side] * np.exp(-rad / 0.12)
    return markings


def _add_bones(img: np.ndarray, g: _Grid, anat: Anatomy, cx: float, dome: float, lung: np.ndarray) -> None:
    """Ribs (posterior arcs, curving down laterally: a periodic band in a warped coordinate) and
    clavicles, added in place."""
    u, v = g.u, g.v
    w = v - 0.35 * (u - cx) ** 2 * 4.0 - 0.08 * np.abs(u - cx)
    ribs = (0.5 + 0.5 * np.cos(2 * math.pi * (w / anat.rib_spacing - anat.rib_phase))) ** 8
    thorax = _sigmoid((anat.body_w - 0.02 - np.abs(u - cx)) / 0.01) * _sigmoid((dome + 0.02 - v) / 0.02)
    img += ribs * thorax * (0.025 + 0.05 * lung)
    for sgn in (-1.0, 1.0):
        img += 0.12 * _segment(g, cx + sgn * 0.05, 0.19, cx + sgn * 0.30, 0.13, 0.014)


def _mediastinum(img: np.ndarray, g: _Grid, anat: Anatomy, cx: float) -> np.ndarray:
    """Mediastinum and spine (vertebrae as a faint periodic texture)."""
    u, v = g.u, g.v
    med = _sigmoid((0.055 - np.abs(u - cx)) / 0.008) * _sigmoid((v - 0.08) / 0.02)
    img = img * (1 - med) + med * (anat.tissue + 0.15)
    spine = _sigmoid((0.03 - np.abs(u - cx)) / 0.004) * (0.05 + 0.03 * np.cos(2 * math.pi * v / 0.045))
    img += spine
    return img


def _heart(rng_base: np.random.Generator, g: _Grid, anat: Anatomy, cx: float, enlarged: bool) -> np.ndarray:
    """The heart: a soft-tissue silhouette mask shifted to the patient's left (image right)."""
    heart_w = anat.heart_w * (1.5 if enlarged else 1.0) * rng_base.uniform(0.96, 1.04)
    heart_h = 0.11 * (1.12 if enlarged else 1.0)
    heart = _ellipse(g, cx + 0.035, anat.heart_cy + (0.01 if enlarged else 0.0), heart_w, heart_h, edge=0.008)
    heart *= _sigmoid((anat.dome + 0.03 - g.v) / 0.01)  # the anatomical dome: emphysema must not widen it
    return heart


def _draw_chest(rng_base: np.random.Generator, g: _Grid, anat: Anatomy, findings: set[str], atel_side: int,
                boxes: list | None) -> _Chest:
    """The normal anatomy of this visit, already showing the findings that change its shape
    (Emphysema's lungs and diaphragm, Atelectasis' raised hemidiaphragm, Cardiomegaly's heart)."""
    emph = "Emphysema" in findings
    cx = anat.cx + rng_base.normal(0, 0.008)
    lung_scale = 1.1 if emph else 1.0
    hx, hy = anat.lung_hx * lung_scale, anat.lung_hy * lung_scale
    dome = anat.dome + (0.06 if emph else 0.0) + rng_base.normal(0, 0.006)
    dome_curve = 0.07 if not emph else 0.025  # emphysema flattens the diaphragm
    img = _soft_tissue(g, anat, cx)
    lungs, lung_side, atel_lost = _lung_fields(g, anat, cx, hx, hy, dome, dome_curve, atel_side)
    lung = np.maximum(lungs[0], lungs[1])

    markings = _vascular_markings(g, anat, lungs, lung_side)
    tex = _smooth_noise(rng_base, g.size, 40) * 0.6 + _smooth_noise(rng_base, g.size, 80) * 0.4
    vessel = np.clip(tex, 0, None) ** 1.5
    lucency = 0.36 + (0.1 if emph else 0.0) + rng_base.normal(0, 0.015)
    mark_amp = 0.07 * (0.4 if emph else 1.0)
    img = img - lung * lucency + lung * markings * vessel * mark_amp + lung * 0.04 * tex

    _add_bones(img, g, anat, cx, dome, lung)
    img = _mediastinum(img, g, anat, cx)
    heart = _heart(rng_base, g, anat, cx, "Cardiomegaly" in findings)
    img = img * (1 - heart) + heart * (anat.tissue + 0.16)
    chest = _Chest(g=g, anat=anat, img=img, cx=cx, hx=hx, hy=hy, dome=dome, lungs=lungs, lung_side=lung_side,
                   lung=lung, atel_side=atel_side, atel_lost=atel_lost, markings=markings, vessel=vessel, tex=tex,
                   mark_amp=mark_amp, tissue=anat.tissue + 0.12, boxes=boxes)
    if "Cardiomegaly" in findings:
        chest.record("Cardiomegaly", _mask_box(heart))
    return chest


# Each finding below draws on the chest in place with its own random numbers (`rng`, the image's
# finding stream) and `sides`, the lung each finding prefers (drawn once per image).
def _effusion(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    g = c.g
    for side in ({sides[0]} if rng.random() < 0.6 else {0, 1}):
        sgn = -1.0 if side == 0 else 1.0
        lat = (g.u - c.lung_side[side]) * sgn / c.hx
        level = c.dome - rng.uniform(0.10, 0.16) - 0.08 * np.clip(lat, 0, 1)  # meniscus rises laterally
        fluid = c.lungs[side] * _sigmoid((g.v - level) / 0.012)
        c.opacify(fluid, 0.9)
        c.record("Effusion", _mask_box(fluid))


def _nodule(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    for _ in range(int(rng.integers(2, 5))):
        side = int(rng.integers(2))
        nx = c.lung_side[side] + rng.uniform(-0.6, 0.6) * c.hx
        ny = c.anat.lung_cy + rng.uniform(-0.6, 0.35) * c.hy
        r = rng.uniform(0.011, 0.017)
        _blob(c.img, c.g, nx, ny, r, 0.28)
        c.record("Nodule", _blobs_box([(nx, ny, r)], c.g.size))  # one box per nodule, as radiologists draw them


def _mass(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    side = sides[1]
    mx = c.lung_side[side] + rng.uniform(-0.4, 0.4) * c.hx
    my = c.anat.lung_cy + rng.uniform(-0.5, 0.2) * c.hy
    r = rng.uniform(0.045, 0.065)
    _blob(c.img, c.g, mx, my, r, 0.30, sharp=4.0)
    c.record("Mass", _blobs_box([(mx, my, r)], c.g.size))


def _pneumothorax(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    g, anat, hx, hy = c.g, c.anat, c.hx, c.hy
    side = sides[2]
    sgn = -1.0 if side == 0 else 1.0
    inner = _ellipse(g, c.lung_side[side] - sgn * 0.02, anat.lung_cy + 0.05, hx * 0.72, (hy + 0.06) * 0.8, edge=0.004)
    rim = c.lungs[side] * (1.0 - inner)
    c.record("Pneumothorax", _mask_box(rim))
    # no lung markings in the rim; darker (air only); a thin bright visceral pleural line
    c.img -= rim * (c.lung * c.markings * c.vessel * c.mark_amp + 0.04 * c.tex + 0.14)
    line = inner * (1 - _ellipse(g, c.lung_side[side] - sgn * 0.02, anat.lung_cy + 0.05,
                                  hx * 0.72 - 0.006, (hy + 0.06) * 0.8 - 0.006, edge=0.003))
    c.img += line * c.lungs[side] * 0.12


def _hernia(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    g = c.g
    bx, by, br = c.cx + rng.uniform(-0.01, 0.04), c.anat.heart_cy + rng.uniform(0.0, 0.03), rng.uniform(0.035, 0.05)
    bubble = _ellipse(g, bx, by, br, br * 0.85, edge=0.004)
    c.record("Hernia", _mask_box(bubble))
    gas = bubble * _sigmoid((by + br * 0.2 - g.v) / 0.003)  # air above the fluid level
    c.img -= gas * 0.28
    c.img += (bubble - _ellipse(g, bx, by, br - 0.006, br * 0.85 - 0.006, edge=0.003)) * 0.10


def _infiltration(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    patch = _smooth_noise(rng, c.g.size, 10)
    zone = c.lung * np.exp(-((c.g.v - c.anat.lung_cy - rng.uniform(-0.03, 0.05)) / 0.12) ** 2)
    c.opacify(zone * _sigmoid((patch - 0.3) / 0.15), 0.55)


def _consolidation(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    u, v = c.g.u, c.g.v
    side = sides[3]
    top = c.dome - rng.uniform(0.17, 0.22)
    region = c.lungs[side] * _sigmoid((v - top) / 0.008)  # sharp upper edge (a fissure)
    c.record("Consolidation", _mask_box(region))
    bronch = (0.5 + 0.5 * np.cos(2 * math.pi * (u * 9 + v * 3 + rng.random()))) ** 12
    c.opacify(region * (1.0 - 0.6 * bronch), 0.85)


def _pneumonia(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    side = sides[4]
    blobs = []
    for _ in range(int(rng.integers(3, 6))):
        px = c.lung_side[side] + rng.uniform(-0.5, 0.5) * c.hx
        py = c.anat.lung_cy + rng.uniform(-0.1, 0.5) * c.hy
        r = rng.uniform(0.03, 0.045)
        _blob(c.img, c.g, px, py, r, 0.2, sharp=1.2)
        blobs.append((px, py, r))
    c.record("Pneumonia", _blobs_box(blobs, c.g.size))  # one box around the fluffy opacities of one lung


def _edema(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    u, v = c.g.u, c.g.v
    for side in (0, 1):
        hil_x = c.lung_side[side] - (-1 if side == 0 else 1) * 0.06
        haze = np.exp(-(((u - hil_x) / 0.09) ** 2 + ((v - c.anat.lung_cy - 0.06) / 0.14) ** 2))
        c.opacify(c.lungs[side] * haze, 0.6)
        # Kerley B lines: short horizontal lines at the lateral lung bases
        sgn = -1.0 if side == 0 else 1.0
        edge_x = c.lung_side[side] + sgn * c.hx * 0.8
        kb = (0.5 + 0.5 * np.cos(2 * math.pi * v / 0.02)) ** 10
        zone = np.exp(-((u - edge_x) / 0.03) ** 2) * _sigmoid((v - c.dome + 0.15) / 0.01)
        c.img += c.lungs[side] * zone * kb * 0.12


def _atelectasis(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    side = c.atel_side
    by = c.dome - 0.07 - rng.uniform(0.08, 0.12)
    band = _segment(c.g, c.lung_side[side] - 0.6 * c.hx, by, c.lung_side[side] + 0.6 * c.hx,
                    by + rng.uniform(-0.02, 0.02), 0.010)
    c.opacify(band * c.lungs[side], 0.9)
    c.record("Atelectasis", _mask_box(np.maximum(band * c.lungs[side], c.atel_lost)))  # the band and the volume lost


def _fibrosis(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    u, v, size = c.g.u, c.g.v, c.g.size
    net = np.abs(np.sin(2 * math.pi * (u * 38 + 0.3 * _smooth_noise(rng, size, 16)))) < 0.22
    net2 = np.abs(np.sin(2 * math.pi * (v * 38 + 0.3 * _smooth_noise(rng, size, 16)))) < 0.22
    reticular = (net | net2).astype(np.float32)
    zone = _sigmoid((c.anat.lung_cy - v + 0.05) / 0.05)  # upper zones
    c.img += c.lung * zone * reticular * 0.10


def _pleural_thickening(c: _Chest, rng: np.random.Generator, sides: list[int]) -> None:
    g, anat = c.g, c.anat
    for side in ({sides[5]} if rng.random() < 0.6 else {0, 1}):
        sgn = -1.0 if side == 0 else 1.0
        lcx = c.lung_side[side]
        inner = _ellipse(g, lcx - sgn * 0.012, anat.lung_cy + 0.07, c.hx - 0.014, c.hy + 0.045, edge=0.003)
        band = c.lungs[side] * (1.0 - inner) * _sigmoid(((g.u - lcx) * sgn) / 0.01)
        cap = c.lungs[side] * _sigmoid((anat.lung_cy - c.hy + 0.045 - g.v) / 0.005)  # apical cap
        c.opacify(np.maximum(band, cap), 0.9)


# The findings drawn on top of the anatomy, in drawing order (the order takes the random numbers).
# Cardiomegaly and Emphysema change the anatomy itself (`_draw_chest`).
_FINDING_DRAWERS = (
    ("Effusion", _effusion), ("Nodule", _nodule), ("Mass", _mass), ("Pneumothorax", _pneumothorax),
    ("Hernia", _hernia), ("Infiltration", _infiltration), ("Consolidation", _consolidation),
    ("Pneumonia", _pneumonia), ("Edema", _edema), ("Atelectasis", _atelectasis), ("Fibrosis", _fibrosis),
    ("Pleural_Thickening", _pleural_thickening),
)


def _acquire(img: np.ndarray, rng_acq: np.random.Generator, size: int) -> np.ndarray:
    """Acquisition: exposure, contrast, smooth illumination and quantum noise; uint8 out."""
    img = img * rng_acq.uniform(0.9, 1.08) + rng_acq.normal(0, 0.02)
    img += 0.03 * _smooth_noise(rng_acq, size, 4) + 0.018 * rng_acq.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img, 0.0, 1.0) ** rng_acq.uniform(0.9, 1.1)
    return (img * 255.0 + 0.5).astype(np.uint8)


def render(rng: np.random.Generator, anat: Anatomy, findings: set[str], size: int = 256,
           boxes: list | None = None) -> np.ndarray:
    """Draw one synthetic radiograph (uint8, size x size) with the given findings.

    boxes: a list to append (finding, x, y, w, h) to, in pixels of this image, for every finding
    drawn in one place (see `BOXED_FINDINGS`): where its mask is over one half, or a blob out to its
    half-amplitude radius. Recording them draws nothing and takes no random numbers: the image is
    the same with or without.
    """
    # separate streams: a finding never shifts the anatomy or the noise of the same image seed
    rng_base, rng_find, rng_acq = rng.spawn(3)
    # atelectasis: one side loses volume (its hemidiaphragm rises)
    atel_side = int(rng_find.integers(2)) if "Atelectasis" in findings else -1
    chest = _draw_chest(rng_base, _grid(size), anat, findings, atel_side, boxes)
    sides = [int(rng_find.integers(2)) for _ in range(8)]  # which lung each finding prefers
    for name, draw in _FINDING_DRAWERS:
        if name in findings:
            draw(chest, rng_find, sides)
    return _acquire(chest.img, rng_acq, size)
