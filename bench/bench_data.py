"""Data pipeline benchmark: the original project's per-item decode path against the decode-once cache.

    .venv/bin/python bench/bench_data.py [--data DIR] [--size 224] [--epochs 2] [--batch-size 16]

naive   what the original project did every epoch, for every item: PIL open, convert to RGB,
        resize, random rotation of ±20 degrees, to tensor, normalise (torchvision transforms in a
        Dataset, one process)
cached  common.cache: the images are decoded once into the memory-mapped cache (the build is timed
        separately, in a fresh cache folder), then each epoch reads uint8 batches from the memmap
        (XrayTensorDataset) and augments them batched on the tensor (random_affine_batch: rotation,
        zoom, shift), scaled and normalised the same way

Prints one markdown table: images/s per epoch for both paths and their ratio (target: >= 20x).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common.paths import sample_data_dir

DEFAULT_DATA = sample_data_dir() / "nih-sample"


def naive_epoch(paths, size, mean, std, batch_size, seed) -> float:
    """Seconds for one epoch of the original per-item pipeline."""
    import torch
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomRotation(20),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])

    class Naive(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(Image.open(paths[i]).convert("RGB"))

    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(Naive(), batch_size=batch_size, shuffle=True, num_workers=0)
    t = time.perf_counter()
    n = 0
    for x in loader:
        n += len(x)
    assert n == len(paths)
    return time.perf_counter() - t


def cached_epoch(images, labels, mean, std, batch_size, seed) -> float:
    """Seconds for one epoch from the memmap cache with batched augmentation."""
    import torch

    from common.augment import random_affine_batch
    from common.cache import XrayTensorDataset

    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(XrayTensorDataset(images, labels), batch_size=batch_size, shuffle=True,
                                         num_workers=0, generator=g)
    # (x - mean) / std per channel as one fused multiply-add: x * (1 / std) + (-mean / std)
    scale = (1.0 / torch.tensor(std)).view(1, 3, 1, 1)
    bias = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)
    t = time.perf_counter()
    n = 0
    for x, _ in loader:
        x = random_affine_batch(x.float().div_(255.0), g)
        x = torch.addcmul(bias, x, scale)  # [B, 1, S, S] → normalised [B, 3, S, S]
        n += len(x)
    assert n == len(images)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"dataset folder (default: {DEFAULT_DATA})")
    p.add_argument("--size", type=int, default=224, help="model input size (default: 224)")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed per path (default: 2)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16, as the study)")
    p.add_argument("--workers", type=int, default=None, help="cache build processes (default: all cores)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    args = p.parse_args(argv)

    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from common.cache import ImageCache, default_workers
    from common.data import load_dataset

    torch.set_num_threads(1)  # both epoch paths run in one process, one thread: a like-for-like comparison
    t = time.perf_counter()
    data = load_dataset(args.data, quiet=True)
    load_s = time.perf_counter() - t
    paths = data.frame["path"].tolist()[: args.limit]
    labels = data.labels[: len(paths)]
    mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)  # what the study used

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    try:
        cache = ImageCache(args.size, root=tmp)
        t = time.perf_counter()
        cached = cache.load(paths, workers=args.workers, progress=True)
        build = time.perf_counter() - t
        t = time.perf_counter()
        again = cache.load(paths, progress=False)
        reload_s = time.perf_counter() - t
        assert again.decoded == 0 and cached.ok.all(), cached.unreadable[:3]
        naive = [naive_epoch(paths, args.size, mean, std, args.batch_size, e) for e in range(args.epochs)]
        fast = [cached_epoch(cached.images, labels, mean, std, args.batch_size, e) for e in range(args.epochs)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(paths)
    naive_ips = n / (sum(naive) / len(naive))
    fast_ips = n / (sum(fast) / len(fast))
    workers = args.workers or default_workers()
    print(f"\n{n} images from {args.data}, {args.size} px, batch {args.batch_size}, {args.epochs} epochs, "
          f"{os.cpu_count()} CPUs (cache build: {workers} processes; epochs: one process, one thread)\n")
    print(f"load_dataset: {load_s:.2f} s ({len(data.frame)} images found, {data.rows_without_image} csv rows "
          f"without an image)\n")
    print("| path | one-off cost | s / epoch | images / s per epoch | vs naive |")
    print("|---|---|---|---|---|")
    print(f"| naive (PIL decode + resize + rotate every item) | - | {sum(naive) / len(naive):.2f} | "
          f"{naive_ips:,.0f} | 1.0x |")
    print(f"| cached (memmap + batched affine) | build {build:.2f} s ({n / build:,.0f} img/s), "
          f"reopen {reload_s * 1000:.0f} ms | {sum(fast) / len(fast):.3f} | {fast_ips:,.0f} | "
          f"{fast_ips / naive_ips:.1f}x |")
    print(f"\nper-epoch speed-up: {fast_ips / naive_ips:.1f}x (target >= 20x); the build pays for itself "
          f"after {build / max(sum(naive) / len(naive) - sum(fast) / len(fast), 1e-9):.2f} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
