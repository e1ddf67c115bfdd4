"""Where a backbone's starting weights come from: one small typed value, from the knobs to the model.

    Weights.parse(False)                  # random initialisation (also None, "none", "random")
    Weights.parse(True)                   # timm's hub (also "hub", "imagenet"; needs internet)
    Weights.parse("w.safetensors")        # a local weights file, or a folder holding one
    Weights.parse("https://host/w.pth")   # downloaded once into torch hub's cache
    Weights.parse("xrv:densenet121-res224-all")             # torchxrayvision's published weights
    Weights.parse("xrv:densenet121-res224-all@/dl/w.pt")    # ... from a file downloaded by hand

`TrainConfig.pretrained` stores `Weights.config_value()` (False / True / the path or URL), the
form config.json has always had, so old runs read back and run keys do not change;
`TrainConfig.weights` and `common.models.build_model` take it through `parse`. A profile's
folder of downloaded weights holds one file or folder per model: `for_model(name)` picks it
(`find_local_weights`). Torch-free, so configurations and `--help` stay light.

Chest X-ray weights (`xrv:NAME`, torchxrayvision's published DenseNet-121 and ResNet-50 weights)
come with their own input convention (`InputConvention`: architecture, one channel, size and the
[-1024, 1024] intensity range): `Weights.convention` is the one place the suite reads it from, and
`common.models.model_input_config` turns it into a run's config.json["input"], which training,
prediction, export and the app all read. The file itself is found and read by `common.xrv_weights`.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from common.io import WEIGHT_SUFFIXES

RANDOM = "random"
HUB = "hub"
LOCAL = "local"
URL = "url"
XRV = "xrv"

XRV_PREFIX = "xrv:"
# torchxrayvision's published names: ARCH-resSIZE-DATA, e.g. densenet121-res224-all, resnet50-res512-all
_XRV_NAME = re.compile(r"^(?P<arch>densenet121|resnet50)-res(?P<size>\d+)-(?P<data>[A-Za-z0-9_]+)$")
# torchxrayvision scales 8-bit pixels x to (2 x / 255 - 1) * 1024, i.e. [-1024, 1024]
# (`xrv.datasets.normalize(img, 255)`); the suite's (x / 255 - mean) / std is exactly that with
# mean 0.5 and std 1 / 2048 (a power of two, so no rounding beyond x / 255's).
XRV_MEAN = (0.5,)
XRV_STD = (1.0 / 2048.0,)

_RANDOM_WORDS = ("none", "random")
_HUB_WORDS = ("hub", "imagenet")


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be fetched (offline, or none exist for the model)."""


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can a TCP connection to host:port be opened? (Checked first so offline fails in ~0 s, not
    after a download library's minute of retries.)"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy the direct probe says nothing; let the download try
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class InputConvention:
    """What a family of pretrained weights expects of its input: the architecture (a timm name with
    the same layers and names), channels, square size, and the per-channel mean / std applied to
    pixels scaled to [0, 1]. Weights without one take timm's data config for the model."""

    model_name: str
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Weights:
    """kind: RANDOM, HUB, LOCAL (a file or folder), URL or XRV; source: the path or URL, or for XRV
    torchxrayvision's weights name ("" otherwise); file: for XRV, a local copy of its file ("": the
    torchxrayvision cache)."""

    kind: str = RANDOM
    source: str = ""
    file: str = ""

    @classmethod
    def parse(cls, value: Weights | bool | str | Path | None) -> Weights:
        """A Weights from any of its spellings (see the module docstring); words are case-insensitive."""
        if isinstance(value, Weights):
            return value
        if value is None or value is False:
            return cls(RANDOM)
        if value is True:
            return cls(HUB)
        if not isinstance(value, (str, Path)):
            raise TypeError(f"pretrained={value!r}: expected False, True, None, a path or an http(s) URL")
        text = str(value)
        if text.strip().lower() in _RANDOM_WORDS:
            return cls(RANDOM)
        if text.strip().lower() in _HUB_WORDS:
            return cls(HUB)
        if not text:
            raise ValueError("pretrained='': expected False, True, a path or an http(s) URL")
        if text.lower().startswith(XRV_PREFIX):
            return cls._parse_xrv(text[len(XRV_PREFIX):].strip())
        return cls(URL if text.startswith(("http://", "https://")) else LOCAL, text)

    @classmethod
    def _parse_xrv(cls, text: str) -> Weights:
        name, _, file = text.partition("@")
        name = name.strip()
        if not _XRV_NAME.match(name):
            raise ValueError(
                f"pretrained='xrv:{text}': expected torchxrayvision's weights name, e.g. "
                f"xrv:densenet121-res224-all (also -nih, -chex, -pc, -mimic_nb, -mimic_ch, -rsna) or "
                f"xrv:resnet50-res512-all, optionally followed by @/path/to/the/downloaded/file.pt")
        if "@" in text and not file.strip():
            raise ValueError(f"pretrained='xrv:{text}': nothing after '@' (expected the path of the weights file)")
        return cls(XRV, name, file.strip())

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM

    @property
    def convention(self) -> InputConvention | None:
        """The input these weights expect (torchxrayvision's: one channel, [-1024, 1024], its size), or
        None when the model's own timm data config decides (random, hub, local and URL weights)."""
        if self.kind != XRV:
            return None
        m = _XRV_NAME.match(self.source)
        return InputConvention(model_name=m["arch"], in_chans=1, image_size=int(m["size"]), mean=XRV_MEAN, std=XRV_STD)

    def config_value(self) -> bool | str:
        """What config.json and `TrainConfig.pretrained` store: False, True, the path / URL, or
        "xrv:NAME" ("xrv:NAME@FILE" for a file downloaded by hand)."""
        if self.kind == XRV:
            return XRV_PREFIX + self.source + (f"@{self.file}" if self.file else "")
        return {RANDOM: False, HUB: True}.get(self.kind, self.source)

    def for_model(self, model_name: str) -> Weights:
        """This value for one backbone: a folder of downloaded weights gives that model's file or
        folder (`find_local_weights`; FileNotFoundError when it has none); anything else is itself."""
        if self.kind == LOCAL and Path(self.source).expanduser().is_dir():
            return Weights(LOCAL, str(find_local_weights(self.source, model_name)))
        return self

    def describe(self) -> str:
        """How tables name it: "random initialisation", "timm hub weights", "pretrained weights from X",
        "torchxrayvision weights NAME"."""
        if self.kind == XRV:
            return f"torchxrayvision weights {self.source}"
        return {RANDOM: "random initialisation", HUB: "timm hub weights"}.get(
            self.kind, f"pretrained weights from {self.source}")


def find_local_weights(folder: str | Path, model_name: str) -> Path:
    """The pretrained weights of `model_name` in a folder of downloaded weights (offline machines).

    Looked for in this order, first with the full timm name (`tf_efficientnet_b4.ns_jft_in1k`),
    then with the architecture alone (`tf_efficientnet_b4`): a file `NAME.safetensors` (or .pth,
    .pt, .bin), then a folder `NAME/` holding one weights file, e.g. what
    `hf download timm/NAME --local-dir FOLDER/NAME` writes.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"weights folder {str(root)!r} does not exist (expected one file or folder per "
                                f"model, e.g. {model_name}.safetensors)")
    names = list(dict.fromkeys([model_name, model_name.split(".", 1)[0]]))
    tried: list[str] = []
    for name in names:
        for suffix in WEIGHT_SUFFIXES:
            tried.append(name + suffix)
            if (root / (name + suffix)).is_file():
                return root / (name + suffix)
        tried.append(name + "/")
        sub = root / name
        if sub.is_dir() and any(f.suffix in WEIGHT_SUFFIXES and f.is_file() for f in sub.iterdir()):
            return sub
    raise FileNotFoundError(
        f"weights folder {str(root)!r} has no weights for {model_name!r} (looked for {', '.join(tried)}). "
        f"Download them where there is internet (e.g. `hf download timm/{model_name} --local-dir "
        f"{root / model_name}`) or train from random initialisation.")
