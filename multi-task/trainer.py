"""Stage 2 of the study: the adaptive fine-tune on all 14 labels, initialised from stage 1.

    python multi-task/trainer.py         # stage 1 (cached), stage 2 from it, stage 2 without it; prints the tables

Stage 1 is the run single-task/trainer.py makes with the same knobs: identical settings give the
identical cached run, so it trains once. The head is replaced by a 14-label head; both datasets are
used, each image supervising only the labels its source knows (NaN-masked loss). `multi_task.ipynb`
imports this file and may override any knob; None means "the profile's value".
"""
from common import experiments

ModelName = "tf_efficientnet_b4.ns_jft_in1k"  # any timm.list_models() name; the study's tf_efficientnet_b4_ns (quick trains a small variant of the named backbones)
Profile = "quick"  # "quick": 64 px, random init, a few epochs on a CPU; "paper": the study's settings (224 px, hub weights, 5 epochs, batch 16, lr 5e-4)
DataFull = None  # the 14-label set (NIH layout or 14_train.csv); None: dataset_full/, or the synthetic default when the data folders are empty
DataCardiomegaly = None  # the Cardiomegaly vs No Finding set (train/ test/ train.csv test.csv); None: dataset_cardiomegaly/
ImageSize = None  # input side in pixels, both stages; None: the profile's (the study used 224)
Epochs = None  # passes over the train split, each stage; None: the profile's (the study used 5)
BatchSize = None  # images per optimiser step; None: the profile's (the study used 16)
LearningRate = None  # peak AdamW learning rate (warmup + cosine); None: the profile's (the study used 5e-4)
Head = "mlp"  # "mlp": the study's 2-hidden-layer head; "linear": one Linear layer
Seed = 49  # patient split, initialisation and data order (the study's split seed)
WithoutStage1 = True  # also train stage 2 from the profile's initialisation alone: the study's 91.82 vs 87.61 comparison
Smoke = False  # True: timm's tiny test models, two optimiser steps per stage (tests)
RunsDir = None  # the run cache; None: $MEDIMAGING_RUNS, else ~/.cache/medimaging/runs


def run(**overrides) -> experiments.Experiment:
    """This experiment with the knobs above; keyword overrides use the same names (None keeps a knob)."""
    knobs = experiments.knobs_of(globals())  # the capitalised names above
    return experiments.multi_task(**experiments.knobs_to_kwargs(knobs, overrides))


if __name__ == "__main__":
    print(run().report())
