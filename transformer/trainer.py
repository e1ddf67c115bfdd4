"""The study's two stages with a vision transformer instead of EfficientNet.

    python transformer/trainer.py        # stage 1 and stage 2 (from stage 1) with a ViT; prints the tables

The same recipe as single-task/ and multi-task/ (same head, masked 14-label loss, Cardiomegaly
before / after stage 2); only the backbone differs. `transformer.ipynb` imports this file and may
override any knob; None means "the profile's value".
"""
from common import experiments

ModelName = "vit_base_patch16_224.augreg_in21k_ft_in1k"  # any timm ViT (or other) name; ViT-B/16 as in the study's variant (quick trains vit_tiny_patch16_224)
Profile = "quick"  # "quick": 64 px, random init, a few epochs on a CPU; "paper": the study's settings (224 px, hub weights, 5 epochs, batch 16, lr 5e-4)
DataFull = None  # the 14-label set (NIH layout or 14_train.csv); None: dataset_full/, or the synthetic default when the data folders are empty
DataCardiomegaly = None  # the Cardiomegaly vs No Finding set (train/ test/ train.csv test.csv); None: dataset_cardiomegaly/
ImageSize = None  # input side in pixels (a ViT's position embedding is resized to it); None: the profile's
Epochs = None  # passes over the train split, each stage; None: the profile's (the study used 5)
BatchSize = None  # images per optimiser step; None: the profile's (the study used 16)
LearningRate = None  # peak AdamW learning rate (warmup + cosine); None: the profile's (the study used 5e-4)
Head = "mlp"  # "mlp": the study's head on the ViT's 768-wide (ViT-B) features; "linear": one Linear layer
Seed = 49  # patient split, initialisation and data order (the study's split seed)
WithoutStage1 = False  # also train stage 2 without stage 1 (the backbone ablation has that run for the ViT)
Smoke = False  # True: timm's tiny test models, two optimiser steps per stage (tests)
RunsDir = None  # the run cache; None: $MEDIMAGING_RUNS, else ~/.cache/medimaging/runs


def run(**overrides) -> experiments.Experiment:
    """This experiment with the knobs above; keyword overrides use the same names (None keeps a knob)."""
    knobs = experiments.knobs_of(globals())  # the capitalised names above
    return experiments.transformer(**experiments.knobs_to_kwargs(knobs, overrides))


if __name__ == "__main__":
    print(run().report())
