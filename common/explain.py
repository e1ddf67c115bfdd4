"""Grad-CAM: where the model looked, for CNNs and ViTs, with overlays and the pointing game.

    from common.explain import explain, pointing_game, pointing_game_summary
    e = explain("runs/all14", "00000001_000.png", "Cardiomegaly")   # Explanation
    e.save("heat.png")                                               # full-resolution overlay + title
    df = pointing_game("runs/all14", "BBox_List_2017.csv", "nih-sample/images")

Grad-CAM (Selvaraju et al. 2017): for the chosen output's logit y and a feature map A [C, h, w],
alpha_c = mean_ij dy/dA_cij and cam = ReLU(sum_c alpha_c A_c), upsampled to the image.
- CNNs: A is `forward_features` (the last feature map before pooling).
- ViTs and other token models: A is the input of the last block's attention (`blocks[-1].norm1`),
  its patch tokens reshaped to the patch grid, prefix (class / register) tokens dropped. The final
  tokens do not work for class-token pooling: after the last block only the class token reaches
  the head, so the patch tokens' gradient is zero. Models without such blocks use the final tokens.
- The ONNX path (`common.onnx_predict.OnnxPredictor.gradcam`) computes the same CNN Grad-CAM in
  numpy, without torch; `explain` uses it when given an ONNX predictor that supports it.

Implemented here on timm's `forward_features` rather than with the `grad-cam` package: that
package works with these models given a per-architecture target layer and reshape function, but
it pulls in OpenCV, and serving needs the identical computation in numpy anyway (checked equal in
the tests). Torch and matplotlib are imported only inside the functions that need them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.predict import ImageInput, Predictor, load_predictor, sigmoid

# NIH's BBox_List_2017.csv spells one finding differently from the label file.
BBOX_FINDINGS = {"Infiltrate": "Infiltration"}
NIH_SIZE = 1024  # BBox_List_2017.csv coordinates are pixels of NIH's 1024 x 1024 images


# ------------------------------------------------------------------------------------- Grad-CAM


def _token_target(model) -> tuple[Any, str] | None:
    """The module whose output ViT-style Grad-CAM uses: the last block's first norm (pre-attention)."""
    blocks = getattr(model.backbone, "blocks", None)
    try:
        last = blocks[-1] if blocks is not None and len(blocks) else None
    except TypeError:
        last = None
    if last is not None and hasattr(last, "norm1"):
        return last.norm1, "backbone.blocks[-1].norm1"
    return None


def _tokens_to_map(tokens, model, image_size: int):
    """[1, N, C] tokens → [1, C, gh, gw]: prefix tokens dropped, the rest laid on the patch grid."""
    backbone = model.backbone
    n = tokens.shape[1]
    prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
    grid = None
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (image_size // ph, image_size // pw)
    if grid is None or grid[0] * grid[1] + prefix != n:
        side = int(round((n - prefix) ** 0.5))
        if side * side != n - prefix:
            raise ValueError(f"Grad-CAM: cannot lay {n - prefix} patch tokens ({prefix} prefix) on a square grid")
        grid = (side, side)
    patches = tokens[:, prefix:, :]
    return patches.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2]).permute(0, 3, 1, 2)


def gradcam(model, x, label_index: int) -> tuple[np.ndarray, float]:
    """Grad-CAM of one output: (cam [h, w] float32, ReLU'd, unnormalised; the output's logit).

    model: a MedImagingModel (eval mode is set); x: one preprocessed image [C, S, S] (array or tensor).
    """
    import torch

    model.eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    if x.ndim == 3:
        x = x[None]
    device = next(model.parameters()).device
    x = x.to(device)
    captured: dict[str, torch.Tensor] = {}
    handle = None
    target = _token_target(model)
    with torch.enable_grad():
        if target is not None:
            handle = target[0].register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out))
        try:
            feats = model.forward_features(x)
        finally:
            if handle is not None:
                handle.remove()
        logits = model.forward_from_features(feats)
        y = logits[0, int(label_index)]
        if feats.ndim == 4:
            nhwc = str(getattr(model.backbone, "output_fmt", "NCHW")).upper().endswith("NHWC")
            (grad,) = torch.autograd.grad(y, feats)
            a, g = (feats.permute(0, 3, 1, 2), grad.permute(0, 3, 1, 2)) if nhwc else (feats, grad)
        else:
            tokens = captured.get("a", feats) if feats.ndim == 3 else None
            if tokens is None or tokens.ndim != 3:
                raise ValueError(f"Grad-CAM: unsupported feature shape {tuple(feats.shape)} for "
                                 f"{getattr(model, 'model_name', type(model).__name__)}")
            (grad,) = torch.autograd.grad(y, tokens)
            a, g = _tokens_to_map(tokens, model, x.shape[-1]), _tokens_to_map(grad, model, x.shape[-1])
        alpha = g.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((alpha * a).sum(dim=1))[0]
    return cam.detach().float().cpu().numpy(), float(y.detach())


def normalize_cam(cam: np.ndarray) -> np.ndarray:
    """Scale a cam to [0, 1] by its maximum (all zeros stay zeros: no positive evidence)."""
    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max()) if cam.size else 0.0
    return cam / peak if peak > 0 else np.zeros_like(cam)


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A low-resolution map → (H, W) float32, bilinear (the model saw the whole image squashed to S x S)."""
    from PIL import Image

    h, w = int(shape[0]), int(shape[1])
    img = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32))
    return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heatmap [0, 1] (same size) over a grayscale image → RGB uint8."""
    import matplotlib

    if heat.shape != gray.shape:
        raise ValueError(f"heatmap {heat.shape} and image {gray.shape} differ in size; upsample() first")
    color = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3].astype(np.float32)
    base = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return np.clip(np.rint(((1 - alpha) * base + alpha * color) * 255), 0, 255).astype(np.uint8)


@dataclass
class Explanation:
    """A Grad-CAM for one image and label, at the image's full resolution."""

    image: np.ndarray  # (H, W) uint8, the image as decoded
    heatmap: np.ndarray  # (H, W) float32 in [0, 1]
    cam: np.ndarray  # (h, w) raw Grad-CAM at feature resolution
    label: str
    probability: float
    method: str  # "torch" or "onnx" (numpy)
    model_name: str = "?"
    synthetic: bool = False
    image_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def peak(self) -> tuple[int, int]:
        """(x, y) of the heatmap's maximum, in image pixels."""
        y, x = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(x), int(y)

    @property
    def title(self) -> str:
        t = f"Grad-CAM: {self.label}, p = {self.probability:.3f} ({self.model_name})"
        if float(self.cam.max(initial=0.0)) <= 0:
            t += " - no positive evidence"
        return ("SYNTHETIC data - " if self.synthetic else "") + t

    def overlay(self, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
        return overlay(self.image, self.heatmap, alpha, cmap)

    def figure(self, alpha: float = 0.4, cmap: str = "jet", dpi: int = 100):
        """A matplotlib Figure: the overlay at full resolution (one image pixel per figure pixel) + title."""
        from matplotlib.figure import Figure

        h, w = self.image.shape
        title_px = max(40, w // 24)
        fig = Figure(figsize=(w / dpi, (h + title_px) / dpi), dpi=dpi)
        ax = fig.add_axes((0, 0, 1, h / (h + title_px)))
        ax.imshow(self.overlay(alpha, cmap), interpolation="none")
        ax.set_axis_off()
        fig.text(0.5, 1 - 0.5 * title_px / (h + title_px), self.title, ha="center", va="center",
                 fontsize=max(8, title_px * 0.3 * 72 / dpi))
        return fig

    def save(self, path: str | os.PathLike, alpha: float = 0.4, cmap: str = "jet") -> Path:
        """Write the overlay with its title as an image file (PNG by extension)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = self.figure(alpha, cmap)
        fig.savefig(path, dpi=fig.dpi)
        return path


def _torch_model(predictor: Predictor):
    """The torch model behind a predictor (an ONNX one reloads its run: torch imported only now)."""
    model = getattr(predictor, "model", None)
    if model is not None:
        return model
    cached = getattr(predictor, "_torch_model", None)
    if cached is not None:
        return cached
    run_dir = (getattr(predictor, "meta", {}) or {}).get("run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        raise FileNotFoundError(
            f"{predictor.source}: Grad-CAM for this model needs torch and its run directory "
            f"({run_dir or 'not recorded'}), which is not available; explain with the run dir instead")
    from common.runs import load_run

    model = load_run(run_dir).model
    predictor._torch_model = model
    return model


def explain(model: str | os.PathLike | Predictor, image: ImageInput, label: str | None = None,
            name: str | None = None) -> Explanation:
    """Grad-CAM of `label` (default: the most probable finding) for one image.

    model: a run directory (torch), an export folder or a predictor from `common.predict.load_predictor`.
    An ONNX predictor uses the numpy Grad-CAM when its export supports it (CNNs), else torch.
    Raises `common.images.UnreadableImage` for an unreadable image, ValueError for an unknown label.
    """
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    gray = predictor.load(image)
    if label is None:
        probs = sigmoid(predictor.logits(predictor.prepare(gray)[None]))[0]
        label = predictor.labels[int(np.argmax(probs))]
    if label not in predictor.labels:
        raise ValueError(f"label {label!r} is not an output of this model; choose one of {predictor.labels}")
    if getattr(predictor, "cam_method", "torch") == "numpy":
        cam, prob = predictor.gradcam(gray, label)
        method = "onnx"
    else:
        cam, logit = gradcam(_torch_model(predictor), predictor.prepare(gray), predictor.labels.index(label))
        prob, method = float(sigmoid(logit)), "torch"
    heat = upsample(normalize_cam(cam), gray.shape)
    if name is None:
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else ""
    return Explanation(gray, np.clip(heat, 0, 1), cam, label, float(prob), method,
                       getattr(predictor, "model_name", "?"), bool(predictor.synthetic), name)


# ---------------------------------------------------------------------------------- pointing game


def read_bboxes(bbox_csv: str | os.PathLike) -> Any:
    """NIH's BBox_List_2017.csv → DataFrame: image_id, finding (label-file spelling), x, y, w, h."""
    import pandas as pd

    path = Path(bbox_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bounding-box file not found (NIH's BBox_List_2017.csv)")
    raw = pd.read_csv(path)
    cols = [c for c in raw.columns if not str(c).startswith("Unnamed")]
    if len(cols) < 6 or "Image Index" not in cols[0] or "Finding" not in cols[1]:
        raise ValueError(f"{path}: expected NIH's columns 'Image Index, Finding Label, Bbox [x, y, w, h]', got {cols}")
    df = raw[cols[:6]].copy()
    df.columns = ["image_id", "finding", "x", "y", "w", "h"]
    df["finding"] = df["finding"].astype(str).str.strip().replace(BBOX_FINDINGS)
    return df.astype({"x": float, "y": float, "w": float, "h": float})


def _index_images(image_dir: str | os.PathLike) -> dict[str, Path]:
    from common.images import IMAGE_EXTENSIONS

    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return {p.name: p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS}


def pointing_game(model: str | os.PathLike | Predictor, bbox_csv: str | os.PathLike,
                  image_dir: str | os.PathLike, progress: bool = True) -> Any:
    """For each radiologist box whose image is in image_dir and finding is a model output: does the
    Grad-CAM maximum of that finding fall inside the box?

    Returns a DataFrame, one row per box: image_id, finding, x, y, w, h (image pixels), peak_x,
    peak_y, hit, probability, chance (the box's share of the image: a random point's hit rate),
    method; evidence is False when the Grad-CAM is empty (no positive evidence: never a hit).
    Box coordinates are NIH's 1024-pixel ones, scaled to each image's size.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    boxes = read_bboxes(bbox_csv)
    images = _index_images(image_dir)
    usable = boxes[boxes["image_id"].isin(images) & boxes["finding"].isin(predictor.labels)]
    rows = []
    cache: dict[tuple[str, str], Explanation] = {}
    for box in tqdm(usable.itertuples(index=False), total=len(usable), desc="pointing game", disable=not progress):
        key = (box.image_id, box.finding)
        if key not in cache:
            cache[key] = explain(predictor, images[box.image_id], box.finding, name=box.image_id)
        e = cache[key]
        h, w = e.image.shape
        sx, sy = w / NIH_SIZE, h / NIH_SIZE
        x0, y0, bw, bh = box.x * sx, box.y * sy, box.w * sx, box.h * sy
        px, py = e.peak
        positive = float(e.cam.max(initial=0.0)) > 0
        hit = positive and (x0 <= px <= x0 + bw) and (y0 <= py <= y0 + bh)
        rows.append({"image_id": box.image_id, "finding": box.finding, "x": x0, "y": y0, "w": bw, "h": bh,
                     "peak_x": px, "peak_y": py, "hit": bool(hit), "evidence": positive, "probability": e.probability,
                     "chance": min(1.0, bw * bh / (w * h)), "method": e.method})
    columns = ["image_id", "finding", "x", "y", "w", "h", "peak_x", "peak_y", "hit", "evidence", "probability",
               "chance", "method"]
    return pd.DataFrame(rows, columns=columns)


def find_bbox_data(data_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(BBox_List_2017.csv, image folder) in data_dir; None: dataset_full/ if it has the box file,
    else the NIH sample ($MEDIMAGING_SAMPLE_DATA/nih-sample, or ../shared/data/nih-sample beside
    the checkout)."""
    repo = Path(__file__).resolve().parents[1]
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        sample = os.environ.get("MEDIMAGING_SAMPLE_DATA")
        candidates = [repo / "dataset_full", *([Path(sample) / "nih-sample"] if sample else []),
                      repo.parent / "shared" / "data" / "nih-sample"]
    for folder in candidates:
        if not folder.is_dir():
            continue
        found = sorted(folder.glob("BBox_List_2017.csv")) or sorted(folder.glob("*/BBox_List_2017.csv"))
        if found:
            return found[0], folder
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no BBox_List_2017.csv in {where}: download NIH's box file (ChestX-ray14, "
                            "BBox_List_2017.csv) next to the images of an NIH-layout folder and pass that folder")


def newest_run(runs_dir: str | os.PathLike | None = None) -> Path:
    """The newest run directory under runs_dir (None: $MEDIMAGING_RUNS, else runs/ in the checkout)."""
    from common.runs import find_runs

    root = Path(runs_dir or os.environ.get("MEDIMAGING_RUNS") or Path(__file__).resolve().parents[1] / "runs")
    found = find_runs(root)
    if not found:
        raise FileNotFoundError(f"no run under {root}; make one with `medimaging train --out {root}/NAME` "
                                "or pass the run directory")
    return found[0]


def pointing_game_summary(df) -> Any:
    """Per finding: boxes, hits, hit rate, and the chance rate (mean box share); plus an 'All' row."""
    import pandas as pd

    if not len(df):
        return pd.DataFrame(columns=["finding", "boxes", "hits", "hit_rate", "chance"])
    g = df.groupby("finding", sort=True)
    table = pd.DataFrame({"boxes": g.size(), "hits": g["hit"].sum().astype(int), "chance": g["chance"].mean()})
    table.loc["All"] = [len(df), int(df["hit"].sum()), float(df["chance"].mean())]
    table["hit_rate"] = table["hits"] / table["boxes"]
    table = table.reset_index().rename(columns={"index": "finding"})
    table["boxes"] = table["boxes"].astype(int)
    table["hits"] = table["hits"].astype(int)
    return table[["finding", "boxes", "hits", "hit_rate", "chance"]]


def pointing_game_markdown(summary, title: str = "") -> str:
    """The summary table as markdown (hit rate and chance as percentages)."""
    lines = ([f"### {title}", ""] if title else []) + [
        "| Finding | Boxes | Hits | Hit rate | Chance |", "|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        name = f"**{r.finding}**" if r.finding == "All" else r.finding
        lines.append(f"| {name} | {r.boxes} | {r.hits} | {100 * r.hit_rate:.0f}% | {100 * r.chance:.1f}% |")
    return "\n".join(lines) + "\n"


def plot_pointing_game(df, model: str | os.PathLike | Predictor, image_dir: str | os.PathLike,
                       n: int = 8, cols: int = 4, alpha: float = 0.4):
    """A Figure: the first n boxes' Grad-CAM overlays with the box (green: hit, red: miss) and peak (+)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    images = _index_images(image_dir)
    rows = df.head(n)
    k = max(1, len(rows))
    ncols = min(cols, k)
    nrows = -(-k // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.5 * nrows), dpi=100)
    synthetic = bool(predictor.synthetic)
    fig.suptitle(("SYNTHETIC data - " if synthetic else "") + "Pointing game: Grad-CAM peak (+) vs radiologist box")
    if not len(rows):
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no boxes for this model's findings in these images", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for i, r in enumerate(rows.itertuples(index=False)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        e = explain(predictor, images[r.image_id], r.finding, name=r.image_id)
        ax.imshow(e.overlay(alpha), interpolation="bilinear")
        color = "lime" if r.hit else "red"
        ax.add_patch(Rectangle((r.x, r.y), r.w, r.h, fill=False, edgecolor=color, linewidth=1.5))
        if r.evidence:
            ax.plot([r.peak_x], [r.peak_y], marker="+", color="white", markersize=12, markeredgewidth=2)
        verdict = "hit" if r.hit else "miss" if r.evidence else "miss (empty map)"
        ax.set_title(f"{r.image_id}\n{r.finding} p={r.probability:.2f} {verdict}", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    return fig
