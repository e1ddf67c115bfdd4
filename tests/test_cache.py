"""common.cache: decode once, reuse, re-decode only what changed, survive broken files and interruptions."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import common.cache as cache_mod
from common.augment import random_affine_batch
from common.cache import ImageCache, XrayTensorDataset, cache_root
from common.data import load_dataset
from common.images import read_grayscale
from common.preprocess import resize_gray


@pytest.fixture(scope="module")
def cardio_paths(cardiomegaly_64):
    return load_dataset(cardiomegaly_64).frame["path"].tolist()


@pytest.fixture
def small_copies(tmp_path, cardio_paths):
    """Twenty real 64 px files copied into tmp (so the test may touch and rewrite them)."""
    out = []
    for p in cardio_paths[:20]:
        dest = tmp_path / "imgs" / os.path.basename(p)
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(p, dest)
        out.append(str(dest))
    return out


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMAGING_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert ImageCache(32).dir == tmp_path / "c" / "images-v1" / "32px"
    monkeypatch.delenv("MEDIMAGING_CACHE")
    assert cache_root() == cache_root().home() / ".cache" / "medimaging"


def test_real_data_decoded_once_then_reused(nih_sample):
    # the session cache is shared with `data summary` tests: decode nih-sample at 224 px once
    paths = load_dataset(nih_sample, quiet=True).frame["path"].tolist()
    cache = ImageCache(224)
    first = cache.load(paths, workers=2, progress=False)
    assert first.images.shape == (400, 224, 224) and first.images.dtype == np.uint8
    assert isinstance(first.images, np.memmap) and first.ok.all() and first.unreadable == []
    second = cache.load(paths, progress=False)
    assert second.decoded == 0  # nothing decoded the second time
    np.testing.assert_array_equal(second.images, first.images)
    for i in (0, 123, 399):  # exactly the one preprocessing pipeline
        np.testing.assert_array_equal(first.images[i], resize_gray(read_grayscale(paths[i]), 224))
    rgba = [i for i, p in enumerate(paths) if p.endswith("00005813_000.png")]
    assert first.ok[rgba].all() and first.images[rgba[0]].std() > 10
    # another order is served from the same entries, aligned with the new order
    rev = cache.load(paths[::-1], progress=False)
    assert rev.decoded == 0
    np.testing.assert_array_equal(rev.images[0], first.images[-1])
    np.testing.assert_array_equal(rev.images[-1], first.images[0])


def test_only_changed_files_are_decoded_again(tmp_path, small_copies):
    cache = ImageCache(32, root=tmp_path / "store")
    first = cache.load(small_copies, workers=2, progress=False)
    assert first.decoded == 20 and first.ok.all()
    before = np.array(first.images)
    assert cache.load(small_copies, progress=False).decoded == 0
    st = os.stat(small_copies[3])
    os.utime(small_copies[3], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched
    again = cache.load(small_copies, progress=False)
    assert again.decoded == 1
    np.testing.assert_array_equal(again.images, before)  # same content, same pixels
    shutil.copy(small_copies[0], small_copies[5])  # file 5 now holds file 0's image
    os.utime(small_copies[5], ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    changed = cache.load(small_copies, progress=False)
    assert changed.decoded == 1
    np.testing.assert_array_equal(changed.images[5], before[0])
    np.testing.assert_array_equal(np.delete(np.asarray(changed.images), 5, 0), np.delete(before, 5, 0))
    # a fresh ImageCache object (another run) sees the same store
    assert ImageCache(32, root=tmp_path / "store").load(small_copies, progress=False).decoded == 0


def test_broken_files_are_reported_remembered_and_skipped(tmp_path, small_copies):
    broken = {
        "trunc.png": open(small_copies[0], "rb").read()[:200],
        "zero.png": b"",
        "text.png": b"hello, I am text\n",
    }
    paths = list(small_copies[:4])
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    paths.append(str(tmp_path / "gone.png"))
    cache = ImageCache(32, root=tmp_path / "store")
    res = cache.load(paths, workers=1, progress=False)
    assert res.ok.tolist() == [True] * 4 + [False] * 4
    reasons = dict(res.unreadable)
    assert "truncat" in reasons[paths[4]] or "corrupt" in reasons[paths[4]]
    assert "empty" in reasons[paths[5]] and "not an image" in reasons[paths[6]]
    assert reasons[paths[7]] == "file not found"
    assert not res.images[4:].any()  # unreadable rows are zeros
    again = cache.load(paths, progress=False)
    assert again.decoded == 0 and dict(again.unreadable) == reasons  # remembered, not re-decoded
    shutil.copy(small_copies[5], paths[6])  # the text file is replaced by an image: decoded again
    fixed = cache.load(paths, progress=False)
    assert fixed.decoded == 1 and fixed.ok[6]


def test_interrupted_build_keeps_finished_entries(tmp_path, small_copies, monkeypatch):
    calls = {"n": 0}
    real = cache_mod.read_resized

    def flaky(path, size):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(cache_mod, "read_resized", flaky)
    cache = ImageCache(32, root=tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        cache.load(small_copies, workers=1, progress=False)
    monkeypatch.setattr(cache_mod, "read_resized", real)
    res = cache.load(small_copies, workers=1, progress=False)
    assert res.decoded == 20 - 7 and res.ok.all()  # the 7 finished before the interruption were kept
    for i in (0, 6, 7, 19):
        np.testing.assert_array_equal(res.images[i], resize_gray(read_grayscale(small_copies[i]), 32))


def test_empty_and_duplicate_paths(tmp_path, small_copies):
    cache = ImageCache(16, root=tmp_path / "store")
    assert cache.load([], progress=False).images.shape == (0, 16, 16)
    res = cache.load([small_copies[0], small_copies[1], small_copies[0]], progress=False)
    assert res.decoded == 2 and res.ok.all()
    np.testing.assert_array_equal(res.images[0], res.images[2])


def test_tensor_dataset_items_and_batches(tmp_path, small_copies):
    res = ImageCache(32, root=tmp_path / "store").load(small_copies, progress=False)
    labels = np.random.default_rng(0).integers(0, 2, size=(20, 3)).astype(np.float32)
    labels[2, 1] = np.nan
    ds = XrayTensorDataset(res.images, labels)
    x, y = ds[2]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 32, 32) and y.dtype == torch.float32
    assert torch.isnan(y[1]) and torch.equal(x[0], torch.from_numpy(np.array(res.images[2])))
    sub = XrayTensorDataset(res.images, labels, indices=[5, 1, 9])
    assert len(sub) == 3 and torch.equal(sub[0][0], ds[5][0])
    loader = torch.utils.data.DataLoader(sub, batch_size=3, shuffle=False)
    xb, yb = next(iter(loader))
    assert tuple(xb.shape) == (3, 1, 32, 32)
    assert all(torch.equal(xb[k], sub[k][0]) for k in range(3))
    np.testing.assert_array_equal(yb.numpy(), labels[[5, 1, 9]])
    with pytest.raises(ValueError, match="same length"):
        XrayTensorDataset(res.images, labels[:3])
    # pickled for spawned DataLoader workers: the memmap travels as a file reference, not a copy
    blob = pickle.dumps(sub)
    assert len(blob) < res.images.nbytes // 4
    back = pickle.loads(blob)
    assert isinstance(back.images, np.memmap) and all(torch.equal(back[k][0], sub[k][0]) for k in range(3))


def test_random_affine_batch_is_deterministic_and_augments():
    x = torch.rand(8, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    a = random_affine_batch(x, torch.Generator().manual_seed(0))
    b = random_affine_batch(x, torch.Generator().manual_seed(0))
    c = random_affine_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert (a - x).abs().mean() > 0.05
    same = random_affine_batch(x, torch.Generator().manual_seed(0), degrees=0.0, scale=(1.0, 1.0), translate=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    # a 20 degree rotation of a white image leaves black (fill=0) corners, the centre white
    white = random_affine_batch(torch.ones(4, 1, 64, 64), torch.Generator().manual_seed(3))
    assert (white[:, :, 30:34, 30:34] > 0.99).all() and white.amin() < 0.5
    filled = random_affine_batch(torch.ones(4, 1, 64, 64), torch.Generator().manual_seed(3), fill=1.0)
    torch.testing.assert_close(filled, torch.ones(4, 1, 64, 64))
    with pytest.raises(TypeError, match="float"):
        random_affine_batch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.Generator())


def test_random_affine_grid_matches_torch_affine_grid():
    """The hand-built sampling grid is F.affine_grid's, for a non-square batch too."""
    import torch.nn.functional as F

    x = torch.rand(4, 2, 30, 44, generator=torch.Generator().manual_seed(2))
    got = random_affine_batch(x, torch.Generator().manual_seed(5), degrees=15, scale=(0.8, 1.2), translate=0.1)
    u = torch.rand(4, 4, generator=torch.Generator().manual_seed(5))  # the same draws, in the same order
    angle = torch.deg2rad((u[:, 0] * 2 - 1) * 15)
    zoom = 0.8 + u[:, 1] * 0.4
    tx, ty = (u[:, 2] * 2 - 1) * 0.2, (u[:, 3] * 2 - 1) * 0.2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin * 30 / 44, tx], 1), torch.stack([sin * 44 / 30, cos, ty], 1)], 1)
    want = F.grid_sample(x, F.affine_grid(theta, [4, 2, 30, 44], align_corners=False), align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
