"""common.images: every pixel format NIH users meet reads to 2-D uint8; broken files say why."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from common.images import MAX_PIXELS, UnreadableImage, read_grayscale, read_resized
from filemakers import bomb_png, dicom_bytes

RGBA_IDS = ("00001369_000.png", "00004934_000.png", "00005224_000.png", "00005813_000.png")


@pytest.fixture
def gradient() -> np.ndarray:
    return np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))  # 64 x 128


def test_real_grayscale_and_rgba_files(nih_sample):
    gray = read_grayscale(nih_sample / "images" / "00000211_000.png")
    assert gray.shape == (1024, 1024) and gray.dtype == np.uint8 and gray.std() > 10
    for image_id in RGBA_IDS:
        path = nih_sample / "images" / image_id
        assert Image.open(path).mode == "RGBA"  # the fixture really is RGBA
        out = read_grayscale(path)
        rgb = np.asarray(Image.open(path))[..., 0]
        assert out.shape == (1024, 1024) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, rgb)  # opaque, grey-replicated: same pixels as a channel


def test_sixteen_bit_is_scaled_by_its_own_range(tmp_path):
    a = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit-like data
    path = tmp_path / "sixteen.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    out = read_grayscale(path)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order of intensities kept


@pytest.mark.parametrize("fmt", ["rgb", "rgba", "la", "palette", "palette_transparent", "jpeg", "one_bit"])
def test_formats_read_to_gray(tmp_path, gradient, fmt):
    g = Image.fromarray(gradient)
    path = tmp_path / ("x.jpg" if fmt == "jpeg" else "x.png")
    if fmt == "rgb":
        g.convert("RGB").save(path)
    elif fmt == "rgba":
        g.convert("RGBA").save(path)
    elif fmt == "la":
        g.convert("LA").save(path)
    elif fmt == "palette":
        g.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=256).save(path)
    elif fmt == "palette_transparent":
        p = g.convert("P")
        p.info["transparency"] = 255
        p.save(path, transparency=255)
    elif fmt == "jpeg":
        g.convert("L").save(path, quality=95)
    elif fmt == "one_bit":
        g.convert("1").save(path)
    out = read_grayscale(path)
    assert out.shape == gradient.shape and out.dtype == np.uint8
    if fmt == "one_bit":
        assert set(np.unique(out)) <= {0, 255}
    else:
        assert np.abs(out.astype(int) - gradient.astype(int)).max() <= (12 if fmt in ("jpeg", "palette") else 1)


def test_alpha_is_composited_over_black(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:4, :, 3] = 0  # top half fully transparent
    path = tmp_path / "half.png"
    Image.fromarray(rgba).save(path)
    out = read_grayscale(path)
    assert (out[:4] == 0).all() and (out[4:] == 200).all()


def test_bytes_and_file_objects(nih_sample):
    path = nih_sample / "images" / "00000211_000.png"
    data = path.read_bytes()
    expected = read_grayscale(path)
    np.testing.assert_array_equal(read_grayscale(data), expected)
    np.testing.assert_array_equal(read_grayscale(io.BytesIO(data)), expected)


def _broken_files(tmp_path, nih_sample) -> dict:
    real = (nih_sample / "images" / "00000211_000.png").read_bytes()
    files = {
        "truncated": (real[: len(real) // 3], "truncat"),
        "zero_byte": (b"", "empty"),
        "text": (b"Image Index,Finding Labels\nthis is not a png\n", "not an image"),
        "bomb": (bomb_png(100_000, 100_000), "too large"),
        "big": (bomb_png(8000, 8000), "too large"),
    }
    out = {}
    for name, (data, reason) in files.items():
        p = tmp_path / f"{name}.png"
        p.write_bytes(data)
        out[name] = (p, reason)
    return out


def test_broken_files_raise_with_reasons(tmp_path, nih_sample):
    for name, (path, reason) in _broken_files(tmp_path, nih_sample).items():
        with pytest.raises(UnreadableImage) as info:
            read_grayscale(path)
        assert info.value.path == str(path)
        assert reason in info.value.reason.lower(), (name, info.value.reason)
        assert str(path) in str(info.value)
    with pytest.raises(UnreadableImage, match="not found"):
        read_grayscale(tmp_path / "absent.png")
    assert 8000 * 8000 > MAX_PIXELS


def test_limit_is_adjustable_and_error_pickles(tmp_path, gradient):
    path = tmp_path / "g.png"
    Image.fromarray(gradient).save(path)
    with pytest.raises(UnreadableImage, match="too large"):
        read_grayscale(path, max_pixels=100)
    err = pickle.loads(pickle.dumps(UnreadableImage("a.png", "because")))
    assert (err.path, err.reason) == ("a.png", "because")


def test_read_resized_reports_instead_of_raising(tmp_path, nih_sample):
    ok, reason = read_resized(str(nih_sample / "images" / "00000211_000.png"), 32)
    assert reason is None and len(ok) == 32 * 32
    (tmp_path / "z.png").write_bytes(b"")
    pixels, reason = read_resized(str(tmp_path / "z.png"), 32)
    assert pixels is None and "empty" in reason


def test_dicom_reads_like_the_png_it_came_from(tmp_path, nih_sample):
    """8- and 16-bit DICOM, MONOCHROME2 and (inverted) MONOCHROME1, from a path, bytes or a file
    object, by the DICM marker or the .dcm name; `load_image` (every predictor) takes them too."""
    pytest.importorskip("pydicom", reason="DICOM is optional: it needs pydicom")
    from common.serving import load_image

    src = read_grayscale(nih_sample / "images" / "00000211_000.png")
    expected = np.rint((src.astype(float) - src.min()) * 255.0 / (src.max() - src.min()))
    cases = {"8bit.dcm": dicom_bytes(src, bits_allocated=8), "16bit.dcm": dicom_bytes(src.astype(np.uint16) * 257),
             "mono1": dicom_bytes(65535 - src.astype(np.uint16) * 257, "MONOCHROME1")}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for source in (tmp_path / name, data, io.BytesIO(data)):
            gray = read_grayscale(source)
            assert gray.dtype == np.uint8 and gray.shape == src.shape
            assert np.abs(gray.astype(float) - expected).max() <= 1, (name, type(source))
        assert np.array_equal(load_image(tmp_path / name), read_grayscale(tmp_path / name))
    (tmp_path / "fake.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(UnreadableImage, match="not a readable DICOM file"):
        read_grayscale(tmp_path / "fake.dcm")
    with pytest.raises(UnreadableImage, match="blank"):
        read_grayscale(dicom_bytes(np.full((8, 8), 7, np.uint8), bits_allocated=8))


def test_dicom_without_pydicom_says_how_to_get_it(monkeypatch, tmp_path):
    from common import images

    monkeypatch.setattr(images.importlib.util, "find_spec", lambda name: None)  # as if not installed
    assert not images.dicom_available()
    with pytest.raises(UnreadableImage, match=r"pip install pydicom") as err:
        read_grayscale(b"\0" * 128 + b"DICM" + b"\0" * 64, name="scan.dcm")
    assert err.value.path == "scan.dcm"
    (tmp_path / "a.dcm").write_bytes(b"\0" * 32)  # named .dcm, no marker: still DICOM, still explained
    with pytest.raises(UnreadableImage, match=r"pip install pydicom"):
        read_grayscale(tmp_path / "a.dcm")
