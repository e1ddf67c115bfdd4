"""torchxrayvision's published chest X-ray weights (`--pretrained xrv:NAME`): the file, and its tensors.

    path = weights_file(Weights.parse("xrv:densenet121-res224-all"))  # cache, download, or a clear error
    state = load_state(path)            # {name: tensor}, read with weights_only=True, nothing executed

Which file a name means (its URL) and where torchxrayvision keeps it (`~/.torchxrayvision/models_data/`)
come from the torchxrayvision package itself (`xrv.models.model_urls`, `xrv.utils.get_cache_dir`),
so the suite finds the files that package downloaded and the other way round. The weights then go
into timm's `densenet121` / `resnet50` with one input channel, which have exactly the layers and
names of torchxrayvision's DenseNet-121 and (torchvision) ResNet-50 feature extractors
(`common.models.build_model`); the input convention is `common.weights.InputConvention`.

Safety: torchxrayvision's DenseNet files are whole pickled models, which its own loader reads with
`torch.load(weights_only=False)`: a pickle can run any code, so that path is never called here.
`load_state` reads the file with `weights_only=True`. A pickled model needs its module classes as
pickle globals; each class name under `torchxrayvision.`, `torch.nn.modules.`, `torch.nn.backends.`
or `torchvision.models.`, and the DenseNet / ResNet classes themselves wherever a training script
defined them, is allow-listed for that one load *as an inert stand-in* (`_Inert`: no
constructor, no methods, its pickled attributes only), never as the real class, so no model code
runs while reading; the parameters and buffers are then collected from the stand-ins' `_parameters`
/ `_buffers` / `_modules` into a state dict. Any other global (os.system, builtins.eval, ...) is
refused before anything is built. The ResNet-50 file is already a plain state dict.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common.weights import XRV, PretrainedWeightsUnavailable, Weights, reachable

__all__ = ["weights_file", "load_state", "published_names", "weights_url", "cache_dir", "UnsafeWeightsFile"]

# pickle globals a pickled torchxrayvision model may name: module classes only
_MODULE_CLASS = re.compile(
    r"^(?:torchxrayvision|torch\.nn\.modules|torch\.nn\.backends|torchvision\.models)(?:\.\w+)*\.[A-Za-z_]\w*$")
# ... and the architecture's own classes under whatever module the training script had them in
_ARCH_CLASSES = {"DenseNet", "_DenseBlock", "_DenseLayer", "_Transition", "ResNet", "Bottleneck", "BasicBlock"}
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_MAX_CLASSES = 256  # a DenseNet-121 pickle names about ten; more means something else


class UnsafeWeightsFile(ValueError):
    """The file needs something other than tensors and module containers to be read: refused."""


def _xrv():
    """The torchxrayvision package. Its `models` module calls warnings.filterwarnings("ignore") on
    import, which would silence every warning of the process: the filters are restored after it."""
    try:
        with warnings.catch_warnings():
            import torchxrayvision
    except ImportError as err:
        raise ImportError(f"--pretrained xrv:...: the torchxrayvision package is not installed ({err}); "
                          f"pip install torchxrayvision") from err
    return torchxrayvision


def published_names() -> list[str]:
    """torchxrayvision's DenseNet-121 and ResNet-50 weights names (xrv:NAME), from its registry."""
    return sorted(k for k in _xrv().models.model_urls if k.startswith(("densenet121-", "resnet50-")))


def weights_url(name: str) -> str:
    """Where torchxrayvision downloads weights `name` from."""
    urls = _xrv().models.model_urls
    if name not in urls:
        raise ValueError(f"pretrained='xrv:{name}': torchxrayvision has no weights of that name; "
                         f"published: {', '.join('xrv:' + n for n in published_names())}")
    return urls[name]["weights_url"]


def cache_dir() -> Path:
    """torchxrayvision's download folder (`~/.torchxrayvision/models_data/`)."""
    return Path(_xrv().utils.get_cache_dir()).expanduser()


def _unavailable(name: str, url: str, target: Path, why: str) -> PretrainedWeightsUnavailable:
    return PretrainedWeightsUnavailable(
        f"pretrained='xrv:{name}': torchxrayvision's weights file {target.name} is not on this machine and "
        f"cannot be downloaded ({why}). Download {url} where there is internet and put it at {target} "
        f"(e.g. `wget {url} -O {target}`), or pass its path: --pretrained xrv:{name}@/path/to/{target.name}.")


def weights_file(weights: Weights) -> Path:
    """The local file of torchxrayvision weights: the given @PATH, else torchxrayvision's cache,
    downloaded there first when the host can be reached; else PretrainedWeightsUnavailable naming
    the URL and the place to put the file."""
    if weights.kind != XRV:
        raise ValueError(f"{weights}: not torchxrayvision weights")
    if weights.file:  # a file downloaded by hand: torchxrayvision is needed only to say where it comes from
        path = Path(weights.file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained='xrv:{weights.source}@{weights.file}': no such file "
                                    f"(torchxrayvision publishes it at {weights_url(weights.source)})")
        return path
    url = weights_url(weights.source)
    target = cache_dir() / Path(urlparse(url).path).name
    if target.is_file():
        return target
    host = urlparse(url).hostname or ""
    if not reachable(host):
        raise _unavailable(weights.source, url, target, f"{host} cannot be reached")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _xrv().utils.download(url, str(target))  # to TARGET.part, moved into place when complete
    except Exception as err:  # requests' errors, HTTP errors, a full disk
        raise _unavailable(weights.source, url, target, f"download failed: {err}") from err
    return target


# ------------------------------------------------------------------------------ reading the file


class _Inert:
    """Stands in for a pickled module class: keeps the pickled attributes, runs nothing."""

    _pickled_as = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # a pickled module is rebuilt without calling its class; a call with arguments is a payload
        if args or kwargs:
            raise UnsafeWeightsFile(f"{self._pickled_as} is called with arguments, which no pickled module needs")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeWeightsFile(f"{self._pickled_as}: unexpected pickled state of type {type(state).__name__}")
        self.__dict__.update(state)


def _stand_in(name: str) -> type:
    module, _, qualname = name.rpartition(".")
    return type(qualname, (_Inert,), {"__module__": module, "_pickled_as": name})


def _refused(path: Path, what: str) -> UnsafeWeightsFile:
    return UnsafeWeightsFile(
        f"{path}: refused: reading it needs {what}, which is neither a tensor nor a module class of "
        f"torchxrayvision / torch.nn. A weights file must not run code when loaded; download the file "
        f"again from torchxrayvision's release page.")


def _reason(err: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice around it."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    picked = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (picked or lines or [type(err).__name__])[0]


def _load_inert(path: Path) -> Any:
    """torch.load(weights_only=True) with each module class the pickle names mapped to an inert stand-in."""
    import torch

    stand_ins: dict[str, type] = {}
    while True:
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in stand_ins.items()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = _UNSUPPORTED.search(str(err))
            if found is None:  # a blocked module (os, subprocess, ...), a call of something unknown
                named = _GLOBAL.search(str(err))
                raise _refused(path, f"the global {named.group(1)}" if named else _reason(err)) from None
            name = found.group(1)
            allowed = _MODULE_CLASS.match(name) or name.rpartition(".")[2] in _ARCH_CLASSES
            if name in stand_ins or not allowed or len(stand_ins) >= _MAX_CLASSES:
                raise _refused(path, f"the global {name}") from None
            stand_ins[name] = _stand_in(name)


def _module_state(module: _Inert, prefix: str = "") -> dict:
    """A stand-in module tree -> its state dict (parameters and persistent buffers, as nn.Module would)."""
    d = module.__dict__
    skip = set(d.get("_non_persistent_buffers_set") or ())
    out = {}
    for key, value in (d.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + key] = value.detach()
    for key, value in (d.get("_buffers") or {}).items():
        if value is not None and key not in skip:
            out[prefix + key] = value
    for key, child in (d.get("_modules") or {}).items():
        if isinstance(child, _Inert):
            out.update(_module_state(child, f"{prefix}{key}."))
    return out


def load_state(path: str | os.PathLike) -> dict:
    """The tensors of a torchxrayvision weights file (a pickled model or a state dict) by name,
    read safely (see the module docstring). The xrv ResNet wrapper's `model.` prefix is removed."""
    import torch

    path = Path(path)
    obj = _load_inert(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, _Inert):
        state = _module_state(obj)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a torchxrayvision model or state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    if sum(k.startswith("model.") for k in state) * 2 > len(state):  # xrv.models.ResNet's own state dict
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state
