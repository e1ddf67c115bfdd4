"""How the study trains: one TrainConfig per training from a profile and the knobs, stage 1 and stage 2.

Every experiment resolves its `Knobs` with `setup` and trains through `stage1_run` / `stage2_run`,
which go through the run cache (`common.experiments.runcache.cached_fit`).
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from common.cache import default_workers
from common.experiments.datasets import DataSpec, resolve_data
from common.experiments.notebooks import STAGE1, runs_dir
from common.experiments.profiles import STUDY_MODEL, Knobs, Profile, get_profile
from common.experiments.runcache import RunRef, cached_fit
from common.train_config import TrainConfig, recipe_defaults


def _workers(wanted: int) -> int:
    """A profile's DataLoader workers, at most one per core: the paper profile's 4 on a 2-core
    machine only add processes (and torch's warning about them). Not part of a run's key."""
    return min(int(wanted), default_workers())


# The study's own backbone, by the names the notebooks and trainer files use for it.
STUDY_NAMES = (STUDY_MODEL, "tf_efficientnet_b4_ns")


def small_data_recipe(profile: Profile, data: DataSpec) -> dict:
    """The small-data recipe's TrainConfig fields when this profile trains on this data with it
    (not the smoke profile; random weights; real data: `common.train_config.uses_small_data_recipe`),
    else {}."""
    if profile.smoke or not profile.weights.is_random:
        return {}
    return recipe_defaults("auto", data.dirs(), False)


def trained_model(profile: Profile, model_name: str, recipe: dict, as_named: bool = False) -> str:
    """The timm model a training of `model_name` trains: the profile's variant of it, except that
    the study's own backbone follows the small-data recipe's model when the recipe applies (the
    quick profile's EfficientNet-B0 does not learn from ~1,000 radiographs from random weights:
    bench/results/recipe_search.md, `b0-30ep-combo` against `r18-30ep-combo`). `as_named`: the
    profile's variant always (the backbone ablation's EfficientNet rows)."""
    if recipe.get("model_name") and not as_named and model_name in STUDY_NAMES:
        return recipe["model_name"]
    return profile.model_for(model_name)


def train_config(profile: Profile, model_name: str, task: str, data: DataSpec, *, init_from: str | Path | None = None,
                 freeze: int = 0, image_size: int | None = None, epochs: int | None = None,
                 batch_size: int | None = None, lr: float | None = None, head: str = "mlp", seed: int = 49,
                 as_named: bool = False):
    """The TrainConfig of one training of the suite (everything but `out`).

    A profile trains from random weights on real data with the small-data recipe
    (`common.train_config.SMALL_DATA_RECIPE`, measured by bench/bench_recipe.py) for everything but
    the backbone, which stays the experiment's (`trained_model`: the study's own backbone becomes the
    recipe's); knobs given explicitly still win."""
    recipe = small_data_recipe(profile, data)
    model = trained_model(profile, model_name, recipe, as_named)
    pretrained = profile.pretrained_for(model) if init_from is None else False
    settings = dict(image_size=profile.image_size, epochs=profile.epochs, batch_size=profile.batch_size,
                    lr=profile.lr, warmup_steps=profile.warmup_steps, patience=profile.patience)
    settings.update({k: v for k, v in recipe.items() if k != "model_name"})
    knobs = dict(image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr)
    settings.update({k: v for k, v in knobs.items() if v})
    return TrainConfig(
        data=data.dirs(), task=task, model_name=model, head=head,
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

    @functools.cached_property
    def recipe(self) -> dict:
        """The small-data recipe's fields when this experiment trains with it, else {}."""
        return small_data_recipe(self.profile, self.data)

    def model_for(self, model_name: str, as_named: bool = False) -> str:
        """The timm model this experiment trains for `model_name` (`trained_model`)."""
        return trained_model(self.profile, model_name, self.recipe, as_named)

    @property
    def label(self) -> str:
        """How the tables name the settings (`settings_label`)."""
        return settings_label(self.profile, self.recipe)


def settings_label(profile: Profile, recipe: dict) -> str:
    """The profile's label, and the small-data recipe's settings when they apply."""
    if not recipe:
        return profile.label
    return (f"{profile.label}; on this real data the small-data recipe (bench/bench_recipe.py): {recipe['image_size']} "
            f"px, {recipe['in_chans']} channel, {recipe['epochs']} epochs, EMA {recipe['ema']}, last epoch kept, the "
            f"study's backbone trained as {recipe['model_name']}")


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


def stage1_run(s: Setup, model_name: str, init: Path | None = None, role: str = STAGE1) -> RunRef:
    """Stage 1 of `model_name`: Cardiomegaly vs No Finding, trained or reused from the run cache
    (`init`: start from this run's backbone, e.g. a `medimaging pretrain` run)."""
    cfg = train_config(s.profile, model_name, "cardiomegaly", s.data, init_from=init, **s.kw)
    return cached_fit(cfg, role, model_name, s.runs)


def stage2_run(s: Setup, model_name: str, init: RunRef | Path | None, role: str, freeze: int = 0,
               as_named: bool = False) -> RunRef:
    """Stage 2 of `model_name` (14 labels), from the run `init` (a stage-1 RunRef or a run folder)
    or from the profile's initialisation; `as_named`: see `trained_model`."""
    init_dir = init.run_dir if isinstance(init, RunRef) else init
    cfg = train_config(s.profile, model_name, "all14", s.data, init_from=init_dir, freeze=freeze, as_named=as_named,
                       **s.kw)
    return cached_fit(cfg, role, model_name, s.runs)
