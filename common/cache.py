"""Decode once: a resized uint8 image cache on disk, served as arrays aligned with the requested paths.

Decoding a 1024x1024 PNG costs ~10-15 ms per core; a training epoch must not pay it again. Each
image is decoded once (`read_grayscale` → `resize_gray`) into a per-size store:

    cache_root()/images-v1/<size>px/
      pixels.u8      PIXELS_FILE: slot k holds one size x size uint8 image at byte offset k * size * size
      index.sqlite   INDEX_FILE: path → (mtime_ns, file size, slot, ok, reason, crc): what each slot holds
      lock           serialises writers (DDP ranks, parallel runs)
      views/         aligned copies for path lists whose slots are not one contiguous run

An entry is valid while the file's mtime and size are unchanged; a changed file is re-decoded into
its own slot, nothing else. New pixels are flushed to disk before the index rows that point to them
are committed, in batches, so an interrupted build (even a SIGKILL) keeps what it finished and never
leaves an index row pointing at unwritten pixels. Unreadable files are remembered with their reason
until they change.

Never a wrong image: each entry stores the CRC-32 of its pixels, checked whenever the entry is
served (about 2 GB/s, a small cost beside decoding); a damaged slot or view is decoded or copied
again, and an index that is no longer a readable database is started again, each with a message.
The space for new slots is reserved before any pixel is written (`posix_fallocate`), so a full disk
is a `CacheWriteError` naming the store, never a crash (SIGBUS) half-way through a write.

At NIH's size (112,120 images, 1.8 GB at 128 px; `bench/bench_scale.py`): the decoding processes
write their images into the store themselves, so a build costs what decoding costs; checksums
and the Dataset's batches are read with pread, not through the memory map, so opening the store
or an epoch over it does not leave the whole store in a process's resident memory; a request
served from an existing aligned copy checks that copy's rows only.

The torch Dataset over the store is `common.cache_dataset.XrayTensorDataset` (also importable from
here, without importing torch until it is used); batched augmentation is `common.augment`.
"""
from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from common.images import read_resized
from common.io import WriteError
from common.paths import cache_root  # noqa: F401  (re-exported: common.cache.cache_root)

STORE_VERSION = "images-v1"
STORE_LOCK = "lock"  # in each <size>px store: held while decoding into it
PIXELS_FILE = "pixels.u8"
INDEX_FILE = "index.sqlite"
_MAX_VIEWS = 8  # aligned view files kept per size; older ones are deleted
_COMMIT_EVERY_S = 5.0  # commit finished entries at least this often during a long build...
_COMMIT_BATCH = 256  # ...once this many are pending (one transaction per entry would be slow)
_IN_PROCESS_BELOW = 16  # fewer files than this are decoded without starting a process pool


class CacheWriteError(WriteError):
    """The image store could not be written (a full disk, a read-only folder); the message names the
    store and what to do. What was decoded before stays valid: a rerun decodes only the rest."""


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class CachedImages:
    """Images aligned with the requested paths: `images[i]` is paths[i] at size x size (zeros if not ok)."""

    images: np.ndarray  # (N, size, size) uint8, a read-only np.memmap for N > 0
    ok: np.ndarray  # (N,) bool: decoded fine
    unreadable: list[tuple[str, str]]  # (path, reason) for each path that is not ok
    paths: list[str] = field(repr=False, default_factory=list)
    size: int = 0
    decoded: int = 0  # how many files this call decoded (0 when everything came from the cache)

    def __len__(self) -> int:
        return len(self.paths)


@contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path` (created with its folder) for the duration of the block."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class ImageCache:
    """A decode-once store of `size` x `size` grayscale images, shared by all runs on this machine."""

    def __init__(self, size: int, root: str | Path | None = None):
        if int(size) <= 0:
            raise ValueError(f"cache image size must be positive, got {size}")
        self.size = int(size)
        self.dir = Path(root) if root is not None else cache_root() / STORE_VERSION / f"{self.size}px"
        self.pixels_path = self.dir / PIXELS_FILE
        self.index_path = self.dir / INDEX_FILE
        self.lock_path = self.dir / STORE_LOCK
        self.views_dir = self.dir / "views"
        self._item = self.size * self.size

    # ------------------------------------------------------------------------------- index
    def _connect(self) -> sqlite3.Connection:
        self.dir.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.index_path, timeout=120)
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS entries (path TEXT PRIMARY KEY, mtime_ns INTEGER, fsize INTEGER, "
                "slot INTEGER, ok INTEGER, reason TEXT, crc INTEGER)"
            )
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
            if "crc" not in [r[1] for r in con.execute("PRAGMA table_info(entries)")]:
                try:  # a store from before checksums: its entries are decoded again, once
                    con.execute("ALTER TABLE entries ADD COLUMN crc INTEGER")
                except sqlite3.OperationalError as err:  # another process added it first
                    if "duplicate column" not in str(err):
                        raise
            con.commit()
        except BaseException:
            con.close()
            raise
        return con

    def _restart_if_damaged(self, err: sqlite3.DatabaseError) -> None:
        """The index is not a readable database (truncated, overwritten): start the store again.

        Under the lock, and only if it is still damaged then (another process may have restarted it
        already). Everything in the store is derived from the image files, so nothing is lost but time.
        """
        with file_lock(self.lock_path):
            try:
                con = sqlite3.connect(self.index_path, timeout=120)
                try:
                    healthy = con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                finally:
                    con.close()
            except sqlite3.DatabaseError:
                healthy = False
            if healthy:
                return
            print(f"image cache: the index {self.index_path} is damaged ({err}); starting the {self.size}px "
                  "store again (every image is decoded again, nothing else is lost)", file=sys.stderr)
            for name in (INDEX_FILE, f"{INDEX_FILE}-journal", PIXELS_FILE):
                (self.dir / name).unlink(missing_ok=True)
            for view in self.views_dir.glob("*.u8") if self.views_dir.is_dir() else ():
                view.unlink(missing_ok=True)

    def _write_error(self, err: BaseException) -> CacheWriteError:
        code = getattr(err, "errno", None) or errno.EIO
        full = code in (errno.ENOSPC, errno.EDQUOT)
        what = ("Free some space (`medimaging cache clear images` deletes the image store) or set $MEDIMAGING_CACHE "
                "to a folder on a larger disk" if full else "Fix the folder (or set $MEDIMAGING_CACHE elsewhere)")
        return CacheWriteError(code, (
            f"{self.dir}: cannot write the image cache ({err}). The images decoded before this are kept. "
            f"{what}, then run the same command again: it decodes only the images still missing."))

    @contextmanager
    def _writing(self):
        """Errors of writing the store (a full disk above all) as one CacheWriteError naming it."""
        try:
            yield
        except CacheWriteError:
            raise
        except sqlite3.OperationalError as err:
            if "full" in str(err) or "I/O" in str(err) or "readonly" in str(err):
                raise self._write_error(err) from err
            raise
        except OSError as err:
            raise self._write_error(err) from err

    def _entries(self, con: sqlite3.Connection, paths: Sequence[str]) -> dict[str, tuple]:
        """path -> (mtime_ns, fsize, slot, ok, reason, crc) for the paths the index knows."""
        rows: dict[str, tuple] = {}
        wanted = set(paths)
        columns = "path, mtime_ns, fsize, slot, ok, reason, crc"
        if len(wanted) > 5000:  # one scan beats thousands of lookups
            for r in con.execute(f"SELECT {columns} FROM entries"):
                if r[0] in wanted:
                    rows[r[0]] = r[1:]
            return rows
        unique = list(wanted)
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            q = f"SELECT {columns} FROM entries WHERE path IN ({','.join('?' * len(chunk))})"
            for r in con.execute(q, chunk):
                rows[r[0]] = r[1:]
        return rows

    def _damaged(self, entries: dict[str, tuple], paths: Sequence[str]) -> tuple[list[str], list[str]]:
        """(paths whose stored pixels fail their checksum or lie beyond the pixel file, paths stored
        before checksums existed) among the decodable `paths`."""
        checked, damaged, unchecked = [], [], []
        for p in paths:
            _, _, slot, ok, _, crc = entries[p]
            if not ok:
                continue  # served as zeros and flagged unreadable: no pixels to trust
            if crc is None:
                unchecked.append(p)
            else:
                checked.append(p)
        slots = np.fromiter((entries[p][2] for p in checked), dtype=np.int64, count=len(checked))
        intact = np.zeros(len(checked), dtype=bool)
        if self.pixels_path.is_file():
            for i, row in _read_rows(self.pixels_path, slots, self._item):
                intact[i] = zlib.crc32(row) == entries[checked[i]][5]
        damaged = [p for p, good in zip(checked, intact) if not good]
        return damaged, unchecked

    # -------------------------------------------------------------------------------- load
    def load(self, paths: Sequence[str | os.PathLike], workers: int | None = None,
             progress: bool = True) -> CachedImages:
        """Images for `paths` (decoding only new, changed or damaged entries, in parallel), aligned with `paths`."""
        paths = [os.path.abspath(os.fspath(p)) for p in paths]
        stats = {p: _stat(p) for p in dict.fromkeys(paths)}
        try:
            entries, decoded, images = self._update(paths, stats, workers, progress)
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError):  # locked, full, I/O: not a damaged file
                raise
            self._restart_if_damaged(err)
            entries, decoded, images = self._update(paths, stats, workers, progress)
        slots, request = _request(paths, stats, entries)
        ok = np.zeros(len(paths), dtype=bool)
        unreadable: list[tuple[str, str]] = []
        for i, (p, e) in enumerate(zip(paths, request)):
            if e is None:
                unreadable.append((p, "file not found"))
                continue
            ok[i] = bool(e[3])
            if not ok[i]:
                unreadable.append((p, e[4] or "unreadable"))
        if images is None:
            images = self._aligned(slots, request)
        return CachedImages(images=images, ok=ok, unreadable=unreadable, paths=paths, size=self.size,
                            decoded=decoded)

    def _update(self, paths: list[str], stats: dict[str, tuple | None], workers,
                progress) -> tuple[dict[str, tuple], int, np.ndarray | None]:
        """(The index entries of the existing paths, after decoding what is new, changed or damaged;
        how many were decoded; the request's aligned copy when it already exists and is intact, else None)."""
        with self._writing():  # a new store on a full disk fails here already
            con = self._connect()
        try:
            entries = self._entries(con, list(stats))
            todo = [p for p, st in stats.items() if st is not None and not _valid(entries.get(p), st)]
            if not todo:
                # an existing aligned copy is what will be served: checking its rows is the one
                # check (the store's slots are not read, so not checked, for this request)
                view = self._existing_view(*_request(paths, stats, entries))
                if view is not None:
                    return entries, 0, view
            stale = set(todo)
            current = [p for p in entries if p not in stale and stats[p] is not None]
            damaged, unchecked = self._damaged(entries, current)
            if not (todo or damaged or unchecked):
                return entries, 0, None
            with file_lock(self.lock_path):
                # another process may have decoded (or repaired) them while we waited for the lock
                entries.update(self._entries(con, todo + damaged + unchecked))
                todo = [p for p in todo if not _valid(entries.get(p), stats[p])]
                again = [p for p in damaged + unchecked if _valid(entries.get(p), stats[p])]
                damaged, unchecked = self._damaged(entries, again)
                if damaged:
                    print(f"image cache: {len(damaged)} stored image(s) of the {self.size}px store failed their "
                          f"checksum ({self.pixels_path} was damaged); decoding them again, e.g. {damaged[0]}",
                          file=sys.stderr)
                todo += damaged + unchecked
                decoded = self._decode(con, todo, stats, entries, workers, progress) if todo else 0
            return entries, decoded, None
        finally:
            con.close()

    def _grow(self, slots: int) -> None:
        """Make the pixel file hold `slots` slots, its space reserved now: writing into a sparse file
        on a full disk kills the process (SIGBUS) where this raises ENOSPC before anything is written."""
        need = slots * self._item
        fd = os.open(self.pixels_path, os.O_RDWR | os.O_CREAT, 0o666)  # not O_APPEND: fallocate's emulation refuses it
        try:
            have = os.fstat(fd).st_size
            if have < need:
                try:
                    os.posix_fallocate(fd, have, need - have)
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.ftruncate(fd, need)  # a file system without fallocate: sparse growth, as before
        finally:
            os.close(fd)

    def _decode(self, con, todo, stats, entries, workers, progress) -> int:
        """Decode `todo` into slots (a changed or damaged entry keeps its slot) and commit their index rows."""
        with self._writing():
            cur = con.execute("SELECT value FROM meta WHERE key='next_slot'").fetchone()
            next_slot = int(cur[0]) if cur else 0
            slot_of = {}
            for p in todo:
                old = entries.get(p)
                if old is not None:
                    slot_of[p] = int(old[2])
                else:
                    slot_of[p] = next_slot
                    next_slot += 1
            self._grow(next_slot)
            # reserve the new slots before writing them: if we die half-way they are wasted, never double-booked
            con.execute("INSERT OR REPLACE INTO meta VALUES ('next_slot', ?)", (next_slot,))
            con.commit()
            fd = os.open(self.pixels_path, os.O_RDWR)
            try:
                self._fill(fd, con, todo, slot_of, stats, entries, workers, progress)
            finally:
                os.close(fd)
        return len(todo)

    def _fill(self, fd, con, todo, slot_of, stats, entries, workers, progress) -> None:
        """Decode `todo` into their slots of the pixel file (open as `fd`), committing index rows in
        batches after their pixels.

        The decoding processes write each image into its slot themselves (`_decode_into`) and send
        back only (ok, reason, crc): the parent does no per-pixel work, so the build runs at the
        workers' decode rate instead of queueing behind one process copying every image.
        """
        workers = default_workers() if workers is None else max(1, int(workers))
        pending: list[tuple] = []
        last_commit = time.monotonic()

        def commit():
            nonlocal last_commit
            if not pending:
                return
            os.fsync(fd)  # pixels reach the file before the rows that point to them
            con.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", pending)
            con.commit()
            for row in pending:
                entries[row[0]] = row[1:]
            pending.clear()
            last_commit = time.monotonic()

        bar = tqdm(total=len(todo), desc=f"caching images at {self.size}px", unit="img",
                   disable=not progress, leave=False)
        executor = None
        slots = [slot_of[p] for p in todo]
        try:
            import multiprocessing

            # a daemonic process (e.g. a DataLoader worker) may not start children: decode in-process
            if workers == 1 or len(todo) < _IN_PROCESS_BELOW or multiprocessing.current_process().daemon:
                results = map(_decode_into, todo, repeat(self.size), slots, repeat(fd))
            else:
                # fork where available: spawn/forkserver re-import the caller's __main__ in every
                # worker, which re-runs an unguarded trainer script; the workers only touch Pillow
                # and numpy, so the parent's threads (torch, tqdm) are not a fork hazard for them
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                executor = ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                               mp_context=multiprocessing.get_context(method),
                                               initializer=_open_pixels, initargs=(str(self.pixels_path),))
                chunk = max(1, min(64, len(todo) // (workers * 8)))
                results = executor.map(_decode_into, todo, repeat(self.size), slots, chunksize=chunk)
            for p, slot, (ok, reason, crc) in zip(todo, slots, results):
                mtime, fsize = stats[p]
                pending.append((p, mtime, fsize, slot, int(ok), reason, crc))
                bar.update(1)
                if len(pending) >= _COMMIT_BATCH and time.monotonic() - last_commit > _COMMIT_EVERY_S:
                    commit()
            commit()
        finally:
            bar.close()
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            commit()  # keep whatever finished before an interruption

    # ------------------------------------------------------------------------------ aligned
    def _view_path(self, slots: np.ndarray, entries: list) -> Path:
        """Where the aligned copy of a request lives: named by its slots and their files' stamps."""
        key = hashlib.sha1()
        key.update(slots.tobytes())
        key.update(repr([(e[0], e[1]) if e is not None else None for e in entries]).encode())
        return self.views_dir / f"{key.hexdigest()[:24]}.u8"

    def _existing_view(self, slots: np.ndarray, entries: list) -> np.ndarray | None:
        """The aligned copy of a request that is not one run of slots, if it exists and every row
        passes its checksum; a damaged one is deleted (and None returned, so it is copied again)."""
        n, s = len(slots), self.size
        if n == 0 or _contiguous(slots):
            return None
        view = self._view_path(slots, entries)
        if not (view.is_file() and view.stat().st_size == n * self._item):
            return None
        if _rows_match(view, entries, self._item):
            os.utime(view)
            return np.memmap(view, dtype=np.uint8, mode="r", shape=(n, s, s))
        print(f"image cache: the aligned copy {view} was damaged; copying it again", file=sys.stderr)
        view.unlink(missing_ok=True)
        return None

    def _aligned(self, slots: np.ndarray, entries: list) -> np.ndarray:
        n, s = len(slots), self.size
        if n == 0:
            return np.zeros((0, s, s), dtype=np.uint8)
        if _contiguous(slots):
            # the common case (a dataset cached in its own order): a zero-copy window on the store
            first = int(slots[0])
            return np.memmap(self.pixels_path, dtype=np.uint8, mode="r", offset=first * self._item, shape=(n, s, s))
        existing = self._existing_view(slots, entries)  # made meanwhile by another process, or just decoded
        if existing is not None:
            return existing
        view = self._view_path(slots, entries)
        with self._writing():
            self._write_view(view, slots)
        self._prune_views(keep=view)
        return np.memmap(view, dtype=np.uint8, mode="r", shape=(n, s, s))

    def _write_view(self, view: Path, slots: np.ndarray) -> None:
        n, s = len(slots), self.size
        self.views_dir.mkdir(parents=True, exist_ok=True)
        total = max(int(slots.max()) + 1, 1)
        src = np.memmap(self.pixels_path, dtype=np.uint8, mode="r", shape=(total, s, s)) if slots.max() >= 0 else None
        fd, tmp = tempfile.mkstemp(prefix=".view.", suffix=".tmp", dir=self.views_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                zero = np.zeros((s, s), dtype=np.uint8)
                step = max(1, (64 << 20) // self._item)  # gather in ~64 MB chunks
                for i in range(0, n, step):
                    part = slots[i:i + step]
                    block = np.empty((len(part), s, s), dtype=np.uint8)
                    good = part >= 0
                    if good.any():
                        block[good] = src[part[good]]
                    block[~good] = zero
                    f.write(block.tobytes())
            os.replace(tmp, view)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _prune_views(self, keep: Path) -> None:
        views = sorted(self.views_dir.glob("*.u8"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [v for v in views if v != keep][_MAX_VIEWS - 1:]:
            old.unlink(missing_ok=True)


def _request(paths: list[str], stats: dict[str, tuple | None], entries: dict[str, tuple]) -> tuple[np.ndarray, list]:
    """(Slot of each requested path, -1 where none; its entry, None for a missing file or entry)."""
    request = [entries.get(p) if stats[p] is not None else None for p in paths]
    slots = np.fromiter((e[2] if e is not None else -1 for e in request), dtype=np.int64, count=len(paths))
    return slots, request


def _contiguous(slots: np.ndarray) -> bool:
    first = int(slots[0]) if len(slots) else -1
    return first >= 0 and bool(np.array_equal(slots, np.arange(first, first + len(slots))))


_worker_pixels: int | None = None  # in a decoding process: the pixel file it writes into (`_open_pixels`)


def _open_pixels(pixels_path: str) -> None:
    """A decoding process's initializer: open the pixel file once for all its `_decode_into` calls."""
    global _worker_pixels
    _worker_pixels = os.open(pixels_path, os.O_RDWR)


def _decode_into(path: str, size: int, slot: int, fd: int | None = None) -> tuple[bool, str | None, int | None]:
    """Decode + resize `path` into `slot` of the pixel file (zeros when unreadable); (ok, reason,
    CRC-32 of the pixels). The slot's space is already reserved (`ImageCache._grow`)."""
    pixels, reason = read_resized(path, size)
    data = pixels if pixels is not None else bytes(size * size)
    fd = _worker_pixels if fd is None else fd
    if os.pwrite(fd, data, slot * size * size) != len(data):
        raise OSError(errno.ENOSPC, f"short write into slot {slot}")
    return pixels is not None, reason, (zlib.crc32(pixels) if pixels is not None else None)


def _valid(entry: tuple | None, st: tuple[int, int]) -> bool:
    return entry is not None and entry[0] == st[0] and entry[1] == st[1]


def _rows_match(view: Path, entries: list, item: int) -> bool:
    """Every row of an aligned copy holds what its entry's checksum says (zeros where not decodable)."""
    seen = 0
    for i, row in _read_rows(view, np.arange(len(entries), dtype=np.int64), item):
        seen += 1
        e = entries[i]
        if e is not None and e[3] and e[5] is not None:
            if zlib.crc32(row) != e[5]:
                return False
        elif np.frombuffer(row, dtype=np.uint8).any():
            return False
    return seen == len(entries)


_READ_BLOCK = 16 << 20  # bytes per read when checking stored rows


def _read_rows(path: Path, slots: np.ndarray, item: int):
    """(i, row) for each `slots[i]` that lies inside the file of `item`-byte rows, read in runs of
    nearby slots with pread, not through a memory map: mapped pages stay in the resident memory of
    the process that touched them, so checksumming a 1.8 GB store through np.memmap made every
    process that opened it (a trainer, each DataLoader worker) 1.8 GB bigger. `row` is a memoryview
    valid until the next one."""
    if not len(slots):
        return
    have = os.path.getsize(path) // item
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    inside = int(np.searchsorted(ordered, have, side="left"))
    step = max(1, _READ_BLOCK // item)
    buf = memoryview(bytearray(step * item))
    fd = os.open(path, os.O_RDONLY)
    try:
        k = 0
        while k < inside:
            first = int(ordered[k])
            j = k + 1  # extend the run while the next slot is near (a few rows read for nothing at most)
            while j < inside and ordered[j] - first < step and ordered[j] - ordered[j - 1] <= 8:
                j += 1
            span = int(ordered[j - 1]) - first + 1
            got = os.preadv(fd, [buf[:span * item]], first * item)
            for t in range(k, j):
                r = int(ordered[t]) - first
                if (r + 1) * item <= got:
                    yield int(order[t]), buf[r * item:(r + 1) * item]
            k = j
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ torch side
# XrayTensorDataset (common.cache_dataset) imports torch, so its module is imported on first use of
# the name, not with this one: the cache, `medimaging data` and the synthetic generator (and their
# worker processes) never pay torch's import time.
def __getattr__(name: str):
    if name == "XrayTensorDataset":
        from common.cache_dataset import XrayTensorDataset

        return XrayTensorDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
