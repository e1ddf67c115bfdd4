"""The torch Dataset over the decoded-image cache: item i is (uint8 image [1, S, S], labels [L]).

`XrayTensorDataset` serves `CachedImages.images` (common.cache) or any (N, S, S) uint8 array. From
a file-backed store it reads rows with pread, one call per run of consecutive rows, instead of
through the memory map, so an epoch does not leave the store in each DataLoader worker's resident
memory; pickled for a spawned worker, the memmap travels as a file reference, not a copy.

This module imports torch; `common.cache` re-exports `XrayTensorDataset` and imports this module on
first use of the name, so the cache itself loads without torch.
"""
from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["XrayTensorDataset"]


class XrayTensorDataset(torch.utils.data.Dataset):
    """Item i → (uint8 tensor [1, S, S], float32 tensor [L] with NaN for unlabelled).

    `images` (N, S, S) uint8 (e.g. `CachedImages.images`) and `labels` (N, L) are aligned; the
    optional `indices` selects the rows this dataset exposes (a split) without copying the images.
    """

    def __init__(self, images: np.ndarray, labels, indices: Sequence[int] | None = None):
        labels = np.asarray(labels, dtype=np.float32)
        if labels.ndim == 1:
            labels = labels[:, None]
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) must have the same length")
        self.images = images
        self.labels = labels
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        self._file = _memmap_file(images)
        self._fd: tuple[int, int] | None = None  # (pid, fd): opened lazily in each process

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        # DataLoader workers started by spawn/forkserver receive the dataset pickled; a pickled
        # np.memmap is a full in-memory copy, so send where the file is and re-open it instead
        state = dict(self.__dict__)
        state["_fd"] = None
        if self._file is not None:
            state["images"] = ("memmap", *self._file)
        return state

    def __setstate__(self, state):
        im = state["images"]
        if isinstance(im, tuple) and im and im[0] == "memmap":
            _, filename, offset, shape, dtype = im
            state["images"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        state.setdefault("_file", _memmap_file(state["images"]))
        state.setdefault("_fd", None)
        self.__dict__.update(state)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and fd[0] == os.getpid():
            os.close(fd[1])

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Image rows `rows` (sorted) as a new (n, S, S) uint8 array.

        From a file-backed cache, read with pread (one call per run of consecutive rows)
        rather than through the memory map: mapped pages count in the resident memory of
        every process that touched them, so an epoch over a memmap grows each DataLoader
        worker by the whole cache (1.8 GB for NIH at 128 px), where a read copies out of the
        page cache and leaves nothing behind.
        """
        block = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        if self._file is None or not len(rows):
            block[:] = self.images[rows]
            return block
        if self._fd is None or self._fd[0] != os.getpid():  # a forked worker gets its own
            self._fd = (os.getpid(), os.open(self._file[0], os.O_RDONLY))
        fd, item = self._fd[1], block[0].nbytes
        offset = self._file[1]
        out = block.reshape(len(rows), -1)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            want = (b - a) * item
            if os.preadv(fd, [out[a:b]], offset + int(rows[a]) * item) != want:
                raise OSError(errno.EIO, f"{self._file[0]}: short read of the image cache")
        return block

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        x = torch.from_numpy(self._read(np.array([j], dtype=np.int64))[0])[None]
        return x, torch.from_numpy(self.labels[j].copy())

    def __getitems__(self, idx: Sequence[int]):
        # one read per batch (per run of rows) instead of one per item (DataLoader uses it when present)
        rows = self.indices[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # sorted reads are sequential in the file
        block = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        block[order] = self._read(rows[order])
        x = torch.from_numpy(block)[:, None]
        y = torch.from_numpy(self.labels[rows])
        return [(x[k], y[k]) for k in range(len(rows))]


def _memmap_file(images) -> tuple | None:
    """(file name, offset, shape, dtype) of a read-only file-backed np.memmap, else None."""
    if isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap) and images.filename \
            and images.dtype == np.uint8 and images.ndim == 3:
        return images.filename, images.offset, images.shape, images.dtype.str
    return None
