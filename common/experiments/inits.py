"""What should stage 2 start from? The study's "medical pretraining" question on the same images.

Four starts for stage 2 (all 14 labels), everything else equal: the profile's initialisation; a
backbone pretrained self-supervised on every image of the data, labels ignored (`medimaging
pretrain`: SimSiam); stage 1 (Cardiomegaly vs No Finding, the study's step); and stage 1 started
from the self-supervised backbone. Each start is scored against the first on the same held-out
images with a paired bootstrap interval (`common.experiments.paired`). Random initialisation and
stage 1 are the multi-task notebook's runs, reused from the run cache.

    exp = init_comparison(profile="quick", data_full=..., data_cardiomegaly=...)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.experiments.notebooks import STAGE1, STAGE2, WITHOUT_STAGE1
from common.experiments.paired import paired_table
from common.experiments.profiles import STUDY_MODEL, Knobs
from common.experiments.records import Experiment
from common.experiments.runcache import cached_pretrain
from common.experiments.stages import Setup, setup, stage1_run, stage2_run, train_config
from common.experiments.tables import Table, model_row, num
from common.io import load_json
from common.pretrain_config import PRETRAIN_JSON, PretrainConfig

SELF_SUPERVISED = "self-supervised"
STAGE2_FROM_SSL = "stage 2 from self-supervised"
STAGE1_FROM_SSL = "stage 1 from self-supervised"
STAGE2_FROM_BOTH = "stage 2 from self-supervised + stage 1"


def pretrain_config(s: Setup, model_name: str, epochs: int | None = None) -> PretrainConfig:
    """The self-supervised pretraining of `model_name` on every image of the experiment's data, with
    the backbone, channels and input size its fine-tunes train (so its run is their `init_from`)."""
    fine = train_config(s.profile, model_name, "all14", s.data, **s.kw)
    return PretrainConfig(data=s.data.dirs(), model_name=fine.model_name, in_chans=fine.in_chans,
                          image_size=fine.image_size, epochs=int(epochs or s.profile.pretrain_epochs),
                          max_steps=s.profile.max_steps, seed=fine.seed, num_workers=fine.num_workers, progress=False)


def init_comparison(model_name: str = STUDY_MODEL, knobs: Knobs | None = None, pretrain_epochs: int | None = None,
                    **kw) -> Experiment:
    """Stage 2 of `model_name` from four starts (see the module docstring), on the same test images.
    `pretrain_epochs`: the self-supervised run's epochs (None: the profile's `pretrain_epochs`)."""
    s = setup(Knobs.of(knobs, **kw))
    exp = Experiment("init_comparison", "What should stage 2 start from?", s.label, s.data)
    ssl = cached_pretrain(pretrain_config(s, model_name, pretrain_epochs), SELF_SUPERVISED, s.runs)
    stage1 = stage1_run(s, model_name)
    stage1_ssl = stage1_run(s, model_name, init=ssl, role=STAGE1_FROM_SSL)
    starts = [("random initialisation", stage2_run(s, model_name, None, WITHOUT_STAGE1)),
              ("self-supervised", stage2_run(s, model_name, ssl, STAGE2_FROM_SSL)),
              ("stage 1", stage2_run(s, model_name, stage1, STAGE2)),
              ("self-supervised, then stage 1", stage2_run(s, model_name, stage1_ssl, STAGE2_FROM_BOTH))]
    exp.runs.update({STAGE1: stage1, STAGE1_FROM_SSL: stage1_ssl})
    exp.runs.update({role: run for role, run in zip((WITHOUT_STAGE1, STAGE2_FROM_SSL, STAGE2, STAGE2_FROM_BOTH),
                                                     (r for _, r in starts))})
    summary = pretrain_summary(ssl)
    rows = []
    for name, run in starts:
        m = run.metrics()
        rows.append({**model_row(m, "Stage 2 starts from", name),
                     "Cardiomegaly AUROC": num((m.get("auroc") or {}).get("Cardiomegaly")),
                     "Test images": str(m.get("n_images", "n/a"))})
    frame = pd.DataFrame(rows).rename(columns={"Accuracy (%)": "Test mean accuracy (%)",
                                               "AUROC [95% CI]": "Test mean AUROC [95% CI]", "AUPRC": "Test mean AUPRC"})
    exp.tables.append(Table(
        exp.title_for(f"Stage 2 from four starts: {starts[0][1].model_label()}, test split"), frame,
        f"Self-supervised: SimSiam on all {summary.get('images', 'n/a')} images of the data (labels ignored; it saw "
        f"the test images' pixels, never their labels), {summary.get('epochs_done', 'n/a')} epochs, loss "
        f"{num(summary.get('loss_first_epoch'))} -> {num(summary.get('loss_last_epoch'))}. Stage 1 trains on its "
        f"own split's training patients only."))
    table, effect = paired_table(exp.title_for("What each start buys over random initialisation: the same test images"),
                                 starts[0], starts[1:], s.profile.n_boot)
    exp.tables.append(table)
    exp.headline = {"init_effect": effect, "pretrain": {k: summary.get(k) for k in
                                                        ("images", "epochs_done", "loss_first_epoch", "loss_last_epoch")}}
    return exp


def pretrain_summary(run_dir: Path) -> dict:
    """A pretraining run's pretrain.json ({} when missing)."""
    path = run_dir / PRETRAIN_JSON
    return load_json(path) if path.is_file() else {}
