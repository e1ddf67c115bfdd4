"""Magnitude pruning of a model's convolution and linear weights, with masks folded into the weights.

Two kinds, both from `torch.nn.utils.prune`:
  - unstructured: the smallest |w| are zeroed, either across all prunable layers at once
    ("global", so layers with many redundant weights give up more) or the same share per layer;
  - channel-structured: whole output channels (conv filters, linear neurons) with the smallest
    L1 or L2 norm are zeroed, the same share in every layer.

The masks are folded in at once (`prune.remove`), so the model keeps plain `weight` parameters and
its state dict has the same keys as before: a pruned model saves, loads and exports like any other,
with real zeros in the safetensors and in the ONNX initialisers. During a fine-tune the zeros are
kept by gradient hooks (`keep_masks_fixed`): a weight whose gradient is always zero never moves
under SGD, Adam or AdamW (its moments stay zero and decoupled weight decay scales zero to zero).

The model's output layer (the last `nn.Linear`, one row per label) is never pruned: zeroing a
label's row would silence that finding.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCOPES = ("global", "layer")


def output_layer_name(model: nn.Module) -> str | None:
    """Name of the model's output layer: the last `nn.Linear` in module order (the head's last)."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    return name


def prunable_layers(model: nn.Module, structured: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv / linear layer pruning may touch; never the output layer.

    For channel pruning, layers with a single output channel are skipped (pruning one would
    remove the whole layer's output).
    """
    skip = output_layer_name(model)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or name == skip:
            continue
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        if structured and module.weight.shape[0] < 2:
            continue
        layers.append((name, module))
    return layers


def prune_model(
    model: nn.Module,
    sparsity: float,
    structured: bool = False,
    scope: str = "global",
    norm: int = 1,
) -> dict[str, torch.Tensor]:
    """Zero a share `sparsity` of the prunable weights by magnitude; return the masks.

    structured=False: unstructured L1 (|w|), across all prunable layers (scope="global") or per
    layer (scope="layer"). structured=True: whole output channels by their L`norm` norm, per layer
    (a global ranking of channels would compare norms of filters of different sizes).
    Masks are folded into the weights; the returned dict maps parameter names
    (e.g. "backbone.conv1.weight") to bool masks (True = kept) for `keep_masks_fixed`.
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 (L1) or 2 (L2), got {norm}")
    layers = prunable_layers(model, structured=structured)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no convolution or linear layer to prune")
    sparsity = float(sparsity)
    with torch.no_grad():
        if structured:
            for _, module in layers:
                prune.ln_structured(module, "weight", amount=sparsity, n=norm, dim=0)
        elif scope == "global":
            prune.global_unstructured(
                [(module, "weight") for _, module in layers], pruning_method=prune.L1Unstructured, amount=sparsity
            )
        else:
            for _, module in layers:
                prune.l1_unstructured(module, "weight", amount=sparsity)
        masks = {}
        for name, module in layers:
            masks[f"{name}.weight" if name else "weight"] = module.weight_mask.detach().bool().clone()
            prune.remove(module, "weight")  # fold: weight = weight_orig * mask, a plain Parameter again
    return masks



def keep_masks_fixed(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list:
    """Register gradient hooks that zero the gradient of pruned weights; returns the hook handles.

    With a zero gradient from the first step on, a zeroed weight stays exactly zero under
    SGD (with momentum / weight decay), Adam and AdamW. Call `.remove()` on the handles when done.
    """
    params = dict(model.named_parameters())
    handles = []
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r}: the model has no such parameter")
        keep = mask.detach().bool()

        def hook(grad: torch.Tensor, keep: torch.Tensor = keep) -> torch.Tensor:
            return grad * keep.to(device=grad.device, dtype=grad.dtype)

        handles.append(params[name].register_hook(hook))
    return handles


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def sparsity_report(tensors: Mapping[str, object], pruned: Iterable[str] | None = None) -> dict:
    """Zeros actually present in a set of weights (a state dict, safetensors or ONNX initialisers).

    Returns JSON-able counts: `weight_sparsity` over every tensor with 2+ dimensions (conv and
    linear weights, the ones pruning targets), `overall_sparsity` over every number, and, when
    `pruned` names the pruned tensors, `pruned_sparsity` over those alone (what `--sparsity` asks
    for) and `zero_channel_share`: the share of their output channels that are entirely zero.
    """
    pruned = set(pruned) if pruned is not None else None
    total = zeros = w_total = w_zeros = p_total = p_zeros = channels = zero_channels = 0
    missing = set(pruned) if pruned is not None else set()
    for name, value in tensors.items():
        a = _as_numpy(value)
        if not np.issubdtype(a.dtype, np.number):
            continue
        n, z = int(a.size), int(a.size - np.count_nonzero(a))
        total += n
        zeros += z
        if a.ndim >= 2:
            w_total += n
            w_zeros += z
        if pruned is not None and name in pruned:
            missing.discard(name)
            p_total += n
            p_zeros += z
            flat = a.reshape(a.shape[0], -1)
            channels += flat.shape[0]
            zero_channels += int((~flat.any(axis=1)).sum())
    report = {
        "total_params": total,
        "total_zeros": zeros,
        "overall_sparsity": zeros / total if total else 0.0,
        "weight_params": w_total,
        "weight_zeros": w_zeros,
        "weight_sparsity": w_zeros / w_total if w_total else 0.0,
    }
    if pruned is not None:
        if missing:
            raise KeyError(f"pruned tensors not found in the weights: {sorted(missing)[:5]}")
        report.update(
            pruned_params=p_total,
            pruned_zeros=p_zeros,
            pruned_sparsity=p_zeros / p_total if p_total else 0.0,
            zero_channel_share=zero_channels / channels if channels else 0.0,
        )
    return report


def onnx_weight_sparsity(onnx_path) -> dict:
    """`sparsity_report` of an ONNX file's initialisers (float or int8), i.e. of what is served."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return sparsity_report(tensors)
