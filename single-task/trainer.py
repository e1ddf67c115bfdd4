"""Stage 1 of the study: Cardiomegaly vs No Finding (the single-task fine-tune).

    python single-task/trainer.py        # trains (or reuses the cached run) and prints the table

The knobs below are the whole experiment; `single_task.ipynb` imports this file and may override
any of them (papermill: `-p ModelName resnet50`). None means "the profile's value". Everything else
happens in common.experiments (runs cached by configuration) and common.train.fit (the loop).
"""
from common import experiments

ModelName = "tf_efficientnet_b4.ns_jft_in1k"  # any timm.list_models() name; the study's tf_efficientnet_b4_ns (quick trains a small variant of the named backbones)
Profile = "quick"  # "quick": 64 px, random init, a few epochs on a CPU; "paper": the study's settings (224 px, hub weights, 5 epochs, batch 16, lr 5e-4)
DataFull = None  # the 14-label set (NIH layout or 14_train.csv); None: dataset_full/, or the synthetic default when the data folders are empty
DataCardiomegaly = None  # the Cardiomegaly vs No Finding set (train/ test/ train.csv test.csv); None: dataset_cardiomegaly/
ImageSize = None  # input side in pixels; None: the profile's (the study used 224)
Epochs = None  # passes over the train split; None: the profile's (the study used 5)
BatchSize = None  # images per optimiser step; None: the profile's (the study used 16)
LearningRate = None  # peak AdamW learning rate (warmup + cosine); None: the profile's (the study used 5e-4, Adam, no schedule)
Head = "mlp"  # "mlp": the study's 2-hidden-layer head; "linear": one Linear layer
Seed = 49  # patient split, initialisation and data order (the study's split seed)
Smoke = False  # True: timm's tiny test models, two optimiser steps (tests)
RunsDir = None  # the run cache; None: $MEDIMAGING_RUNS, else ~/.cache/medimaging/runs


def run(**overrides) -> experiments.Experiment:
    """This experiment with the knobs above; keyword overrides use the same names (None keeps a knob)."""
    knobs = experiments.knobs_of(globals())  # the capitalised names above
    return experiments.single_task(**experiments.knobs_to_kwargs(knobs, overrides))


if __name__ == "__main__":
    print(run().report())
