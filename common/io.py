"""Writing files so that a crash never leaves half of one, and loading weights that cannot run code.

A leaf module (no project imports): `common.runs`, `common.models` and every other writer of a
run's files build on it. Files are written to a temporary file in the same folder and renamed, so a
failed write (a full disk: `WriteError`, naming the file) leaves the previous file as it was;
torch files are read with `weights_only=True`, weights preferably from safetensors, so a
checkpoint carrying a pickled payload is refused before any of it runs.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Suffixes of weights files, in the order a folder (or a folder of downloads) is searched for one.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@functools.cache
def _umask() -> int:
    """The process's umask, for the mode of written files (mkstemp makes them 0600). Linux shows it
    in /proc/self/status; elsewhere reading it means setting it for a moment, once, when first needed."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only folder). The message names the file and
    says that its previous version, if any, is unchanged; `errno` is the system's."""


def full_disk_hint(err: BaseException) -> str:
    """What to do after a write failed: " Free some space ..." for a full disk or quota, else ""."""
    return (" Free some space and run the same command again."
            if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else "")


def write_error(path: str | os.PathLike, err: OSError) -> WriteError:
    """`err` while writing `path`, as the WriteError users see."""
    path = Path(path)
    what = err.strerror or str(err)
    hint = full_disk_hint(err)
    kept = "is unchanged" if path.exists() else "was not written"
    return WriteError(err.errno or errno.EIO, f"{path}: cannot write ({what}); the previous {path.name} {kept}.{hint}")


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staged_path(path: str | Path) -> Path:
    """Where a new version of `path` waits, beside it, until `commit_staged` puts it in place: files
    that belong together (an export folder) are all written first, then renamed, which a full disk
    cannot fail, so a failure half-way leaves the previous set whole."""
    path = Path(path)
    return path.with_name(f".{path.name}.staged")


def commit_staged(folder: str | Path, names: list[str], remove: list[str] = ()) -> None:
    """Rename the staged `names` in `folder` into place, in order, then delete `remove`."""
    for name in names:
        os.replace(staged_path(Path(folder) / name), Path(folder) / name)
    for name in remove:
        (Path(folder) / name).unlink(missing_ok=True)


def discard_staged(folder: str | Path, names: list[str]) -> None:
    for name in names:
        staged_path(Path(folder) / name).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file + rename."""
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_png(path: str | Path, fig, dpi: int = 120) -> None:
    """A matplotlib Figure as a PNG, written atomically (a half-written plot never replaces a good one)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` through a temporary file + rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON (numpy scalars/arrays and paths converted), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def load_json(path: str | Path) -> Any:
    """A JSON file's content; FileNotFoundError / ValueError name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temporary file + rename (the checkpoint is never half-written)."""
    import torch  # heavy: only the writers of checkpoints pay for it

    # serialised in memory first: torch's own file writer reports a full disk as an opaque
    # RuntimeError ("unexpected pos"), a plain write as ENOSPC, which WriteError explains
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(Path(path), lambda f: f.write(buf.getbuffer()))


def torch_load_safe(path: str | Path, map_location: str = "cpu") -> Any:
    """Load a torch checkpoint with weights_only=True: tensors and plain containers only."""
    import torch  # heavy: only the readers of checkpoints pay for it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError with long texts
        raise ValueError(
            f"{path}: cannot be loaded safely (weights_only=True): {str(err).splitlines()[0]}. "
            "Only checkpoints of tensors and plain Python containers are accepted."
        ) from None


def save_weights(state_dict: dict, path: str | Path) -> None:
    """Model weights as safetensors, written atomically."""
    from safetensors.torch import save  # heavy (torch): only the writers of weights pay for it

    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(state))


def weights_in_folder(folder: str | Path) -> Path:
    """The weights file a folder holds: the first .safetensors by name, else .pth, .pt, .bin."""
    folder = Path(folder)
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if found:
            return found[0]
    raise FileNotFoundError(f"{folder}: no {', '.join(WEIGHT_SUFFIXES)} weights file in this folder")


def load_weights(path: str | Path) -> dict:
    """A state dict from .safetensors, or from a torch file (weights_only) holding one.

    A folder loads the file `weights_in_folder` picks. A torch file may be a bare state dict or a
    checkpoint with a "model" / "state_dict" / "model_state_dict" entry.
    """
    path = Path(path)
    if path.is_dir():
        path = weights_in_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # heavy (torch): only the readers of weights pay for it

        return load_file(str(path))
    obj = torch_load_safe(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
