"""How the study trains: one TrainConfig per training from a profile and the knobs, stage 1 and stage 2.

Every experiment resolves its `Knobs` with `setup` and trains through `stage1_run` / `stage2_run`,
which go through the run cache (`common.experiments.runcache.cached_fit`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from common.cache import default_workers
from common.experiments.datasets import DataSpec, resolve_data
from common.experiments.notebooks import STAGE1, runs_dir
from common.experiments.profiles import Knobs, Profile, get_profile
from common.experiments.runcache import RunRef, cached_fit
from common.train_config import TrainConfig, recipe_defaults


def _workers(wanted: int) -> int:
    """A profile's DataLoader workers, at most one per core: the paper profile's 4 on a 2-core
    machine only add processes (and torch's warning about them). Not part of a run's key."""
    return min(int(wanted), default_workers())


def train_config(profile: Profile, model_name: str, task: str, data: DataSpec, *, init_from: str | Path | None = None,
                 freeze: int = 0, image_size: int | None = None, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, head: str = "mlp", seed: int = 49):
    """The TrainConfig of one training of the suite (everything but `out`).

    The quick profile on real data trains from random weights, so it follows the small-data recipe
    (`common.train_config.SMALL_DATA_RECIPE`, measured by bench/bench_recipe.py) for everything but
    the backbone, which stays the experiment's; knobs given explicitly still win."""
    pretrained = profile.pretrained_for(profile.model_for(model_name)) if init_from is None else False
    settings = dict(image_size=profile.image_size, epochs=profile.epochs, batch_size=profile.batch_size,
                    lr=profile.lr, warmup_steps=profile.warmup_steps, patience=profile.patience)
    if not profile.smoke and profile.weights.is_random:
        recipe = recipe_defaults("auto", data.dirs(), False)
        recipe.pop("model_name", None)
        settings.update(recipe)
    knobs = dict(image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr)
    settings.update({k: v for k, v in knobs.items() if v})
    return TrainConfig(
        data=data.dirs(), task=task, model_name=profile.model_for(model_name), head=head,
        # a run that starts from another run's backbone needs no hub download first
        pretrained=pretrained, init_from=str(init_from) if init_from is not None else None, freeze=int(freeze),
        max_steps=profile.max_steps, n_boot=profile.n_boot, seed=int(seed),
        num_workers=_workers(profile.num_workers), out="", **settings,
    )


@dataclass
class Setup:
    """What an experiment's runs share: the profile, the data, the run cache and the knobs."""

    profile: Profile
    data: DataSpec
    runs: Path
    knobs: Knobs

    @property
    def kw(self) -> dict:
        """train_config's keyword arguments that come from the knobs."""
        k = self.knobs
        return dict(image_size=k.image_size, epochs=k.epochs, batch_size=k.batch_size, lr=k.lr, head=k.head, seed=k.seed)


def passive_openmp() -> None:
    """Let OpenMP threads sleep rather than spin while they wait, when torch is not loaded yet (it
    reads this once): spinning threads train 10x slower when anything else wants the cores (see
    common.reproduce.python_kernel, which does the same for notebook kernels)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def setup(knobs: Knobs) -> Setup:
    """Resolve an experiment's knobs: its profile, data folders and run cache."""
    passive_openmp()
    prof = get_profile(knobs.profile, knobs.smoke)
    data = resolve_data(knobs.data_full, knobs.data_cardiomegaly)
    if not data.dirs():
        raise ValueError("no data: give DataFull and/or DataCardiomegaly, or leave both None for the defaults")
    use_profile_threads(prof)
    return Setup(prof, data, runs_dir(knobs.runs_dir), knobs)


def use_profile_threads(prof: Profile) -> None:
    """Train with the profile's torch CPU threads, when it sets them (the smoke profile: one)."""
    if prof.threads:
        import torch  # only when a profile asks: keeps the experiments importable without loading torch

        torch.set_num_threads(prof.threads)


def stage1_run(s: Setup, model_name: str) -> RunRef:
    """Stage 1 of `model_name`: Cardiomegaly vs No Finding, trained or reused from the run cache."""
    cfg = train_config(s.profile, model_name, "cardiomegaly", s.data, **s.kw)
    return cached_fit(cfg, STAGE1, model_name, s.runs)


def stage2_run(s: Setup, model_name: str, init: RunRef | None, role: str, freeze: int = 0) -> RunRef:
    """Stage 2 of `model_name` (14 labels), from the stage-1 run `init` or from scratch."""
    cfg = train_config(s.profile, model_name, "all14", s.data, init_from=init.run_dir if init else None,
                       freeze=freeze, **s.kw)
    return cached_fit(cfg, role, model_name, s.runs)
