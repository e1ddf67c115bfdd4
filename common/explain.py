"""Grad-CAM: where the model looked, for CNNs and ViTs, with overlays and the pointing game.

    from common.explain import explain, pointing_game, pointing_game_summary
    e = explain("runs/all14", "00000001_000.png", "Cardiomegaly")   # Explanation
    e.save("heat.png")                                               # full-resolution overlay + title
    df = pointing_game("runs/all14", "BBox_List_2017.csv", "nih-sample/images")

The localisation notebook's experiment (which run, which images, its table) is
`common.experiments.localisation`.

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

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.paths import SYNTHETIC_MARKER
from common.predict import load_predictor
from common.serving import ImageInput, Predictor, sigmoid

# NIH's BBox_List_2017.csv spells one finding differently from the label file.
BBOX_FINDINGS = {"Infiltrate": "Infiltration"}
NIH_SIZE = 1024  # BBox_List_2017.csv coordinates are pixels of NIH's 1024 x 1024 images
POINTING_GAME_COLUMNS = ["image_id", "finding", "x", "y", "w", "h", "peak_x", "peak_y", "inside", "hit", "evidence",
                         "probability", "chance", "method"]


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
    """File name → path below image_dir, as the dataset readers find them (common.data.index_images)."""
    from common.data import index_images

    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    return {name: Path(path) for name, path in index_images(root).items()}


def box_frame(bbox_csv: str | os.PathLike) -> int | None:
    """The pixel frame a box file's coordinates are in: NIH_SIZE for NIH's file (its images are
    1024 x 1024; smaller copies scale), None (each image's own pixels) for the suite's synthetic
    data, whose generator (common.synthetic) writes them so beside its marker file."""
    return None if (Path(bbox_csv).parent / SYNTHETIC_MARKER).is_file() else NIH_SIZE


def pointing_game(model: str | os.PathLike | Predictor, bbox_csv: str | os.PathLike,
                  image_dir: str | os.PathLike, progress: bool = True, images: Iterable[str] | None = None,
                  frame: int | None | str = "auto") -> Any:
    """For each image and finding with radiologist boxes (the image in image_dir, the finding a model
    output): does the Grad-CAM maximum of that finding fall inside one of its boxes? (The pointing
    game of Zhang et al. 2016: one verdict per image and finding, however many boxes it has.)

    images: only these image names (e.g. `common.experiments.localisation.held_out_images(run)`); None: every image with a box.
    frame: the side in pixels of the images the box coordinates refer to; None: each image's own
    pixels; "auto": `box_frame(bbox_csv)`. Coordinates are scaled from it to each image's size.

    Returns a DataFrame, one row per box: image_id, finding, x, y, w, h (image pixels), peak_x,
    peak_y, inside (the peak is in this box), hit (in any box of this finding on this image: the
    game's verdict), evidence (False when the Grad-CAM is empty: never a hit), probability, chance
    (the share of pixels in any of those boxes: a random peak's hit rate), method.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    if frame == "auto":
        frame = box_frame(bbox_csv)
    boxes = read_bboxes(bbox_csv)
    found = _index_images(image_dir)
    usable = boxes[boxes["image_id"].isin(found) & boxes["finding"].isin(predictor.labels)]
    if images is not None:
        usable = usable[usable["image_id"].isin(set(images))]
    rows = []
    cases = usable.groupby(["image_id", "finding"], sort=False)
    for (image_id, finding), group in tqdm(cases, total=cases.ngroups, desc="pointing game", disable=not progress):
        e = explain(predictor, found[image_id], finding, name=image_id)
        h, w = e.image.shape
        sx, sy = (1.0, 1.0) if frame is None else (w / frame, h / frame)
        px, py = e.peak
        positive = float(e.cam.max(initial=0.0)) > 0
        scaled = [(b.x * sx, b.y * sy, b.w * sx, b.h * sy) for b in group.itertuples(index=False)]
        inside = [(x0 <= px <= x0 + bw) and (y0 <= py <= y0 + bh) for x0, y0, bw, bh in scaled]
        covered = np.zeros((h, w), dtype=bool)  # the pixels a peak may land on and hit, as tested above
        for x0, y0, bw, bh in scaled:
            covered[max(0, math.ceil(y0)):math.floor(y0 + bh) + 1, max(0, math.ceil(x0)):math.floor(x0 + bw) + 1] = True
        hit = positive and any(inside)
        for (x0, y0, bw, bh), this in zip(scaled, inside):
            rows.append({"image_id": image_id, "finding": finding, "x": x0, "y": y0, "w": bw, "h": bh,
                         "peak_x": px, "peak_y": py, "inside": bool(this), "hit": bool(hit), "evidence": positive,
                         "probability": e.probability, "chance": float(covered.mean()), "method": e.method})
    return pd.DataFrame(rows, columns=POINTING_GAME_COLUMNS)


def bbox_file(folder: str | os.PathLike | None) -> Path | None:
    """BBox_List_2017.csv in folder (or one level below it), or None when there is none."""
    if folder is None or not Path(folder).is_dir():
        return None
    found = sorted(Path(folder).glob("BBox_List_2017.csv")) or sorted(Path(folder).glob("*/BBox_List_2017.csv"))
    return found[0] if found else None


def pointing_game_summary(df) -> Any:
    """Per finding: images (image-finding pairs scored), boxes, hits, hit rate, chance (the mean
    share of pixels in the boxes: a random peak's hit rate) and empty maps (Grad-CAMs with no
    positive evidence: never a hit); plus an 'All' row."""
    import pandas as pd

    columns = ["finding", "images", "boxes", "hits", "hit_rate", "chance", "empty"]
    if not len(df):
        return pd.DataFrame(columns=columns)
    cases = df.drop_duplicates(["image_id", "finding"]).assign(empty=lambda c: ~c["evidence"].astype(bool))
    g = cases.groupby("finding", sort=True)
    table = pd.DataFrame({"images": g.size(), "boxes": df.groupby("finding", sort=True).size(),
                          "hits": g["hit"].sum(), "chance": g["chance"].mean(), "empty": g["empty"].sum()})
    table.loc["All"] = [len(cases), len(df), int(cases["hit"].sum()), float(cases["chance"].mean()),
                        int(cases["empty"].sum())]
    table = table.astype({"images": int, "boxes": int, "hits": int, "empty": int})
    table["hit_rate"] = table["hits"] / table["images"]
    return table.reset_index().rename(columns={"index": "finding"})[columns]


def pointing_game_display(summary) -> Any:
    """The summary as a table reads: hit rate and chance as percentages, the 'All' row last."""
    import pandas as pd

    return pd.DataFrame({"Finding": summary["finding"], "Images": summary["images"], "Boxes": summary["boxes"],
                         "Hits": summary["hits"], "Hit rate": [f"{100 * r:.0f}%" for r in summary["hit_rate"]],
                         "Chance": [f"{100 * c:.1f}%" for c in summary["chance"]], "Empty maps": summary["empty"]})


def plot_pointing_game(df, model: str | os.PathLike | Predictor, image_dir: str | os.PathLike,
                       n: int = 8, cols: int = 4, alpha: float = 0.4, synthetic: bool | None = None):
    """A Figure: Grad-CAM overlays of the first n images and findings scored, each with its boxes
    (green: hit, red: miss) and the peak (+). synthetic: say SYNTHETIC in the title (None: when the
    model's run says its data was)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    cases = list(df.groupby(["image_id", "finding"], sort=False))[:n]
    k = max(1, len(cases))
    ncols = min(cols, k)
    nrows = -(-k // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.5 * nrows), dpi=100)
    synthetic = bool(predictor.synthetic) if synthetic is None else synthetic
    fig.suptitle(("SYNTHETIC data - " if synthetic else "") + "Pointing game: Grad-CAM peak (+) vs radiologist box")
    if not cases:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no boxes for this model's findings in these images", ha="center", va="center")
        ax.set_axis_off()
        return fig
    images = _index_images(image_dir)
    for i, ((image_id, finding), group) in enumerate(cases):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        e = explain(predictor, images[image_id], finding, name=image_id)
        ax.imshow(e.overlay(alpha), interpolation="bilinear")
        r = group.iloc[0]
        color = "lime" if r.hit else "red"
        for b in group.itertuples(index=False):
            ax.add_patch(Rectangle((b.x, b.y), b.w, b.h, fill=False, edgecolor=color, linewidth=1.5))
        if r.evidence:
            ax.plot([r.peak_x], [r.peak_y], marker="+", color="white", markersize=12, markeredgewidth=2)
        verdict = "hit" if r.hit else "miss" if r.evidence else "miss (empty map)"
        ax.set_title(f"{image_id}\n{finding} p={r.probability:.2f} {verdict}", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    return fig
