"""Shared fixtures. Real NIH images come from the sample-data folder, never from the repository.

The folder is `$MEDIMAGING_SAMPLE_DATA`, else `../shared/data` beside the checkout. Tests that need
it skip with a clear reason when it is absent, except under CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.paths import SAMPLE_DATA_ENV, sample_data_dir

# pyproject's `timeout` bounds every test; those marked slow (real trainings, torchrun, browsers) get
# this much instead, unless they carry their own @pytest.mark.timeout.
SLOW_TEST_TIMEOUT_S = 1200


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """Root of the real NIH sample data (`nih-sample/`, `nih-64-cardiomegaly/`)."""
    root = sample_data_dir()
    if not (root / "nih-sample").is_dir():
        msg = f"real NIH sample data not found at {root} (set {SAMPLE_DATA_ENV})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def nih_sample(sample_data: Path) -> Path:
    return sample_data / "nih-sample"


@pytest.fixture(scope="session")
def cardiomegaly_64(sample_data: Path) -> Path:
    return sample_data / "nih-64-cardiomegaly"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The test session gets its own cache (images, synthetic data, runs), so tests never touch a
    user's. Session-scoped, so it is in place before any module or session fixture trains or decodes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDIMAGING_CACHE", str(tmp_path_factory.getbasetemp() / "medimaging-cache"))
        for name in ("MEDIMAGING_RUNS", "MEDIMAGING_WEIGHTS"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests run tiny models: on a 2-core machine a second intra-op thread mostly spin-waits
    (measured 2-3x the CPU time for the same forward/backward), so in-process torch uses one.
    Subprocesses (torchrun, notebooks, benchmarks) keep their own defaults."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
