"""prune: magnitude pruning of a model's convolution and linear weights, and of a whole run.

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

`prune_run` prunes a run's best weights, fine-tunes them with `common.train.fit` from the source's
configuration (same data and split) with the masks held fixed (`FitHooks.on_model`), and writes
the sparsity achieved in best.safetensors and in the exported ONNX initialisers to compression.json.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from common import runs
from common.compress.base import FineTune, source_train_config, write_report
from common.export import export_onnx
from common.serving import EXPORT_DIR, FP32
from common.train import FitHooks, fit

PRUNE_LR_FACTOR = 0.1  # fine-tuning a pruned model: a tenth of the source run's learning rate
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


def prune_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    sparsity: float,
    structured: bool = False,
    scope: str = "global",
    norm: int = 1,
    tune: FineTune = FineTune(epochs=1),
    **train_overrides,
) -> Path:
    """Prune a run's best weights by magnitude, fine-tune with the masks fixed; return the new run dir.

    sparsity: share of the prunable conv/linear weights zeroed (unstructured, `scope` "global" or
    "layer") or of their output channels (structured, by L`norm` norm). The fine-tune is `fit`
    with the source's configuration (same data and split) for `tune.epochs` / `tune.max_steps` at
    `tune.lr` (default: a tenth of the source's); max_steps=0 keeps the pruned weights as they are
    and only scores them. The achieved sparsity of best.safetensors (and of RUN/export/model.onnx
    when `tune.export`) is measured and written to compression.json; a mask that did not hold is an
    error.
    """
    log = tune.logger
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the source run itself; give a new folder for the pruned run")
    source = runs.load_run(run_dir)
    src_cfg = runs.read_config(run_dir)
    base_lr = float((src_cfg.get("train") or {}).get("lr", 5e-4))
    cfg = source_train_config(run_dir, out, data=tune.data, epochs=tune.epochs, max_steps=tune.max_steps,
                              lr=tune.lr if tune.lr is not None else base_lr * PRUNE_LR_FACTOR, **train_overrides)
    masks = prune_model(source.model, sparsity, structured=structured, scope=scope, norm=norm)
    pruned_state = {k: v.detach().clone() for k, v in source.model.state_dict().items()}
    before = sparsity_report(pruned_state, masks)
    kind = f"{'structured L' + str(norm) + ' channel' if structured else 'unstructured L1 ' + scope}"
    log(f"prune: {kind} at {sparsity:.0%}: {len(masks)} layers, {before['pruned_zeros']:,} of "
        f"{before['pruned_params']:,} prunable weights are zero ({before['pruned_sparsity']:.2%})")
    init = {"source": str(run_dir.resolve()), "method": "prune", "sparsity": float(sparsity), "structured": structured,
            "scope": scope, "norm": norm}

    def on_model(model: nn.Module, fit_log: Callable[[str], None]) -> dict:
        model.load_state_dict(pruned_state)  # strict: the same architecture as the source
        keep_masks_fixed(model, masks)
        fit_log(f"pruned weights of {run_dir} loaded ({kind} {sparsity:.0%}); masks held fixed while fine-tuning")
        return init

    fit(cfg, hooks=FitHooks(on_model=on_model))
    saved = runs.load_weights(out / runs.BEST)
    achieved = sparsity_report(saved, masks)
    broken = [name for name, m in masks.items() if bool((saved[name][~m.to(saved[name].device)] != 0).any())]
    if broken:
        raise RuntimeError(f"{out / runs.BEST}: pruned weights became non-zero during the fine-tune in "
                           f"{len(broken)} layer(s) ({broken[:3]}); the masks did not hold")
    report = {"method": "prune", **init, "layers": len(masks), "safetensors": achieved,
              "fine_tune": {"epochs": cfg.epochs, "max_steps": cfg.max_steps, "lr": cfg.lr}}
    log(f"prune: {out / runs.BEST}: {achieved['pruned_sparsity']:.2%} of the prunable weights are zero "
        f"({achieved['overall_sparsity']:.2%} of all parameters)")
    if tune.export:
        exp = export_onnx(out, out / EXPORT_DIR, log=log)
        report["onnx"] = onnx_weight_sparsity(exp / FP32)
        log(f"prune: {exp / FP32}: {report['onnx']['weight_sparsity']:.2%} of the weight tensors' values are zero")
    write_report(out, report)
    return out
