"""The app under hostile use: uploads that are empty, not images, bombs, huge, DICOM without pixels,
RGBA or 16-bit; then eight sessions uploading at once to a real server, which stays up, answers
the next upload correctly and gives its memory back.

The real-server test drives Chromium (eight tabs, one session each): it needs Debian's chromium +
chromedriver and skips without them, except under CI, where that is a failure.
"""
from __future__ import annotations

import io
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import chromium_and_driver, headless_chrome
from common.labels import LABELS
from filemakers import bomb_png, dicom_bytes
from streamlit_app import app_test as _app
from streamlit_app import runs_with_one_export, served_app

THRESHOLDS = {name: 0.40 + 0.01 * i for i, name in enumerate(LABELS)}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return runs_with_one_export(tmp_path_factory.mktemp("hostile-runs"), THRESHOLDS)


def _png(array: np.ndarray, mode: str) -> bytes:
    im = Image.fromarray(array)
    assert im.mode == mode
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uploads(nih_sample) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, the message expected, or None: decoded and answered)."""
    pytest.importorskip("pydicom", reason="the DICOM upload needs pydicom (a test dependency)")
    gray = np.asarray(Image.open(sorted((nih_sample / "images").glob("*.png"))[8]).convert("L"))
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 200)])
    sixteen = (gray.astype(np.uint16) * 257 + 3).astype(np.uint16)
    huge = np.zeros((10_000, 10_000), dtype=np.uint8)  # 100 MP, ~100 KB as a PNG
    huge[::97] = 255
    header_only = dicom_bytes(None, rows=2048, columns=2048, PatientName="Anonymous", Modality="DX")  # no pixels
    return {
        "zero.png": (b"", "empty file (0 bytes)"),
        "notes.png": (b"these are not pixels\n" * 40, "not an image"),
        "bomb.png": (bomb_png(), "too large"),
        "huge.png": (_png(huge, "L"), "10000x10000 = 100 MP exceeds the 50 MP limit"),
        "header-only.dcm": (header_only, "DICOM file without an image"),
        "rgba.png": (_png(rgba, "RGBA"), None),
        "sixteen.png": (_png(sixteen, "I;16"), None),
    }


def test_each_hostile_upload_gets_a_message_and_the_session_keeps_working(monkeypatch, runs_root, uploads,
                                                                          nih_sample):
    from common.images import read_grayscale
    from common.onnx_predict import OnnxPredictor

    predictor = OnnxPredictor(runs_root / "cnn")
    at = _app(monkeypatch, runs_root)
    for name, (data, message) in uploads.items():
        at.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
        at.run()
        assert not at.exception, (name, at.exception)
        errors = [e.value for e in at.error]
        if message is not None:
            assert any(f"Could not read {name}" in e and message in e for e in errors), (name, errors)
            continue
        assert not errors, (name, errors)  # RGBA and 16-bit are X-rays too: decoded and answered
        table = at.dataframe[0].value
        expected = predictor.predict(read_grayscale(data)).probabilities
        assert dict(zip(table["Finding"], table["Probability"])) == pytest.approx(expected, abs=1e-6), name
    good = sorted((nih_sample / "images").glob("*.png"))[3]
    at.file_uploader(key="upload").set_value((good.name, good.read_bytes(), "image/png"))
    at.run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    assert dict(zip(table["Finding"], table["Probability"])) == pytest.approx(
        predictor.predict(good).probabilities, abs=1e-6)


# ------------------------------------------------------------------------------ a real server


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def _expected_text(predictor, path: Path) -> str:
    """What the page writes under "Findings above threshold" for this image (common.onnx_predict)."""
    pred = predictor.predict(path)
    ranked = sorted(pred.probabilities, key=lambda k: -pred.probabilities[k])
    shown = [f"{k} ({pred.probabilities[k]:.2f})" for k in ranked if k in pred.positive]
    return ", ".join(shown) if shown else "None of the findings is above its threshold."


@pytest.mark.browser
@pytest.mark.slow
def test_a_real_server_survives_hostile_uploads_and_eight_sessions_at_once(runs_root, uploads, nih_sample, tmp_path):
    chromium_and_driver()  # skips (fails under CI) without a browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from common.onnx_predict import OnnxPredictor

    predictor = OnnxPredictor(runs_root / "cnn")
    files = {}
    for name, (data, _) in uploads.items():
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    images = sorted((nih_sample / "images").glob("*.png"))[10:28]
    # closed tabs' sessions go after 2 s, not 120
    with served_app(runs_root, tmp_path, "--server.disconnectedSessionTTL", "2") as (server, url):
        driver = headless_chrome("--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                                 "--disable-backgrounding-occluded-windows", window="1200,1600")
        try:
            wait = WebDriverWait(driver, 300)  # a loaded 2-core CI machine serves eight sessions slowly

            def open_page():
                driver.get(f"{url}/")
                return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))

            def shows(text):
                wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), text))

            def hostile_round():
                """One session, every hostile upload in turn: a message each, and the page stays usable."""
                for name, (_, message) in uploads.items():
                    driver.find_element(By.CSS_SELECTOR, "input[type='file']").send_keys(str(files[name]))
                    if message is None:
                        shows(f"{name} (")  # the image's caption: decoded and answered
                        shows("Findings above threshold")
                    else:
                        shows(f"Could not read {name}")
                        shows(message)

            def eight_sessions(batch):
                """Eight sessions (tabs) upload at once; each gets its own image's answer; then they end."""
                tabs = [driver.current_window_handle]
                for _ in range(7):
                    driver.switch_to.new_window("tab")
                    tabs.append(driver.current_window_handle)
                for tab in tabs:
                    driver.switch_to.window(tab)
                    open_page()
                for tab, image in zip(tabs, batch):
                    driver.switch_to.window(tab)
                    driver.find_element(By.CSS_SELECTOR, "input[type='file']").send_keys(str(image))
                for tab, image in zip(tabs, batch):
                    driver.switch_to.window(tab)
                    shows(_expected_text(predictor, image))
                rss = _rss_mb(server.pid)
                assert _healthy(url) and server.poll() is None
                for tab in tabs[1:]:
                    driver.switch_to.window(tab)
                    driver.close()
                driver.switch_to.window(tabs[0])
                return rss

            def settled() -> float:
                """The server's RSS once the ended sessions are gone (their TTL) and it stops shrinking."""
                driver.get("about:blank")
                last = _rss_mb(server.pid)
                for _ in range(20):
                    time.sleep(1)
                    now = _rss_mb(server.pid)
                    if abs(now - last) < 1:
                        return now
                    last = now
                return last

            # a first round loads the model, imports what each kind of upload needs and sizes the
            # allocators for eight sessions: the baseline is what the server holds after it
            open_page().send_keys(str(images[0]))
            shows(_expected_text(predictor, images[0]))
            hostile_round()
            eight_sessions(images[1:9])
            baseline = settled()
            # the same again: nothing may accumulate
            open_page()
            hostile_round()
            peak = eight_sessions(images[9:17])
            open_page().send_keys(str(images[17]))  # the server answers the next upload correctly
            shows(_expected_text(predictor, images[17]))
            after = settled()
            print(f"server RSS: baseline {baseline:.0f} MB, eight sessions {peak:.0f} MB, after them {after:.0f} MB")
            if after > baseline + 50:
                # glibc may keep one more arena's pages after a round (measured: +53 MB on one run in
                # two, +0 on the other); a leak grows again with every round, so run a third
                open_page()
                hostile_round()
                eight_sessions(images[1:9])
                again = settled()
                print(f"server RSS after a third round: {again:.0f} MB")
                assert again <= after + 50, (f"RSS grows with every round of sessions: baseline {baseline:.0f} MB, "
                                             f"{after:.0f} MB, then {again:.0f} MB")
            assert _healthy(url) and server.poll() is None
        finally:
            driver.quit()
