"""Training throughput: the end-to-end input path against the model step alone.

    python bench/bench_train.py                                   # CPU, efficientnet_b0 at 224, batch 16
    python bench/bench_train.py --device cuda --bf16 --batch-size 64

Both paths run the same optimiser step (`common.train.masked_bce`, AdamW) on the same model:
  model step alone   pre-normalised float tensors already on the device, no loader
  end to end         uint8 cache (common.cache) -> DataLoader (workers) -> to device -> normalise +
                     random affine (common.train.BatchTransform) -> step, as `fit` does
The two are measured in alternating rounds (so load from other processes hits both alike) and the
table gives images/s and the ratio end-to-end / model-only; the target is >= 0.9, i.e. data loading
hidden behind compute. The image cache is built (or reused) first and its time reported apart.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common.cache import ImageCache, XrayTensorDataset
from common.data import load_dataset
from common.labels import LABELS
from common.models import build_model, model_input_config
from common.paths import sample_data_dir
from common.train import BatchTransform, ResumableSampler, masked_bce

DEFAULT_DATA = sample_data_dir() / "nih-sample"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"dataset folder (default: {DEFAULT_DATA})")
    p.add_argument("--model", default="efficientnet_b0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps per path per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (model-only, end-to-end)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first round")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the end-to-end path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast + channels_last (CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.bf16 and not cuda:
        raise SystemExit("--bf16 is for CUDA: on CPU bf16 autocast is slower, drop the flag")

    data = load_dataset(args.data, quiet=True)
    t0 = time.perf_counter()
    cached = ImageCache(args.image_size).load(data.frame["path"].tolist(), progress=True)
    cache_s = time.perf_counter() - t0
    keep = np.flatnonzero(cached.ok)
    y = data.frame[list(LABELS)].to_numpy(dtype=np.float32)

    torch.manual_seed(0)
    model = build_model(args.model, num_labels=len(LABELS), image_size=args.image_size).to(device)
    if args.bf16:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    transform = BatchTransform(model_input_config(model, image_size=args.image_size), device,
                               channels_last=args.bf16)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16)

    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        with amp:
            logits = model(x)
        masked_bce(logits, t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # model step alone: one fixed, already normalised batch on the device
    g = torch.Generator().manual_seed(0)
    fixed_x = transform(torch.from_numpy(np.asarray(cached.images[keep[: args.batch_size]]))[:, None], g)
    fixed_y = torch.from_numpy(y[keep[: args.batch_size]]).to(device)

    # end to end: the loader `fit` uses, over the cache, augmenting every batch
    dataset = XrayTensorDataset(cached.images, y, indices=keep)
    sampler = ResumableSampler(dataset, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=cuda,
                                         persistent_workers=args.workers > 0, generator=torch.Generator())
    epoch = 0

    def batches():
        nonlocal epoch
        while True:
            sampler.set_epoch(epoch)
            epoch += 1
            yield from loader

    stream = batches()

    def run_model_only(n: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            step(fixed_x, fixed_y)
        sync()
        return time.perf_counter() - t

    def run_end_to_end(n: int) -> float:
        sync()
        t = time.perf_counter()
        for i in range(n):
            x, target = next(stream)
            step(transform(x, torch.Generator().manual_seed(i)), target.to(device, non_blocking=True))
        sync()
        return time.perf_counter() - t

    run_model_only(args.warmup)
    run_end_to_end(args.warmup)  # starts the workers, fills their prefetch queue
    model_s, e2e_s = [], []
    for _ in range(args.rounds):
        model_s.append(run_model_only(args.steps))
        e2e_s.append(run_end_to_end(args.steps))

    n_img = args.steps * args.batch_size
    model_ips = n_img / statistics.median(model_s)
    e2e_ips = n_img / statistics.median(e2e_s)
    threads = torch.get_num_threads()
    print(f"\n{args.model} at {args.image_size}px, batch {args.batch_size}, {device}"
          f"{' bf16 + channels_last' if args.bf16 else ' fp32'}, {threads} torch thread(s), "
          f"{args.workers} loader workers; {len(keep)} cached images from {args.data.name} "
          f"(cache load {cache_s:.1f} s); median of {args.rounds} rounds x {args.steps} steps\n")
    print("| path | images/s | ms/step |")
    print("|---|---:|---:|")
    print(f"| model step alone (in-memory tensors) | {model_ips:.1f} | {1000 * args.batch_size / model_ips:.1f} |")
    print(f"| end to end (cache -> loader -> augment -> step) | {e2e_ips:.1f} | {1000 * args.batch_size / e2e_ips:.1f} |")
    ratio = e2e_ips / model_ips
    print(f"\nratio end-to-end / model-only: {ratio:.3f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
