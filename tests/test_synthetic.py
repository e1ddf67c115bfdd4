"""common.synthetic: deterministic, in the real layouts, and every label changes the image."""
from __future__ import annotations

import filecmp
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import cli
from common.data import load_dataset, patient_split
from common.labels import LABELS
from common.synthetic import (
    BBOX_CSV,
    BOXED_FINDINGS,
    _sample_findings,
    generate,
    random_anatomy,
    render,
)

# Findings that add density (brighter) and those that add air (darker), on average.
DARKER = {"Pneumothorax", "Emphysema", "Hernia"}


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file()]
    return (not cmp.left_only and not cmp.right_only and len(files) > 0
            and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files))


def _tree_digest(root: Path) -> str:
    """sha256 over a folder: each file's path and content, a PNG's by its pixels (zlib may encode
    the same pixels differently elsewhere)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes()
            h.update(f"{p.relative_to(root).as_posix()}\n".encode() + hashlib.sha256(data).digest())
    return h.hexdigest()


def test_the_generated_data_is_pinned(tmp_path):
    # Digests of what the generator made before `render` and `generate` were cut into steps: the
    # committed synthetic results depend on every byte, so a change here needs a new GENERATOR_VERSION.
    boxes: list = []
    img = render(np.random.default_rng(5), random_anatomy(np.random.default_rng(11)), set(LABELS), 64, boxes=boxes)
    assert hashlib.sha256(img.tobytes()).hexdigest() == "6467be762385d0dd477ba2c074913cd008c80aea4303c0aa1fa5830285534553"
    assert len(boxes) == 12
    nih = generate(tmp_path / "nih", "nih", n_images=24, image_size=48, seed=7, progress=False, workers=1)
    assert _tree_digest(nih) == "5398d1234d14109108cfad9ea1a9339dc907e67b09b84875fb3017aa396485f3"
    cardio = generate(tmp_path / "c", "cardiomegaly", n_images=12, image_size=40, seed=7, progress=False, workers=1)
    assert _tree_digest(cardio) == "b5c6a9295ae097f5b5a219ee74a6601481579dd544cdb1490d21fb218264fcb2"


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = generate(tmp_path / "a", "nih", n_images=70, image_size=64, seed=0, progress=False, workers=2)
    b = generate(tmp_path / "b", "nih", n_images=70, image_size=64, seed=0, progress=False, workers=1)
    c = generate(tmp_path / "c", "nih", n_images=70, image_size=64, seed=1, progress=False, workers=1)
    assert _same_tree(a, b)
    assert (a / "images" / "90000001_000.png").read_bytes() != (c / "images" / "90000001_000.png").read_bytes()


def test_nih_layout_has_nih_columns_and_follow_ups(tmp_path, nih_sample):
    out = generate(tmp_path / "nih", "nih", n_images=40, image_size=64, progress=False)
    real_header = (nih_sample / "Data_Entry_2017_v2020.csv").open().readline()
    assert (out / "Data_Entry_2017_v2020.csv").open().readline() == real_header
    d = load_dataset(out)
    f = d.frame
    assert d.is_synthetic and d.layout == "nih" and len(f) == 40 and d.rows_without_image == 0
    assert f["patient_id"].value_counts().max() > 1  # several follow-ups per patient
    assert (f["patient_id"].astype(int) > 30_805).all()  # never a real NIH patient id
    assert set(f["view"]) == {"PA", "AP"} and set(f["sex"]) == {"M", "F"} and f["age"].between(1, 100).all()
    assert not f[list(LABELS)].isna().any().any()
    split = patient_split(f, seed=0)
    assert (f.groupby("patient_id").apply(lambda g: split[g.index].nunique(), include_groups=False) == 1).all()
    img = np.asarray(__import__("PIL").Image.open(f["path"].iloc[0]))
    assert img.shape == (64, 64) and img.dtype == np.uint8


def test_cardiomegaly_layout(tmp_path):
    out = generate(tmp_path / "c", "cardiomegaly", n_images=40, image_size=64, progress=False)
    assert (out / "train").is_dir() and (out / "test").is_dir()
    d = load_dataset(out)
    f = d.frame
    assert d.is_synthetic and d.layout == "cardiomegaly" and len(f) == 40
    assert set(f["Cardiomegaly"].unique()) == {0.0, 1.0}
    assert f[[c for c in LABELS if c != "Cardiomegaly"]].isna().all().all()
    train, test = f[f["official_split"] == "trainval"], f[f["official_split"] == "test"]
    assert len(test) > 0 and not set(train["patient_id"]) & set(test["patient_id"])


@pytest.mark.parametrize("label", LABELS)
def test_each_label_changes_the_image(label):
    anat = random_anatomy(np.random.default_rng(11))
    normal = render(np.random.default_rng(5), anat, set(), 128).astype(int)
    sick = render(np.random.default_rng(5), anat, {label}, 128).astype(int)
    diff = sick - normal
    changed = np.abs(diff) > 6
    assert 0.001 < changed.mean() < 0.5, f"{label}: {changed.mean():.4f} of pixels changed"
    assert np.abs(diff[:8, :8]).max() == 0  # outside the body nothing moves: the change is the finding
    assert (np.sign(diff.sum()) < 0) == (label in DARKER), f"{label}: mean change {diff.mean():.2f}"


@pytest.mark.parametrize("label", LABELS)
def test_boxes_are_where_the_finding_was_drawn(label):
    anat = random_anatomy(np.random.default_rng(11))
    normal = render(np.random.default_rng(5), anat, set(), 128).astype(int)
    boxes: list = []
    sick = render(np.random.default_rng(5), anat, {label}, 128, boxes=boxes)
    assert np.array_equal(sick, render(np.random.default_rng(5), anat, {label}, 128))  # recording draws nothing
    if label not in BOXED_FINDINGS:
        assert boxes == []  # diffuse or bilateral: no one place to box
        return
    assert boxes and {b[0] for b in boxes} == {label}
    if label != "Nodule":
        assert len(boxes) <= 2  # one per lesion: an effusion may be bilateral
    diff = np.abs(sick.astype(int) - normal)
    inside = np.zeros(diff.shape, dtype=bool)
    for _, x, y, w, h in boxes:
        assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= 128 and y + h <= 128
        box = (slice(int(y), int(np.ceil(y + h))), slice(int(x), int(np.ceil(x + w))))
        assert diff[box].mean() > 8, f"{label}: box {x, y, w, h} holds no lesion"
        inside[box] = True
    changed = diff > 6
    assert changed[inside].sum() >= 0.5 * changed.sum(), f"{label}: most of what changed is outside its boxes"
    assert diff[inside].mean() > 25 * diff[~inside].mean()


def test_nih_layout_writes_nih_box_file(tmp_path, nih_sample):
    from common.explain import read_bboxes

    out = generate(tmp_path / "nih", "nih", n_images=60, image_size=64, progress=False)
    real = (nih_sample / BBOX_CSV).read_text().splitlines()
    lines = (out / BBOX_CSV).read_text().splitlines()
    assert lines[0] == real[0] and len(lines) > 20
    assert all(len(line.split(",")) == len(real[1].split(",")) == 6 for line in lines[1:])  # no trailing commas
    boxes = read_bboxes(out / BBOX_CSV)
    assert ((boxes[["x", "y"]] >= 0).all(axis=None) and (boxes.x + boxes.w <= 64).all()
            and (boxes.y + boxes.h <= 64).all() and (boxes[["w", "h"]] > 0).all(axis=None))
    frame = load_dataset(out).frame.set_index("image_id")
    # every box is of a finding the image has, and every image with a boxed finding has its box
    assert all(frame.loc[b.image_id, b.finding] == 1 for b in boxes.itertuples())
    boxed = {(b.image_id, b.finding) for b in boxes.itertuples()}
    expected = {(i, f) for i, row in frame.iterrows() for f in BOXED_FINDINGS if row[f] == 1}
    assert boxed == expected
    assert set(boxes["finding"]) <= set(BOXED_FINDINGS) and len(set(boxes["finding"])) >= 5
    # the cardiomegaly layout is the original project's: no box file
    assert not (generate(tmp_path / "c", "cardiomegaly", n_images=8, image_size=32, progress=False) / BBOX_CSV).exists()


def test_a_default_made_before_box_files_is_made_again(tmp_path, monkeypatch):
    import common.synthetic as synthetic

    monkeypatch.setenv("MEDIMAGING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", {"nih": 16, "cardiomegaly": 8})  # small for speed
    nih, _ = synthetic.ensure_default(progress=False)
    images = {p.name: p.read_bytes() for p in (nih / "images").glob("*.png")}
    text = (nih / BBOX_CSV).read_text()
    (nih / BBOX_CSV).unlink()  # as generated before boxes existed
    assert synthetic.ensure_default(progress=False)[0] == nih
    assert (nih / BBOX_CSV).read_text() == text
    assert {p.name: p.read_bytes() for p in (nih / "images").glob("*.png")} == images


def test_cardiomegaly_widens_the_heart():
    widths = {}
    for flag in (False, True):
        anat = random_anatomy(np.random.default_rng(3))
        img = render(np.random.default_rng(9), anat, {"Cardiomegaly"} if flag else set(), 256).astype(float)
        row = img[int(anat.heart_cy * 256)]  # a row through the heart: bright between the dark lungs
        centre = int(anat.cx * 256)
        bright = row > (row[centre] * 0.85)
        left = right = centre
        while left > 0 and bright[left - 1]:
            left -= 1
        while right < 255 and bright[right + 1]:
            right += 1
        widths[flag] = right - left
    assert widths[True] > 1.25 * widths[False]


def test_label_prevalence_and_co_occurrence():
    rng = np.random.default_rng(0)
    sets = [_sample_findings(rng) for _ in range(4000)]
    y = np.array([[name in s for name in LABELS] for s in sets], dtype=float)
    prevalence = y.mean(axis=0)
    assert ((prevalence > 0.07) & (prevalence < 0.25)).all(), dict(zip(LABELS, prevalence.round(3)))
    assert 0.2 < (y.sum(axis=1) == 0).mean() < 0.35  # a 'No Finding' share
    assert (y.sum(axis=1) >= 2).mean() > 0.3  # co-occurrence
    corr = np.corrcoef(y.T)
    i, j = LABELS.index("Effusion"), LABELS.index("Atelectasis")
    assert corr[i, j] > 0.05


def test_generate_refuses_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="layout"):
        generate(tmp_path / "new", layout="chexpert", progress=False)


def test_cli_writes_a_synthetic_dataset(tmp_path, capsys):
    assert cli.main(["data", "synthetic", str(tmp_path / "s"), "--n-images", "6", "--image-size", "48",
                     "--layout", "cardiomegaly"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(load_dataset(tmp_path / "s")) == 6
    assert cli.main(["data", "summary", str(tmp_path / "s"), "--size", "32"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
