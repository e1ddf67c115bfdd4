"""Where a backbone's starting weights come from: one small typed value, from the knobs to the model.

    Weights.parse(False)                  # random initialisation (also None, "none", "random")
    Weights.parse(True)                   # timm's hub (also "hub", "imagenet"; needs internet)
    Weights.parse("w.safetensors")        # a local weights file, or a folder holding one
    Weights.parse("https://host/w.pth")   # downloaded once into torch hub's cache

`TrainConfig.pretrained` stores `Weights.config_value()` (False / True / the path or URL), the
form config.json has always had, so old runs read back and run keys do not change;
`TrainConfig.weights` and `common.models.build_model` take it through `parse`. A profile's
folder of downloaded weights holds one file or folder per model: `for_model(name)` picks it
(`find_local_weights`). Torch-free, so configurations and `--help` stay light.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.io import WEIGHT_SUFFIXES

RANDOM = "random"
HUB = "hub"
LOCAL = "local"
URL = "url"

_RANDOM_WORDS = ("none", "random")
_HUB_WORDS = ("hub", "imagenet")


@dataclass(frozen=True)
class Weights:
    """kind: RANDOM, HUB, LOCAL (a file or folder) or URL; source: the path or URL ("" otherwise)."""

    kind: str = RANDOM
    source: str = ""

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
        return cls(URL if text.startswith(("http://", "https://")) else LOCAL, text)

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM

    def config_value(self) -> bool | str:
        """What config.json and `TrainConfig.pretrained` store: False, True, or the path / URL."""
        return {RANDOM: False, HUB: True}.get(self.kind, self.source)

    def for_model(self, model_name: str) -> Weights:
        """This value for one backbone: a folder of downloaded weights gives that model's file or
        folder (`find_local_weights`; FileNotFoundError when it has none); anything else is itself."""
        if self.kind == LOCAL and Path(self.source).expanduser().is_dir():
            return Weights(LOCAL, str(find_local_weights(self.source, model_name)))
        return self

    def describe(self) -> str:
        """How tables name it: "random initialisation", "timm hub weights", "pretrained weights from X"."""
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
