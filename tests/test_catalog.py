"""common.catalog on hand-made run folders and records (the file contracts of common.runs and
common.experiments.records): roles by meaning, grouping, the default choice. The real path, after
a smoke `make reproduce`, is tests/test_newcomer.py."""
from __future__ import annotations

import json
from pathlib import Path

from common import catalog
from common.labels import LABELS


def _run(root: Path, name: str, *, task: str = "all14", init_from: str | None = None, synthetic: bool = False,
         auroc: float | None = 0.6, data: str = "/data/nih-sample", created: str = "2026-11-26T10:00:00+00:00") -> Path:
    run = root / name
    run.mkdir(parents=True)
    labels = ["Cardiomegaly"] if task == "cardiomegaly" else list(LABELS)
    (run / "config.json").write_text(json.dumps({
        "model": {"model_name": "efficientnet_b0"}, "labels": labels, "input": {"image_size": 64},
        "train": {"task": task, "init_from": init_from}, "synthetic": synthetic,
        "data": [{"root": data, "synthetic": synthetic}], "created": created}))
    (run / "best.safetensors").write_bytes(b"weights")
    if auroc is not None:
        (run / "metrics.json").write_text(json.dumps({"mean_auroc": auroc}))
    return run


def _record(out: Path, name: str, runs: dict[str, Path]) -> None:
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "tables" / f"{name}.json").write_text(json.dumps({"name": name, "runs": {
        role: {"role": role, "run_dir": f"/elsewhere/runs/{run.name}", "requested_model": "m", "model_name": "m",
               "reused": False} for role, run in runs.items()}}))


def test_runs_are_named_by_the_roles_records_give_them_and_grouped(tmp_path):
    runs, out = tmp_path / "cache" / "runs", tmp_path / "results" / "local"
    s1 = _run(runs, "cardiomegaly-efficientnet_b0-aaa", task="cardiomegaly", auroc=0.7)
    s2 = _run(runs, "all14-efficientnet_b0-bbb", init_from=str(s1), auroc=0.61)
    scratch = _run(runs, "all14-efficientnet_b0-ccc", auroc=0.58)
    pruned = _run(runs, "all14-efficientnet_b0-ccc--prune-1234567890", auroc=0.57)
    _run(tmp_path / "runs", "first", created="2026-11-27T10:00:00+00:00")
    _record(out, "single_task", {"stage 1": s1})
    _record(out, "multi_task", {"stage 1": s1, "stage 2": s2, "stage 2 without stage 1": scratch})
    _record(out, "backbone_ablation", {"EfficientNet-B0": scratch})
    _record(out, "compression", {"EfficientNet-B0 pruned 50%": pruned})
    (out / "tables" / "broken.json").write_text("{not json")  # passed over, never fatal

    entries = catalog.catalog([runs, tmp_path / "runs"], records=[out])
    names = [e.name for e in entries]
    assert names == ["single task: stage 1", "multi task: stage 2", "multi task: stage 2 without stage 1",
                     "compression: EfficientNet-B0 pruned 50%", "runs/first (all14 run)"]
    by_name = {e.name: e for e in entries}
    assert by_name["multi task: stage 2 without stage 1"].also == (catalog.Role("backbone_ablation", "EfficientNet-B0"),)
    assert by_name["compression: EfficientNet-B0 pruned 50%"].kind == "compressed variant"
    label = by_name["multi task: stage 2"].label
    assert label == "multi task: stage 2 | efficientnet_b0, 64 px | nih-sample | test AUROC 0.610 | " + \
        by_name["multi task: stage 2"].made
    assert catalog.default_entry(entries).path == s2.resolve()
    # without records: described from its own files
    assert catalog.model_entry(s2).name == f"runs/{s2.name} (stage 2)"
    assert catalog.model_entry(s1).kind == "stage 1" and catalog.model_entry(pruned).kind == "compressed variant"


def test_the_default_is_the_best_stage2_real_data_first(tmp_path):
    runs = tmp_path / "runs"
    stage1 = _run(runs, "s1", task="cardiomegaly", auroc=0.9)
    synthetic = _run(runs, "synthetic", init_from=str(stage1), synthetic=True, auroc=0.8)
    real_low = _run(runs, "real-low", init_from=str(stage1), auroc=0.55)
    real_high = _run(runs, "real-high", init_from=str(stage1), auroc=0.62)
    _run(runs, "real-unscored", init_from=str(stage1), auroc=None)
    _run(runs, "newest-student", auroc=0.99, created="2027-01-01T00:00:00+00:00")  # not a stage 2
    entries = catalog.catalog([runs], records=[])
    assert catalog.default_entry(entries).path == real_high.resolve()
    assert synthetic.resolve() in [e.path for e in entries] and real_low.resolve() in [e.path for e in entries]
    assert "SYNTHETIC" in next(e.label for e in entries if e.path == synthetic.resolve())
    assert catalog.default_entry([e for e in entries if e.synthetic or e.kind != "stage 2"]).path == synthetic.resolve()
    assert catalog.default_entry([]) is None
