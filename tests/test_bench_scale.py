"""bench/bench_scale.py at tiny N, so it cannot rot: every step runs (each in its own process) and
the table has sane numbers (not timings). Plus the two things it exists to keep: the official
lists it writes split by patient, and a cache request served from an aligned copy is checksummed once."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from common.cache import ImageCache

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_scale_bench_runs_every_step_and_prints_one_table(tmp_path, capsys):
    bench = _bench()
    plot = tmp_path / "scale.png"
    out = tmp_path / "scale.json"
    code = bench.main([
        "--sizes", "40", "--root", str(tmp_path / "root"), "--image-px", "48", "--cache-px", "32",
        "--batch-size", "8", "--small-model", "test_efficientnet", "--model-batches", "2", "--decode-sample", "10",
        "--n-boot", "20", "--predict-images", "4", "--predict-px", "96", "--predict-source", "synthetic",
        "--predict-model", "test_efficientnet", "--predict-size", "32", "--predict-batch", "2", "--model-reps", "2", "--plot", str(plot), "--json", str(out),
    ])
    assert code == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    titles = [row.split("|")[1].strip() for row in rows]
    assert titles == [bench.TITLES[s] for s in bench.STEPS + bench.ONCE_STEPS]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        images, seconds, cpu, rate, per_image, rss = (float(c.replace(",", "")) for c in cells[2:])
        assert images > 0 and seconds > 0 and cpu >= 0 and rate > 0 and per_image > 0
        assert 50 < rss < 20_000  # MB: a process with numpy at least, and not absurd
    data = json.loads(out.read_text())["sizes"]["40"]
    assert data["load"]["images"] == 40 and data["load"]["synthetic"] is True
    assert set(data["load"]["split"]) <= {"train", "dev", "test"}
    assert data["cache"]["images"] == 40 and data["cache"]["disk_mb"] > 40 * 32 * 32 / 1e6
    assert data["evaluate"]["images"] == round(40 * bench.NIH_TEST_SHARE)
    assert re.search(r"cache build .* x \(cores x one process's decode rate", text)
    assert plot.stat().st_size > 1000
    # a second run reuses the generated data and the export
    folder = tmp_path / "root" / "nih-40-48px-seed0"
    stamp = (folder / "Data_Entry_2017_v2020.csv").stat().st_mtime_ns
    assert bench.ensure_dataset(tmp_path / "root", 40, 48, log=lambda m: None) == folder
    assert (folder / "Data_Entry_2017_v2020.csv").stat().st_mtime_ns == stamp


def test_official_lists_keep_each_patient_on_one_side_at_nih_share(tmp_path):
    bench = _bench()
    from common.data import load_dataset
    from common.synthetic import generate

    folder = generate(tmp_path / "nih", n_images=300, image_size=32, progress=False, workers=1)
    n_test = bench.write_official_lists(folder)
    frame = load_dataset(folder, quiet=True).frame
    assert n_test == (frame["official_split"] == "test").sum()
    assert abs(n_test - 300 * bench.NIH_TEST_SHARE) <= 4  # whole patients (1-4 images each)
    assert frame["official_split"].notna().all()
    assert frame.groupby("patient_id")["official_split"].nunique().max() == 1


def test_a_request_served_from_its_aligned_copy_is_checksummed_once(tmp_path, nih_sample, monkeypatch):
    paths = sorted(str(p) for p in (nih_sample / "images").glob("*.png"))[:8]
    cache = ImageCache(24, root=tmp_path / "store")
    cache.load(paths, workers=1, progress=False)
    other = paths[::-1]  # not one run of slots: an aligned copy in views/
    first = cache.load(other, progress=False).images.copy()
    calls = []
    crc32 = zlib.crc32

    def counting_crc32(data, *args):
        calls.append(1)
        return crc32(data, *args)

    monkeypatch.setattr("common.cache.zlib.crc32", counting_crc32)
    res = ImageCache(24, root=tmp_path / "store").load(other, progress=False)
    assert res.decoded == 0
    np.testing.assert_array_equal(res.images, first)
    assert len(calls) == len(other)  # each row of the copy once; the store's slots not again
    assert os.path.dirname(res.images.filename).endswith("views")


def test_opencv_decodes_gray_pngs_to_the_same_pixels_and_leaves_damaged_ones_to_pillow(nih_sample, capfd):
    from common import images

    if not images._opencv():
        pytest.skip("opencv-python-headless is not installed: every file takes Pillow")
    paths = sorted((nih_sample / "images").glob("*.png"))[:12]
    fast = 0
    for p in paths:
        data = p.read_bytes()
        via_cv2 = images._read_gray_png(data, images.MAX_PIXELS)
        saved, images._cv2 = images._cv2, False
        try:
            pillow = images.read_grayscale(data)
        finally:
            images._cv2 = saved
        if via_cv2 is not None:
            fast += 1
            np.testing.assert_array_equal(via_cv2, pillow)
        np.testing.assert_array_equal(images.read_grayscale(data), pillow)
    assert fast >= len(paths) - 2  # NIH's PNGs are 8-bit gray (a few RGBA ones take Pillow)
    data = paths[0].read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    for broken in (data[: len(data) // 2], bytes(flipped)):
        assert images._read_gray_png(broken, images.MAX_PIXELS) is None
        with pytest.raises(images.UnreadableImage):
            images.read_grayscale(broken)
    assert "libpng" not in capfd.readouterr().err  # Pillow names the problem; nothing printed behind it


def test_dataset_reads_rows_without_mapping_them_and_gets_the_same_pixels(tmp_path, nih_sample):
    import torch

    from common.cache import XrayTensorDataset

    paths = sorted(str(p) for p in (nih_sample / "images").glob("*.png"))[:10]
    cache = ImageCache(16, root=tmp_path / "store")
    cache.load(paths, workers=1, progress=False)
    window = cache.load(paths[3:9], progress=False).images  # a zero-copy window at an offset in the store
    assert isinstance(window, np.memmap) and window.offset == 3 * 16 * 16
    labels = np.arange(len(window) * 2, dtype=np.float32).reshape(-1, 2)
    ds = XrayTensorDataset(window, labels)
    assert ds._file is not None  # file-backed: rows are read, not mapped
    batch = ds.__getitems__([4, 0, 4, 5, 1])  # out of order, repeated, a run of neighbours
    for k, i in enumerate([4, 0, 4, 5, 1]):
        assert torch.equal(batch[k][0][0], torch.from_numpy(np.array(window[i])))
        assert torch.equal(batch[k][1], torch.from_numpy(labels[i]))
        assert torch.equal(ds[i][0][0], torch.from_numpy(np.array(window[i])))
    in_memory = XrayTensorDataset(np.array(window), labels)  # a plain array: indexed as before
    assert in_memory._file is None and torch.equal(in_memory[2][0], ds[2][0])
