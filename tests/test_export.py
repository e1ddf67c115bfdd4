"""common.export and `medimaging export`: ONNX parity with torch, int8, metadata, calibration data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.cli import main as cli
from common.export import (
    INT8_RECIPE,
    ExportError,
    calibration_paths,
    ensure_export,
    export_onnx,
    quantize_int8,
)
from common.labels import LABELS, TASKS
from common.onnx_predict import OnnxModelError, OnnxPredictor
from common.predict import TorchPredictor, create_untrained_run


def _images(nih_sample: Path, n: int, start: int = 0) -> list[Path]:
    return sorted((nih_sample / "images").glob("*.png"))[start:start + n]


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory, nih_sample) -> tuple[Path, Path]:
    """A CNN run exported with int8, calibrated on given real images."""
    run = create_untrained_run(tmp_path_factory.mktemp("export") / "cnn", "test_efficientnet", image_size=64,
                               thresholds={k: 0.3 + 0.01 * i for i, k in enumerate(LABELS)}, synthetic=True)
    out = export_onnx(run, int8=True, calibration_images=_images(nih_sample, 16, start=100), n_calibration=16,
                      log=lambda m: None)
    return run, out


def test_export_writes_model_and_metadata(cnn_export):
    run, out = cnn_export
    assert out == run / "export"
    meta = json.loads((out / "model.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert meta["labels"] == list(LABELS)
    assert meta["thresholds"] == json.loads((run / "thresholds.json").read_text())
    assert meta["input"] == cfg["input"]
    assert meta["synthetic"] is True and meta["model"]["model_name"] == "test_efficientnet"
    assert meta["opset"] >= 17 and meta["exporter"] in ("dynamo", "torchscript")
    assert meta["parity"]["max_abs_logit_diff"] <= 1e-4
    assert meta["outputs"] == {"logits": "logits", "features": "features"}
    assert meta["cam"]["method"] == "numpy" and (out / "head.npz").is_file()


def test_onnx_matches_torch_with_a_dynamic_batch(cnn_export, nih_sample):
    import onnx
    import onnxruntime as ort

    run, out = cnn_export
    model = onnx.load(str(out / "model.onnx"))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not fixed
    torch_p, onnx_p = TorchPredictor(run), OnnxPredictor(out)
    for n in (1, 5):
        images = _images(nih_sample, n)
        np.testing.assert_allclose(onnx_p.predict_proba(images), torch_p.predict_proba(images), atol=1e-4)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([onnx_p.prepare(onnx_p.load(p)) for p in _images(nih_sample, 3)])
    logits, feats = sess.run(None, {"image": x})
    assert logits.shape == (3, len(LABELS)) and feats.ndim == 4 and feats.shape[0] == 3


def test_int8_is_static_qdq_and_close_to_fp32(cnn_export, nih_sample):
    import onnx

    _run, out = cnn_export
    meta = json.loads((out / "model.json").read_text())
    q = meta["int8"]
    assert q["method"] == "static-qdq" and q["n_calibration"] == 16 and q["file"] == "model.int8.onnx"
    assert q["recipe"] == INT8_RECIPE  # the app shows it; ensure_export compares it
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size
    images = _images(nih_sample, 6, start=200)  # not calibration images
    p32 = OnnxPredictor(out).predict_proba(images)
    p8 = OnnxPredictor(out, int8=True).predict_proba(images)
    assert np.abs(p8 - p32).max() < 0.02
    assert not np.array_equal(p8, p32)  # really a different (quantised) model


def test_int8_recipe_keeps_excluded_nodes_fp32(cnn_export, nih_sample, tmp_path):
    import onnx

    _run, out = cnn_export
    meta = json.loads((out / "model.json").read_text())
    report = quantize_int8(out / "model.onnx", tmp_path / "model.int8.onnx", _images(nih_sample, 8, start=100),
                           meta["input"], n_calibration=8, recipe={"exclude": ["stem", "depthwise"]},
                           log=lambda m: None)
    excluded = set(report["excluded_nodes"])
    assert report["method"] == "static-qdq" and report["recipe"]["exclude"] == ["stem", "depthwise"]
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    float_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    kept = [n for n in convs if n.name in excluded]
    assert len(kept) >= 2 and len(kept) == len(excluded & {n.name for n in convs})
    assert all(n.input[1] in float_inits for n in kept)  # fp32 weights, no int8 copy
    assert all(n.input[1] in dequantised for n in convs if n.name not in excluded)  # the rest is int8
    with pytest.raises(ValueError, match="exclude="):
        quantize_int8(out / "model.onnx", tmp_path / "bad.onnx", [], meta["input"], recipe={"exclude": ["neck"]})


def test_ensure_export_requantises_when_the_recipe_changed(cnn_export, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cnn_export[0], run)  # copy2: modification times kept, so the export is fresh
    before = (run / "export" / "model.int8.onnx").stat().st_mtime_ns
    assert ensure_export(run, int8=True) == run / "export"
    assert (run / "export" / "model.int8.onnx").stat().st_mtime_ns == before  # same recipe: reused
    meta = json.loads((run / "export" / "model.json").read_text())
    meta["int8"]["recipe"] = {**INT8_RECIPE, "version": INT8_RECIPE["version"] - 1}
    (run / "export" / "model.json").write_text(json.dumps(meta))
    # another recipe: re-exported, which needs the run's data for calibration (an untrained run has none)
    with pytest.raises(ExportError, match="int8 calibration"):
        ensure_export(run, int8=True, log=lambda m: None)


def test_one_freshness_rule_for_every_export_user(cnn_export, tmp_path):
    """common.serving.stale_reason: what predict warns about, the app re-exports and ensure_export redoes."""
    import os
    import shutil

    from common.serving import stale_reason

    run = tmp_path / "run"
    shutil.copytree(cnn_export[0], run)
    out = run / "export"
    assert stale_reason(out, run) is None and stale_reason(out, run, int8=True, recipe=INT8_RECIPE) is None
    earlier = (run / "best.safetensors").stat().st_mtime - 10
    for name in ("model.onnx", "model.int8.onnx", "model.json"):
        os.utime(out / name, (earlier, earlier))  # the run was retrained in place after its export
    assert "older than the run's weights" in stale_reason(out, run)
    assert OnnxPredictor(out).stale is True  # predict's warning: the same rule, on the run model.json records
    assert "older than the run's weights" in stale_reason(out, run, int8=True)
    (out / "model.int8.onnx").unlink()
    assert stale_reason(out, run, int8=True).startswith("model.int8.onnx missing")
    assert ensure_export(run, int8=False, log=lambda m: None) == out  # fp32 redone from the newer weights
    assert stale_reason(out, run) is None and not (out / "model.int8.onnx").exists()
    assert OnnxPredictor(run).stale is False


def test_int8_falls_back_to_dynamic_quantisation_when_static_fails(tmp_path, nih_sample, monkeypatch):
    import onnxruntime.quantization as q

    def static_fails(*args, **kwargs):  # an architecture static quantisation cannot handle
        raise RuntimeError("no QDQ support for this operator")

    monkeypatch.setattr(q, "quantize_static", static_fails)
    run = create_untrained_run(tmp_path / "run", "test_efficientnet", image_size=32)
    out = export_onnx(run, int8=True, calibration_images=nih_sample / "images", n_calibration=4, log=lambda m: None)
    report = json.loads((out / "model.json").read_text())["int8"]
    assert report["method"] == "dynamic" and "no QDQ support" in report["static_error"]
    probs = OnnxPredictor(out, int8=True).predict_proba(_images(nih_sample, 2))
    assert probs.shape == (2, len(LABELS)) and np.isfinite(probs).all()


def test_int8_needs_calibration_images(tmp_path):
    run = create_untrained_run(tmp_path / "run", "test_efficientnet", image_size=32)
    with pytest.raises(ExportError, match="--calibration"):
        export_onnx(run, tmp_path / "out", int8=True, log=lambda m: None)  # an untrained run has no data


def test_calibration_paths_come_from_the_runs_dev_split(nih_sample, tmp_path):
    from common.data import load_dataset, patient_split
    from common.train import select_task

    run = create_untrained_run(tmp_path / "run", "test_efficientnet", labels=TASKS["cardiomegaly"], image_size=32)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] = [{"root": str(nih_sample), "layout": "nih"}]
    cfg["train"] = {"data": [str(nih_sample)], "task": "cardiomegaly", "seed": 3, "split_fractions": [0.6, 0.2, 0.2]}
    (run / "config.json").write_text(json.dumps(cfg))
    paths = calibration_paths(run, n=20)
    frame, _ = select_task(load_dataset(nih_sample, quiet=True).frame, "cardiomegaly")
    split = patient_split(frame, seed=3, fractions=(0.6, 0.2, 0.2))
    dev = set(frame.loc[split == "dev", "path"])
    assert len(paths) == min(20, len(dev)) and set(paths) <= dev
    assert paths == calibration_paths(run, n=20)  # deterministic
    cfg["data"] = [{"root": str(tmp_path / "gone")}]
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="--calibration DIR"):
        calibration_paths(run)


def test_vit_export_via_cli_matches_torch_and_marks_torch_gradcam(tmp_path, nih_sample, capsys):
    run = create_untrained_run(tmp_path / "vit", "test_vit", image_size=64)
    out = tmp_path / "vit-onnx"
    assert cli(["export", "--run", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "model.json").read_text())
    assert meta["cam"]["method"] == "torch" and "tokens" in meta["cam"]["reason"]
    assert meta["outputs"] == {"logits": "logits"} and not (out / "head.npz").exists()
    images = _images(nih_sample, 3)
    np.testing.assert_allclose(OnnxPredictor(out).predict_proba(images), TorchPredictor(run).predict_proba(images),
                               atol=1e-4)


def test_export_errors_are_clear(tmp_path, capsys):
    assert cli(["export", "--run", str(tmp_path / "missing")]) == 1
    assert "run directory not found" in capsys.readouterr().err
    with pytest.raises(OnnxModelError, match="medimaging export --run"):
        OnnxPredictor(create_untrained_run(tmp_path / "r", "test_efficientnet", image_size=32))
