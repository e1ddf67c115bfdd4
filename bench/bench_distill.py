"""Distillation benchmark: an EfficientNet-B0 teacher against distilled students, speed and test AUROC.

    .venv/bin/python bench/bench_distill.py                              # the synthetic default, quick recipe
    .venv/bin/python bench/bench_distill.py --recipe px=48 --recipe px=64,epochs=8,alpha=1
    .venv/bin/python bench/bench_distill.py --data ../shared/data/nih-sample --data ../shared/data/nih-64-cardiomegaly
    .venv/bin/python bench/bench_distill.py --teacher RUN                # reuse a trained teacher run

Issue 6's target: the best compressed model >= 3x faster model-only than the fp32 EfficientNet-B0
teacher, with mean AUROC lower by at most 0.02. That is only measurable where the teacher learns
something, so the default data is the suite's synthetic default (`common.synthetic`, generated once
into $MEDIMAGING_CACHE), whose findings a small network can learn at 64 px.

The teacher is trained exactly as `notebooks/compression.ipynb` trains it (`common.experiments`:
all 14 labels, the profile's recipe, cached in the run cache, so the notebook reuses it and vice
versa); each `--recipe` distils a student with `common.compress.distill_run`, cached under the
key the notebook uses (`common.experiments.compression.cached_distill`), so the profile's default
recipe is shared too. Every model is exported to ONNX (fp32 and int8) and measured by
`common.compress.measure_table`: model-only latency at batch 1 with `--threads` ONNX Runtime
threads, each model in a fresh process, all in the same run and `--rounds` times (each row keeps
its fastest median), and mean AUROC on the teacher's stored test split. Prints one table and the
target check.

Measured on a 2-core CPU (tables in the commit message that added this paragraph): the quick
profile's 4-epoch teacher reaches only ~0.59 test mean AUROC on the synthetic default, so its
students' AUROC changes are noise-sized; `--teacher-epochs 12` gives a teacher that has learnt
(~0.72). Against it, mobilenetv3_small_100 at 64 px distilled for 20 epochs (T=2, alpha=0.5)
met the target (int8: 4.0x faster, -0.006 mean AUROC); 4 or 12 epochs, 48 px or alpha=1 did not.

A recipe is comma-separated key=value pairs, missing keys from the profile's defaults:
student (timm name), px (input side), epochs, alpha, T (temperature), lr.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

RECIPE_KEYS = {"student": str, "px": int, "epochs": int, "alpha": float, "T": float, "lr": float}


def parse_recipe(text: str, defaults: dict) -> dict:
    """'px=64,epochs=8' -> a full recipe dict, the rest from `defaults`."""
    recipe = dict(defaults)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in RECIPE_KEYS:
            raise SystemExit(f"--recipe {text!r}: expected key=value pairs with keys {sorted(RECIPE_KEYS)}, got {part!r}")
        try:
            recipe[key] = RECIPE_KEYS[key](value)
        except ValueError:
            raise SystemExit(f"--recipe {text!r}: {key}={value!r} is not a {RECIPE_KEYS[key].__name__}") from None
    return recipe


def recipe_label(r: dict) -> str:
    return f"{r['px']} px, {r['epochs']} ep, alpha={r['alpha']:g}, T={r['T']:g}, lr={r['lr']:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, action="append",
                    help="a dataset folder (repeat for two; default: the synthetic default, nih + cardiomegaly)")
    ap.add_argument("--teacher", type=Path, help="a trained teacher run to reuse (default: train the profile's)")
    ap.add_argument("--teacher-epochs", type=int, help="train the teacher for this many epochs (default: the profile's)")
    ap.add_argument("--profile", default="quick", help="the recipe of teacher and default student (default: quick)")
    ap.add_argument("--recipe", action="append",
                    help="a student recipe, e.g. px=64,epochs=8,alpha=1 (repeat; default: the profile's one)")
    ap.add_argument("--runs", type=Path, help="the run cache (default: $MEDIMAGING_RUNS, else <cache>/runs)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: 2)")
    ap.add_argument("--repeats", type=int, default=30, help="timed model runs per model and round (default: 30)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds; the fastest median is kept (default: 3)")
    ap.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 rows")
    ap.add_argument("--smoke", action="store_true",
                    help="the code path only: the smoke profile's tiny models, two steps each, a small synthetic set")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args()
    # OpenMP threads that sleep while waiting: spinning ones train far slower on a shared machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from common import compress, runs
    from common import experiments as ex
    from common.experiments.compression import cached_distill

    prof = ex.get_profile(args.profile, args.smoke)
    plan = ex.compression_plan(prof)
    root = ex.runs_dir(args.runs)
    data = None
    if args.data:
        if len(args.data) > 2:
            raise SystemExit("--data: at most two folders (a 14-label set and a Cardiomegaly set)")
        full = cardio = None
        for d in args.data:
            d = d.expanduser().resolve()
            ex.load_data(d)  # a clear error for a missing or unreadable folder
            if ex.is_cardiomegaly_layout(d):
                cardio = d
            else:
                full = d
        data = ex.DataSpec(full, cardio, any(bool(getattr(ex.load_data(d), "is_synthetic", False)) for d in args.data))
    elif args.teacher is None:
        from common import synthetic

        if args.smoke:  # a small set of its own, beside the default, so smoke runs stay seconds
            smoke_root = synthetic.synthetic_root().with_name("synthetic-bench-smoke")
            if not (smoke_root / synthetic.SYNTHETIC_MARKER).is_file():
                synthetic.generate(smoke_root, "nih", n_images=80, image_size=64, progress=args.progress)
            data = ex.DataSpec(smoke_root.resolve(), None, True)
        else:
            nih, cardio = synthetic.ensure_default(progress=args.progress)
            data = ex.DataSpec(nih.resolve(), cardio.resolve(), True)

    t0 = time.perf_counter()
    if args.teacher is not None:
        teacher_run = args.teacher.resolve()
        if not (teacher_run / runs.METRICS_JSON).is_file():
            raise SystemExit(f"--teacher {args.teacher}: not a finished run ({runs.METRICS_JSON} missing)")
    else:
        cfg = ex.train_config(prof, "efficientnet_b0", "all14", data, epochs=args.teacher_epochs)
        teacher_run = ex.cached_fit(cfg, "teacher", "efficientnet_b0", root).run_dir
    teacher_s = time.perf_counter() - t0

    defaults = {"student": prof.model_for(compress.DEFAULT_STUDENT), "px": int(plan["student_image_size"]),
                "epochs": prof.epochs, "alpha": 0.5, "T": 2.0, "lr": prof.lr}
    recipes = [parse_recipe(r, defaults) for r in (args.recipe or [""])]
    variants = [compress.Variant("teacher fp32", teacher_run, False, "fp32",
                                 runs.read_config(teacher_run)["model"]["model_name"], "the reference")]
    if args.int8:
        variants.append(compress.Variant("teacher int8", teacher_run, True, "int8", variants[0].backbone,
                                         "post-training int8", "teacher fp32"))
    fit_common = {"progress": args.progress, "num_workers": prof.num_workers, "n_boot": prof.n_boot}
    student_s = {}
    for r in recipes:
        student = prof.model_for(r["student"])
        t0 = time.perf_counter()
        # the cache key of the compression experiment's student (weights as the profile says)
        run_dir, _ = cached_distill(teacher_run, root, student, r["px"], r["T"], r["alpha"], r["epochs"],
                                    prof.max_steps, r["lr"], prof.pretrained_for(student), **fit_common)
        label = f"{student} ({recipe_label(r)})"
        student_s[label] = time.perf_counter() - t0
        variants.append(compress.Variant(f"{label} fp32", run_dir, False, "distill", student, recipe_label(r),
                                         "teacher fp32"))
        if args.int8:
            variants.append(compress.Variant(f"{label} int8", run_dir, True, "distill", student, recipe_label(r),
                                             "teacher fp32"))
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("two --recipe give the same student; give each a different setting")

    quiet = lambda msg: None  # noqa: E731
    repeats = {"repeats": 5, "e2e_repeats": 2, "rounds": 1} if args.smoke else {
        "repeats": args.repeats, "e2e_repeats": 5, "rounds": args.rounds}
    rows = compress.measure_table(variants, threads=args.threads, progress=args.progress, log=quiet, **repeats)

    t_metrics = runs.load_json(teacher_run / runs.METRICS_JSON)
    where = ex.display_path(teacher_run)
    print(f"\n## Distillation, {'SYNTHETIC data' if rows[0].get('synthetic') else 'data of ' + where}: "
          f"batch 1, {args.threads} ONNX Runtime threads, model only, fastest median of {repeats['rounds']} round(s)\n")
    print(f"Teacher run: {where} ({'reused' if args.teacher else f'{teacher_s:.0f} s to train or reuse'}; "
          f"dev mean AUROC {t_metrics.get('dev', {}).get('mean_auroc', float('nan')):.4f}); test split: "
          f"{rows[0]['n_images']} images. Students: "
          + "; ".join(f"{k} {v:.0f} s" for k, v in student_s.items()) + " (to distil, or reuse from the cache)\n")
    print("| model | input px | params M | GMACs | model ms | speed x | test mean AUROC | AUROC change |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [r["name"], str(r["image_size"]), f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.4f}",
                 f"{r['model_ms']:.3f}", "1.00x" if r["speed_x"] is None else f"{r['speed_x']:.2f}x",
                 "n/a" if r["mean_auroc"] is None else f"{r['mean_auroc']:.4f}",
                 "n/a" if r["d_auroc"] is None else f"{r['d_auroc']:+.4f}"]
        print("| " + " | ".join(cells) + " |")
    print()
    print(compress.targets_markdown([c for c in compress.check_targets(rows, teacher="teacher fp32")
                                     if c["target"].startswith(("best", "fastest"))]))


if __name__ == "__main__":
    main()
