"""Inference benchmark: torch vs ONNX Runtime fp32 vs ONNX Runtime int8, side by side.

    .venv/bin/python bench/bench_infer.py                       # efficientnet_b0 at 224, a real NIH PNG
    .venv/bin/python bench/bench_infer.py --model resnet18 --repeats 50 --rounds 3

For each backend, in fresh processes (interleaved, `--rounds` times; the median is reported):
  cold start   process start -> first probabilities for one 1024x1024 PNG (imports, model load,
               decode, preprocess, inference), measured from the parent's launch time
  latency      steady state per image, decode + preprocess + inference (`predictor.predict(path)`)
  peak RSS     the process's peak resident memory (resource.getrusage ru_maxrss)
plus the real command line, `medimaging predict IMAGE --run EXPORT --onnx --json`, timed from
launch to exit. The run is an untrained model (random init: timing does not depend on training);
int8 is calibrated on sample images. Targets (issue 5, 2-core CPU): cold start <= 1 s, latency
<= 50 ms, peak RSS <= 200 MB for the ONNX path; issue 13: latency <= 20 ms for efficientnet_b0.
Then a second table: the ways to decode and resize the PNG (Pillow, OpenCV, reduced decode,
INTER_AREA), timed side by side in one process, with how far each is from the suite's pixels
(the training cache's: only an exact one can serve without retraining).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.paths import sample_data_dir


def _sample_images() -> Path:
    images = sample_data_dir() / "nih-sample" / "images"
    if not images.is_dir():
        sys.exit(f"bench_infer: no NIH sample images at {images}; set MEDIMAGING_SAMPLE_DATA or pass --image")
    return images


def worker(args: argparse.Namespace) -> None:
    """One fresh process: first probabilities, then steady-state latency; prints one JSON line."""
    t_import = time.time()
    if args.worker == "torch":
        from common.predict import TorchPredictor

        t_loaded_imports = time.time()
        predictor = TorchPredictor(args.run)
    else:
        from common.onnx_predict import OnnxPredictor

        t_loaded_imports = time.time()
        predictor = OnnxPredictor(args.run, int8=args.worker == "onnx-int8", threads=args.threads)
    t_model = time.time()
    first = predictor.predict(args.image)
    t_first = time.time()
    assert len(first.probabilities) == len(predictor.labels)
    for _ in range(3):  # warm-up: allocator, thread pool, caches
        predictor.predict(args.image)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predictor.predict(args.image)
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "cold_s": t_first - args.launched,
        "python_s": t_import - args.launched,
        "imports_s": t_loaded_imports - t_import,
        "load_s": t_model - t_loaded_imports,
        "first_s": t_first - t_model,
        "median_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hwm_mb": _vm_hwm_mb(),
        "torch_imported": "torch" in sys.modules,
    }), flush=True)


def decode_options(image: Path, size: int, repeats: int) -> list[tuple[str, float, int]]:
    """The decode + resize choices for one PNG, side by side in this process: (what, median ms, median
    CPU ms of this thread, max |pixel difference| at size x size from the suite's path, `read_grayscale`
    + `resize_gray`)."""
    import numpy as np
    from PIL import Image

    from common import images
    from common.images import read_grayscale
    from common.preprocess import resize_gray

    data = image.read_bytes()
    try:
        import cv2
    except ImportError:
        cv2 = None
    reference = resize_gray(read_grayscale(data), size)

    def pil_decode():  # read_grayscale without OpenCV: what the suite did before
        saved, images._cv2 = images._cv2, False
        try:
            return read_grayscale(data)
        finally:
            images._cv2 = saved

    options = [
        ("Pillow decode + Pillow bilinear (before)", lambda: resize_gray(pil_decode(), size)),
        ("read_grayscale + Pillow bilinear (the suite's path now)", lambda: resize_gray(read_grayscale(data), size)),
        ("Pillow decode + Pillow bilinear, reducing_gap=2", lambda: np.asarray(
            Image.fromarray(pil_decode()).resize((size, size), Image.BILINEAR, reducing_gap=2.0))),
    ]
    if cv2 is not None:
        buf = np.frombuffer(data, dtype=np.uint8)
        options += [
            ("cv2 IMREAD_UNCHANGED + Pillow bilinear", lambda: resize_gray(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), size)),
            ("cv2 IMREAD_GRAYSCALE + Pillow bilinear", lambda: resize_gray(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), size)),
            ("cv2 IMREAD_UNCHANGED + cv2 INTER_AREA", lambda: cv2.resize(
                cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), (size, size), interpolation=cv2.INTER_AREA)),
            ("cv2 IMREAD_REDUCED_GRAYSCALE_2 + Pillow bilinear", lambda: resize_gray(
                cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_2), size)),
            ("cv2 IMREAD_REDUCED_GRAYSCALE_4 + cv2 INTER_AREA", lambda: cv2.resize(
                cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_4), (size, size), interpolation=cv2.INTER_AREA)),
        ]
    times: dict[str, list[float]] = {name: [] for name, _ in options}
    cpu: dict[str, list[float]] = {name: [] for name, _ in options}
    for _ in range(repeats):  # interleaved, so load from other processes hits every option alike
        for name, fn in options:
            t, c = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c)  # this thread's CPU: what other processes cannot inflate
            times[name].append(time.perf_counter() - t)
    return [(name, 1000 * statistics.median(times[name]), 1000 * statistics.median(cpu[name]),
             int(np.abs(fn().astype(np.int16) - reference.astype(np.int16)).max())) for name, fn in options]


def _run_worker(backend: str, run: Path, image: Path, repeats: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--run", str(run), "--image", str(image),
           "--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    launched = time.time()
    done = subprocess.run(cmd + ["--launched", repr(launched)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_cli(export: Path, image: Path) -> dict:
    cmd = [sys.executable, "-m", "common", "predict", str(image), "--run", str(export), "--onnx", "--json"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        raise RuntimeError(f"CLI failed:\n{done.stderr[-2000:]}")
    json.loads(done.stdout.strip().splitlines()[-1])
    return {"cold_s": wall}


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this process image from /proc (Linux), reset by exec unlike an inherited maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def setup(args: argparse.Namespace) -> None:
    """In its own process (torch is imported here, never in the orchestrator): run + export + int8."""
    from common.export import export_onnx
    from common.predict import create_untrained_run

    images = _sample_images()
    run = create_untrained_run(args.workdir / "run", args.model, image_size=args.image_size)
    calib = sorted(images.glob("*.png"))[1:1 + args.n_calibration]
    export = export_onnx(run, int8=True, calibration_images=calib, n_calibration=args.n_calibration, log=lambda m: None)
    print(json.dumps({"run": str(run), "export": str(export)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_b0", help="timm model name (default: efficientnet_b0)")
    p.add_argument("--image-size", type=int, default=224, help="model input size (default: 224)")
    p.add_argument("--image", type=Path, default=None, help="a 1024x1024 PNG (default: the first NIH sample image)")
    p.add_argument("--repeats", type=int, default=30, help="steady-state predictions per process (default: 30)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per backend, interleaved (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: CPU count)")
    p.add_argument("--n-calibration", type=int, default=32, help="int8 calibration images (default: 32)")
    p.add_argument("--workdir", type=Path, default=None, help="where to put the run and export (default: a temp dir)")
    # internal modes: one measured process, and the setup process
    p.add_argument("--worker", choices=["torch", "onnx-fp32", "onnx-int8"], help=argparse.SUPPRESS)
    p.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--decode-options", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.setup:
        setup(args)
        return
    if args.decode_options:
        print(json.dumps(decode_options(args.image, args.image_size, args.repeats)), flush=True)
        return

    # The orchestrator stays small (no numpy / torch): children inherit nothing heavy.
    image = args.image or sorted(_sample_images().glob("*.png"))[0]
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    print(f"setting up: {args.model} at {args.image_size} px (random init), export + int8 ...", file=sys.stderr)
    cmd = [sys.executable, __file__, "--setup", "--workdir", str(work), "--model", args.model,
           "--image-size", str(args.image_size), "--n-calibration", str(args.n_calibration)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_infer: setup failed:\n{done.stderr[-3000:]}")
    paths = json.loads(done.stdout.strip().splitlines()[-1])
    run, export = Path(paths["run"]), Path(paths["export"])
    meta = json.loads((export / "model.json").read_text())

    backends = ["torch", "onnx-fp32", "onnx-int8"]
    results: dict[str, list[dict]] = {b: [] for b in backends + ["cli"]}
    for r in range(args.rounds):
        for b in backends:
            results[b].append(_run_worker(b, run if b == "torch" else export, image, args.repeats, args.threads))
        results["cli"].append(_run_cli(export, image))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    def med(b, key):
        return statistics.median(x[key] for x in results[b])

    sizes = {"torch": (run / "best.safetensors").stat().st_size, "onnx-fp32": (export / "model.onnx").stat().st_size,
             "onnx-int8": (export / "model.int8.onnx").stat().st_size}
    try:
        load = " (load average {:.1f} {:.1f} {:.1f} at the end)".format(*os.getloadavg())
    except OSError:
        load = ""
    print(f"\nInference on {os.cpu_count()} CPU core(s){load}: {args.model} at {args.image_size} px, "
          f"{image.name} (1024x1024 PNG from the NIH sample); median of {args.rounds} fresh processes, "
          f"{args.repeats} steady-state predictions each\n")
    print("| backend | cold start (s) | = python + imports + load + first | latency median (ms) | p90 (ms) "
          "| peak RSS (MB) | VmHWM (MB) | model (MB) | torch imported |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in backends:
        parts = " + ".join(f"{med(b, k):.2f}" for k in ("python_s", "imports_s", "load_s", "first_s"))
        print(f"| {b} | {med(b, 'cold_s'):.2f} | {parts} | {med(b, 'median_ms'):.1f} | {med(b, 'p90_ms'):.1f} | "
              f"{med(b, 'rss_mb'):.0f} | {med(b, 'hwm_mb') or float('nan'):.0f} | {sizes[b] / 1e6:.1f} | {'yes' if results[b][0]['torch_imported'] else 'no'} |")
    print(f"| `medimaging predict --onnx --json` (launch to exit) | {med('cli', 'cold_s'):.2f} | | | | | | | |")
    q = meta.get("int8") or {}
    print(f"\nfp32 ONNX vs torch: max |logit diff| {meta['parity']['max_abs_logit_diff']:.1e}; int8 ({q.get('method')}, "
          f"{q.get('n_calibration')} calibration images) vs fp32: max |prob diff| "
          f"{q.get('max_abs_prob_diff_vs_fp32', float('nan')):.4f}")
    print("targets for the ONNX path: cold start <= 1 s, latency <= 50 ms (issue 13: <= 20 ms), peak RSS <= 200 MB")
    done = subprocess.run([sys.executable, __file__, "--decode-options", "--image", str(image),
                           "--image-size", str(args.image_size), "--repeats", str(args.repeats)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_infer: decode options failed:\n{done.stderr[-3000:]}")
    print(f"\nDecode + resize of {image.name} to {args.image_size} px, one process, median of {args.repeats} "
          "(interleaved); max |difference| from the suite's pixels\n")
    print("| decode + resize | ms | CPU ms | max abs pixel diff |")
    print("|---|---:|---:|---:|")
    for name, ms, cpu_ms, diff in json.loads(done.stdout.strip().splitlines()[-1]):
        print(f"| {name} | {ms:.2f} | {cpu_ms:.2f} | {diff} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
