"""What the suite keeps on disk, and clearing it: the one inventory `medimaging cache` prints.

Three things live under the cache folder ($MEDIMAGING_CACHE, else ~/.cache/medimaging):

  images-v1/<size>px   decoded images, one memory-mapped store per image size (rebuilt on demand)
  synthetic-v1/        the embedded default dataset (regenerated on demand, byte-identical)
  runs/                finished trainings and compressions that `medimaging reproduce`, the
                       notebooks and the trainer files reuse ($MEDIMAGING_RUNS moves it)

A run's folder is touched each time it is reused, so "last used" is its newest mtime. Deleting
skips whatever another process holds (a training in progress, an image store being written).
"""
from __future__ import annotations

import fcntl
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from common import runs as runfiles
from common.cache import INDEX_FILE, STORE_LOCK, STORE_VERSION, cache_root
from common.experiments.notebooks import runs_dir
from common.experiments.runcache import RUN_LOCK, is_finished
from common.synthetic import synthetic_root

KINDS = ("runs", "images", "synthetic")


@dataclass
class Entry:
    kind: str  # runs | images | synthetic
    name: str
    path: str
    bytes: int
    last_used: float  # seconds since the epoch
    finished: bool | None  # runs only
    detail: str


def _size_and_mtime(path: Path) -> tuple[int, float]:
    """Bytes on disk below `path` and the newest mtime of it or anything in it."""
    total, newest = 0, path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            st = p.lstat()
        except OSError:  # deleted while we walked
            continue
        total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
        newest = max(newest, st.st_mtime)
    return total, newest


def _run_detail(run: Path) -> tuple[bool, str]:
    finished = is_finished(run)
    try:
        cfg = json.loads((run / runfiles.CONFIG).read_text())
        train = cfg.get("train") or {}
        detail = f"{train.get('model_name', '?')} {train.get('task', '?')} {train.get('image_size', '?')}px"
    except (OSError, ValueError):
        detail = "no config.json"
    return finished, detail


def inventory(cache: Path | None = None, runs: Path | None = None) -> list[Entry]:
    """Every entry of the cache (see the module docstring), runs first, largest first within a kind."""
    cache = Path(cache) if cache is not None else cache_root()
    runs = Path(runs) if runs is not None else runs_dir()
    synthetic = cache / synthetic_root().name
    entries: list[Entry] = []
    for kind, root in (("runs", runs), ("images", cache / STORE_VERSION), ("synthetic", synthetic)):
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            size, newest = _size_and_mtime(path)
            finished, detail = _run_detail(path) if kind == "runs" else (None, "")
            if kind == "images":
                detail = f"{_count_images(path)} images"
            elif kind == "synthetic":
                detail = f"{sum(1 for _ in path.rglob('*.png'))} images, {path.name} layout"
            entries.append(Entry(kind, path.name, str(path), size, newest, finished, detail))
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(entries, key=lambda e: (order[e.kind], -e.bytes))


def _count_images(store: Path) -> int:
    index = store / INDEX_FILE
    if not index.is_file():
        return 0
    try:
        con = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT COUNT(*) FROM entries WHERE ok = 1").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def human_bytes(n: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as the app, export and compression tables print sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def human_age(seconds: float) -> str:
    """How long ago, in the largest whole unit: "3 d ago", "just now"."""
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def format_inventory(entries: list[Entry], cache: Path, runs: Path, now: float | None = None) -> str:
    """The inventory as `medimaging cache list` prints it: one line per entry, then totals per kind."""
    now = time.time() if now is None else now
    lines = [f"cache: {cache}", f"runs:  {runs}", ""]
    if not entries:
        return "\n".join(lines + ["(empty)"])
    lines.append(f"{'kind':<10}{'size':>10}  {'last used':<12}{'state':<11}name")
    for e in entries:
        state = "" if e.finished is None else "finished" if e.finished else "unfinished"
        lines.append(f"{e.kind:<10}{human_bytes(e.bytes):>10}  {human_age(now - e.last_used):<12}{state:<11}"
                     f"{e.name}  ({e.detail})")
    lines.append("")
    for kind in KINDS:
        part = [e for e in entries if e.kind == kind]
        if part:
            lines.append(f"{kind:<10}{human_bytes(sum(e.bytes for e in part)):>10}  {len(part)} entries")
    lines.append(f"{'total':<10}{human_bytes(sum(e.bytes for e in entries)):>10}")
    return "\n".join(lines)


def _lock_file(entry: Entry) -> Path | None:
    """The file a writer of this entry holds an flock on (see runcache.run_lock / common.cache)."""
    if entry.kind == "runs":
        return Path(entry.path) / RUN_LOCK
    if entry.kind == "images":
        return Path(entry.path) / STORE_LOCK
    return None


def delete(entry: Entry) -> str | None:
    """Delete one entry unless another process holds its lock; None when deleted, else why not."""
    lock = _lock_file(entry)
    if lock is None or not lock.is_file():
        shutil.rmtree(entry.path)
        return None
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "in use by another process (a training or decode in progress)"
        shutil.rmtree(entry.path)  # the open handle keeps the lock until we are done
    return None


def select(entries: list[Entry], what: str, older_than_days: float | None = None, unfinished: bool = False,
           now: float | None = None) -> list[Entry]:
    """The entries of one kind (or "all"), optionally only those unused for a while or unfinished runs."""
    now = time.time() if now is None else now
    chosen = [e for e in entries if what == "all" or e.kind == what]
    if older_than_days is not None:
        chosen = [e for e in chosen if now - e.last_used > older_than_days * 86400]
    if unfinished:
        chosen = [e for e in chosen if e.kind == "runs" and e.finished is False]
    return chosen
