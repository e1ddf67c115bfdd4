"""What the real-browser tests share: Chromium + chromedriver (or why the test cannot run), a free
localhost port, waiting for a server to answer, a headless Chrome, and ending a server's process group.

Debian's chromium + chromium-driver are needed (`.ci/run` installs them). Without them a test skips
with the reason, except under CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

WINDOW = "1400,1900"  # tall enough that a page's outputs are drawn without scrolling


def chromium_and_driver() -> tuple[str, str]:
    """Paths of chromium and chromedriver; skips (fails under CI) when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        msg = ("no Chromium/chromedriver installed (Debian: apt-get install -y chromium chromium-driver); "
               "the real-browser test cannot run")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return chromium, driver


def headless_chrome(*extra_args: str, window: str = WINDOW):
    """A headless Chrome driven by selenium (quit it when done); `extra_args` are more Chrome flags."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={window}",
                *extra_args):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, server: subprocess.Popen, log: Path, timeout: float = 90,
                         ok=lambda status, body: status == 200) -> None:
    """Poll `url` until `ok(status, body)`; fail with the server's log when it exits or times out."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.status, r.read()):
                    return
        except OSError:
            pass
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def stop_group(server: subprocess.Popen) -> None:
    """End a server started with start_new_session=True and everything it started (kernels, exports)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
