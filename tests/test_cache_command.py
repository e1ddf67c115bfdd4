"""`medimaging cache`: listing and clearing the image store, the synthetic data and the run cache,
on a real smoke training, a real interrupted run and real decoded NIH images."""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from common import experiments as ex
from common.cache import ImageCache
from common.cli import main as cli
from common.predict import create_untrained_run
from common.runs import find_runs

MONTH = 30 * 86400


def _listing(capsys) -> dict:
    capsys.readouterr()
    assert cli(["cache", "list", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _by_name(listing: dict) -> dict:
    return {(e["kind"], e["name"]): e for e in listing["entries"]}


def _age(path: Path, seconds: float) -> None:
    """Make everything in `path` look last touched `seconds` ago."""
    t = time.time() - seconds
    for p in [*path.rglob("*"), path]:
        os.utime(p, (t, t))


@pytest.fixture
def cache(tmp_path, monkeypatch, cardiomegaly_64, nih_sample):
    """A fresh cache with a finished smoke run, an interrupted run and a 40 px image store of 3 NIH images."""
    monkeypatch.setenv("MEDIMAGING_CACHE", str(tmp_path / "cache"))
    ImageCache(40).load(sorted((nih_sample / "images").glob("*.png"))[:3], progress=False)
    prof = ex.get_profile("smoke")
    config = ex.train_config(prof, "efficientnet_b0", "cardiomegaly", ex.DataSpec(None, cardiomegaly_64, False))
    finished = ex.cached_fit(config, "stage 1", "efficientnet_b0")
    assert not finished.reused
    interrupted = create_untrained_run(ex.runs_dir() / "all14-test_vit-interrupted", "test_vit", image_size=32)
    return {"config": config, "finished": finished.run_dir, "interrupted": interrupted}


def test_list_shows_every_entry_with_its_size_state_and_model(cache, capsys):
    listing = _listing(capsys)
    assert listing["runs"] == str(ex.runs_dir())
    entries = _by_name(listing)
    run = entries[("runs", cache["finished"].name)]
    assert run["finished"] is True and run["bytes"] > 100_000
    assert run["detail"].startswith(cache["config"].model_name)
    assert entries[("runs", "all14-test_vit-interrupted")]["finished"] is False
    assert entries[("images", "40px")]["detail"] == "3 images"
    assert listing["total_bytes"] == sum(e["bytes"] for e in listing["entries"])

    assert cli(["cache"]) == 0  # the table is the default action
    table = capsys.readouterr().out
    assert "unfinished" in table and cache["finished"].name in table and "total" in table


def test_reusing_a_run_marks_it_used_so_age_based_clearing_keeps_it(cache, capsys):
    _age(cache["finished"], MONTH)
    _age(cache["interrupted"], MONTH)
    before = _by_name(_listing(capsys))[("runs", cache["finished"].name)]["last_used"]
    assert time.time() - before > MONTH - 60

    again = ex.cached_fit(cache["config"], "stage 1", "efficientnet_b0")
    assert again.reused and again.run_dir == cache["finished"]
    assert time.time() - _by_name(_listing(capsys))[("runs", cache["finished"].name)]["last_used"] < 60

    assert cli(["cache", "clear", "runs", "--older-than", "7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete runs/all14-test_vit-interrupted" in out and cache["finished"].name not in out
    assert cache["interrupted"].is_dir()  # a dry run deletes nothing

    assert cli(["cache", "clear", "runs", "--older-than", "7"]) == 0
    assert not cache["interrupted"].exists() and cache["finished"].is_dir()


def test_clear_unfinished_spares_finished_runs_and_runs_in_progress(cache, capsys):
    assert cli(["cache", "clear", "images", "--unfinished"]) == 2
    assert "runs only" in capsys.readouterr().err

    # a training in progress holds its run's lock (common.experiments.runcache.run_lock)
    with open(cache["interrupted"] / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cli(["cache", "clear", "runs", "--unfinished"]) == 0
        assert "in use by another process" in capsys.readouterr().err
        assert cache["interrupted"].is_dir()
    assert cli(["cache", "clear", "runs", "--unfinished"]) == 0
    assert "deleted runs/all14-test_vit-interrupted" in capsys.readouterr().out
    assert not cache["interrupted"].exists() and cache["finished"].is_dir()


def test_clear_all_empties_the_cache_and_everything_is_made_again(cache, capsys, nih_sample):
    assert cli(["cache", "clear", "all"]) == 0
    assert "freed" in capsys.readouterr().out
    assert _listing(capsys)["entries"] == []
    assert cli(["cache", "clear", "runs"]) == 0
    assert "nothing to clear" in capsys.readouterr().out
    # cleared is not broken: the store decodes again and the run trains again
    assert ImageCache(40).load(sorted((nih_sample / "images").glob("*.png"))[:3], progress=False).images.shape[0] == 3
    assert not ex.cached_fit(cache["config"], "stage 1", "efficientnet_b0").reused


def test_find_runs_orders_by_when_a_run_was_made_not_by_its_folder_mtime(tmp_path):
    old = create_untrained_run(tmp_path / "old", "test_vit", image_size=32)
    new = create_untrained_run(tmp_path / "new", "test_vit", image_size=32)
    _age(old, 7200)
    _age(new, 3600)
    os.utime(old)  # reused by the run cache, or an export added inside it
    assert find_runs(tmp_path) == [new, old]
