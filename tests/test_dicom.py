"""DICOM everywhere: `medimaging predict` (files and folders), `explain`, `data summary` and the app
read .dcm files made with pydicom from real NIH PNGs (MONOCHROME1 and MONOCHROME2, 8- and 16-bit),
and answer as they do for the PNG each was made from."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.cli import main
from common.images import read_grayscale
from common.labels import LABELS
from common.predict import create_untrained_run
from filemakers import dicom_bytes
from streamlit_app import app_test

pytest.importorskip("pydicom", reason="DICOM needs pydicom (requirements.txt installs it)")

PROB_ATOL = 1e-5  # the bound: a DICOM made from a PNG answers as the PNG does
# How each variant stores the PNG's 8-bit values v: what a scanner's file could hold for the same image.
VARIANTS = {
    "mono2-8bit": ("MONOCHROME2", 8, lambda v: v.astype(np.uint8)),
    "mono2-16bit": ("MONOCHROME2", 16, lambda v: v.astype(np.uint16) * 257),
    "mono1-8bit": ("MONOCHROME1", 8, lambda v: (255 - v).astype(np.uint8)),  # white = low values
    "mono1-16bit": ("MONOCHROME1", 16, lambda v: 65535 - v.astype(np.uint16) * 257),
}


def _full_range_pngs(nih_sample: Path, n: int) -> list[Path]:
    """NIH PNGs whose values span 0..255. DICOM values are scaled by their own range (a scanner's
    16-bit file rarely uses all 16 bits), so only such an image decodes to exactly the PNG's pixels."""
    found = []
    for p in sorted((nih_sample / "images").glob("*.png")):
        gray = read_grayscale(p)
        if gray.min() == 0 and gray.max() == 255:
            found.append(p)
        if len(found) == n:
            return found
    pytest.fail(f"fewer than {n} full-range images in {nih_sample}")


@pytest.fixture(scope="module")
def dicoms(nih_sample, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Two NIH PNGs, each with its four DICOM variants in one folder: stem -> (png, {variant: dcm})."""
    folder = tmp_path_factory.mktemp("dicoms")
    out = {}
    for png in _full_range_pngs(nih_sample, 2):
        gray = read_grayscale(png)
        files = {}
        for name, (photometric, bits, store) in VARIANTS.items():
            files[name] = folder / f"{png.stem}-{name}.dcm"
            files[name].write_bytes(dicom_bytes(store(gray), photometric, bits))
        out[png.stem] = (png, files)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real (randomly initialised) CNN run with its ONNX export: what predict, explain and the app load."""
    from common.export import export_onnx

    root = tmp_path_factory.mktemp("dicom-runs")
    # timm's tiny ResNet: its probabilities move ~1e-3 between two NIH images (more than the tiny
    # EfficientNet's), so agreeing within PROB_ATOL says the decoded pixels were the same
    run = create_untrained_run(root / "cnn", "test_resnet", image_size=64)
    export_onnx(run, log=lambda m: None)
    return run


def _predict_json(capsys, *args: str) -> dict[str, dict[str, float]]:
    assert main(["predict", *args, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return {Path(d["image"]).name: d["probabilities"] for d in lines}


@pytest.mark.parametrize("onnx", [False, True], ids=["torch", "onnx"])
def test_predict_on_dicom_files_and_folders_matches_the_png(dicoms, run, capsys, onnx):
    extra = ["--onnx"] if onnx else []
    pngs = [str(png) for png, _ in dicoms.values()]
    expected = _predict_json(capsys, *pngs, "--run", str(run), *extra)
    a, b = (expected[Path(p).name] for p in pngs)
    assert max(abs(a[k] - b[k]) for k in LABELS) > 50 * PROB_ATOL  # the bound tells images apart
    folder = next(iter(dicoms.values()))[1]["mono2-8bit"].parent
    from_folder = _predict_json(capsys, str(folder), "--run", str(run), *extra)  # a folder of .dcm files
    assert len(from_folder) == len(dicoms) * len(VARIANTS)
    for png, files in dicoms.values():
        for name, dcm in files.items():
            one = _predict_json(capsys, str(dcm), "--run", str(run), *extra)[dcm.name]  # a named .dcm file
            for got in (one, from_folder[dcm.name]):
                assert got == pytest.approx(expected[png.name], abs=PROB_ATOL), (png.name, name)


def test_explain_reads_dicom(dicoms, run, tmp_path, capsys):
    png, files = next(iter(dicoms.values()))
    assert main(["explain", str(png), "--run", str(run), "--label", "Effusion", "--out", str(tmp_path / "png.png")]) == 0
    from_png = capsys.readouterr().out
    for name, dcm in files.items():
        heat = tmp_path / f"{name}.png"
        assert main(["explain", str(dcm), "--run", str(run), "--label", "Effusion", "--out", str(heat)]) == 0
        title = capsys.readouterr().out.split(": ", 1)[1]
        assert title == from_png.split(": ", 1)[1], name  # label and probability, as for the PNG
        diff = np.abs(read_grayscale(heat).astype(int) - read_grayscale(tmp_path / "png.png").astype(int))
        assert diff.max() <= 1, name


def test_data_summary_indexes_a_folder_of_dicom_files(dicoms, tmp_path, capsys):
    """A dataset whose label file lists .dcm images (the original project's `14_train.csv` layout)."""
    root = tmp_path / "own"
    (root / "sample" / "images").mkdir(parents=True)
    rows = ["Image Index,Finding Labels"]
    for _, files in dicoms.values():
        for name, dcm in files.items():
            (root / "sample" / "images" / dcm.name).write_bytes(dcm.read_bytes())
            rows.append(f"{dcm.name},{'Effusion' if '8bit' in name else 'No Finding'}")
    (root / "14_train.csv").write_text("\n".join(rows) + "\n")
    assert main(["data", "summary", str(root), "--json", "--size", "64", "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    n = len(dicoms) * len(VARIANTS)
    assert summary["images_found"] == n and summary["rows_without_image"] == 0
    assert summary["unreadable"] == [], summary["unreadable"]


def test_the_app_answers_a_dicom_upload_as_the_png(dicoms, run, monkeypatch):
    at = app_test(monkeypatch, run.parent)
    assert {".dcm"} <= set(at.file_uploader(key="upload").allowed_type)

    def upload(path: Path, mime: str) -> dict[str, float]:
        at.file_uploader(key="upload").set_value((path.name, path.read_bytes(), mime))
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        table = at.dataframe[0].value
        return dict(zip(table["Finding"], table["Probability"]))

    png, files = next(iter(dicoms.values()))
    expected = upload(png, "image/png")
    for name, dcm in files.items():
        assert upload(dcm, "application/dicom") == pytest.approx(expected, abs=PROB_ATOL), name
