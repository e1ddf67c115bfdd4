"""The newcomer's path, end to end, on fresh copies of the checkout (its tracked and unignored
files, committed to a new git repository), each with a run cache of its own and `common` imported
from the copy (PYTHONPATH), as a fresh clone would run:

- `make reproduce` (its smoke equivalent) leaves `git status` clean; the app, started with no
  settings, opens on the best stage-2 run it made, named by meaning, and answers an uploaded NIH
  image (AppTest, and Chromium with a screenshot kept in the test's temporary folder);
- the empty app's advice works on a fresh clone;
- the README's "Your first hour with your own data", followed with the NIH sample laid out as NIH's
  archive, goes from `data summary` to a run, a prediction, the app and `make reproduce`.

Smoke knobs stand in for the README's (tiny models, two optimiser steps); everything else runs as
written. The synthetic reproduce runs in the background while the real-data path runs.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import chromium_and_driver, free_port, headless_chrome, stop_group, wait_until_answering

from common import runs
from common.experiments.notebooks import DEFAULT_OUT, NOTEBOOKS
from common.labels import LABELS
from common.paths import REPO_ROOT

pytestmark = pytest.mark.slow

# The README's and the app's knobs -> the smoke ones: the same commands, a tiny model, two steps.
SMOKE = {"--model efficientnet_b0": "--model test_efficientnet", "--image-size 64": "--image-size 32",
         "--epochs 1": "--epochs 1 --max-steps 2"}
MAKE_REPRODUCE = ["reproduce", "--smoke", "--no-progress"]  # the Makefile's recipe, smoke-sized
FIRST_HOUR = "### Your first hour with your own data"  # the README section the real-data test follows


# ------------------------------------------------------------------------------------ copies
def fresh_copy(dest: Path) -> Path:
    """The checkout's tracked and unignored files, copied to `dest` and committed there."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{REPO_ROOT} is not a git checkout: no fresh copy to make")
    for rel in filter(None, listed.stdout.split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():  # listed but deleted in the working tree: not part of the copy
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=test", "-c", "user.email=test@example.com",
                                                  "commit", "-q", "-m", "fresh copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def environment(copy: Path, cache: Path) -> dict:
    """No settings, as a newcomer has: only the copy's package and its own cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")])),
           "MEDIMAGING_CACHE": str(cache)}
    for name in ("MEDIMAGING_RUNS", "MEDIMAGING_WEIGHTS"):
        env.pop(name, None)
    return env


def medimaging(copy: Path, env: dict, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`.venv/bin/medimaging ARGS` from the copy's root (its `common`, through PYTHONPATH)."""
    done = subprocess.run([sys.executable, "-m", "common", *args], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"medimaging {shlex.join(args)}:\n{(done.stdout + done.stderr)[-3000:]}"
    return done


def git_status(copy: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=copy, capture_output=True, text=True,
                          check=True).stdout


def smoke(command: str) -> list[str]:
    """A documented `medimaging ...` command line -> its smoke-sized arguments."""
    command = command.split("  #")[0].strip()
    for knob, small in SMOKE.items():
        command = command.replace(knob, small)
    return shlex.split(command.removeprefix(".venv/bin/medimaging "))


APP_PROBE = """
import json, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("app/app.py", default_timeout=180)
at.run()
picker = at.sidebar.selectbox(key="run")
out = {"exception": [str(e.value) for e in at.exception], "value": str(picker.value),
       "label": picker.options[picker.index], "options": list(picker.options)}
if len(sys.argv) > 1:
    at.file_uploader(key="upload").set_value((sys.argv[1].rsplit("/", 1)[-1], open(sys.argv[1], "rb").read(), "image/png"))
    at.run()
    table = at.dataframe[0].value
    out.update(exception=[str(e.value) for e in at.exception], errors=[e.value for e in at.error],
               probabilities=dict(zip(table["Finding"], table["Probability"])))
print(json.dumps(out))
"""


def app_with_no_settings(copy: Path, env: dict, image: Path | None = None) -> dict:
    """The copy's app/app.py in AppTest, in a process of its own started in the copy: the run
    picker's value and labels, and with `image` uploaded, the probabilities it shows."""
    done = subprocess.run([sys.executable, "-c", APP_PROBE, *([str(image)] if image else [])], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["exception"] and not result.get("errors"), result
    return result


def best_stage2(out: Path) -> tuple[Path, str]:
    """The stage-2 run with the best test mean AUROC among those the records name, read directly
    from the records and each run's metrics.json: (run folder, "experiment: stage 2")."""
    found = []
    for record in sorted((out / "tables").glob("*.json")):
        for role, ref in (json.loads(record.read_text()).get("runs") or {}).items():
            if role == "stage 2":
                auroc = json.loads((Path(ref["run_dir"]) / "metrics.json").read_text())["mean_auroc"]
                found.append((auroc, Path(ref["run_dir"]), f"{record.stem.replace('_', ' ')}: stage 2"))
    assert found, f"no stage-2 run recorded under {out}"
    _, run, name = max(found)
    return run, name


def _image(nih_sample: Path, i: int = 0) -> Path:
    return sorted((nih_sample / "images").glob("*.png"))[i]


# ------------------------------------------------------------------------- own data, first hour
def first_hour_commands() -> list[str]:
    """The command lines of the README's first-hour block, in order."""
    text = (REPO_ROOT / "README.md").read_text()
    assert FIRST_HOUR in text, f"README.md has no {FIRST_HOUR!r} section"
    block = re.search(r"```bash\n(.*?)```", text[text.index(FIRST_HOUR):], re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def nih_archive(nih_sample: Path, dataset_full: Path) -> Path:
    """NIH's download as the README says to put it: the label file and images_001/images/ (the
    sample's images, linked, not copied)."""
    (dataset_full / "images_001").mkdir(parents=True, exist_ok=True)
    shutil.copy2(nih_sample / "Data_Entry_2017_v2020.csv", dataset_full / "Data_Entry_2017_v2020.csv")
    (dataset_full / "images_001" / "images").symlink_to((nih_sample / "images").resolve(), target_is_directory=True)
    return dataset_full


def test_own_data_first_hour_follows_the_readme(nih_sample, tmp_path_factory):
    copy = fresh_copy(tmp_path_factory.mktemp("own-data-clone"))
    env = environment(copy, tmp_path_factory.mktemp("own-data-cache"))
    nih_archive(nih_sample, copy / "dataset_full")
    commands = first_hour_commands()
    assert [c.split()[:3] for c in commands] == [
        [".venv/bin/medimaging", "data", "summary"], [".venv/bin/medimaging", "train", "--data"],
        [".venv/bin/medimaging", "predict", "dataset_full/images_001/images"],
        [".venv/bin/streamlit", "run", "app/app.py"], ["make", "reproduce"]], commands

    summary = medimaging(copy, env, [*smoke(commands[0]), "--json"])  # 1. what the suite sees
    seen = json.loads(summary.stdout)
    assert seen["images_found"] == 400 and seen["unreadable"] == [] and not seen["is_synthetic"]

    train = smoke(commands[1])  # 2. a first run
    medimaging(copy, env, train)
    run = copy / train[train.index("--out") + 1]
    config = json.loads((run / "config.json").read_text())
    assert not config["synthetic"] and config["labels"] == list(LABELS) and (run / "metrics.json").is_file()
    assert list(run.glob(runs.TENSORBOARD_EVENTS))  # and TensorBoard's curves

    predict = smoke(commands[2])  # 3. predictions for the archive's images
    medimaging(copy, env, predict)
    csv = (copy / predict[predict.index("--csv") + 1]).read_text().splitlines()
    assert len(csv) == 1 + 400 and csv[0].split(",")[1:] == list(LABELS)

    medimaging(copy, env, [*MAKE_REPRODUCE, "--only", "multi_task"])  # 5. the study (both stages), on it
    tables = (copy / DEFAULT_OUT / "tables.md").read_text()
    assert "dataset_full = dataset_full (nih layout, 400 images, 400 patients)" in tables
    assert "SYNTHETIC" not in tables

    image = _image(nih_sample, 3)  # 4. the app, with no settings: the real stage 2, beside runs/first
    run2, name = best_stage2(copy / DEFAULT_OUT)
    app = app_with_no_settings(copy, env, image)
    assert Path(app["value"]) == run2.resolve() and app["label"].startswith(f"{name} | ")
    assert " | dataset_full | " in app["label"] and "SYNTHETIC" not in " ".join(app["options"])
    assert any(label.startswith(f"runs/{run.name} (all14 run) | ") for label in app["options"]), app["options"]
    assert len(app["probabilities"]) == len(LABELS)
    assert git_status(copy) == ""  # data, runs and results/local are all ignored


# ------------------------------------------------------------------- `make reproduce`, synthetic
@dataclass
class Reproduced:
    copy: Path
    env: dict
    returncode: int
    log: str


@pytest.fixture(scope="module")
def _synthetic_started(tmp_path_factory):
    """A fresh copy and its smoke `make reproduce`, started in the background at once (the real-data
    test runs meanwhile); stopped at the end if still running."""
    copy = fresh_copy(tmp_path_factory.mktemp("fresh-clone"))
    env = environment(copy, tmp_path_factory.mktemp("fresh-clone-cache"))
    log = (copy.parent / "reproduce.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "common", *MAKE_REPRODUCE], cwd=copy, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    yield copy, env, proc, log
    if proc.poll() is None:
        stop_group(proc)
    log.close()


@pytest.fixture(scope="module")
def synthetic(_synthetic_started) -> Reproduced:
    copy, env, proc, log = _synthetic_started
    code = proc.wait(timeout=900)
    log.seek(0)
    return Reproduced(copy, env, code, log.read())


@pytest.fixture(scope="module", autouse=True)
def _start_early(request):
    """Start the synthetic reproduce before the first test of this module, whichever runs first."""
    request.getfixturevalue("_synthetic_started")


def test_make_reproduce_leaves_the_tree_clean(synthetic):
    assert synthetic.returncode == 0, synthetic.log[-3000:]
    assert f"all {len(NOTEBOOKS)} notebook(s) ran" in synthetic.log
    out = synthetic.copy / DEFAULT_OUT
    assert "SYNTHETIC" in (out / "tables.md").read_text()
    assert {nb.name for nb in NOTEBOOKS} <= {p.stem for p in (out / "notebooks").glob("*.ipynb")}
    assert git_status(synthetic.copy) == ""  # nothing tracked changed, nothing untracked appeared
    # the committed results are untouched, byte for byte
    assert (synthetic.copy / "results" / "tables.md").read_bytes() == (REPO_ROOT / "results" / "tables.md").read_bytes()


def test_the_app_opens_on_the_best_stage2_run_and_answers(synthetic, nih_sample):
    from common.onnx_predict import OnnxPredictor

    assert synthetic.returncode == 0, synthetic.log[-3000:]
    run, name = best_stage2(synthetic.copy / DEFAULT_OUT)
    image = _image(nih_sample, 2)
    seen = app_with_no_settings(synthetic.copy, synthetic.env, image)
    assert Path(seen["value"]) == run.resolve()
    assert seen["label"].startswith(f"{name} | ") and "SYNTHETIC" in seen["label"] and "test AUROC 0." in seen["label"]
    assert not any(re.search(r"[0-9a-f]{12}", label) for label in seen["options"]), seen["options"]  # no hash names
    assert any(label.startswith("single task: stage 1 | ") for label in seen["options"])
    assert any(label.startswith("multi task: stage 2 without stage 1 | ") for label in seen["options"])
    assert any(label.startswith("compression: ") for label in seen["options"])
    expected = OnnxPredictor(run / "export").predict(image).probabilities  # the app exported it on first use
    assert seen["probabilities"] == pytest.approx(expected, abs=1e-6) and len(seen["probabilities"]) == len(LABELS)
    assert git_status(synthetic.copy) == ""


def test_the_empty_pages_advice_works_on_a_fresh_clone(synthetic):
    """The app's empty state names `make reproduce` (the test above) and one `medimaging train`."""
    import importlib.util

    import timm

    spec = importlib.util.spec_from_file_location("newcomer_app", synthetic.copy / "app" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    lines = [line for line in app.MAKE_A_RUN.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("make reproduce") and len(lines) == 2
    args = smoke(lines[1])
    assert args[0] == "train" and "efficientnet_b0" in timm.list_models("efficientnet_b0")
    medimaging(synthetic.copy, synthetic.env, args)
    out = synthetic.copy / args[args.index("--out") + 1]
    assert (out / "metrics.json").is_file() and json.loads((out / "config.json").read_text())["synthetic"]
    assert git_status(synthetic.copy) == ""  # runs/ is ignored


@pytest.mark.browser
def test_real_browser_opens_on_the_best_stage2_run_and_answers(synthetic, nih_sample, tmp_path):
    chromium_and_driver()  # skips (fails under CI) without a browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    assert synthetic.returncode == 0, synthetic.log[-3000:]
    _, name = best_stage2(synthetic.copy / DEFAULT_OUT)
    port, log_path = free_port(), tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/app.py", "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=synthetic.copy, env=synthetic.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver = None
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/_stcore/health", server, log_path,
                             ok=lambda status, body: body.strip() == b"ok")
        driver = headless_chrome()
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 180)
        sidebar = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stSidebar']")))
        wait.until(lambda d: f"{name} | " in sidebar.text)  # the chosen run, named in full under the picker
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']")))
        image = _image(nih_sample, 6)
        upload.send_keys(str(image.resolve()))
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Findings above threshold"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stDataFrame']")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img")) >= 2)
        assert image.name in driver.find_element(By.TAG_NAME, "body").text
        shot = tmp_path / "app-after-make-reproduce.png"  # the test artifact, kept with pytest's tmp dir
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    finally:
        if driver is not None:
            driver.save_screenshot(str(tmp_path / "app-last.png"))  # what the page showed last, for a failure
            driver.quit()
        stop_group(server)
