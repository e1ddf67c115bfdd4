"""Compression of a trained run, and the one table that says what it costs and what it buys.

    from common import compress
    compress.quantize_run("runs/all14", "runs/all14-int8")                 # ONNX export folder (fp32 + int8)
    compress.prune_run("runs/all14", "runs/all14-prune50", sparsity=0.5)   # a run dir, fine-tuned
    compress.distill_run("runs/all14", "runs/all14-student",
                         student="mobilenetv3_small_100", student_image_size=160)   # a run dir
    rows = compress.measure_table(compress.variants_for({"efficientnet_b0": "runs/all14"},
                                                        pruned_runs=["runs/all14-prune50"],
                                                        student_runs=["runs/all14-student"]))
    print(compress.table_markdown(rows))    # the notebook's experiment: common.experiments.compression

The package, in the order a compression runs:

    base       the derived run's TrainConfig; compression.json, which every output folder carries
    quantize   int8: ONNX Runtime static QDQ, per-channel, calibrated on dev images (`common.export`)
    prune      magnitude pruning, and a run pruned then fine-tuned by `fit` with the masks held fixed
    distill    the distillation loss, and a smaller timm model trained by `fit` on the teacher's split
    variants   the rows of a table: trained runs, or random-init models at one input size
    measure    sizes, MACs, test AUROC as served, ratios against each row's baseline
    timing     latency and peak memory in a fresh torch-free process (`python -m common.compress`)
    table      the table's columns and markdown, where speed comes from, the issue's targets

Every output folder gets `compression.json`: method, source, knobs, and what was measured.

The names below are importable from `common.compress` itself; each submodule is imported when one
of its names is first used. `python -m common.compress` is the measuring child process: it loads
only `timing` (numpy, Pillow, ONNX Runtime), so the peak RSS it reports is the serving process's
own, without torch or pandas.
"""
from __future__ import annotations

from common.lazy import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "base": ("COMPRESSION_JSON", "FineTune", "source_train_config", "read_report"),
    "quantize": ("quantize_run",),
    "prune": ("PRUNE_LR_FACTOR", "prune_run"),
    "distill": ("DEFAULT_STUDENT", "DISTILL_LOSS_CSV", "distill_run", "read_distill_loss"),
    "variants": ("Variant", "variants_for", "random_init_variants"),
    # ensure_export is common.export's (the one freshness rule), which measure uses; named here as before
    "measure": ("SplitImages", "split_images", "count_macs", "model_stats", "file_stats", "score_served",
                "measure_table", "ensure_export"),
    "timing": ("measure_served", "time_shares"),
    "table": ("TABLE_COLUMNS", "SPEED_COLUMNS", "table_markdown", "table_title", "table_note", "speed_source",
              "check_targets", "targets_markdown"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
