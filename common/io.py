"""Writing files so that a crash never leaves half of one, and loading weights that cannot run code.

A leaf module (no project imports): `common.runs`, `common.models` and every other writer of a
run's files build on it. Files are written to a temporary file in the same folder and renamed;
torch files are read with `weights_only=True`, weights preferably from safetensors.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Suffixes of weights files, in the order a folder (or a folder of downloads) is searched for one.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# mkstemp creates 0600 files; written files get the process's ordinary mode instead. Reading the
# umask means setting it, so it is read once here.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file + rename."""
    _atomic_write(Path(path), lambda f: f.write(data))


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

    _atomic_write(Path(path), lambda f: torch.save(obj, f))


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
