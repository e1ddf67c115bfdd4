"""Scale benchmark: how every step's cost grows from 1,000 to 112,120 images (NIH's size), side by side.

    .venv/bin/python bench/bench_scale.py                          # N = 1,000, 10,000, 112,120
    .venv/bin/python bench/bench_scale.py --sizes 1000 10000 --predict-images 200
    .venv/bin/python bench/bench_scale.py --steps load cache loader --sizes 1000

Data: for each N, an NIH-layout SYNTHETIC dataset made by the suite's own generator
(`common.synthetic.generate`: NIH's Data_Entry columns, 1-4 follow-ups per patient, the
SYNTHETIC.json marker) at --image-px (192 px PNGs by default, so 112,120 images take ~2.5 GB and
~7 minutes on 2 idle cores), plus
NIH's official lists (train_val_list.txt / test_list.txt: whole patients, 25,596 / 112,120 of the
images in test, as NIH's). Generated once under --root (default: $MEDIMAGING_CACHE/bench-scale) and
reused by later runs; so is the untrained ONNX export of the predict step.

Steps, each in a fresh process (its peak RSS is the process tree's, from wait4, so steps do not
pollute each other), at every N:
  load          `load_dataset` (csv + image index) + `patient_split`
  decode 1 proc one process decoding + resizing (`read_resized`) a sample of the PNGs: the floor's unit
  cache build  `ImageCache.load` into an empty store with every core; target >= 0.8 x cores x decode 1 proc
  reopen       the same paths again from the built store (nothing decoded)
  reopen view  the paths in another order (an aligned copy in views/), the second time (the copy exists)
  loader       one epoch of the training DataLoader (`XrayTensorDataset`, shuffled, 2 workers, batch 64),
               model-free, timed from its first batch (starting the workers is a fixed cost): per-image
               cost against N (target: at 112k within 20% of 1k); `epoch_s` in --json is the whole epoch
  loader+model --model-batches batches of the same loader through a small model's training step
               (BatchTransform with augmentation, masked BCE, AdamW)
  evaluate     `common.evaluate.evaluate_files` (what `medimaging evaluate` runs) on the official test
               list's images (25,596 x 14 at N = 112,120) with --n-boot resamples
and once (it does not depend on N), on 1,000 1024x1024 PNGs: the real NIH sample images
(`$MEDIMAGING_SAMPLE_DATA/nih-sample`, 400 files each linked under 2-3 names) when present, else
synthetic ones (--predict-source):
  predict decode 1 proc   `load` + `prepare` of the 1,024 px PNGs in one process
  predict model only      the ONNX model on ready batches (the same batch size)
  predict (CLI)           `medimaging predict DIR --onnx --csv` over --predict-images 1,024 px PNGs, launch to
                          exit; target >= 0.8 x the decode floor (cores x predict decode 1 proc)

Prints one markdown table (step x N: seconds, images/s, microseconds per image, peak RSS) and the
targets, and draws cost per image against N on log-log axes (--plot, default bench/bench_scale.png).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NIH_TEST_SHARE = 25_596 / 112_120  # NIH's official test list / all images
STEPS = ("load", "decode1", "cache", "reopen", "reopen_view", "loader", "model", "evaluate")
ONCE_STEPS = ("predict_decode1", "predict_model", "predict")
SCALING_STEPS = ("load", "cache", "reopen", "reopen_view", "loader", "evaluate")  # the others time a fixed sample
TITLES = {
    "load": "load_dataset + patient_split", "decode1": "decode 1 proc", "cache": "cache build",
    "reopen": "cache reopen", "reopen_view": "cache reopen, other order", "loader": "loader epoch (no model)",
    "model": "loader + small model", "evaluate": "evaluate (n_boot)", "predict_decode1": "predict decode 1 proc",
    "predict_model": "predict model only", "predict": "medimaging predict --onnx",
}


def default_root() -> Path:
    from common.paths import cache_root

    return cache_root() / "bench-scale"


def cores() -> int:
    from common.cache import default_workers  # the suite's own count of usable cores

    return default_workers()


# ------------------------------------------------------------------------------------ datasets
def write_official_lists(folder: Path) -> int:
    """NIH's train_val_list.txt / test_list.txt for a generated dataset: whole patients, in id order,
    every ~4.4th patient to test until NIH's share of the images is reached. Returns the test size."""
    import csv

    with open(folder / "Data_Entry_2017_v2020.csv", newline="") as f:
        rows = [(r["Image Index"], r["Patient ID"]) for r in csv.DictReader(f)]
    by_patient: dict[str, list[str]] = {}
    for image, pid in rows:
        by_patient.setdefault(pid, []).append(image)
    want = round(len(rows) * NIH_TEST_SHARE)
    test_set: set[str] = set()
    chosen: set[str] = set()
    patients = sorted(by_patient)
    stride = max(1, round(1 / NIH_TEST_SHARE))
    for order in (patients[::stride], patients):  # a spread first, then fill up
        for pid in order:
            if len(test_set) >= want:
                break
            if pid not in chosen:
                chosen.add(pid)
                test_set.update(by_patient[pid])
    (folder / "test_list.txt").write_text("".join(f"{i}\n" for i in sorted(test_set)))
    (folder / "train_val_list.txt").write_text("".join(f"{i}\n" for i, _ in rows if i not in test_set))
    return len(test_set)


def ensure_dataset(root: Path, n: int, image_px: int, seed: int = 0, log=print) -> Path:
    """The NIH-layout synthetic dataset of n images at image_px under root, generated once (atomically)."""
    from common.synthetic import SYNTHETIC_MARKER, generate

    out = root / f"nih-{n}-{image_px}px-seed{seed}"
    if (out / SYNTHETIC_MARKER).is_file() and (out / "test_list.txt").is_file():
        return out
    if not (out / SYNTHETIC_MARKER).is_file():
        tmp = root / f".tmp-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"generating {n} synthetic NIH images at {image_px} px into {out} ...")
        t = time.perf_counter()
        generate(tmp, layout="nih", n_images=n, image_size=image_px, seed=seed, progress=False)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        log(f"  {time.perf_counter() - t:.0f} s")
    write_official_lists(out)
    return out


def ensure_full_size(root: Path, n: int, px: int, source: str = "auto", log=print) -> Path:
    """n 1,024 px PNGs for the predict step: the real NIH sample images (`common.paths.sample_data_dir`),
    linked as often as needed to make n files, when they are there (source "auto" or "nih-sample");
    else synthetic images at px, generated once."""
    from common.paths import sample_data_dir
    from common.synthetic import SYNTHETIC_MARKER, generate

    real = sorted((sample_data_dir() / "nih-sample" / "images").glob("*.png"))
    if source == "nih-sample" and not real:
        raise SystemExit(f"--predict-source nih-sample: no PNGs in {sample_data_dir() / 'nih-sample' / 'images'}")
    if real and source != "synthetic":
        out = root / f"predict-{n}-nih-sample"
        if len(list(out.glob("*.png"))) != n:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for k in range(n):  # each real image under 2-3 names: the decode cost is per file
                (out / f"{k:05d}_{real[k % len(real)].name}").symlink_to(real[k % len(real)])
        return out
    out = root / f"predict-{n}-{px}px"
    if not (out / SYNTHETIC_MARKER).is_file():
        tmp = root / f".tmp-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"generating {n} synthetic images at {px} px for the predict step ...")
        generate(tmp, layout="nih", n_images=n, image_size=px, seed=1, progress=False)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    return out / "images"


def ensure_export(root: Path, model: str, size: int, log=print) -> Path:
    """An untrained run of `model` at `size` and its fp32 ONNX export (timing does not depend on training)."""
    folder = root / f"export-{model}-{size}px"
    if not (folder / "export" / "model.onnx").is_file():
        log(f"making an untrained {model} run and its ONNX export ...")
        code = ("import sys; from common.predict import create_untrained_run; from common.export import export_onnx; "
                "run = create_untrained_run(sys.argv[1], sys.argv[2], image_size=int(sys.argv[3]), synthetic=True); "
                "export_onnx(run, log=lambda m: None)")
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, "-c", code, str(folder), model, str(size)], check=True)
    return folder / "export"


# -------------------------------------------------------------------------------- step workers
def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (pool workers, the CLI)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _store(args) -> Path:
    return Path(args.data).parent / "stores" / f"{Path(args.data).name}-{args.cache_px}px"


def _paths(data: Path) -> list[str]:
    from common.data import load_dataset

    return load_dataset(data, quiet=True).frame["path"].tolist()


def step_load(args) -> dict:
    from common.data import load_dataset, patient_split

    t, c = time.perf_counter(), _cpu()
    ds = load_dataset(args.data, quiet=True)
    split = patient_split(ds.frame, seed=0)
    s = time.perf_counter() - t
    counts = split.value_counts().to_dict()
    return {"seconds": s, "cpu_s": _cpu() - c, "images": len(ds), "patients": int(ds.frame["patient_id"].nunique()),
            "split": {k: int(v) for k, v in counts.items()}, "synthetic": ds.is_synthetic}


def step_decode1(args) -> dict:
    from common.images import read_resized

    paths = _paths(args.data)[: args.decode_sample]
    read_resized(paths[0], args.cache_px)  # warm: imports, page cache
    t, c = time.perf_counter(), _cpu()
    for p in paths:
        pixels, reason = read_resized(p, args.cache_px)
        assert pixels is not None, reason
    return {"seconds": time.perf_counter() - t, "cpu_s": _cpu() - c, "images": len(paths)}


def step_cache(args) -> dict:
    from common.cache import ImageCache

    paths = _paths(args.data)
    store = _store(args)
    shutil.rmtree(store, ignore_errors=True)
    t, c = time.perf_counter(), _cpu()
    res = ImageCache(args.cache_px, root=store).load(paths, workers=args.workers, progress=False)
    s = time.perf_counter() - t
    assert res.ok.all() and res.decoded == len(paths), (res.decoded, res.unreadable[:3])
    disk = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    return {"seconds": s, "cpu_s": _cpu() - c, "images": len(paths), "disk_mb": disk / 1e6, "workers": args.workers}


def step_reopen(args) -> dict:
    from common.cache import ImageCache

    paths = _paths(args.data)
    t, c = time.perf_counter(), _cpu()
    res = ImageCache(args.cache_px, root=_store(args)).load(paths, progress=False)
    s = time.perf_counter() - t
    assert res.decoded == 0 and res.ok.all()
    return {"seconds": s, "cpu_s": _cpu() - c, "images": len(paths)}


def step_reopen_view(args) -> dict:
    from common.cache import ImageCache

    paths = _paths(args.data)
    other = paths[1::2] + paths[0::2]  # not one run of slots: served from an aligned copy
    cache = ImageCache(args.cache_px, root=_store(args))
    t, c = time.perf_counter(), _cpu()
    cache.load(other, progress=False)  # writes the copy (or finds it from an earlier run)
    first = time.perf_counter() - t
    t, c = time.perf_counter(), _cpu()
    res = cache.load(other, progress=False)
    s, cpu = time.perf_counter() - t, _cpu() - c
    assert res.decoded == 0 and res.ok.all()
    del res
    shutil.rmtree(cache.views_dir, ignore_errors=True)  # a copy of the whole store, made only to time it
    return {"seconds": s, "cpu_s": cpu, "images": len(paths), "first_s": first}


def _loader(args, images, y, shuffle_seed=0):
    import torch

    from common.cache import XrayTensorDataset

    dataset = XrayTensorDataset(images, y)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                       num_workers=args.loader_workers, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(shuffle_seed))


def _cached(args):
    import numpy as np

    from common.cache import ImageCache
    from common.data import load_dataset
    from common.labels import LABELS

    frame = load_dataset(args.data, quiet=True).frame
    res = ImageCache(args.cache_px, root=_store(args)).load(frame["path"].tolist(), progress=False)
    return res.images, frame[list(LABELS)].to_numpy(dtype=np.float32)


def step_loader(args) -> dict:
    images, y = _cached(args)
    loader = _loader(args, images, y)
    start = time.perf_counter()
    n = 0
    for x, target in loader:
        if n == 0:  # from the first batch on: starting the workers is a fixed cost, not a per-image one
            t, c = time.perf_counter(), _cpu()
            first = len(x)
        n += len(x)
        int(x[:, 0, 0, 0].sum())  # touch the batch
    s = time.perf_counter() - t
    assert n == len(y)
    return {"seconds": s, "cpu_s": _cpu() - c, "images": n - first, "epoch_s": time.perf_counter() - start,
            "epoch_images": n}


def step_model(args) -> dict:
    import torch

    from common.labels import LABELS
    from common.models import build_model, model_input_config
    from common.optim import masked_bce
    from common.train_data import BatchTransform

    images, y = _cached(args)
    torch.manual_seed(0)
    model = build_model(args.small_model, num_labels=len(LABELS), image_size=args.cache_px).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    transform = BatchTransform(model_input_config(model, image_size=args.cache_px), torch.device("cpu"))
    loader = _loader(args, images, y)
    it = iter(loader)
    n = 0
    t = None
    for i in range(args.model_batches + 1):
        try:
            x, target = next(it)
        except StopIteration:
            it = iter(loader)
            x, target = next(it)
        logits = model(transform(x, torch.Generator().manual_seed(i)))
        masked_bce(logits, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:  # the first batch starts the workers and warms the model: untimed
            t, c = time.perf_counter(), _cpu()
        else:
            n += len(x)
    return {"seconds": time.perf_counter() - t, "cpu_s": _cpu() - c, "images": n, "model": args.small_model}


def step_evaluate(args) -> dict:
    import numpy as np

    from common.evaluate import evaluate_files
    from common.labelfiles import load_labels
    from common.labels import LABELS

    data = Path(args.data)
    test = [line for line in (data / "test_list.txt").read_text().splitlines() if line]
    truth = load_labels(data / "Data_Entry_2017_v2020.csv", quiet=True).loc[test]
    rng = np.random.default_rng(0)
    y = truth.to_numpy(dtype=np.float64)
    prob = np.clip(0.25 * y + 0.75 * rng.random(y.shape), 0, 1)
    pred = _store(args).parent / f"{data.name}-predictions.csv"
    pred.parent.mkdir(parents=True, exist_ok=True)
    with open(pred, "w") as f:
        f.write("Image Index," + ",".join(LABELS) + "\n")
        for name, row in zip(test, prob):
            f.write(name + "," + ",".join(f"{v:.6g}" for v in row) + "\n")
    t, c = time.perf_counter(), _cpu()
    result = evaluate_files(pred, data / "Data_Entry_2017_v2020.csv", n_boot=args.n_boot)
    s = time.perf_counter() - t
    return {"seconds": s, "cpu_s": _cpu() - c, "images": len(test), "n_boot": args.n_boot, "mean_auroc": result["mean_auroc"],
            "mean_auroc_ci": result["mean_auroc_ci"]}


def step_predict_decode1(args) -> dict:
    from common.onnx_predict import OnnxPredictor

    predictor = OnnxPredictor(args.export, threads=1)
    paths = sorted(Path(args.predict_dir).glob("*.png"))[: args.decode_sample]
    predictor.prepare(predictor.load(paths[0]))
    t, c = time.perf_counter(), _cpu()
    for p in paths:
        predictor.prepare(predictor.load(p))
    return {"seconds": time.perf_counter() - t, "cpu_s": _cpu() - c, "images": len(paths)}


def step_predict_model(args) -> dict:
    import numpy as np

    from common.onnx_predict import OnnxPredictor

    predictor = OnnxPredictor(args.export)
    paths = sorted(Path(args.predict_dir).glob("*.png"))[: args.predict_batch]
    batch = np.stack([predictor.prepare(predictor.load(p)) for p in paths])
    predictor.logits(batch)
    t, c = time.perf_counter(), _cpu()
    reps = max(1, args.model_reps)
    for _ in range(reps):
        predictor.logits(batch)
    return {"seconds": time.perf_counter() - t, "cpu_s": _cpu() - c, "images": reps * len(batch)}


def step_predict(args) -> dict:
    out = Path(args.export).parent / "predictions.csv"
    cmd = [sys.executable, "-m", "common", "predict", str(args.predict_dir), "--run", str(args.export), "--onnx",
           "--csv", str(out), "--batch-size", str(args.predict_batch)]
    t, c = time.perf_counter(), _cpu()
    done = subprocess.run(cmd, capture_output=True, text=True)
    s = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"medimaging predict failed:\n{done.stderr[-2000:]}")
    n = sum(1 for _ in open(out)) - 1
    return {"seconds": s, "cpu_s": _cpu() - c, "images": n}


WORKERS = {name: globals()[f"step_{name}"] for name in STEPS + ONCE_STEPS}


# ---------------------------------------------------------------------------------- orchestrator
def run_step(name: str, argv: list[str]) -> dict:
    """One step in a fresh process: its JSON result plus the peak RSS of its process tree (wait4's
    rusage: the child and the descendants it waited for, e.g. pool and DataLoader workers)."""
    import tempfile

    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, *argv]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): that reaps it without the rusage
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise RuntimeError(f"step {name} failed ({code}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = max(result.pop("hwm_mb", 0.0), usage.ru_maxrss / 1024)
    return result


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def fmt_row(step: str, n: int | str, r: dict) -> str:
    s, k = r["seconds"], r["images"]
    return (f"| {TITLES[step]} | {n} | {k} | {_num(s)} | {_num(r['cpu_s'])} | {_num(k / s)} | {_num(1e6 * s / k)} | "
            f"{_num(r['peak_rss_mb'])} |")


def plot(results: dict, path: Path, synthetic_note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    for step in SCALING_STEPS:
        pts = sorted((n, r[step]["seconds"]) for n, r in results.items() if step in r)
        if len(pts) >= 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=TITLES[step])
    ns = sorted(results)
    if len(ns) >= 2:
        ax.plot(ns, [ns[0] and 1.0 * n / ns[0] for n in ns], linestyle=":", color="grey", label="linear (slope 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images in the dataset (N)")
    ax.set_ylabel("seconds")
    ax.set_title(f"Cost of each step over all N images against N ({synthetic_note})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 112120], help="dataset sizes N")
    p.add_argument("--steps", nargs="+", default=None, choices=STEPS + ONCE_STEPS, help="only these steps")
    p.add_argument("--root", type=Path, default=None, help="where datasets and stores live (default: $MEDIMAGING_CACHE/bench-scale)")
    p.add_argument("--image-px", type=int, default=192, help="side of the generated PNGs (default: 192)")
    p.add_argument("--cache-px", type=int, default=128, help="image cache size, and the small model's input (default: 128)")
    p.add_argument("--workers", type=int, default=None, help="cache build processes (default: the cores)")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch (default: 64)")
    p.add_argument("--small-model", default="mobilenetv3_small_100", help="the loader+model step's model")
    p.add_argument("--model-batches", type=int, default=4, help="timed batches of the loader+model step (default: 4)")
    p.add_argument("--decode-sample", type=int, default=300, help="images decoded by the 1-process steps (default: 300)")
    p.add_argument("--n-boot", type=int, default=1000, help="evaluate's bootstrap resamples (default: 1000)")
    p.add_argument("--predict-images", type=int, default=1000, help="1,024 px PNGs for the predict step (0: skip)")
    p.add_argument("--predict-px", type=int, default=1024, help="their side when synthetic (default: 1024, NIH's)")
    p.add_argument("--predict-source", choices=("auto", "nih-sample", "synthetic"), default="auto",
                   help="the predict step's PNGs: the real NIH sample (auto: when present) or synthetic ones")
    p.add_argument("--predict-model", default="efficientnet_b0", help="the predict step's model (default: efficientnet_b0)")
    p.add_argument("--predict-size", type=int, default=224, help="its input side (default: 224)")
    p.add_argument("--predict-batch", type=int, default=16, help="images per model call (default: 16, the CLI's)")
    p.add_argument("--model-reps", type=int, default=8, help="timed model calls of predict model only")
    p.add_argument("--plot", default=str(Path(__file__).with_suffix(".png")),
                   help="where to draw the log-log plot (default: bench/bench_scale.png; '' for none)")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    # internal: one measured step in this process
    p.add_argument("--step", choices=STEPS + ONCE_STEPS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    p.add_argument("--predict-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workers = args.workers or cores()

    if args.step:
        result = WORKERS[args.step](args)
        result["hwm_mb"] = _hwm_mb()
        print(json.dumps(result), flush=True)
        return 0

    root = (args.root or default_root()).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    steps = [s for s in STEPS if args.steps is None or s in args.steps]
    once = [s for s in ONCE_STEPS if (args.steps is None or s in args.steps) and args.predict_images > 0]
    common_argv = ["--image-px", str(args.image_px), "--cache-px", str(args.cache_px), "--workers", str(args.workers),
                   "--loader-workers", str(args.loader_workers), "--batch-size", str(args.batch_size),
                   "--small-model", args.small_model, "--model-batches", str(args.model_batches),
                   "--decode-sample", str(args.decode_sample), "--n-boot", str(args.n_boot),
                   "--predict-batch", str(args.predict_batch), "--model-reps", str(args.model_reps)]
    results: dict[int, dict] = {}
    t_all = time.perf_counter()
    for n in sorted(set(args.sizes)):
        data = ensure_dataset(root, n, args.image_px, log=log)
        results[n] = {}
        store = root / "stores" / f"{data.name}-{args.cache_px}px"  # as `_store` names it
        if {"reopen", "reopen_view", "loader", "model"} & set(steps) and "cache" not in steps \
                and not (store / "index.sqlite").is_file():
            log(f"N={n}: building the image cache the other steps read ...")
            run_step("cache", ["--data", str(data), *common_argv])
        for step in steps:
            log(f"N={n}: {TITLES[step]} ...")
            results[n][step] = run_step(step, ["--data", str(data), *common_argv])
    once_results: dict[str, dict] = {}
    if once:
        images = ensure_full_size(root, args.predict_images, args.predict_px, args.predict_source, log=log)
        export = ensure_export(root, args.predict_model, args.predict_size, log=log)
        for step in once:
            log(f"{TITLES[step]} ...")
            once_results[step] = run_step(step, ["--export", str(export), "--predict-dir", str(images), *common_argv])
    total = time.perf_counter() - t_all

    ncores = cores()
    try:
        load = " (load average {:.1f} {:.1f} {:.1f} at the end)".format(*os.getloadavg())
    except OSError:
        load = ""
    print(f"\n## Scale: SYNTHETIC NIH-layout datasets ({args.image_px} px PNGs, cache at {args.cache_px} px), "
          f"{ncores} CPU core(s){load}; {total:.0f} s in all\n")
    print("| step | N | images | seconds | CPU s | images/s | us/image | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, steps_done in results.items():
        for step, r in steps_done.items():
            print(fmt_row(step, n, r))
    for step, r in once_results.items():
        print(fmt_row(step, f"{args.predict_images} PNGs", r))

    print("\nTargets (2-core CPU):")
    for n, r in results.items():
        if "load" in r:
            print(f"- N={n}: load_dataset {r['load']['seconds']:.2f} s (<= 10 s at 112,120), peak RSS "
                  f"{r['load']['peak_rss_mb']:.0f} MB; {r['load']['patients']} patients")
        if "cache" in r and "decode1" in r:
            floor = ncores * r["decode1"]["images"] / r["decode1"]["seconds"]
            rate = r["cache"]["images"] / r["cache"]["seconds"]
            # CPU per image against one process's: what the build adds to decoding, whatever else runs
            overhead = (r["cache"]["cpu_s"] / r["cache"]["images"]) / (r["decode1"]["cpu_s"] / r["decode1"]["images"])
            print(f"- N={n}: cache build {rate:.0f} images/s = {rate / floor:.2f} x (cores x one process's decode rate, "
                  f"{floor:.0f}/s) (target >= 0.8); CPU per image {overhead:.2f} x one process's; "
                  f"{r['cache']['disk_mb']:.0f} MB on disk; reopen {r['reopen']['seconds']:.2f} s" if "reopen" in r else
                  f"- N={n}: cache build {rate:.0f} images/s = {rate / floor:.2f} x (cores x one process's decode rate, "
                  f"{floor:.0f}/s) (target >= 0.8); CPU per image {overhead:.2f} x one process's; "
                  f"{r['cache']['disk_mb']:.0f} MB on disk")
        if "evaluate" in r:
            print(f"- N={n}: evaluate {r['evaluate']['images']} x 14, {args.n_boot} resamples: "
                  f"{r['evaluate']['seconds']:.1f} s (<= 60 s at 25,596)")
    ns = [n for n in results if "loader" in results[n]]
    if len(ns) >= 2:
        per = {n: results[n]["loader"]["seconds"] / results[n]["loader"]["images"] for n in ns}
        print(f"- loader per-image cost at N={ns[-1]} / at N={ns[0]}: {per[ns[-1]] / per[ns[0]]:.2f} (target <= 1.2)")
    if "predict" in once_results and "predict_decode1" in once_results:
        d, pr = once_results["predict_decode1"], once_results["predict"]
        floor = ncores * d["images"] / d["seconds"]
        rate = pr["images"] / pr["seconds"]
        line = (f"- predict --onnx: {rate:.1f} images/s = {rate / floor:.2f} x the decode floor ({floor:.1f}/s = "
                f"{ncores} x one process's decode + resize) (target >= 0.8)")
        if "predict_model" in once_results:
            m = once_results["predict_model"]
            # decoding and the model share the cores: at best the cores do one image per (its decode
            # CPU + its model CPU), whatever the overlap
            per_image_cpu = d["cpu_s"] / d["images"] + m["cpu_s"] / m["images"]
            ceiling = ncores / per_image_cpu
            line += (f"; model alone {m['images'] / m['seconds']:.1f}/s; decode + model need {1e3 * per_image_cpu:.1f} "
                     f"CPU-ms an image, so {ceiling:.1f}/s is the most {ncores} cores can do ({rate / ceiling:.2f} of it); "
                     f"the CLI used {1e3 * pr['cpu_s'] / pr['images']:.1f} CPU-ms an image")
        print(line)
    if args.plot and any(results.values()):
        plot(results, Path(args.plot), "SYNTHETIC data")
        print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"sizes": results, "once": once_results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
