"""JupyterLab as its users use it: the README's `jupyter lab`, a notebook opened in Chromium, every
cell run through the UI (Run > Run All Cells) on the smoke settings, and its outputs rendered: a
table, a figure and the widget progress bar of the training.

The server runs token-less on a free localhost port with a temporary copy of `single-task/` as its
root (the notebook's parameters injected by papermill, as `medimaging reproduce` does), so nothing
in the checkout changes. Needs Chromium + chromedriver (`.ci/run` installs them): without them it
skips with the reason, except under CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from browser import chromium_and_driver, free_port, headless_chrome, stop_group, wait_until_answering
from common.paths import REPO_ROOT

NOTEBOOK_DIR = "single-task"
NOTEBOOK = "single_task.ipynb"


def _lab_copy(root: Path, nih_sample: Path, cardiomegaly_64: Path) -> Path:
    """single-task/ (trainer + notebook) copied under root, the smoke settings injected."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    folder = root / NOTEBOOK_DIR
    folder.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / NOTEBOOK_DIR / "trainer.py", folder / "trainer.py")
    smoke = {"Smoke": True, "DataFull": str(nih_sample), "DataCardiomegaly": str(cardiomegaly_64),
             "OutDir": str(root / "out"), "RunsDir": str(root / "runs")}
    nb = parameterize_notebook(load_notebook_node(str(REPO_ROOT / NOTEBOOK_DIR / NOTEBOOK)), smoke)
    nbformat.write(nb, str(folder / NOTEBOOK))
    return folder / NOTEBOOK


def _start_lab(root: Path, port: int, log) -> subprocess.Popen:
    """`jupyter lab` as the README starts it, headless, token-less, on 127.0.0.1:port, root `root`;
    its settings, workspaces and runtime files in temporary folders, not the user's."""
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab"] if jupyter.is_file() else [sys.executable, "-m", "jupyterlab"]
    cmd += ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root, which jupyter refuses without it
    env = {**os.environ, **{name: str(root.parent / "jupyter" / sub) for name, sub in (
        ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"))}}
    env.pop("MEDIMAGING_RUNS", None)
    # its own session: the server and the kernels it starts end together (browser.stop_group)
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _command(driver, menu: str, item: str) -> None:
    """Open a menu of the menu bar and click one of its items, by their labels, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='{menu}']"))).click()
    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class, 'lm-Menu-item')][.//div[contains(@class, 'lm-Menu-itemLabel') "
                   f"and text()='{item}']]"))).click()


def _all_cells_ran(driver) -> bool:
    """Every code cell shows an execution count ("[3]:"), none is queued or running ("[*]:")."""
    from selenium.webdriver.common.by import By

    prompts = [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]
    return bool(prompts) and all(p[1:-2].isdigit() for p in prompts)


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", NOTEBOOK_DIR, "results"], cwd=REPO_ROOT,
                          capture_output=True, text=True).stdout


@pytest.mark.browser
@pytest.mark.slow
def test_a_notebook_runs_in_jupyterlab_and_its_outputs_render(tmp_path, nih_sample, cardiomegaly_64):
    chromium_and_driver()  # skips (fails under CI) without a browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    tracked_before = _status()
    root = tmp_path / "lab"
    notebook = _lab_copy(root, nih_sample, cardiomegaly_64)
    port, log_path = free_port(), tmp_path / "jupyterlab.log"
    with log_path.open("w") as log:
        server = _start_lab(root, port, log)
    driver = None
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/api/status", server, log_path)
        driver = headless_chrome()
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK_DIR}/{NOTEBOOK}")
        wait = WebDriverWait(driver, 120)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")))
        wait.until(ec.presence_of_element_located(  # the kernel is up
            (By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")))
        _command(driver, "Run", "Run All Cells")
        WebDriverWait(driver, 240).until(_all_cells_ran)
        # what a user sees: a table, figures, the training's widget progress bars
        table = wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-OutputArea .jp-RenderedMarkdown table")))
        assert len(table.find_elements(By.TAG_NAME, "tr")) >= 3  # header, the model, its baselines
        wait.until(ec.presence_of_element_located(  # tqdm.auto's ipywidgets bar, drawn by the widget manager
            (By.CSS_SELECTOR, ".jp-OutputArea .widget-hprogress .progress-bar")))
        figures = ".jp-OutputArea .jp-RenderedImage img"  # training curves, ROC, example predictions
        images = wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, figures)) >= 3
                            and d.find_elements(By.CSS_SELECTOR, figures))
        assert all(driver.execute_script("return arguments[0].naturalWidth", img) > 100 for img in images)
        shot = tmp_path / "jupyterlab.png"  # kept with the test's temporary folder
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000

        _command(driver, "File", "Save Notebook")
        wait.until(lambda d: any(c.get("outputs") for c in json.loads(notebook.read_text())["cells"]))
    finally:
        if driver is not None:
            driver.save_screenshot(str(tmp_path / "jupyterlab-last.png"))  # what the page showed last, for a failure
            driver.quit()
        stop_group(server)
    saved = nbformat.read(str(notebook), as_version=4)
    outputs = [o for c in saved.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    kinds = {k for o in outputs for k in (o.get("data") or {})}
    assert {"application/vnd.jupyter.widget-view+json", "text/markdown", "image/png"} <= kinds
    assert (root / "out" / "tables" / "single_task.json").is_file()  # the last cell ran: exp.save(OutDir)
    assert _status() == tracked_before  # nothing in the checkout's notebook folder or results changed
