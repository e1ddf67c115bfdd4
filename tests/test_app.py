"""The Streamlit app: AppTest drives uploads; a real Chromium drives the served page.

The browser test needs Debian's chromium + chromedriver (`.ci/run` installs them). Without them it
skips with the reason, except under CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser import chromium_and_driver, headless_chrome
from common.labels import LABELS
from common.paths import REPO_ROOT
from common.predict import create_untrained_run
from filemakers import bomb_png, dicom_bytes
from streamlit_app import APP, runs_with_one_export, served_app
from streamlit_app import app_test as _app

THRESHOLDS = {name: 0.35 + 0.02 * i for i, name in enumerate(LABELS)}
# int8 vs fp32 probabilities on the test image: max |difference| measured 2e-4 for the fixture's
# model (16 calibration images); the bound leaves room for other CPUs' int8 kernels
INT8_PROB_ATOL = 0.01


def _image(nih_sample: Path, i: int = 0) -> Path:
    return sorted((nih_sample / "images").glob("*.png"))[i]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """A runs folder with one exported CNN run (the newest, so the app's default)."""
    return runs_with_one_export(tmp_path_factory.mktemp("app-runs"), THRESHOLDS)


@pytest.fixture(scope="module")
def int8_root(runs_root, nih_sample, tmp_path_factory) -> Path:
    """A stand-alone export folder with model.onnx and model.int8.onnx (the layout `medimaging
    compress --method int8` writes), made from runs_root's run."""
    from common.export import export_onnx

    root = tmp_path_factory.mktemp("app-int8")
    calibration = sorted((nih_sample / "images").glob("*.png"))[20:36]
    export_onnx(runs_root / "cnn", root / "cnn-int8", int8=True, calibration_images=calibration,
                n_calibration=16, log=lambda m: None)
    return root


def _upload(at, name: str, data: bytes, mime: str = "image/png"):
    at.file_uploader(key="upload").set_value((name, data, mime))
    at.run()
    assert not at.exception, at.exception
    return at


def _app_module():
    """app/app.py imported as a module (its page runs only as __main__), for its helper functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("medimaging_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dicom_upload_is_decoded_with_its_lut_and_photometry(nih_sample):
    pytest.importorskip("pydicom", reason="DICOM uploads are optional: they need pydicom")
    import numpy as np

    from common.images import read_grayscale

    src = read_grayscale(_image(nih_sample, 7))
    # white = low values; 12-bit values in 16-bit words
    data = dicom_bytes(4095 - src.astype(np.uint16) * 16, "MONOCHROME1", bits_allocated=16, bits_stored=12)
    gray = _app_module().decode_upload("x.dcm", data)
    expected = np.rint((src.astype(float) - src.min()) * 255.0 / (src.max() - src.min()))
    assert gray.dtype == np.uint8 and np.abs(gray.astype(float) - expected).max() <= 1


def test_upload_decoding_refuses_what_it_cannot_read(monkeypatch, nih_sample):
    from common.images import UnreadableImage, dicom_available

    app = _app_module()
    data = _image(nih_sample).read_bytes()
    assert app.decode_upload("x.png", data).shape == (1024, 1024)
    with pytest.raises(UnreadableImage, match="too large"):
        app.decode_upload("bomb.png", bomb_png())
    monkeypatch.setattr(app, "MAX_UPLOAD_MB", 0.01)
    with pytest.raises(UnreadableImage, match="file too large"):
        app.decode_upload("x.png", data)
    if not dicom_available():
        with pytest.raises(UnreadableImage, match="pip install pydicom"):
            app.decode_upload("x.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64)


def test_an_export_older_than_the_runs_weights_is_redone(runs_root, tmp_path):
    """The app asks common.serving.needs_export (the one freshness rule) before exporting on first use."""
    from common.serving import OnnxModelError, needs_export

    run = runs_root / "cnn"
    assert not needs_export(run) and not needs_export(run / "export")
    weights = run / "best.safetensors"
    before = weights.stat()
    exported = (run / "export" / "model.onnx").stat().st_mtime
    os.utime(weights, (exported + 5, exported + 5))  # retrained in place after the export
    try:
        assert needs_export(run)
        assert not needs_export(run / "export")  # an export folder alone: nothing to export from
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not needs_export(run)
    assert needs_export(create_untrained_run(tmp_path / "new", "test_efficientnet", image_size=32))
    with pytest.raises(OnnxModelError, match="neither an ONNX export folder"):
        needs_export(tmp_path)


def test_a_runs_label_does_not_change_when_its_export_is_written_later(tmp_path):
    """The selectbox value must survive the first-use export (it once used the folder's mtime,
    which the new export/ folder bumps: a page rerun across a minute boundary then failed)."""
    from common.catalog import describe_model, find_models

    run = create_untrained_run(tmp_path / "runs" / "cnn", "test_efficientnet", image_size=32)
    before = describe_model(run)
    (run / "export").mkdir()
    later = time.time() + 3600
    os.utime(run, (later, later))
    assert describe_model(run) == before
    assert find_models([tmp_path / "runs"]) == [run.resolve()]


def test_models_are_found_under_the_given_roots_or_the_defaults(tmp_path, int8_root, runs_root):
    from common import experiments
    from common.catalog import find_models, model_roots

    assert model_roots(os.pathsep.join([str(int8_root), str(runs_root)])) == [int8_root, runs_root]
    defaults = model_roots(None)
    assert defaults[0] == experiments.runs_dir()  # the run cache, where `medimaging reproduce` trains
    assert Path("runs") in defaults and all(r.name in ("runs", "results") for r in defaults)
    assert {r.resolve() for r in defaults} >= {(REPO_ROOT / "runs").resolve(), (REPO_ROOT / "results").resolve()}
    # a run's own export/ is not a second model; a stand-alone export folder is one
    found = find_models([runs_root, int8_root])
    assert sorted(found) == sorted([(runs_root / "cnn").resolve(), (int8_root / "cnn-int8").resolve()])


def test_no_run_says_how_to_make_one(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path / "empty")
    text = " ".join(i.value for i in at.info)
    assert "No trained run found" in text and "medimaging train" in text and "make reproduce" in text
    assert any("not for diagnosis" in w.value for w in at.warning)
    assert not at.file_uploader  # nothing to upload to yet


def test_upload_shows_all_probabilities_thresholds_and_gradcam(monkeypatch, runs_root, nih_sample):
    from common.onnx_predict import OnnxPredictor

    at = _app(monkeypatch, runs_root)
    assert any("not for diagnosis" in w.value for w in at.warning)
    assert any("untrained" in w.value for w in at.sidebar.warning)  # create_untrained_run's flag, via model.json
    assert not at.sidebar.radio  # no int8 model beside model.onnx: no precision choice
    assert any(c.value.startswith("Serving `model.onnx`") for c in at.sidebar.caption)
    assert set(at.file_uploader(key="upload").allowed_type) >= {".png", ".jpg", ".jpeg"}
    image = _image(nih_sample, 2)
    _upload(at, image.name, image.read_bytes())
    assert not at.error
    table = at.dataframe[0].value
    assert len(table) == len(LABELS) and set(table["Finding"]) == set(LABELS)
    assert list(table["Probability"]) == sorted(table["Probability"], reverse=True)
    assert dict(zip(table["Finding"], table["Threshold"])) == pytest.approx(THRESHOLDS)
    expected = OnnxPredictor(runs_root / "cnn").predict(image)
    assert dict(zip(table["Finding"], table["Probability"])) == pytest.approx(expected.probabilities, abs=1e-6)
    markdown = " ".join(m.value for m in at.markdown)
    for name in expected.positive:
        assert f"**{name}**" in markdown
    chart = at.get("vega_lite_chart")
    assert len(chart) == 1, "the probability bar chart is missing"
    spec = json.loads(chart[0].proto.spec)
    assert {layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]} \
        == {"bar", "tick"}  # bars + a tick per threshold
    assert any("numpy, no torch" in c.value for c in at.caption)
    assert len(at.get("image")) == 2  # the X-ray and the Grad-CAM overlay
    # choosing another finding recomputes the overlay
    at.selectbox(key="cam_label").set_value("Hernia")
    at.run()
    assert not at.exception and len(at.get("image")) == 2


def test_an_int8_model_beside_fp32_can_be_chosen_and_is_served(monkeypatch, runs_root, int8_root, nih_sample):
    import numpy as np

    from common.onnx_predict import OnnxPredictor

    export = (int8_root / "cnn-int8").resolve()
    at = _app(monkeypatch, os.pathsep.join([str(int8_root), str(runs_root)]))
    at.selectbox(key="run").set_value(export)
    at.run()
    precision = at.sidebar.radio(key="precision")
    assert precision.options == ["fp32", "int8"] and precision.value == "fp32"  # the reference by default
    assert any(c.value.startswith("Serving `model.onnx`") for c in at.sidebar.caption)
    image = _image(nih_sample, 2)
    _upload(at, image.name, image.read_bytes())
    fp32 = dict(zip(at.dataframe[0].value["Finding"], at.dataframe[0].value["Probability"]))

    at.sidebar.radio(key="precision").set_value("int8")  # from this run's tree: an older element is not sent
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    size_mb = (export / "model.int8.onnx").stat().st_size / 1e6
    assert any(c.value.startswith(f"Serving `model.int8.onnx` ({size_mb:.2f} MB): static-qdq quantisation")
               for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]
    table = at.dataframe[0].value
    int8 = dict(zip(table["Finding"], table["Probability"]))
    assert len(int8) == len(LABELS) == 14
    assert int8 == pytest.approx(OnnxPredictor(export, int8=True).predict(image).probabilities, abs=1e-6)
    diff = max(abs(int8[k] - fp32[k]) for k in LABELS)
    assert 0 < diff <= INT8_PROB_ATOL, diff  # > 0: the int8 file answered, not model.onnx again
    # Grad-CAM still works, from the int8 model's feature map
    assert len(at.get("image")) == 2
    assert any("int8 ONNX model's last feature map" in c.value for c in at.caption)
    assert all(np.isfinite(v) for v in int8.values())

    at.selectbox(key="run").set_value((runs_root / "cnn").resolve())  # no int8 there: no choice, fp32
    at.run()
    assert not at.exception and not at.sidebar.radio
    assert any(c.value.startswith("Serving `model.onnx`") for c in at.sidebar.caption)
    assert dict(zip(at.dataframe[0].value["Finding"], at.dataframe[0].value["Probability"])) \
        == pytest.approx(fp32, abs=1e-6)


def test_bad_uploads_get_a_message_and_the_app_keeps_working(monkeypatch, runs_root, nih_sample):
    at = _app(monkeypatch, runs_root)
    _upload(at, "notes.png", b"these are not pixels")
    assert any("Could not read notes.png" in e.value and "not an image" in e.value for e in at.error)
    _upload(at, "bomb.png", bomb_png())
    assert any("too large" in e.value for e in at.error)
    good = _image(nih_sample, 3).read_bytes()
    _upload(at, "cut.png", good[: len(good) // 3])
    assert any("Could not read cut.png" in e.value for e in at.error)
    _upload(at, "good.png", good)  # the same session still works
    assert not at.error and len(at.dataframe[0].value) == len(LABELS)
    monkeypatch.setenv("MEDIMAGING_MAX_UPLOAD_MB", "0.01")
    _upload(at, "big.png", good)
    assert any("file too large" in e.value for e in at.error)


def test_first_use_exports_and_a_vit_gradcam_says_it_uses_torch(monkeypatch, tmp_path, nih_sample):
    root = tmp_path / "runs"
    run = create_untrained_run(root / "vit", "test_vit", image_size=32)
    at = _app(monkeypatch, root)
    assert not at.error, [e.value for e in at.error]
    assert (run / "export" / "model.onnx").is_file()  # exported on first use, in a subprocess
    image = _image(nih_sample, 4)
    _upload(at, image.name, image.read_bytes())
    assert not at.error, [e.value for e in at.error]
    assert len(at.dataframe[0].value) == len(LABELS)
    assert any("needs torch" in c.value for c in at.caption)


def test_the_app_process_never_imports_torch_for_predicting(runs_root, nih_sample):
    code = (
        "import json, sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({str(APP)!r}, default_timeout=120)\n"
        "at.run()\n"
        f"at.file_uploader(key='upload').set_value(('x.png', open({str(_image(nih_sample, 5))!r}, 'rb').read(), 'image/png'))\n"
        "at.run()\n"
        "print(json.dumps({'rows': len(at.dataframe[0].value), 'exception': len(at.exception), "
        "'torch': 'torch' in sys.modules}))\n"
    )
    env = {**os.environ, "MEDIMAGING_RUNS": str(runs_root)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"rows": len(LABELS), "exception": 0, "torch": False}


# ------------------------------------------------------------------------------ real browser


@pytest.mark.browser
@pytest.mark.slow
def test_real_browser_upload_shows_findings(runs_root, nih_sample, tmp_path):
    chromium_and_driver()  # skips (fails under CI) without a browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with served_app(runs_root, tmp_path) as (server, url):
        driver = headless_chrome()
        try:
            driver.get(f"{url}/")
            wait = WebDriverWait(driver, 120)
            upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
            image = _image(nih_sample, 6)
            upload.send_keys(str(image.resolve()))
            wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Findings above threshold"))
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stDataFrame']")))
            wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stVegaLiteChart'] canvas, "
                                                                        "[data-testid='stVegaLiteChart'] svg")))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")) >= 2)
            body = driver.find_element(By.TAG_NAME, "body").text
            assert "not for diagnosis" in body and image.name in body
            time.sleep(1.0)  # let the chart finish drawing for the screenshot
            shot = tmp_path / "app.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
            # the serving process never loaded torch's native library
            maps = Path(f"/proc/{server.pid}/maps")
            if maps.exists():
                assert "libtorch" not in maps.read_text()
        finally:
            driver.quit()
