"""Faults injected and survived: a killed cache build, full disks, damaged cache files, damaged or
mismatched exports, checkpoints that carry code, two processes wanting the same run.

A full disk is real: the writing command runs in a private mount namespace (`unshare`) on a small
tmpfs, where the kernel answers ENOSPC. Without `unshare` those tests skip (and fail under CI).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from common.cache import INDEX_FILE, ImageCache
from common.images import read_grayscale
from common.preprocess import resize_gray
from common.serving import EXPORT_LOCK

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _run_script(code: str, tmp_path: Path, name: str = "driver.py", **kw) -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, **kw)


@cache
def _unshare_works() -> str | None:
    """None when `unshare` can give this user a private mount namespace with a tmpfs, else why not."""
    if not shutil.which("unshare"):
        return "the unshare command is not installed (util-linux)"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt && echo ok"], capture_output=True, text=True)
    if probe.stdout.strip() != "ok":
        return f"unshare cannot mount a tmpfs here ({probe.stderr.strip()[:200]})"
    return None


def _on_small_disk(code: str, tmp_path: Path, size: str, timeout: int = 300, prelude: str = "") -> dict:
    """Run python `prelude` + `code` (with `fill` defined) where $SMALL_DISK is a fresh tmpfs of
    `size`, seen by it alone; the JSON object it prints last."""
    why = _unshare_works()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"cannot make a small disk for the full-disk tests: {why}")
        pytest.skip(f"cannot make a small disk for the full-disk tests: {why}")
    disk = tmp_path / "small-disk"
    disk.mkdir()
    script = tmp_path / "on_small_disk.py"
    script.write_text(FILL + prelude + textwrap.dedent(code))
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
           f'mount -t tmpfs -o size={size} tmpfs "$SMALL_DISK" && exec "$0" "$1"', sys.executable, str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=_env(SMALL_DISK=str(disk)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Shared by the small-disk scripts: take all but `leave` bytes of the disk holding `folder`.
FILL = """
import os
def fill(folder, leave=0):
    path = os.path.join(folder, "filler")
    st = os.statvfs(folder)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
    finally:
        os.close(fd)
    return path
"""


# --------------------------------------------------------------------------------- image cache


@pytest.fixture(scope="module")
def images(nih_sample) -> list[str]:
    return [str(p) for p in sorted((nih_sample / "images").glob("*.png"))[:60]]


def _expected(paths, size):
    return np.stack([resize_gray(read_grayscale(p), size) for p in paths])


def _rows(store: Path) -> int:
    con = sqlite3.connect(f"file:{store / INDEX_FILE}?mode=ro", uri=True, timeout=30)
    try:
        return int(con.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    except sqlite3.OperationalError:  # no table yet
        return 0
    finally:
        con.close()


def test_sigkill_during_the_cache_build_then_only_the_rest_is_decoded(images, tmp_path):
    store = tmp_path / "store"
    code = f"""
        import time
        import common.cache as cache
        cache._COMMIT_BATCH, cache._COMMIT_EVERY_S = 4, 0.0  # commit often, so a kill lands between commits
        real = cache.read_resized
        def slow(path, size):
            time.sleep(0.05)  # a slow disk: the kill comes mid-build
            return real(path, size)
        cache.read_resized = slow
        cache.ImageCache(48, root={str(store)!r}).load({images!r}, workers=1, progress=False)
        print("finished")
    """
    (tmp_path / "build.py").write_text(textwrap.dedent(code))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "build.py")], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (not (store / INDEX_FILE).exists() or _rows(store) < 12) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    kept = _rows(store)
    assert 12 <= kept < len(images)

    res = ImageCache(48, root=store).load(images, workers=1, progress=False)
    assert res.decoded == len(images) - kept  # only what the killed build had not committed
    assert res.ok.all()
    np.testing.assert_array_equal(res.images, _expected(images, 48))
    assert ImageCache(48, root=store).load(images, progress=False).decoded == 0


def test_flipped_bytes_in_a_stored_image_are_detected_and_decoded_again(images, tmp_path, capsys):
    paths = images[:12]
    cache = ImageCache(40, root=tmp_path / "store")
    cache.load(paths, workers=1, progress=False)
    with open(cache.pixels_path, "r+b") as f:  # bit rot in the 6th image's slot
        f.seek(5 * 40 * 40 + 700)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    res = ImageCache(40, root=tmp_path / "store").load(paths, workers=1, progress=False)
    assert res.decoded == 1 and "1 stored image(s) of the 40px store failed their checksum" in capsys.readouterr().err
    np.testing.assert_array_equal(res.images, _expected(paths, 40))


def test_a_truncated_or_overwritten_index_is_started_again(images, tmp_path, capsys):
    paths = images[:10]
    store = tmp_path / "store"
    ImageCache(32, root=store).load(paths, workers=1, progress=False)
    index = store / INDEX_FILE
    index.write_bytes(index.read_bytes()[:1500])  # truncated mid-page
    capsys.readouterr()
    res = ImageCache(32, root=store).load(paths, workers=1, progress=False)
    assert "is damaged" in capsys.readouterr().err and res.decoded == len(paths)
    np.testing.assert_array_equal(res.images, _expected(paths, 32))
    index.write_bytes(b"this is not a database at all" * 100)
    res = ImageCache(32, root=store).load(paths[::-1], workers=1, progress=False)  # a view, too
    assert "is damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(res.images, _expected(paths[::-1], 32))


def test_a_damaged_view_or_a_short_pixel_file_never_serves_a_wrong_image(images, tmp_path, capsys):
    paths = images[:10]
    cache = ImageCache(32, root=tmp_path / "store")
    cache.load(paths, workers=1, progress=False)
    shuffled = [paths[i] for i in (3, 1, 4, 0, 9, 2, 6, 5, 8, 7)]
    cache.load(shuffled, progress=False)  # not one run of slots: an aligned copy in views/
    (view,) = cache.views_dir.glob("*.u8")
    data = bytearray(view.read_bytes())
    data[2 * 32 * 32 + 10] ^= 0x55
    view.write_bytes(bytes(data))
    capsys.readouterr()
    res = ImageCache(32, root=tmp_path / "store").load(shuffled, progress=False)
    assert "was damaged; copying it again" in capsys.readouterr().err
    np.testing.assert_array_equal(res.images, _expected(shuffled, 32))
    with open(cache.pixels_path, "r+b") as f:  # the last three slots lost (a copy cut short)
        f.truncate(7 * 32 * 32)
    res = ImageCache(32, root=tmp_path / "store").load(paths, workers=1, progress=False)
    assert res.decoded == 3 and "failed their checksum" in capsys.readouterr().err
    np.testing.assert_array_equal(res.images, _expected(paths, 32))


def test_full_disk_while_caching_names_the_store_and_a_rerun_resumes(images, tmp_path):
    out = _on_small_disk(f"""
        import json, os, sys
        import numpy as np
        from common.cache import CacheWriteError, ImageCache, INDEX_FILE
        paths = {images!r}
        disk = os.environ["SMALL_DISK"]
        store = os.path.join(disk, "store")
        first = ImageCache(64, root=store).load(paths[:20], workers=1, progress=False)  # fits
        filler = fill(disk, leave=64 * 64)
        try:
            ImageCache(64, root=store).load(paths, workers=1, progress=False)
            error = None
        except CacheWriteError as err:
            error = str(err)
        kept = ImageCache(64, root=store).load(paths[:20], workers=1, progress=False)
        os.unlink(filler)
        again = ImageCache(64, root=store).load(paths, workers=1, progress=False)
        print(json.dumps({{"error": error, "kept_decoded": kept.decoded, "decoded": again.decoded,
                          "same": bool(np.array_equal(kept.images, first.images)), "ok": bool(again.ok.all()),
                          "store": store}}))
    """, tmp_path, size="4m")
    assert out["error"] and out["store"] in out["error"] and "No space left on device" in out["error"]
    assert "run the same command again" in out["error"]
    assert out["kept_decoded"] == 0 and out["same"]  # what was cached before is intact
    assert out["decoded"] == len(images) - 20 and out["ok"]  # the rerun decodes only the rest


# ------------------------------------------------------------------------------------ run files

# The disk fills up just before the armed write of a file (its name -> which write): a real ENOSPC
# at a chosen moment of a real `medimaging train`.
ARM = """
from pathlib import Path
import common.io as cio
armed, _real_write = {}, cio._atomic_write
def _atomic_write(path, write):
    name = Path(path).name
    if name in armed:
        armed[name] -= 1
        if armed[name] == 0:
            armed["filler"] = fill(os.environ["SMALL_DISK"])
    return _real_write(path, write)
cio._atomic_write = _atomic_write
"""


@pytest.mark.slow
def test_full_disk_while_training_names_the_file_keeps_the_last_good_one_and_resumes(cardiomegaly_64, tmp_path):
    out = _on_small_disk(f"""
        import contextlib, io, json, os
        from common.cli import main
        from common.io import WriteError, save_json, torch_load_safe

        def train(run):
            return main(["train", "--data", {str(cardiomegaly_64)!r}, "--task", "cardiomegaly", "--model",
                         "test_efficientnet", "--image-size",
                         "32", "--batch-size", "16", "--epochs", "1", "--max-steps", "6", "--checkpoint-every", "2",
                         "--workers", "0", "--n-boot", "10", "--no-progress", "--out", str(run)])

        result = {{}}
        for target, nth in (("last.pt", 2), ("metrics.json", 1)):
            run = Path(os.environ["SMALL_DISK"]) / target.replace(".", "-")
            armed.clear()
            armed[target] = nth
            said = io.StringIO()
            with contextlib.redirect_stderr(said):  # the CLI prints a write error as one line, exit 1
                rc = train(run)
            error = said.getvalue() if rc == 1 else None
            ckpt = torch_load_safe(run / "checkpoints" / "last.pt")
            before = {{"error": error, "step": ckpt["step"], "done": ckpt["training_done"],
                      "metrics": (run / "metrics.json").exists(),
                      "temp_files": sorted(p.name for p in run.rglob("*.tmp"))}}
            os.unlink(armed.pop("filler"))
            armed.clear()
            rc = train(run)
            result[target] = {{**before, "rerun": rc, "log": (run / "log.txt").read_text(),
                              "metrics_after": (run / "metrics.json").exists()}}
        # a file that already exists: its previous content survives a write on a full disk
        prev = Path(os.environ["SMALL_DISK"]) / "thresholds.json"
        save_json(prev, {{"Effusion": 0.3}})
        filler = fill(os.environ["SMALL_DISK"])
        try:
            save_json(prev, {{"Effusion": 0.4, "pad": "x" * 100000}})
            result["overwrite"] = None
        except WriteError as err:
            result["overwrite"] = str(err)
        result["kept"] = json.loads(prev.read_text())
        print(json.dumps(result))
    """, tmp_path, size="64m", timeout=600, prelude=ARM)
    ckpt = out["last.pt"]
    assert ckpt["error"] and "checkpoints/last.pt: cannot write (No space left on device)" in ckpt["error"]
    assert "the previous last.pt is unchanged" in ckpt["error"] and "run the same command again" in ckpt["error"]
    assert ckpt["step"] == 2 and not ckpt["done"]  # the first checkpoint, intact and loadable
    assert ckpt["temp_files"] == [] and not ckpt["metrics"]
    assert ckpt["rerun"] == 0 and "resuming" in ckpt["log"] and ckpt["metrics_after"]
    metrics = out["metrics.json"]
    assert metrics["error"] and "metrics.json: cannot write (No space left on device)" in metrics["error"]
    assert metrics["done"] and not metrics["metrics"] and metrics["temp_files"] == []
    assert metrics["rerun"] == 0 and "resuming" in metrics["log"] and metrics["metrics_after"]
    assert "thresholds.json: cannot write" in out["overwrite"] and out["kept"] == {"Effusion": 0.3}


@pytest.mark.slow
def test_full_disk_during_export_keeps_the_previous_export_whole_and_a_rerun_completes(nih_sample, tmp_path):
    image = str(sorted((nih_sample / "images").glob("*.png"))[0])
    out = _on_small_disk(f"""
        import hashlib, json, os
        from common.export import ExportError, export_onnx
        from common.onnx_predict import OnnxPredictor
        from common.predict import create_untrained_run

        run = create_untrained_run(Path(os.environ["SMALL_DISK"]) / "run", "test_efficientnet", image_size=32)
        folder = export_onnx(run, log=lambda m: None)
        def digest():
            return {{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}}
        before = digest()
        armed[".model.json.staged"] = 1  # the disk fills up after model.onnx and head.npz were written
        try:
            export_onnx(run, log=lambda m: None)
            error = None
        except ExportError as err:
            error = str(err)
        after = digest()
        served = OnnxPredictor(folder).predict({image!r}).probabilities
        os.unlink(armed.pop("filler"))
        armed.clear()
        export_onnx(run, log=lambda m: None)
        again = OnnxPredictor(folder).predict({image!r}).probabilities
        print(json.dumps({{"error": error, "intact": before == after, "files": sorted(after),
                          "same": served == again, "folder": str(folder)}}))
    """, tmp_path, size="48m", prelude=ARM)
    assert out["error"].startswith(f"{out['folder']}: cannot write the export (No space left on device)")
    assert "previous export there, if any, is unchanged" in out["error"]
    # byte for byte, no staged leftovers; the lock file only serialises exporters
    assert out["intact"] and out["files"] == sorted([EXPORT_LOCK, "head.npz", "model.json", "model.onnx"])
    assert out["same"]  # the rerun exported the same model


# ------------------------------------------------------------------------------- damaged exports


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory) -> Path:
    from common.export import export_onnx
    from common.predict import create_untrained_run

    root = tmp_path_factory.mktemp("faults-export")
    run = create_untrained_run(root / "run", "test_efficientnet", image_size=32)
    return export_onnx(run, root / "good", log=lambda m: None)


def _damaged(export_folder: Path, root: Path, how: str) -> Path:
    folder = root / how
    shutil.copytree(export_folder, folder)
    meta = json.loads((folder / "model.json").read_text())
    if how == "truncated-model":
        data = (folder / "model.onnx").read_bytes()
        (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    elif how == "fewer-labels":
        meta["labels"] = meta["labels"][:-1]
        (folder / "model.json").write_text(json.dumps(meta))
    elif how == "other-size":
        meta["input"]["image_size"] = 64
        (folder / "model.json").write_text(json.dumps(meta))
    elif how == "broken-json":
        (folder / "model.json").write_text('{"labels": ["Mass"')
    elif how == "truncated-head":
        (folder / "head.npz").write_bytes((folder / "head.npz").read_bytes()[:100])
    return folder


@pytest.mark.parametrize("how, message", [
    ("truncated-model", r"model\.onnx: not a loadable ONNX model .*damaged or incomplete"),
    ("fewer-labels", r"model\.json lists 13 labels but model\.onnx outputs 14 logits"),
    ("other-size", r"model\.json describes inputs \[batch, 3, 64, 64\] but model\.onnx takes"),
    ("broken-json", r"model\.json: not valid JSON"),
])
def test_predict_names_what_is_wrong_with_a_damaged_or_mismatched_export(export_folder, nih_sample, tmp_path,
                                                                         capsys, how, message):
    from common.cli import main

    folder = _damaged(export_folder, tmp_path, how)
    image = str(sorted((nih_sample / "images").glob("*.png"))[0])
    assert main(["predict", image, "--run", str(folder), "--json"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "medimaging export --run" in err and "Traceback" not in err


def test_gradcam_names_damaged_head_weights(export_folder, nih_sample, tmp_path):
    from common.onnx_predict import OnnxPredictor
    from common.serving import OnnxModelError

    predictor = OnnxPredictor(_damaged(export_folder, tmp_path, "truncated-head"))
    image = sorted((nih_sample / "images").glob("*.png"))[0]
    assert len(predictor.predict(image).probabilities) == 14  # predicting does not need head.npz
    with pytest.raises(OnnxModelError, match=r"head\.npz: head weights for Grad-CAM cannot be read"):
        predictor.gradcam(image, "Mass")


@pytest.mark.parametrize("how, message", [
    ("truncated-model", "not a loadable ONNX model"),
    ("fewer-labels", "lists 13 labels but model.onnx outputs 14 logits"),
])
def test_the_app_names_what_is_wrong_with_a_damaged_export(export_folder, tmp_path, monkeypatch, how, message):
    from streamlit.testing.v1 import AppTest

    _damaged(export_folder, tmp_path / "models", how)
    monkeypatch.setenv("MEDIMAGING_RUNS", str(tmp_path / "models"))
    at = AppTest.from_file(str(REPO / "app" / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert any("Cannot load this model" in e and message in e for e in errors), errors


# ----------------------------------------------------------------------------- code in checkpoints


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def test_a_checkpoint_or_weights_file_with_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    import pickle

    import torch

    from common import runs
    from common.cli import main
    from common.io import load_weights, torch_load_safe

    marker = tmp_path / "MARKER"
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=2))
    zipped = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, zipped)
    hub_style = tmp_path / "pytorch_model.bin"
    hub_style.write_bytes(zipped.read_bytes())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(zipped.read_bytes())  # a run to "resume"
    for path in (legacy, zipped, hub_style):
        with pytest.raises(ValueError, match="cannot be loaded safely"):
            torch_load_safe(path)
        with pytest.raises(ValueError, match="weights_only"):
            load_weights(path)
    with pytest.raises(ValueError, match="weights_only"):
        runs.init_from(torch.nn.Linear(2, 2), zipped)
    with pytest.raises(ValueError, match="weights_only"):
        main(["train", "--data", str(tmp_path), "--model", "test_efficientnet", "--out", str(run)])
    assert not marker.exists(), "a checkpoint's payload ran"
    pickle.loads(legacy.read_bytes())  # the control: unpickled the unsafe way, the payload does run
    assert marker.read_text() == "the payload ran"


# ------------------------------------------------------------------------------- the run cache


@pytest.mark.slow
def test_two_processes_asking_for_the_same_run_train_it_once(cardiomegaly_64, tmp_path):
    """`common.experiments.runcache.cached_fit` from two processes at once: one trains, the other
    waits for the run's lock and reuses the finished run."""
    go = tmp_path / "go"
    code = f"""
        import json, os, time
        from pathlib import Path
        from common import experiments as ex
        config = ex.train_config(ex.get_profile("smoke"), "efficientnet_b0", "cardiomegaly",
                                 ex.DataSpec(None, Path({str(cardiomegaly_64)!r}), False))
        while not Path({str(go)!r}).exists():  # both start asking at the same moment
            time.sleep(0.01)
        ref = ex.cached_fit(config, "stage 1", "efficientnet_b0", runs={str(tmp_path / "runs")!r})
        print(json.dumps({{"reused": ref.reused, "run_dir": str(ref.run_dir), "done": time.time()}}))
    """
    (tmp_path / "ask.py").write_text(textwrap.dedent(code))
    env = _env(MEDIMAGING_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "ask.py")], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(1.0)
    go.touch()
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["reused"] for r in results) == [False, True]  # one trained, the other reused
    assert results[0]["run_dir"] == results[1]["run_dir"]
    run = Path(results[0]["run_dir"])
    assert (run / "log.txt").read_text().count("new run in") == 1 and (run / "metrics.json").is_file()


def test_the_cli_prints_a_write_error_as_one_line_and_exits_1(monkeypatch, capsys):
    import errno as errno_

    from common import cli, io
    from common.commands import cache as cache_command

    def full_disk(args):
        raise io.write_error("/data/run/metrics.json", OSError(errno_.ENOSPC, "No space left on device"))

    monkeypatch.setattr(cache_command, "run", full_disk)
    assert cli.main(["cache"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: /data/run/metrics.json: cannot write (No space left on device)")
    assert "Free some space" in err and "Traceback" not in err


def test_two_processes_exporting_the_same_run_both_succeed_and_the_folder_is_whole(tmp_path):
    import subprocess
    import sys

    from common.onnx_predict import OnnxPredictor
    from common.predict import create_untrained_run

    run = create_untrained_run(tmp_path / "run", "test_efficientnet", image_size=32)
    code = f"from common.export import export_onnx; export_onnx({str(run)!r}, log=lambda m: None)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    export = run / "export"
    assert not [p.name for p in export.iterdir() if p.name.endswith(".staged")]
    predictor = OnnxPredictor(export)  # model.json, model.onnx and head.npz of one export, checked together
    assert len(predictor.predict(np.full((64, 64), 128, np.uint8)).probabilities) == len(predictor.labels)
