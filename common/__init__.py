"""MedImaging: chest X-ray disease detection on NIH ChestX-ray14.

The package is imported by the notebooks, the trainer files, the app and the CLI. Importing it
must stay cheap and must not import torch: the ONNX serving path runs without it.
"""
from common.labels import LABELS, NUM_LABELS

__version__ = "0.1.0"
__all__ = ["LABELS", "NUM_LABELS", "__version__"]
