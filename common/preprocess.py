"""Image → model input, shared by the training cache, torch inference and the torch-free ONNX path.

Numpy and Pillow only: this module must not import torch.
The one pipeline everywhere: decode to 8-bit grayscale, resize to `image_size` x `image_size`
with Pillow's bilinear filter, scale to [0, 1], repeat to the model's channels, normalise with the
run's mean and std (`common.models.model_input_config`: timm's `resolve_model_data_config`, never
hard-coded ImageNet values, or the starting weights' own convention, e.g. torchxrayvision's
[-1024, 1024] as mean 0.5 and std 1/2048).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize_gray(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D uint8 grayscale image to size x size (bilinear, with Pillow's antialiasing)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got shape {image.shape} dtype {image.dtype}")
    if image.shape == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def to_model_input(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], in_chans: int = 3
) -> np.ndarray:
    """uint8 grayscale [..., H, W] → float32 [..., in_chans, H, W], normalised per channel."""
    x = images.astype(np.float32) / 255.0
    x = np.repeat(x[..., None, :, :], in_chans, axis=-3)
    mean_ = np.asarray(mean, dtype=np.float32)[:in_chans].reshape(in_chans, 1, 1)
    std_ = np.asarray(std, dtype=np.float32)[:in_chans].reshape(in_chans, 1, 1)
    if mean_.shape[0] != in_chans or std_.shape[0] != in_chans:
        # a one-channel model keeps the first channel's statistics
        mean_ = np.resize(mean_, (in_chans, 1, 1))
        std_ = np.resize(std_, (in_chans, 1, 1))
    return (x - mean_) / std_
