"""common.predict, common.onnx_predict and `medimaging predict`, on real NIH images.

Runs are made through the run-directory contract (`create_untrained_run`) and, once, by a real
few-step `common.train.fit` on a subset of the NIH sample.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.cli import main as cli
from common.images import UnreadableImage, read_grayscale
from common.labels import LABELS
from common.predict import (
    TorchPredictor,
    create_untrained_run,
    expand_inputs,
    load_image,
    load_predictor,
    write_predictions_csv,
)
from common.preprocess import resize_gray, to_model_input

# thresholds far apart so "positive" is decided by the thresholds, not by 0.5
THRESHOLDS = {name: (0.0 if i % 3 == 0 else 1.0 if i % 3 == 1 else 0.5) for i, name in enumerate(LABELS)}


def _images(nih_sample: Path, n: int) -> list[Path]:
    return sorted((nih_sample / "images").glob("*.png"))[:n]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return create_untrained_run(tmp_path_factory.mktemp("predict") / "run", "test_efficientnet", image_size=64,
                                thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def export_dir(run_dir: Path) -> Path:
    from common.export import export_onnx

    return export_onnx(run_dir, log=lambda m: None)


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> TorchPredictor:
    return TorchPredictor(run_dir)


def test_predict_uses_the_exact_preprocessing_and_thresholds(predictor, nih_sample):
    import torch

    path = _images(nih_sample, 1)[0]
    pred = predictor.predict(path)
    assert list(pred.probabilities) == list(LABELS)
    # the documented pipeline, spelled out: read_grayscale -> resize_gray -> to_model_input -> model -> sigmoid
    cfg = predictor.input
    x = to_model_input(resize_gray(read_grayscale(path), cfg["image_size"]), cfg["mean"], cfg["std"], cfg["in_chans"])
    with torch.no_grad():
        expected = torch.sigmoid(predictor.model(torch.from_numpy(x[None]))).numpy()[0]
    np.testing.assert_allclose([pred.probabilities[k] for k in LABELS], expected, atol=1e-6)
    assert pred.positive == [k for k in LABELS if pred.probabilities[k] >= THRESHOLDS[k]]
    assert all(k in pred.positive for k in LABELS if THRESHOLDS[k] == 0.0)
    assert not any(k in pred.positive for k in LABELS if THRESHOLDS[k] == 1.0)


def test_path_bytes_and_array_inputs_agree(predictor, nih_sample):
    path = _images(nih_sample, 1)[0]
    a = predictor.predict_proba([path])
    b = predictor.predict_proba([path.read_bytes()])
    c = predictor.predict_proba([read_grayscale(path)])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_fast_jpeg_decoding_stays_close_to_the_exact_path(nih_sample, tmp_path):
    from PIL import Image

    src = read_grayscale(_images(nih_sample, 1)[0])
    jpg = tmp_path / "x.jpg"
    Image.fromarray(src).save(jpg, quality=95)
    exact = resize_gray(load_image(jpg), 224).astype(float)
    fast_full = load_image(jpg, size=224, fast_jpeg=True)
    assert fast_full.shape[0] < src.shape[0]  # really decoded at a reduced scale (1024 -> 512)
    fast = resize_gray(fast_full, 224).astype(float)
    assert np.abs(exact - fast).mean() < 1.5
    # a PNG is never "fast"-decoded: identical
    np.testing.assert_array_equal(load_image(_images(nih_sample, 1)[0], 224, fast_jpeg=True), src)


def _mixed_folder(nih_sample: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = []
    for i, src in enumerate(_images(nih_sample, 3)):
        dst = (folder / "sub" if i == 2 else folder) / src.name
        dst.write_bytes(src.read_bytes())
        good.append(dst.name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes(_images(nih_sample, 4)[3].read_bytes()[:3000])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder, good, ["empty.png", "text.png", "truncated.png"]


def test_iter_predict_reports_and_skips_unreadable_files(predictor, nih_sample, tmp_path):
    folder, good, bad = _mixed_folder(nih_sample, tmp_path)
    files, missing = expand_inputs([folder, tmp_path / "nope.png"])
    assert missing == [(str(tmp_path / "nope.png"), "file not found")]
    assert len(files) == 6  # notes.txt is not an image file
    results = list(predictor.iter_predict(files, batch_size=2, progress=False))
    assert [Path(p).name for p, _, _ in results] == [f.name for f in files]  # order kept
    ok = {Path(p).name for p, pred, _ in results if pred is not None}
    failed = {Path(p).name: reason for p, pred, reason in results if pred is None}
    assert ok == set(good)
    assert set(failed) == set(bad)
    assert "empty" in failed["empty.png"] and "not an image" in failed["text.png"]
    with pytest.raises(UnreadableImage):
        predictor.predict(folder / "text.png")
    # batched results equal one-by-one results
    first = next(pred for _, pred, _ in results if pred is not None)
    assert first.probabilities == pytest.approx(predictor.predict(first.image).probabilities, abs=1e-6)


def test_cli_predict_json_lines(run_dir, nih_sample, capsys):
    images = _images(nih_sample, 3)
    assert cli(["predict", *map(str, images), "--run", str(run_dir), "--json"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in images]
    for r in rows:
        assert set(r) == {"image", "probabilities", "positive"}
        assert list(r["probabilities"]) == list(LABELS)
        assert all(0.0 <= v <= 1.0 for v in r["probabilities"].values())
        assert r["positive"] == [k for k in LABELS if r["probabilities"][k] >= THRESHOLDS[k]]


def test_cli_predict_folder_csv_is_what_evaluate_reads(run_dir, nih_sample, tmp_path, capsys):
    folder, good, bad = _mixed_folder(nih_sample, tmp_path)
    out_csv = tmp_path / "preds.csv"
    assert cli(["predict", str(folder), "--run", str(run_dir), "--csv", str(out_csv)]) == 0
    err = capsys.readouterr().err
    for name in bad:
        assert f"warning: {folder / name}" in err and "skipped" in err
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["Image Index"] for r in rows] == sorted(good, key=lambda n: (n == good[2], n))
    assert list(rows[0]) == ["Image Index", *LABELS]
    # `medimaging evaluate` accepts the file against NIH's label file
    labels_csv = nih_sample / "Data_Entry_2017_v2020.csv"
    assert cli(["evaluate", "--predictions", str(out_csv), "--labels", str(labels_csv), "--n-boot", "0"]) == 0


def test_cli_predict_exit_status_when_nothing_is_readable(run_dir, tmp_path, capsys):
    (tmp_path / "a.png").write_text("no")
    assert cli(["predict", str(tmp_path / "a.png"), "--run", str(run_dir), "--json"]) == 1
    err = capsys.readouterr().err
    assert "not an image" in err and "no readable image" in err
    assert cli(["predict", str(tmp_path / "a.png"), "--run", str(tmp_path / "no-run")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_onnx_without_export_says_how_to_make_one(run_dir, tmp_path, capsys):
    bare = create_untrained_run(tmp_path / "bare", "test_efficientnet", image_size=64)
    assert cli(["predict", "x.png", "--run", str(bare), "--onnx"]) == 2
    assert f"medimaging export --run {bare}" in capsys.readouterr().err


def test_onnx_predictions_match_torch(predictor, export_dir, nih_sample):
    images = _images(nih_sample, 5)
    onnx = load_predictor(export_dir)
    assert onnx.backend == "onnx" and onnx.labels == predictor.labels and onnx.thresholds == predictor.thresholds
    np.testing.assert_allclose(onnx.predict_proba(images), predictor.predict_proba(images), atol=1e-4)
    # the run dir with --onnx resolves to its export/
    assert load_predictor(predictor.source, onnx=True).source == export_dir


def test_cli_warns_when_the_export_is_older_than_the_runs_weights(run_dir, export_dir, nih_sample, capsys):
    weights = run_dir / "best.safetensors"
    before = weights.stat()
    exported = (export_dir / "model.onnx").stat().st_mtime
    os.utime(weights, (exported + 5, exported + 5))  # retrained after the export
    try:
        assert cli(["predict", str(_images(nih_sample, 1)[0]), "--run", str(run_dir), "--onnx", "--json"]) == 0
        assert "re-export with `medimaging export --run" in capsys.readouterr().err
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cli(["predict", str(_images(nih_sample, 1)[0]), "--run", str(run_dir), "--onnx", "--json"]) == 0
    assert "re-export" not in capsys.readouterr().err


def test_optimised_graph_cache_gives_the_same_predictions(export_dir, nih_sample, tmp_path):
    import shutil

    from common.onnx_predict import OPT_CACHE, OnnxPredictor

    images = _images(nih_sample, 3)
    plain = OnnxPredictor(export_dir, cache=False)
    assert plain.optimized_file is None
    cached = OnnxPredictor(export_dir)  # export already wrote this machine's optimised graph
    assert cached.optimized_file is not None and cached.optimized_file.parent == export_dir / OPT_CACHE
    np.testing.assert_allclose(cached.predict_proba(images), plain.predict_proba(images), atol=1e-6)
    # a damaged cache file is replaced, not trusted
    cached.optimized_file.write_bytes(b"garbage")
    again = OnnxPredictor(export_dir)
    np.testing.assert_allclose(again.predict_proba(images), plain.predict_proba(images), atol=1e-6)
    assert again.optimized_file.stat().st_size > 1000
    # where the cache cannot be written (read-only folder; here: its name is taken by a file), it still serves
    blocked = tmp_path / "blocked"
    shutil.copytree(export_dir, blocked, ignore=shutil.ignore_patterns(OPT_CACHE))
    (blocked / OPT_CACHE).write_text("not a folder")
    p = OnnxPredictor(blocked)
    assert p.optimized_file is None
    np.testing.assert_allclose(p.predict_proba(images), plain.predict_proba(images), atol=1e-6)


def test_onnx_predict_never_imports_torch(export_dir, nih_sample, tmp_path):
    """A fresh process: the CLI's ONNX path and the library API, with torch/pandas/matplotlib absent."""
    images = [str(p) for p in _images(nih_sample, 2)]
    (tmp_path / "bad.png").write_text("x")
    code = (
        "import json, sys\n"
        "from common.cli import main\n"
        f"rc = main(['predict', *{images!r}, {str(tmp_path / 'bad.png')!r}, '--run', {str(export_dir)!r}, '--onnx', '--json'])\n"
        "from common.onnx_predict import OnnxPredictor\n"
        f"p = OnnxPredictor({str(export_dir)!r}).predict({images[0]!r})\n"
        "heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'timm') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy, 'n': len(p.probabilities)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    status = json.loads(lines[-1])
    assert status == {"rc": 0, "heavy": [], "n": len(LABELS)}
    assert len(lines) == 3  # two JSON lines for two readable images, then the status
    assert "bad.png" in done.stderr


def _mini_nih(nih_sample: Path, dst: Path, n: int = 32) -> Path:
    """An NIH-layout dataset of n real sample images (symlinks) and their Data_Entry rows."""
    (dst / "images").mkdir(parents=True)
    names = set()
    for src in sorted((nih_sample / "images").glob("*.png"))[:n]:
        (dst / "images" / src.name).symlink_to(src)
        names.add(src.name)
    with (nih_sample / "Data_Entry_2017_v2020.csv").open(newline="") as f_in, \
            (dst / "Data_Entry_2017_v2020.csv").open("w", newline="") as f_out:
        reader = csv.reader(f_in)
        writer = csv.writer(f_out)
        writer.writerow(next(reader))
        writer.writerows(row for row in reader if row and row[0] in names)
    return dst


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")  # random init is the point of this smoke run
def test_run_from_a_real_fit_predicts_and_exports(nih_sample, tmp_path, capsys):
    from common.export import export_onnx
    from common.train import TrainConfig, fit

    data = _mini_nih(nih_sample, tmp_path / "nih-mini")
    run = fit(TrainConfig(data=[str(data)], task="all14", model_name="test_efficientnet", image_size=64,
                          max_steps=2, epochs=1, batch_size=8, eval_batch_size=32, n_boot=10, num_workers=0,
                          progress=False, seed=0, out=str(tmp_path / "run")))
    tuned = json.loads((run / "thresholds.json").read_text())
    torch_pred = load_predictor(run)
    assert torch_pred.thresholds == pytest.approx({k: tuned[k] for k in torch_pred.labels})
    export = export_onnx(run, int8=True, log=lambda m: None)  # int8 calibrated on the run's dev split
    dev_images = json.loads((run / "config.json").read_text())["split"]["dev"]
    assert json.loads((export / "model.json").read_text())["int8"]["n_calibration"] == dev_images > 0
    images = [Path(p) for p in sorted((data / "images").iterdir())[:4]]
    onnx_pred = load_predictor(export)
    np.testing.assert_allclose(onnx_pred.predict_proba(images), torch_pred.predict_proba(images), atol=1e-4)
    capsys.readouterr()  # drop fit's log lines
    assert cli(["predict", *map(str, images), "--run", str(export), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert r["positive"] == [k for k in torch_pred.labels if r["probabilities"][k] >= tuned[k]]
    meta = json.loads((export / "model.json").read_text())
    assert meta["run_dir"] == str(run.resolve()) and meta["synthetic"] is False


def test_write_predictions_csv_round_trip(tmp_path):
    from common.predict import Prediction

    preds = [Prediction(f"/x/{i:08d}_000.png", {k: (i + j) / 40 for j, k in enumerate(LABELS)}, []) for i in range(3)]
    path = tmp_path / "p.csv"
    assert write_predictions_csv(preds, LABELS, path) == 3
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["Image Index"] == "00000001_000.png"
    assert float(rows[2]["Hernia"]) == pytest.approx((2 + 13) / 40)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # atomic write left no temp file
    assert os.path.getsize(path) > 0
