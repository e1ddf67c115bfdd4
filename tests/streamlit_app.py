"""What the Streamlit app's tests share: an AppTest session of app/app.py, and the app served by a
real `streamlit run` on a free localhost port (for the real-browser tests; see browser.py)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from browser import free_port, stop_group, wait_until_answering
from common.paths import REPO_ROOT

APP = REPO_ROOT / "app" / "app.py"


def runs_with_one_export(root: Path, thresholds: dict[str, float] | None = None) -> Path:
    """`root` holding one untrained CNN run, root/cnn, with its ONNX export: what the app serves."""
    from common.export import export_onnx
    from common.predict import create_untrained_run

    run = create_untrained_run(root / "cnn", "test_efficientnet", image_size=64, thresholds=thresholds)
    export_onnx(run, log=lambda m: None)
    return root


def app_test(monkeypatch, root: Path | str, **env):
    """An AppTest of the app serving the models under `root` (MEDIMAGING_RUNS), run once, with no exception."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MEDIMAGING_RUNS", str(root))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


@contextlib.contextmanager
def served_app(runs_root: Path, workdir: Path, *args: str, timeout: float = 90
               ) -> Iterator[tuple[subprocess.Popen, str]]:
    """`streamlit run app/app.py` serving the models under `runs_root` (more options in `args`), run in
    `workdir` with its log in workdir/streamlit.log: yields (the server, its URL) once its health check
    answers "ok", and ends the server and all it started on leaving."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", *args]
    log = workdir / "streamlit.log"
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=workdir, env={**os.environ, "MEDIMAGING_RUNS": str(runs_root)},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/_stcore/health", server, log, timeout=timeout,
                             ok=lambda status, body: body.strip() == b"ok")
        yield server, url
    finally:
        stop_group(server)
