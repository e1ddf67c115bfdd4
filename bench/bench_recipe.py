"""The small-data recipe search: which training recipe learns most from ~1,000 real radiographs on a CPU.

Every recipe is a set of `TrainConfig` fields over one base, trained from random initialisation on
the 14-label task and measured by patient-wise K-fold cross-validation
(`common.experiments.crossval`): every image is a test image once, the folds are the same for
every recipe, and each fold is a cached run (rerunning the bench reuses finished folds and resumes
an interrupted one). It appends each recipe's row to a markdown table as soon as it is measured:

    recipe | what changes | Cardiomegaly AUROC | mean AUROC (14) | labels > 0.5 | pooled mean | min / fold

AUROCs are the mean over folds with a Student-t 95% interval across folds; "pooled mean" is the mean
over labels of one AUROC per label on all out-of-fold predictions; "labels > 0.5" counts labels
whose fold-mean interval lies above 0.5.

    python bench/bench_recipe.py                          # every recipe, 5 folds, ../shared/data
    python bench/bench_recipe.py --recipes base ema --only 0 1   # a quick look: two folds
    python bench/bench_recipe.py --list                   # the recipes and what each changes

Data: --data DIR (repeatable); default: nih-sample and nih-64-cardiomegaly under $MEDIMAGING_SAMPLE_DATA
(or ../shared/data beside the checkout). Runs go to --runs (default: the run cache's bench-recipe/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning on a busy machine

from common.experiments.crossval import cross_validate, t_interval  # noqa: E402
from common.paths import REPO_ROOT, cache_root, sample_data_dir  # noqa: E402
from common.train_config import TrainConfig  # noqa: E402

# The base every recipe changes: what the suite trained on real data before this search (the quick
# profile's EfficientNet-B0 at 64 px, 3 channels, 4 epochs).
BASE = dict(task="all14", model_name="efficientnet_b0", in_chans=3, image_size=64, epochs=4, batch_size=32,
            lr=1e-3, warmup_steps=20, patience=0, n_boot=200, num_workers=0, progress=False, seed=49)

# name -> (what changes, TrainConfig fields over BASE). Later recipes build on the best earlier one.
_R18 = dict(model_name="resnet18", in_chans=1, epochs=30, warmup_steps=50)
_COMBO = dict(ema=0.998, keep_best=False, intensity=0.5, zoom=0.15, translate=0.08)
RECIPES: dict[str, tuple[str, dict]] = {
    "base": ("the quick profile before this search: efficientnet_b0, 3 ch, 64 px, 4 epochs", {}),
    "r18-30ep": ("resnet18, 1 channel, 30 epochs", _R18),
    "r18-30ep-posw": ("+ positive weighting", {**_R18, "pos_weight": True}),
    "r18-30ep-int": ("+ intensity 0.5, zoom 0.15, shift 0.08", {**_R18, "intensity": 0.5, "zoom": 0.15,
                                                                  "translate": 0.08}),
    "r18-30ep-ema": ("+ EMA of the weights (0.998), keep the last epoch", {**_R18, "ema": 0.998, "keep_best": False}),
    "r18-30ep-combo": ("+ EMA, keep the last epoch, intensity 0.5, zoom 0.15, shift 0.08",
                       {**_R18, "ema": 0.998, "keep_best": False, "intensity": 0.5, "zoom": 0.15, "translate": 0.08}),
    "r18-30ep-last": ("+ keep the last epoch, not the best on dev", {**_R18, "keep_best": False}),
    "r18-30ep-mixup": ("+ mixup 0.3", {**_R18, "mixup": 0.3}),
    "r18-30ep-focal": ("+ focal loss", {**_R18, "loss": "focal"}),
    "r18-30ep-ls": ("+ label smoothing 0.1", {**_R18, "label_smoothing": 0.1}),
    "r10t-30ep": ("resnet10t instead of resnet18", {**_R18, "model_name": "resnet10t"}),
    "r10t-30ep-combo": ("resnet10t + EMA, keep the last epoch, intensity 0.5, zoom 0.15, shift 0.08",
                        {**_R18, "model_name": "resnet10t", "ema": 0.998, "keep_best": False, "intensity": 0.5,
                         "zoom": 0.15, "translate": 0.08}),
    "r10t-30ep-combo-mixup": ("resnet10t + the combination + mixup 0.3",
                              {**_R18, "model_name": "resnet10t", "ema": 0.998, "keep_best": False, "intensity": 0.5,
                               "zoom": 0.15, "translate": 0.08, "mixup": 0.3}),
    "r18-30ep-combo-mixup": ("resnet18 + the combination + mixup 0.3",
                             {**_R18, "ema": 0.998, "keep_best": False, "intensity": 0.5, "zoom": 0.15,
                              "translate": 0.08, "mixup": 0.3}),
    "r18-30ep-combo-posw": ("resnet18 + the combination + positive weighting",
                            {**_R18, **_COMBO, "pos_weight": True}),
    "r18-96px-combo": ("resnet18 + the combination at 96 px", {**_R18, **_COMBO, "image_size": 96}),
    "r18-60ep-combo": ("resnet18 + the combination, 60 epochs", {**_R18, **_COMBO, "epochs": 60}),
    "b0-30ep-combo": ("efficientnet_b0 (the quick profile's study backbone) + the combination",
                      {**_R18, "model_name": "efficientnet_b0", "ema": 0.998, "keep_best": False, "intensity": 0.5,
                       "zoom": 0.15, "translate": 0.08}),
    "r10t-30ep-mixup": ("resnet10t + mixup 0.3", {**_R18, "model_name": "resnet10t", "mixup": 0.3}),
    "r10t-30ep-posw": ("resnet10t + positive weighting", {**_R18, "model_name": "resnet10t", "pos_weight": True}),
    "r10t-60ep": ("resnet10t, 60 epochs", {**_R18, "model_name": "resnet10t", "epochs": 60}),
    "r18-60ep": ("resnet18, 60 epochs", {**_R18, "epochs": 60}),
    "r18-96px": ("resnet18 at 96 px", {**_R18, "image_size": 96}),
    "r18-lr3e-3": ("resnet18, lr 3e-3, weight decay 0.05", {**_R18, "lr": 3e-3, "weight_decay": 0.05}),
}

# the search's choice: common.train_config.SMALL_DATA_RECIPE is this recipe (tests/test_recipe.py checks it)
WINNER = "r18-30ep-combo"

TABLE_HEAD = ("| recipe | what changes | folds | Cardiomegaly AUROC | mean AUROC (14) | labels > 0.5 | pooled mean "
              "| min / fold |\n|---|---|---|---|---|---|---|---|\n")


def default_data() -> list[str]:
    root = sample_data_dir()
    if not (root / "nih-sample").is_dir():
        raise SystemExit(f"no sample data in {root}: give --data DIR (repeatable) or set MEDIMAGING_SAMPLE_DATA")
    return [str(root / "nih-sample"), str(root / "nih-64-cardiomegaly")]


def _ci(m: dict) -> str:
    if m.get("mean") is None:
        return "n/a"
    if m.get("low") is None:
        return f"{m['mean']:.3f}"
    return f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def row(name: str, what: str, summary: dict) -> str:
    labels = summary["labels"]
    cardio = labels.get("Cardiomegaly", {})
    above = sum(1 for v in labels.values() if v.get("low") is not None and v["low"] > 0.5)
    pooled = [v["pooled"] for v in labels.values() if v.get("pooled") is not None]
    pooled_mean = t_interval(pooled)[0]
    folds = f"{summary['folds']}/{summary['of_folds']}"
    return (f"| {name} | {what} | {folds} | {_ci(cardio)} | {_ci(summary['mean_auroc'])} | {above}/{len(labels)} "
            f"| {pooled_mean:.3f} | {summary['minutes_per_fold']} |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", help="dataset folder (repeatable)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe names (default: all)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only", type=int, nargs="+", help="run only these folds (a quick look)")
    ap.add_argument("--runs", default=str(cache_root() / "bench-recipe"), help="where the fold runs are cached")
    ap.add_argument("--table", default=str(REPO_ROOT / "bench" / "results" / "recipe_search.md"))
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field of every recipe (JSON values), e.g. epochs=2")
    ap.add_argument("--list", action="store_true", help="print the recipes and exit")
    ap.add_argument("--compare-inits", metavar="RECIPE", help="instead of the search: what stage 2 of RECIPE "
                    "should start from (random, --pretrain-run, a per-fold stage 1, both), on the same folds")
    ap.add_argument("--pretrain-run", help="a `medimaging pretrain` run for --compare-inits (its model, channels "
                    "and size must be the recipe's)")
    args = ap.parse_args(argv)
    if args.list:
        for name, (what, fields) in RECIPES.items():
            print(f"{name:16s} {what}\n{'':16s} {json.dumps({**BASE, **fields})}")
        return 0
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {unknown}; see --list")
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    data = args.data or default_data()
    table = Path(args.table)
    table.parent.mkdir(parents=True, exist_ok=True)
    if not table.is_file():
        table.write_text(TABLE_HEAD)
    command = "python bench/bench_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.compare_inits:
        return compare(args, data, overrides, command)
    for name in args.recipes:
        what, fields = RECIPES[name]
        cfg = TrainConfig(data=data, out="", **{**BASE, **fields, **overrides})
        started = time.perf_counter()
        cv = cross_validate(cfg, folds=args.folds, name=name, runs=args.runs, only=args.only)
        summary = cv.summary(n_boot=200)
        line = row(name, what + (f"; {overrides}" if overrides else ""), summary)
        print(line, end="", flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s; per label: " + ", ".join(
            f"{k} {v['mean']:.2f}" for k, v in summary["labels"].items() if v["mean"] is not None) + ")", flush=True)
        with table.open("a") as f:
            f.write(line)
        detail = table.with_suffix(".jsonl")
        with detail.open("a") as f:
            f.write(json.dumps({"recipe": name, "what": what, "config": {**BASE, **fields, **overrides},
                                "command": command, "summary": summary}) + "\n")
    return 0


def compare(args, data: list[str], overrides: dict, command: str) -> int:
    """--compare-inits: one table, written next to the search table as init_comparison.md."""
    from common.experiments.crossval import compare_inits

    if args.compare_inits not in RECIPES:
        raise SystemExit(f"unknown recipe {args.compare_inits!r}; see --list")
    what, fields = RECIPES[args.compare_inits]
    cfg = TrainConfig(data=data, out="", **{**BASE, **fields, **overrides})
    frame = compare_inits(cfg, args.pretrain_run, folds=args.folds, runs=args.runs, only=args.only)
    lines = [f"Recipe {args.compare_inits} ({what}{f'; {overrides}' if overrides else ''}); `{command}`\n\n",
             "| stage 2 starts from | folds | mean AUROC (14) | Cardiomegaly AUROC | mean AUROC vs random init "
             "| pooled, paired vs random init | min / fold |\n|---|---|---|---|---|---|---|\n"]
    for r in frame.to_dict("records"):
        lines.append(f"| {r['start']} | {r['folds']}/{args.folds} | {_ci(r['mean AUROC'])} | {_ci(r['Cardiomegaly AUROC'])} "
                     f"| {_ci(r['vs random init']) if r['vs random init']['mean'] is not None else '—'} "
                     f"| {_ci(r['pooled vs random init']) if r['pooled vs random init']['mean'] is not None else '—'} "
                     f"| {r['min / fold']} |\n")
    text = "".join(lines)
    print(text)
    out = Path(args.table).with_name("init_comparison.md")
    with out.open("a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
