"""The study's experiments as functions of a few knobs: profiles, cached runs, tables and plots.

The trainer files (`single-task/trainer.py`, ...) and the notebooks call these; nothing here is a
training loop (`common.train.fit`), a dataset (`common.data`) or a metric (`common.metrics`).

    from common import experiments
    exp = experiments.single_task("tf_efficientnet_b4.ns_jft_in1k", profile="quick")
    print(exp.report())          # markdown tables, SYNTHETIC in the titles when the data is
    exp.save("results")          # results/tables/single_task.json, collected by `medimaging reproduce`

The package, in the order data flows through it:

    profiles      how big a training is (quick / paper / smoke), the backbones, the shared `Knobs`
    datasets      which folders an experiment uses (`DataSpec`), their identity in run keys
    runcache      the run cache: key, finished, lock, `cached_fit` (train or reuse)
    stages        one TrainConfig per training; stage 1 and stage 2 through the run cache
    crossval      patient-wise K-fold cross-validation of one TrainConfig, CIs across folds
    heldout       a run's test split joined with its test predictions
    tables        `Table` and the number formats every table uses
    notebooks     the reproduce order of the notebooks
    records       `Experiment`: what a notebook reports, saved to OUT/tables; tables.md
    plots         curves, ROC, CheXNet comparison, example predictions
    study         the two stages (single_task, multi_task, transformer), the headline table
    ablations     backbones and freezing
    paired        runs compared on the same held-out images (paired bootstrap differences)
    inits         what stage 2 should start from: random, self-supervised, stage 1, both
    exploration   the data's tables and plots
    compression   int8 / pruning / distillation of the study's backbones, in one table
    localisation  the Grad-CAM pointing game on radiologist boxes
    inventory     what the suite keeps on disk (`medimaging cache`)
    reproduce     `medimaging reproduce`: every notebook through papermill

The names below are importable from `common.experiments` itself; each submodule is imported when
one of its names is first used, so `import common.experiments.notebooks` (the command line) stays
light and nothing loads matplotlib before a plot is drawn.
"""
from __future__ import annotations

from common.lazy import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "profiles": ("STUDY_MODEL", "STUDY_VIT", "STUDY", "BACKBONES", "QUICK_MODELS", "Profile", "PROFILES",
                 "WEIGHTS_ENV", "check_weights", "get_profile", "KNOBS", "knobs_of", "knobs_to_kwargs", "Knobs",
                 "COMPRESSION_PLANS", "compression_plan"),
    "datasets": ("load_data", "dataset_identity", "DataSpec", "is_cardiomegaly_layout", "resolve_data",
                 "display_path", "title"),
    "runcache": ("run_key", "cache_key", "is_finished", "RUN_LOCK", "run_lock", "RunRef", "touch_used",
                 "cached_fit"),
    "stages": ("train_config",),
    "crossval": ("CrossValidation", "cross_validate", "compare_inits", "paired_difference",
                 "pooled_paired_difference", "t_interval"),
    "heldout": ("HeldOut", "held_out"),
    "tables": ("Table", "pct", "num", "with_ci", "baseline_row", "model_row", "per_label_table"),
    "notebooks": ("Notebook", "NOTEBOOKS", "notebook_names", "runs_dir"),
    "records": ("Experiment", "load_experiments", "record_runs", "record_tables", "write_tables_md"),
    "plots": ("plot_curves", "plot_test_roc", "plot_chexnet_comparison", "prediction_grid"),
    "study": ("single_task", "two_stage", "multi_task", "transformer", "headline_table"),
    "ablations": ("backbone_ablation", "plot_backbones", "choose_backbones", "freeze_ablation"),
    "paired": ("paired_table", "shared_test_images", "seen_patients"),
    "inits": ("init_comparison", "pretrain_config"),
    "compression": ("CompressionKnobs", "compression_experiment"),
    "exploration": ("label_counts", "dataset_overview", "cooccurrence", "demographics", "plot_label_frequencies",
                    "plot_cooccurrence", "plot_demographics", "image_grid", "data_exploration"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
