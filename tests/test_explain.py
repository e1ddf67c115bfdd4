"""common.explain: Grad-CAM (torch and numpy/ONNX), overlays, `medimaging explain`, the pointing game."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import explain as explain_module
from common.cli import main as cli
from common.experiments.localisation import localisation, recorded_run
from common.explain import (
    NIH_SIZE,
    Explanation,
    box_frame,
    explain,
    gradcam,
    normalize_cam,
    pointing_game,
    pointing_game_summary,
    read_bboxes,
    upsample,
)
from common.labels import LABELS, TASKS
from common.onnx_predict import OnnxPredictor
from common.paths import REPO_ROOT
from common.predict import TorchPredictor, create_untrained_run
from common.synthetic import SYNTHETIC_MARKER

REPO = REPO_ROOT


def _image(nih_sample: Path, i: int = 0) -> Path:
    return sorted((nih_sample / "images").glob("*.png"))[i]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> tuple[TorchPredictor, OnnxPredictor]:
    from common.export import export_onnx

    run = create_untrained_run(tmp_path_factory.mktemp("explain") / "cnn", "test_efficientnet", image_size=64,
                               synthetic=True, seed=1)
    return TorchPredictor(run), OnnxPredictor(export_onnx(run, log=lambda m: None))


def _autograd_cam(model, x, k):
    """Grad-CAM written out with autograd on forward_features, as the definition reads."""
    import torch

    feats = model.forward_features(torch.from_numpy(x[None])).detach().requires_grad_(True)
    y = model.forward_from_features(feats)[0, k]
    (g,) = torch.autograd.grad(y, feats)
    return torch.relu((g.mean(dim=(2, 3), keepdim=True) * feats).sum(1))[0].detach().numpy()


def test_cnn_gradcam_is_the_definition_and_the_onnx_numpy_path_matches(cnn, nih_sample):
    torch_p, onnx_p = cnn
    assert onnx_p.cam_method == "numpy"
    gray = torch_p.load(_image(nih_sample))
    x = torch_p.prepare(gray)
    nonconstant = 0
    for label in ("Cardiomegaly", "Effusion", "Mass", "Hernia"):
        k = LABELS.index(label)
        cam, logit = gradcam(torch_p.model, x, k)
        np.testing.assert_allclose(cam, _autograd_cam(torch_p.model, x, k), rtol=1e-5, atol=1e-9)
        onnx_cam, onnx_prob = onnx_p.gradcam(gray, label)
        assert onnx_cam.shape == cam.shape
        np.testing.assert_allclose(onnx_cam, cam, rtol=1e-3, atol=1e-6 * max(1e-12, float(cam.max())))
        assert onnx_prob == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-5)
        nonconstant += float(cam.max()) > float(cam.min())
    assert nonconstant >= 2  # a random model still has spatial structure for most labels


def test_vit_gradcam_lays_patch_tokens_on_the_grid(tmp_path, nih_sample):
    run = create_untrained_run(tmp_path / "vit", "test_vit", image_size=64, seed=2)
    p = TorchPredictor(run)
    patch = p.model.backbone.patch_embed.patch_size[0]
    x = p.prepare(p.load(_image(nih_sample)))
    maps = [gradcam(p.model, x, k)[0] for k in range(len(LABELS))]
    assert all(m.shape == (64 // patch, 64 // patch) for m in maps)
    assert any(float(m.max()) > float(m.min()) for m in maps)  # patch tokens do carry gradient
    e = explain(p, _image(nih_sample), "Mass")
    assert e.method == "torch" and e.heatmap.shape == e.image.shape


def test_explain_cli_writes_a_full_resolution_overlay(cnn, nih_sample, tmp_path, capsys):
    from PIL import Image

    torch_p, _ = cnn
    image = _image(nih_sample, 1)
    out = tmp_path / "heat.png"
    assert cli(["explain", str(image), "--run", str(torch_p.source), "--label", "Effusion", "--out", str(out)]) == 0
    msg = capsys.readouterr().out
    assert "Effusion" in msg and "p = " in msg and "SYNTHETIC" in msg
    with Image.open(image) as src, Image.open(out) as im:
        assert im.size[0] == src.size[0] and im.size[1] > src.size[1]  # full resolution + a title band
        rgb = np.asarray(im.convert("RGB")).astype(int)
    body = rgb[-src.size[1]:]
    assert np.abs(body[..., 0] - body[..., 2]).max() > 50  # coloured: a heatmap was blended in
    e = explain(torch_p, image, "Effusion")
    assert e.heatmap.std() > 0.01 and 0.0 <= e.heatmap.min() and e.heatmap.max() == pytest.approx(1.0)
    assert e.image.shape == (src.size[1], src.size[0])
    # unknown label, unreadable image: clear errors, non-zero status
    assert cli(["explain", str(image), "--run", str(torch_p.source), "--label", "Flu", "--out", str(out)]) == 2
    assert "not an output" in capsys.readouterr().err
    (tmp_path / "x.png").write_text("no")
    assert cli(["explain", str(tmp_path / "x.png"), "--run", str(torch_p.source), "--out", str(out)]) == 1


def test_onnx_explain_for_a_vit_falls_back_to_torch_from_the_run(tmp_path, nih_sample):
    from common.export import export_onnx

    run = create_untrained_run(tmp_path / "vit", "test_vit", image_size=32)
    onnx_p = OnnxPredictor(export_onnx(run, log=lambda m: None))
    assert onnx_p.cam_method == "torch"
    with pytest.raises(ValueError, match="no torch-free Grad-CAM"):
        onnx_p.gradcam(_image(nih_sample), "Mass")
    e = explain(onnx_p, _image(nih_sample), "Mass")
    assert e.method == "torch"
    patch = onnx_p._torch_model.backbone.patch_embed.patch_size[0]  # loaded lazily from the run
    assert e.cam.shape == (32 // patch, 32 // patch)


def test_upsample_and_normalize():
    cam = np.array([[0.0, 2.0], [1.0, 4.0]], dtype=np.float32)
    heat = upsample(normalize_cam(cam), (40, 30))
    assert heat.shape == (40, 30) and heat.max() <= 1.0 + 1e-6 and heat.min() >= 0
    assert np.unravel_index(np.argmax(heat), heat.shape)[0] >= 20  # the peak stays bottom-right
    assert normalize_cam(np.zeros((3, 3))).max() == 0


def test_read_bboxes_maps_nih_spelling(tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                   "a.png,Infiltrate,10,20,30,40,,,\nb.png,Mass,1.5,2,3,4,,,\n")
    df = read_bboxes(csv)
    assert list(df["finding"]) == ["Infiltration", "Mass"]
    assert df.iloc[0][["x", "y", "w", "h"]].tolist() == [10, 20, 30, 40]


def test_pointing_game_on_the_nih_boxes(cnn, nih_sample):
    torch_p, onnx_p = cnn
    bbox = nih_sample / "BBox_List_2017.csv"
    df = pointing_game(onnx_p, bbox, nih_sample / "images", progress=False)
    boxes = read_bboxes(bbox)
    present = {p.name for p in (nih_sample / "images").glob("*.png")}
    assert len(df) == int(boxes["image_id"].isin(present).sum()) == 7
    assert box_frame(bbox) == NIH_SIZE  # NIH's coordinates are in its 1024-pixel images (the sample's size)
    inside = (df["x"] <= df["peak_x"]) & (df["peak_x"] <= df["x"] + df["w"]) & \
             (df["y"] <= df["peak_y"]) & (df["peak_y"] <= df["y"] + df["h"])
    assert (df["inside"] == inside).all()
    assert (df["hit"] == (inside & df["evidence"])).all()  # NIH: one box per image and finding
    assert ((df["chance"] > 0) & (df["chance"] < 1)).all()
    summary = pointing_game_summary(df)
    assert summary.iloc[-1]["finding"] == "All" and summary.iloc[-1]["boxes"] == summary.iloc[-1]["images"] == 7
    assert summary.iloc[-1]["hits"] == int(df["hit"].sum())
    assert summary.iloc[-1]["empty"] == int((~df["evidence"]).sum())
    # the torch path gives the same peaks (same Grad-CAM)
    df_t = pointing_game(torch_p, bbox, nih_sample / "images", progress=False)
    assert df_t[["peak_x", "peak_y", "hit"]].equals(df[["peak_x", "peak_y", "hit"]])
    # a Cardiomegaly-only run is scored on Cardiomegaly boxes only
    cardio = create_untrained_run(Path(torch_p.source).parent / "cardio", "test_efficientnet",
                                  labels=TASKS["cardiomegaly"], image_size=32)
    only = pointing_game(cardio, bbox, nih_sample / "images", progress=False)
    assert set(only["finding"]) == {"Cardiomegaly"} and len(only) == 1


def _peak_at(x: int, y: int, size: int = 64, evidence: bool = True):
    """An `explain` stand-in whose Grad-CAM peaks at (x, y) of a size x size image."""
    def fake(predictor, image, label, name=None):
        heat = np.zeros((size, size), dtype=np.float32)
        heat[y, x] = 1.0
        cam = np.ones((2, 2), dtype=np.float32) * (1.0 if evidence else 0.0)
        return Explanation(np.zeros((size, size), np.uint8), heat, cam, label, 0.5, "torch", "fake", True, name or "")
    return fake


def test_pointing_game_scores_each_image_and_finding_once_over_all_its_boxes(cnn, tmp_path, monkeypatch):
    torch_p, _ = cnn
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        __import__("PIL").Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "images" / name)
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                   "a.png,Nodule,10,10,4,4\na.png,Nodule,40,30,8,6\nb.png,Mass,0,0,16,16\nb.png,Fracture,1,1,2,2\n")
    (tmp_path / SYNTHETIC_MARKER).write_text("{}")  # boxes in the images' own pixels, as the generator writes
    assert box_frame(csv) is None
    monkeypatch.setattr(explain_module, "explain", _peak_at(44, 33))
    df = pointing_game(torch_p, csv, tmp_path / "images", progress=False)
    assert list(df["finding"]) == ["Nodule", "Nodule", "Mass"]  # Fracture is no output of the run
    assert df["inside"].tolist() == [False, True, False] and df["hit"].tolist() == [True, True, False]
    assert df.loc[0, "chance"] == pytest.approx((5 * 5 + 9 * 7) / 64 ** 2)  # pixels a peak can hit, both boxes
    assert df[["x", "y", "w", "h"]].iloc[1].tolist() == [40, 30, 8, 6]  # own pixels: not scaled from 1024
    summary = pointing_game_summary(df).set_index("finding")
    assert summary.loc["Nodule", ["images", "boxes", "hits"]].tolist() == [1, 2, 1]
    assert summary.loc["All", ["images", "boxes", "hits"]].tolist() == [2, 3, 1]
    assert summary.loc["All", "hit_rate"] == 0.5
    # NIH's frame: the same numbers are 1024-pixel coordinates, scaled to the 64-pixel image
    nih = pointing_game(torch_p, csv, tmp_path / "images", progress=False, frame=NIH_SIZE)
    assert nih[["x", "w"]].iloc[1].tolist() == [40 / 16, 8 / 16] and not nih["hit"].any()
    # only the images asked for; an empty Grad-CAM is never a hit
    only_b = pointing_game(torch_p, csv, tmp_path / "images", progress=False, images={"b.png"})
    assert set(only_b["image_id"]) == {"b.png"}
    monkeypatch.setattr(explain_module, "explain", _peak_at(44, 33, evidence=False))
    assert not pointing_game(torch_p, csv, tmp_path / "images", progress=False)["hit"].any()


def test_localisation_on_the_synthetic_boxes_and_without_a_box_file(cnn, tmp_path):
    from common.synthetic import BBOX_CSV, generate

    torch_p, _ = cnn
    data = generate(tmp_path / "nih", "nih", n_images=12, image_size=64, progress=False)
    loc = localisation(run=torch_p.source, data_dir=data, images="all")
    exp = loc.experiment
    assert exp.name == "localisation" and exp.synthetic
    table = exp.tables[0]
    assert table.title.startswith("SYNTHETIC DATA - Pointing game")
    assert table.frame["Finding"].iloc[-1] == "All" and exp.headline["boxes"] == len(loc.boxes) > 0
    assert exp.headline["boxes"] == len(read_bboxes(data / BBOX_CSV))  # every box of the folder is scored
    # an untrained run has no test split to score: a clear error, not every image silently
    with pytest.raises(ValueError, match="no test split.*Images = 'all'"):
        localisation(run=torch_p.source, data_dir=data, images="test")
    (data / BBOX_CSV).unlink()
    empty = localisation(run=torch_p.source, data_dir=data, images="all")
    assert len(empty.boxes) == 0 and "not measured: no BBox_List_2017.csv" in empty.experiment.tables[0].markdown()


def test_the_run_to_explain_comes_from_the_multi_task_record(tmp_path, cardiomegaly_64, nih_sample):
    from common import experiments
    from common.runs import save_json

    with pytest.raises(FileNotFoundError, match="multi_task.json: not found; run multi_task first"):
        recorded_run(tmp_path)
    run = tmp_path / "runs" / "all14-x"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    data = experiments.DataSpec(nih_sample, cardiomegaly_64, False)
    save_json(tmp_path / "tables" / "multi_task.json", {
        "data": "the NIH sample", "data_spec": data.to_dict(),
        "runs": {"stage 2": {"role": "stage 2", "run_dir": str(run), "requested_model": "m", "model_name": "m",
                             "reused": False}}})
    assert recorded_run(tmp_path, data) == run
    with pytest.raises(ValueError, match="trained on the NIH sample, not on this data"):
        recorded_run(tmp_path, experiments.DataSpec(nih_sample, None, False))
    with pytest.raises(FileNotFoundError, match="no finished 'stage 1' run"):
        recorded_run(tmp_path, data, role="stage 1")


@pytest.mark.slow
def test_localisation_notebook_runs_with_papermill(cnn, nih_sample, tmp_path):
    _, onnx_p = cnn
    out = tmp_path / "results"
    executed = tmp_path / "localisation.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(REPO / "notebooks" / "localisation.ipynb"), str(executed),
           "-p", "RunDir", str(onnx_p.source), "-p", "DataDir", str(nih_sample), "-p", "OutDir", str(out),
           "-p", "Images", "all", "-p", "NumExamples", "4", "--cwd", str(REPO / "notebooks"), "--no-progress-bar"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    import pandas as pd

    record = json.loads((out / "tables" / "localisation.json").read_text())
    assert record["headline"]["boxes"] == record["headline"]["images"] == 7
    assert len(pd.read_csv(out / "tables" / "localisation_boxes.csv")) == 7
    assert (out / "figures" / "localisation_examples.png").stat().st_size > 10_000
    # real images, but the run was marked synthetic: the table says so
    assert record["tables"][0]["title"].startswith("SYNTHETIC DATA - Pointing game")
    nb = json.loads(executed.read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
