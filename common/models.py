"""Models: any timm backbone by name + the study's 2-layer MLP head (or a linear one).

    model = build_model("tf_efficientnet_b4", num_labels=14)          # random init (warns)
    model = build_model("resnet50", pretrained=True)                  # timm hub (online)
    model = build_model("resnet50", pretrained="weights.safetensors") # a local file or folder
    model = build_model("densenet121", in_chans=1, pretrained="xrv:densenet121-res224-all")  # chest X-ray weights
    load_backbone_state(model, state)    # backbone weights kept by name and shape, head fresh
    freeze(model, 2)                     # freeze the stem and the first block group

`pretrained` is anything `common.weights.Weights.parse` reads. Starting from an earlier run (stage
1 -> stage 2) is `common.runs.init_from`: the run folder's layout is `common.runs`'s, and this
module knows nothing of it (it reads weights files through `common.io`).

The backbone is `timm.create_model(name, num_classes=0)`: its forward returns pooled features of
width `model.num_features`; the head maps them to one logit per label. `model.build_kwargs` holds
exactly what `build_model` needs to rebuild the architecture (minus `pretrained`), which is what a
run stores in config.json["model"] and `common.runs.load_run` passes back.

Weights with their own input convention (torchxrayvision's, `Weights.convention`) fix the
architecture and channels (build_model checks them) and decide the run's input: `model_input_config`
is the one place that turns a model (and its weights) into config.json["input"] (size, mean, std,
channels), which training, prediction, export and the app all read.

Head width rule: the study's head was 1792 -> 625 -> 256 on EfficientNet-B4 (1792 features), i.e.
about F*0.35 and F/7. We use h1 = round(F * 0.35) and h2 = round(F / 7) (627 and 256 for
F = 1792), each at least 16 so tiny backbones still get a head wider than the 14 outputs.
"""
from __future__ import annotations

import difflib
import sys
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from common.io import load_weights
from common.train_config import HEADS
from common.weights import (
    HUB,
    LOCAL,
    RANDOM,
    URL,
    XRV,
    InputConvention,
    PretrainedWeightsUnavailable,
    Weights,
    find_local_weights,
)
from common.weights import reachable as _reachable

__all__ = [
    "MIN_HIDDEN", "RANDOM_INIT_WARNING", "PretrainedWeightsUnavailable", "mlp_hidden_sizes", "make_head",
    "MedImagingModel", "build_model", "model_input_config", "load_backbone_state", "backbone_groups", "freeze",
    # re-exported from common.weights, where they live
    "Weights", "find_local_weights", "InputConvention",
]

MIN_HIDDEN = 16

RANDOM_INIT_WARNING = (
    "pretrained=False: the backbone starts from random initialisation. Unless trained weights are "
    "loaded next (a run, init_from), results will be far below published ones; pass pretrained=True "
    "(online) or pretrained='/path/to/weights.safetensors' (CLI: --pretrained PATH)."
)


def mlp_hidden_sizes(num_features: int) -> tuple[int, int]:
    """The MLP head's hidden widths for a backbone with `num_features` pooled features."""
    return max(MIN_HIDDEN, round(num_features * 0.35)), max(MIN_HIDDEN, round(num_features / 7))


def make_head(num_features: int, num_labels: int, head: str = "mlp", dropout: float = 0.3) -> nn.Module:
    """The study's head: Linear -> LeakyReLU -> Dropout -> Linear -> LeakyReLU -> Linear, or a Linear."""
    if head == "linear":
        return nn.Sequential(nn.Linear(num_features, num_labels))
    if head == "mlp":
        h1, h2 = mlp_hidden_sizes(num_features)
        return nn.Sequential(
            nn.Linear(num_features, h1),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.LeakyReLU(),
            nn.Linear(h2, num_labels),
        )
    raise ValueError(f"head={head!r}: expected one of {HEADS}")


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class MedImagingModel(nn.Module):
    """A timm backbone (num_classes=0, pooled features) followed by a classification head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int, build_kwargs: dict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.num_labels = int(build_kwargs["num_labels"])
        # exactly what build_model needs to rebuild this architecture (config.json["model"])
        self.build_kwargs = dict(build_kwargs)
        # filled when weights were loaded from a file: {"source", "kept", "dropped", "new"}
        self.pretrained_report: dict | None = None
        # the input the starting weights expect (torchxrayvision's), read by model_input_config
        self.input_convention: InputConvention | None = None

    @property
    def model_name(self) -> str:
        return self.build_kwargs["model_name"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> logits [B, num_labels]."""
        return self.head(self.backbone(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's unpooled features (e.g. [B, C, h, w] for a CNN, tokens for a ViT)."""
        return self.backbone.forward_features(x)

    def forward_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `forward_features` output: pooling + pre-logits, then the head (for CAMs)."""
        return self.head(self.backbone.forward_head(features, pre_logits=True))

    def train(self, mode: bool = True) -> MedImagingModel:
        """As nn.Module.train, but BatchNorm layers whose parameters are all frozen stay in eval mode.

        A frozen stage must not keep updating its running statistics from the new data (that would
        change the features the frozen weights were trained for), so `freeze` + `model.train()`
        leaves those BatchNorm layers in eval mode; unfrozen ones train normally.
        """
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters(recurse=False))
                if _is_bn(module) and params and not any(p.requires_grad for p in params):
                    module.eval()
        return self


# --------------------------------------------------------------------------------------- build


def _check_model_name(model_name: str) -> None:
    import timm
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(model_name)
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"model_name={model_name!r} is not a timm model (see timm.list_models()).{hint}")


def _pretrained_cfg(model_name: str):
    """timm's registered pretrained config for `model_name` (with or without a tag), or None."""
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(model_name)
    return get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_unregistered=False)


def _hub_host(model_name: str) -> str | None:
    """The host timm would download `model_name`'s default weights from (None: no weights)."""
    cfg = _pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname
    if cfg.url:
        return urlparse(cfg.url).hostname
    return None


def _cached_hub_file(model_name: str) -> Path | None:
    """Weights of `model_name` already downloaded (Hugging Face cache or torch hub cache), if any."""
    cfg = _pretrained_cfg(model_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        found = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if found.is_file():
            return found
    return None


def _offline_error(model_name: str, detail: str) -> PretrainedWeightsUnavailable:
    return PretrainedWeightsUnavailable(
        f"pretrained=True: could not download the pretrained weights of {model_name!r} from the timm hub "
        f"({detail}). If this machine is offline, download the weights elsewhere and pass the local file: "
        f"build_model({model_name!r}, pretrained='/path/to/weights.safetensors') or, on the command line, "
        f"--pretrained /path/to/weights.safetensors (a .safetensors/.pth file or a folder holding one); "
        f"or use pretrained=False for random initialisation."
    )


def _create_backbone(model_name: str, pretrained: bool, in_chans: int, image_size: int | None,
                     timm_kwargs: dict) -> tuple[nn.Module, bool]:
    """timm.create_model with num_classes=0; returns (backbone, whether img_size was used)."""
    import timm

    kwargs = dict(num_classes=0, in_chans=in_chans, **timm_kwargs)
    if image_size is not None:
        try:
            return timm.create_model(model_name, pretrained=pretrained, img_size=int(image_size), **kwargs), True
        except TypeError as err:
            # the model's constructor has no img_size (CNNs): their input size is free anyway
            if "img_size" not in str(err):
                raise
    return timm.create_model(model_name, pretrained=pretrained, **kwargs), False


def build_model(
    model_name: str,
    num_labels: int = 14,
    head: str = "mlp",
    pretrained: Weights | bool | str | Path | None = False,
    in_chans: int = 3,
    image_size: int | None = None,
    head_dropout: float = 0.3,
    **timm_kwargs: Any,
) -> MedImagingModel:
    """Any `timm.list_models()` backbone with a `head` ("mlp" or "linear") of `num_labels` outputs.

    pretrained: a `Weights` or anything `Weights.parse` reads: False (random init, warns); True
    (timm hub; offline -> the cached download if there is one, else a clear error naming the
    local-file option); a local weights file or folder; an http(s) URL; "xrv:NAME" (torchxrayvision's
    chest X-ray weights: model_name must be their architecture and in_chans 1; see
    `common.xrv_weights`); None = random init without the warning, for callers that load trained
    weights right after (e.g. `common.runs.load_run`).
    image_size is passed to timm for models that take `img_size` (ViTs) and ignored by the others.
    Extra keyword arguments go to `timm.create_model` (e.g. drop_rate, drop_path_rate).
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r}: expected one of {HEADS}")
    if int(num_labels) < 1:
        raise ValueError(f"num_labels={num_labels}: must be at least 1")
    for bad, use in (("num_classes", "num_labels"), ("img_size", "image_size"), ("pretrained_cfg_overlay", "pretrained=PATH")):
        if bad in timm_kwargs:
            raise ValueError(f"build_model: pass {use}=..., not {bad}=... (the head is MedImaging's own)")
    _check_model_name(model_name)

    weights = Weights.parse(pretrained)
    if weights.convention is not None:
        _check_convention(weights, model_name, int(in_chans), image_size)
    hub = weights.kind == HUB
    if hub:
        host = _hub_host(model_name)
        if host is None:
            raise PretrainedWeightsUnavailable(
                f"pretrained=True: timm has no pretrained weights for {model_name!r}. Pass a local file "
                f"(pretrained='/path/to/weights.safetensors', CLI --pretrained PATH) or pretrained=False."
            )
        if not _reachable(host):
            cached = _cached_hub_file(model_name)
            if cached is None:
                raise _offline_error(model_name, f"{host} cannot be reached and the weights are not in the local cache")
            # offline but downloaded before: load the cached file like any local weights file
            hub, weights = False, Weights(LOCAL, str(cached))
    try:
        backbone, used_img_size = _create_backbone(model_name, hub, int(in_chans), image_size, timm_kwargs)
    except OSError as err:  # requests / huggingface_hub / urllib download errors are all OSErrors
        if hub:
            raise _offline_error(model_name, str(err).splitlines()[0] if str(err) else type(err).__name__) from err
        raise

    build_kwargs = dict(model_name=model_name, num_labels=int(num_labels), head=head, in_chans=int(in_chans),
                        image_size=None if image_size is None else int(image_size),
                        head_dropout=float(head_dropout), **timm_kwargs)
    # pooled width: timm's head_hidden_size when a pre-logits block sits after forward_features
    num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    model = MedImagingModel(backbone, make_head(num_features, int(num_labels), head, head_dropout),
                            num_features, build_kwargs)
    model.image_size_applied = used_img_size

    if weights.kind == RANDOM and pretrained is not None:
        warnings.warn(RANDOM_INIT_WARNING, UserWarning, stacklevel=2)
    elif weights.kind in (LOCAL, URL):
        path = _download_url(weights.source) if weights.kind == URL else Path(weights.source)
        model.pretrained_report = _load_pretrained_file(model, path)
    elif weights.kind == XRV:
        model.pretrained_report = _load_xrv_weights(model, weights)
    model.input_convention = weights.convention
    return model


def _check_convention(weights: Weights, model_name: str, in_chans: int, image_size: int | None) -> None:
    """Weights with an input convention fit one architecture with its channels; another size only warns."""
    from timm.models import split_model_name_tag

    conv = weights.convention
    arch = split_model_name_tag(model_name)[0]
    if arch != conv.model_name or in_chans != conv.in_chans:
        raise ValueError(
            f"pretrained={weights.config_value()!r} are weights of a {conv.model_name} with {conv.in_chans} input "
            f"channel(s) at {conv.image_size} px, not of {model_name!r} with in_chans={in_chans}: use "
            f"model_name={conv.model_name!r}, in_chans={conv.in_chans} (CLI: --model {conv.model_name} "
            f"--in-chans {conv.in_chans} --image-size {conv.image_size})")
    if image_size is not None and int(image_size) != conv.image_size:
        warnings.warn(f"pretrained={weights.config_value()!r} were trained at {conv.image_size} px; this model "
                      f"gets {image_size} px inputs (fine for a smoke run, below their published results otherwise)",
                      UserWarning, stacklevel=3)


def _load_xrv_weights(model: MedImagingModel, weights: Weights) -> dict:
    """torchxrayvision's weights into the backbone: every backbone tensor must come from the file
    (their classifier and operating-point thresholds are the only things left out)."""
    from common import xrv_weights

    path = xrv_weights.weights_file(weights)
    state = xrv_weights.load_state(path)
    report = load_backbone_state(model, state, source=str(path))
    missing = [k for k in report["new"] if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: is not a complete {model.model_name} of xrv:{weights.source} ({len(missing)} "
                         f"backbone weights missing: {', '.join(missing[:5])}); download it again")
    return {"source": str(path), "weights": weights.config_value(), **report}


def _download_url(url: str) -> Path:
    """Download weights once into torch hub's cache (torch.hub.get_dir()/checkpoints)."""
    name = Path(urlparse(url).path).name or "weights.pth"
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as err:  # urllib raises URLError / HTTPError / socket errors
        raise PretrainedWeightsUnavailable(
            f"pretrained={url!r}: download failed ({err}). Download the file elsewhere and pass its local "
            f"path (pretrained='/path/to/weights.safetensors', CLI --pretrained PATH)."
        ) from err
    return target


def model_input_config(model: nn.Module, image_size: int | None = None,
                       weights: Weights | bool | str | None = None) -> dict:
    """{"image_size", "mean", "std", "in_chans"} for preprocessing: what config.json["input"] holds.

    From the starting weights' input convention when they have one (torchxrayvision's: one channel,
    mean 0.5 / std 1/2048 = its [-1024, 1024] range, its size): `weights` when given (a resumed run
    rebuilds its model without them), else the one `build_model` loaded. Otherwise from timm's data
    config: a one-channel model gets the mean of the three channel statistics (grey = R = G = B).
    image_size: explicit override; else the size the model was built for; else the weights' or
    timm's default.
    """
    from timm.data import resolve_model_data_config

    build = getattr(model, "build_kwargs", {})
    conv = (Weights.parse(weights).convention if weights is not None
            else getattr(model, "input_convention", None))
    if conv is not None:
        size = image_size or build.get("image_size") or conv.image_size
        return {"image_size": int(size), "mean": [float(v) for v in conv.mean], "std": [float(v) for v in conv.std],
                "in_chans": int(conv.in_chans)}
    backbone = getattr(model, "backbone", model)
    cfg = resolve_model_data_config(backbone)
    in_chans = int(build.get("in_chans") or cfg["input_size"][0])
    size = image_size or build.get("image_size") or cfg["input_size"][-1]
    mean, std = [float(v) for v in cfg["mean"]], [float(v) for v in cfg["std"]]
    if in_chans != len(mean):
        if in_chans == 1:
            mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
        else:
            mean, std = [mean[i % len(mean)] for i in range(in_chans)], [std[i % len(std)] for i in range(in_chans)]
    return {"image_size": int(size), "mean": mean, "std": std, "in_chans": in_chans}


# ----------------------------------------------------------------------------- loading weights


def _adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem conv's weights for a different number of input channels (timm's rule: sum for one
    channel, else repeat and rescale so the activation scale is kept)."""
    source = weight.shape[1]
    if source == in_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // source)
        out = w.repeat(1, reps, 1, 1)[:, :in_chans] * (source / in_chans)
    return out.to(weight.dtype)


def _first_conv_keys(backbone: nn.Module) -> list[str]:
    first = (getattr(backbone, "pretrained_cfg", None) or {}).get("first_conv")
    if not first:
        return []
    names = (first,) if isinstance(first, str) else tuple(first)
    return [f"{n}.weight" for n in names]


def _strip_prefixes(state: dict) -> tuple[dict, list[str]]:
    """Normalise a state dict's names to the backbone's: drop DDP's `module.`, take a MedImaging
    model's `backbone.*` keys. Returns (state, names not meant for the backbone)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        other = [k for k in state if not k.startswith("backbone.")]
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, other
    return dict(state), []


def _match(backbone: nn.Module, state: dict) -> tuple[dict, list[str], list[str]]:
    """Tensors of `state` that fit the backbone by name and shape; (fit, dropped, shape notes)."""
    target = backbone.state_dict()
    stem = set(_first_conv_keys(backbone))
    fit, dropped, notes = {}, [], []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key not in target:
            dropped.append(key)
            continue
        want = target[key].shape
        if key in stem and value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            value = _adapt_channels(value, want[1])
        if value.shape != want:
            dropped.append(key)
            notes.append(f"{key} {tuple(value.shape)} vs {tuple(want)}")
            continue
        fit[key] = value
    return fit, dropped, notes


def load_backbone_state(model: MedImagingModel, state: dict, source: str = "state dict") -> dict:
    """Load every tensor of `state` that matches the backbone by name and shape.

    Accepts MedImaging state dicts (`backbone.*` / `head.*`, optionally DDP's `module.`) and plain
    timm checkpoints of the same architecture (classifier keys dropped); when the model's module has
    a timm `checkpoint_filter_fn` (ViT pos-embed resampling, original-format conversions) it is
    tried too and used if it matches more. The head is never loaded. Returns {"kept", "dropped",
    "new"} with model-level names for kept/new and the source's names for dropped. Raises
    ValueError when fewer than half of the backbone's parameters match (a different architecture).
    """
    backbone = model.backbone
    raw, not_backbone = _strip_prefixes(state)
    fit, dropped, notes = _match(backbone, raw)
    target_keys = set(backbone.state_dict())
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and len(fit) < len(target_keys):
        try:
            filtered = filter_fn(dict(raw), backbone)
        except Exception:  # a filter written for another checkpoint format: keep the direct match
            filtered = None
        if isinstance(filtered, dict):
            fit2, dropped2, notes2 = _match(backbone, filtered)
            if len(fit2) > len(fit):
                fit, dropped, notes = fit2, dropped2, notes2
    params = {name for name, _ in backbone.named_parameters()}
    matched = len(params & set(fit))
    # a buffer such as bn1.num_batches_tracked matches any architecture: judge by parameters
    if matched * 2 < len(params):
        sample = ", ".join(list(raw)[:4])
        raise ValueError(
            f"{source}: matches only {matched} of the {len(params)} parameters of the {model.model_name!r} "
            f"backbone by name and shape (its first names: {sample or 'none'}). Is it a checkpoint of a "
            f"different architecture? Build the model with the checkpoint's model_name."
        )
    if notes:
        more = f" (+{len(notes) - 5} more)" if len(notes) > 5 else ""
        warnings.warn(f"{source}: {len(notes)} weights have other shapes and were dropped: "
                      f"{'; '.join(notes[:5])}{more}", UserWarning, stacklevel=3)
    full = backbone.state_dict()
    full.update(fit)
    backbone.load_state_dict(full)  # strict: `full` has exactly the backbone's keys
    kept = [f"backbone.{k}" for k in fit]
    new = [f"backbone.{k}" for k in backbone.state_dict() if k not in fit] + [f"head.{k}" for k in model.head.state_dict()]
    return {"kept": kept, "dropped": not_backbone + dropped, "new": new}


def _load_pretrained_file(model: MedImagingModel, path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"pretrained={str(path)!r}: no such weights file or folder")
    report = load_backbone_state(model, load_weights(path), source=str(path))
    # classifier / head weights are expected to be dropped: only surprises are worth a warning
    classifier = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    surprising = [k for k in report["dropped"]
                  if not k.startswith("head.") and not any(k.startswith(c + ".") for c in classifier)]
    missing = [k for k in report["new"] if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    if surprising or missing:
        warnings.warn(
            f"{path}: loaded {len(report['kept'])} backbone weights; {len(surprising)} unexpected weights "
            f"dropped ({', '.join(surprising[:5])}) and {len(missing)} backbone weights left random "
            f"({', '.join(missing[:5])})", UserWarning, stacklevel=3)
    return {"source": str(path), **report}


# ------------------------------------------------------------------------------------ freezing


def _group_names(groups: list[list[str]]) -> list[str]:
    """Readable group names: for each parameter the shortest module prefix that belongs to its group
    alone, joined with "+" (e.g. "conv_stem+bn1", "blocks.0", "blocks.5+norm")."""
    owner = {n: i for i, names in enumerate(groups) for n in names}
    out = []
    for i, names in enumerate(groups):
        parts = []
        for name in names:
            path = name.split(".")
            for depth in range(1, len(path) + 1):
                prefix = ".".join(path[:depth])
                if all(j == i for n, j in owner.items() if n == prefix or n.startswith(prefix + ".")):
                    break
            if prefix not in parts:
                parts.append(prefix)
        out.append("+".join(parts))
    return out


def backbone_groups(model: MedImagingModel) -> list[tuple[str, list[str]]]:
    """The backbone's parameters in ordered coarse groups (stem first, then stages / blocks).

    From timm's `group_matcher(coarse=True)` + `group_parameters`; backbones without a matcher
    fall back to one group per top-level child module, in definition order.
    """
    from timm.models import group_parameters

    backbone = model.backbone
    try:
        matcher = backbone.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        matcher = None
    if matcher:
        grouped = group_parameters(backbone, matcher)
        groups = [list(names) for _, names in sorted(grouped.items()) if names]
        return list(zip(_group_names(groups), groups))
    out = []
    for child, module in backbone.named_children():
        names = [f"{child}.{n}" for n, _ in module.named_parameters()]
        if names:
            out.append((child, names))
    return out


def freeze(model: MedImagingModel, k: int) -> list[str]:
    """Freeze the first k backbone groups (k=0: none, k=-1: the whole backbone, i.e. head only).

    Other backbone groups and the head are made trainable, so calling it again re-decides.
    Frozen BatchNorm layers stay in eval mode under `model.train()` (see MedImagingModel.train).
    Returns the frozen group names.
    """
    groups = backbone_groups(model)
    k = int(k)
    if k == -1:
        k = len(groups)
    if not 0 <= k <= len(groups):
        names = ", ".join(name for name, _ in groups)
        raise ValueError(f"freeze k={k}: {model.model_name!r} has {len(groups)} groups ({names}); "
                         f"use 0..{len(groups)} or -1 for the whole backbone")
    frozen = {n for _, names in groups[:k] for n in names}
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(name not in frozen)
    for param in model.head.parameters():
        param.requires_grad_(True)
    model.train(model.training)  # apply the BatchNorm rule now
    return [name for name, _ in groups[:k]]
