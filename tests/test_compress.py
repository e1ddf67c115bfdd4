"""Compression on real NIH images: int8 close to fp32, pruning's zeros in safetensors and ONNX,
distillation's loss falling and its student served by `predict`, the CLI for each method, the table.

One tiny teacher run (test_resnet, 48 px, real 64 px NIH images, Cardiomegaly task) is trained once
per module; every method then runs through `medimaging compress` itself.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import compress, runs
from common.cli import main as cli
from common.compress.distill import distillation_terms, soft_target_loss
from common.compress.prune import (
    keep_masks_fixed,
    onnx_weight_sparsity,
    output_layer_name,
    prunable_layers,
    prune_model,
    sparsity_report,
)
from common.experiments.compression import cached_compress
from common.serving import EXPORT_DIR

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")

# Tolerances for int8 vs fp32 on the same images: a probability may move by quantisation noise,
# the ranking (AUROC) barely.
INT8_PROB_ATOL = 0.05
INT8_AUROC_ATOL = 0.02


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: two intra-op threads wait on each other more than they help
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(cardiomegaly_64: Path, tmp_path_factory) -> Path:
    from common.train import TrainConfig, fit

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("compress") / "teacher"
    # a few steps at a high learning rate: enough for the outputs to spread, so rankings mean something
    return fit(TrainConfig(data=[str(cardiomegaly_64)], task="cardiomegaly", model_name="test_resnet", image_size=48,
                           batch_size=32, epochs=1, max_steps=12, lr=3e-3, warmup_steps=0, num_workers=0, n_boot=0,
                           progress=False, out=str(out)))


@pytest.fixture(scope="module")
def int8_export(teacher: Path) -> Path:
    out = teacher / "export"  # the run's own export folder: the table below reuses it
    assert cli(["compress", "--run", str(teacher), "--method", "int8", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def pruned(teacher: Path) -> Path:
    out = teacher.parent / "pruned50"
    assert cli(["compress", "--run", str(teacher), "--method", "prune", "--sparsity", "0.5", "--max-steps", "2",
                "--lr", "1e-3", "--workers", "0", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def student(teacher: Path) -> Path:
    out = teacher.parent / "student"
    assert cli(["compress", "--run", str(teacher), "--method", "distill", "--student", "test_efficientnet",
                "--student-image-size", "32", "--temperature", "2", "--alpha", "1", "--epochs", "1",
                "--max-steps", "6", "--lr", "3e-3", "--workers", "0", "--out", str(out), "--no-progress"]) == 0
    return out


def _tiny_model(num_labels: int = 3, name: str = "test_efficientnet"):
    from common.models import build_model

    torch.manual_seed(0)
    return build_model(name, num_labels=num_labels, pretrained=None, image_size=32)


# ----------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("structured,scope", [(False, "global"), (False, "layer"), (True, "layer")])
def test_prune_model_reaches_sparsity_and_masks_hold(structured: bool, scope: str):
    model = _tiny_model()
    out_layer = compress_output_layer_weight(model)
    before = out_layer.detach().clone()
    masks = prune_model(model, 0.4, structured=structured, scope=scope, norm=2 if structured else 1)
    report = sparsity_report(model.state_dict(), masks)
    # round() per layer (structured / per-layer) or over all weights (global): within one channel per layer
    assert report["pruned_sparsity"] == pytest.approx(0.4, abs=0.03)
    if structured:
        assert report["zero_channel_share"] == pytest.approx(0.4, abs=0.05)
        for name, m in masks.items():  # whole output channels, nothing else
            rows = m.reshape(m.shape[0], -1)
            assert bool((rows.all(dim=1) | ~rows.any(dim=1)).all()), name
    else:
        assert report["zero_channel_share"] < 0.05
    assert torch.equal(out_layer, before)  # the output layer is never pruned
    assert all(not k.endswith(("_orig", "_mask")) for k in model.state_dict())  # masks folded in

    keep_masks_fixed(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        loss = model(torch.randn(4, 3, 32, 32)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sparsity_report(model.state_dict(), masks)
    assert after["pruned_zeros"] == report["pruned_zeros"]
    assert not torch.equal(compress_output_layer_weight(model), before)  # it did train


def compress_output_layer_weight(model):
    return dict(model.named_modules())[output_layer_name(model)].weight


def test_prune_model_rejects_bad_arguments():
    model = _tiny_model()
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, 1.0)
    with pytest.raises(ValueError, match="scope"):
        prune_model(model, 0.5, scope="network")
    assert output_layer_name(model) == "head.5"  # the MLP head's last Linear: one row per label
    assert all(name != "head.5" for name, _ in prunable_layers(model))


def test_prune_cli_zeros_in_safetensors_and_onnx(teacher: Path, pruned: Path):
    report = compress.read_report(pruned)
    assert report["method"] == "prune" and report["sparsity"] == 0.5
    saved = runs.load_weights(pruned / runs.BEST)
    src = runs.load_weights(teacher / runs.BEST)
    # measured again here, from the file itself: prunable = conv/linear weights except the output layer
    names = [k for k, v in saved.items() if k.endswith(".weight") and v.ndim >= 2 and not k.startswith("head.5.")]
    zeros = sum(int((saved[k] == 0).sum()) for k in names)
    total = sum(saved[k].numel() for k in names)
    assert zeros / total == pytest.approx(0.5, abs=1e-3)
    assert report["safetensors"]["pruned_sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    # the fine-tune moved the kept weights (it ran), and the pruned ones stayed exactly zero
    changed = sum(int(((saved[k] != src[k]) & (saved[k] != 0)).sum()) for k in names)
    assert changed > 0.5 * (total - zeros)
    # the served model carries the same zeros (ONNX initialisers, measured from the file)
    onnx_report = onnx_weight_sparsity(pruned / "export" / "model.onnx")
    assert onnx_report["weight_zeros"] >= zeros
    assert onnx_report["weight_sparsity"] == pytest.approx(report["safetensors"]["weight_sparsity"], abs=0.01)
    # a normal run directory: evaluate-ready files and a complete config
    assert (pruned / "test_predictions.csv").is_file() and (pruned / "metrics.json").is_file()
    assert runs.read_config(pruned)["init"]["method"] == "prune"


def test_structured_prune_without_fine_tune(teacher: Path, capsys):
    out = teacher.parent / "pruned-channels"
    capsys.readouterr()
    assert cli(["compress", "--run", str(teacher), "--method", "prune", "--sparsity", "0.25", "--structured",
                "--norm", "2", "--max-steps", "0", "--workers", "0", "--no-export", "--out", str(out),
                "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # --json: the report alone on stdout
    assert report["structured"] and report["norm"] == 2
    assert report["safetensors"]["zero_channel_share"] == pytest.approx(0.25, abs=0.03)
    assert "onnx" not in report  # --no-export
    run = runs.load_run(out)
    zero_rows = [int((~m.weight.detach().reshape(m.weight.shape[0], -1).any(dim=1)).sum())
                 for _, m in prunable_layers(run.model, structured=True)]
    assert sum(zero_rows) > 0


# -------------------------------------------------------------------------------------- int8


def test_int8_close_to_fp32_on_fixed_images(teacher: Path, int8_export: Path):
    from common.onnx_predict import OnnxPredictor

    report = compress.read_report(int8_export)
    assert report["method"] == "int8" and report["quantization"]["method"] in ("static-qdq", "dynamic")
    assert report["size_ratio"] > 2.5  # tiny model: biases and graph overhead weigh more than at 224
    split = compress.split_images(teacher, "test")
    assert len(split.paths) > 50 and not split.synthetic
    fp32 = OnnxPredictor(int8_export, int8=False, threads=1).predict_proba(split.paths)
    int8 = OnnxPredictor(int8_export, int8=True, threads=1).predict_proba(split.paths)
    assert fp32.std() > 0.01  # the outputs spread: a ranking to compare
    assert np.abs(int8 - fp32).max() <= INT8_PROB_ATOL
    from common.metrics import per_label_auroc

    a32 = per_label_auroc(split.y, fp32, split.labels)["Cardiomegaly"]
    a8 = per_label_auroc(split.y, int8, split.labels)["Cardiomegaly"]
    assert abs(a8 - a32) <= INT8_AUROC_ATOL


# ------------------------------------------------------------------------------ distillation


def test_soft_target_loss_is_a_divergence():
    t = torch.randn(5, 3)
    assert float(soft_target_loss(t.clone(), t, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_target_loss(t + 1.0, t, temperature=3.0)) > 0
    with pytest.raises(ValueError, match="teacher's labels"):
        soft_target_loss(torch.zeros(5, 2), t)


def test_distillation_loss_falls_over_a_few_steps():
    from common.train import masked_bce

    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    t_logits = 2.0 * torch.randn(8, 3)  # a teacher's outputs: confident, different per image and label
    y = (t_logits > 0).float()
    y[:4, 1] = float("nan")  # unlabelled entries: only the teacher teaches them

    def train(targets: torch.Tensor, steps: int = 12) -> list[dict]:
        student = _tiny_model(name="test_efficientnet")
        opt = torch.optim.Adam(student.parameters(), lr=3e-3)
        student.train()
        history = []
        for _ in range(steps):
            logits = student(x)
            hard = masked_bce(logits, targets)
            loss, soft = distillation_terms(hard, logits, t_logits, temperature=2.0, alpha=1.0)
            parts = {"hard": float(hard.detach()), "soft": float(soft.detach()), "total": float(loss.detach())}
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(parts)
        return history

    both = train(y)
    assert np.mean([h["total"] for h in both[-3:]]) < 0.6 * np.mean([h["total"] for h in both[:3]])
    assert all(h["total"] == pytest.approx(h["hard"] + h["soft"], rel=1e-5) for h in both)
    # no labels at all: the soft term alone moves the student towards the teacher
    soft_only = train(torch.full_like(y, float("nan")))
    assert all(h["hard"] == 0.0 for h in soft_only)
    assert np.mean([h["soft"] for h in soft_only[-3:]]) < 0.6 * np.mean([h["soft"] for h in soft_only[:3]])


def test_distill_cli_student_run_loads_in_predict(teacher: Path, student: Path, cardiomegaly_64: Path, capsys):
    report = compress.read_report(student)
    assert report["method"] == "distill" and report["student"] == "test_efficientnet"
    assert report["temperature"] == 2.0 and report["alpha"] == 1.0
    cfg = runs.read_config(student)
    assert cfg["model"]["model_name"] == "test_efficientnet" and cfg["input"]["image_size"] == 32
    assert cfg["labels"] == runs.read_config(teacher)["labels"]
    # the same patient split as the teacher: identical test images
    import pandas as pd

    t_ids = pd.read_csv(teacher / "test_predictions.csv")["Image Index"].tolist()
    s_ids = pd.read_csv(student / "test_predictions.csv")["Image Index"].tolist()
    assert sorted(t_ids) == sorted(s_ids)
    # the loss parts of every micro-batch; the soft term really was there
    history = compress.read_distill_loss(student)
    assert len(history) == 6 and all(h["soft"] > 0 for h in history)
    assert all(h["total"] == pytest.approx(h["hard"] + 1.0 * h["soft"], rel=1e-4) for h in history)

    from common.predict import load_predictor

    image = sorted((cardiomegaly_64 / "test").glob("*.png"))[0]
    pred = load_predictor(student).predict(str(image))
    assert list(pred.probabilities) == ["Cardiomegaly"] and 0.0 <= pred.probabilities["Cardiomegaly"] <= 1.0
    capsys.readouterr()
    assert cli(["predict", str(image), "--run", str(student), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["probabilities"]["Cardiomegaly"] == pytest.approx(pred.probabilities["Cardiomegaly"], abs=1e-5)
    assert cli(["predict", str(image), "--run", str(student / "export"), "--int8", "--json"]) == 0
    line8 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(line8["probabilities"]["Cardiomegaly"] - line["probabilities"]["Cardiomegaly"]) <= INT8_PROB_ATOL


# ----------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv,message", [
    (["--method", "prune"], "needs --sparsity"),
    (["--method", "int8", "--student", "x"], "--student only applies to --method distill"),
    (["--method", "distill", "--sparsity", "0.5"], "--sparsity only applies to --method prune"),
    (["--method", "int8", "--epochs", "2"], "--epochs only applies to --method"),
])
def test_compress_cli_rejects_misused_options(tmp_path: Path, argv: list[str], message: str, capsys):
    assert cli(["compress", "--run", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_compress_cli_default_out_names():
    from common.commands.compress import default_out

    assert default_out("runs/all14", "int8") == "runs/all14-int8"
    assert default_out("runs/all14/", "prune", 0.5) == "runs/all14-prune50"
    assert default_out("runs/all14", "prune", 0.3, structured=True) == "runs/all14-prune30-channels"
    assert default_out("runs/all14", "distill", student="mobilenetv3_small_100") == "runs/all14-distill-mobilenetv3_small_100"


def test_compress_missing_run_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        compress.quantize_run(tmp_path / "nope")


# --------------------------------------------------------------------------------------- table


def test_measure_table_rows_ratios_and_markdown(teacher: Path, int8_export: Path, pruned: Path, student: Path,
                                                cardiomegaly_64: Path):
    variants = compress.variants_for({"test_resnet": teacher}, pruned_runs=[pruned], student_runs=[student])
    assert [v.name for v in variants] == ["test_resnet fp32", "test_resnet int8", "test_resnet pruned 50% unstructured global",
                                          "test_efficientnet student fp32", "test_efficientnet student int8"]
    images = sorted((cardiomegaly_64 / "test").glob("*.png"))[:3]
    rows = compress.measure_table(variants, timing_images=images, threads=1, repeats=3, e2e_repeats=3, progress=False)
    by = {r["name"]: r for r in rows}
    base, q, p, s8 = (by["test_resnet fp32"], by["test_resnet int8"], by["test_resnet pruned 50% unstructured global"],
                      by["test_efficientnet student int8"])
    for r in rows:
        assert r["model_ms"] > 0 and r["e2e_ms"] >= r["model_ms"] * 0.5
        # the serving process's own peak (numpy + Pillow + ONNX Runtime + a tiny model), not this one's
        assert 20 < r["peak_rss_mb"] < 400
        assert r["torch_imported"] is False  # measured as served: no torch in the process
        shares = r["time_shares"]
        assert sum(shares[k] for k in ("dense", "depthwise", "qdq", "other")) == pytest.approx(1.0)
        assert shares["dense"] > 0 and shares["top"]
        assert 0 <= r["mean_auroc"] <= 1 and 0 <= r["mean_accuracy"] <= 1 and r["n_images"] == 118
    assert base["size_x"] is None and base["speed_from"].startswith("reference; time: ")
    assert base["time_shares"]["qdq"] == 0 and q["time_shares"]["qdq"] > 0  # int8 adds (de)quantise steps
    assert "of the fp32 time" in q["speed_from"]
    assert q["size_x"] == pytest.approx(base["file_mb"] / q["file_mb"]) and q["size_x"] > 2.5
    assert q["d_auroc"] == pytest.approx(q["mean_auroc"] - base["mean_auroc"])
    assert p["nonzero_params"] < 0.6 * p["params"] and p["zipped_size_x"] > 1.3  # zeros pay off zipped
    assert "dense kernels" in p["speed_from"]
    assert s8["baseline"] == "test_resnet fp32" and "fewer MACs" in s8["speed_from"] and "int8" in s8["speed_from"]
    md = compress.table_markdown(rows)
    assert md.count("\n") == len(rows) + 1 and "where speed comes from" in md
    assert "SYNTHETIC" not in compress.table_title(rows)  # real NIH images
    checks = compress.check_targets(rows, teacher="test_resnet fp32")
    assert any(c["target"].startswith("test_resnet: int8 >= 3x smaller") for c in checks)
    assert any(c["target"].startswith("best compressed") for c in checks)


def test_check_targets_and_speed_notes_on_known_rows():
    def row(name, method, backbone, ms, mb, auroc, baseline=None, int8=False, gmacs=4.0, dense=0.95):
        shares = {"dense": dense, "depthwise": 0.1 * (1 - dense), "qdq": 0.1 if int8 else 0.0,
                  "other": 0.9 * (1 - dense) - (0.1 if int8 else 0.0), "top": [["Conv", dense]]}
        return {"name": name, "method": method, "backbone": backbone, "model_ms": ms, "file_mb": mb,
                "mean_auroc": auroc, "baseline": baseline, "int8": int8, "gmacs": gmacs, "image_size": 224,
                "time_shares": shares}

    rows = [row("resnet50 fp32", "fp32", "resnet50", 30.0, 100.0, 0.80),
            row("resnet50 int8", "int8", "resnet50", 10.0, 25.0, 0.795, "resnet50 fp32", True),
            row("efficientnet_b0 fp32", "fp32", "efficientnet_b0", 8.0, 16.0, 0.81, gmacs=0.4, dense=0.4),
            row("efficientnet_b0 int8", "int8", "efficientnet_b0", 9.0, 5.0, 0.78, "efficientnet_b0 fp32", True,
                gmacs=0.4, dense=0.5),
            row("student int8", "distill", "mobilenetv3_small_100", 2.0, 2.0, 0.80, "efficientnet_b0 fp32", True,
                gmacs=0.05, dense=0.6)]
    by = {r["name"]: r for r in rows}
    for r in rows:
        b = by.get(r["baseline"])
        r["size_x"] = b["file_mb"] / r["file_mb"] if b else None
        r["speed_x"] = b["model_ms"] / r["model_ms"] if b else None
        r["d_auroc"] = r["mean_auroc"] - b["mean_auroc"] if b else None
    checks = {c["target"]: c for c in compress.check_targets(rows)}
    assert checks["resnet50: int8 >= 2.5x faster (model only)"]["met"] is True
    assert checks["efficientnet_b0: int8 mean AUROC lower by <= 0.01"]["met"] is False  # 0.03 lower
    best = [c for t, c in checks.items() if t.startswith("best compressed (student int8) >= 3x")]
    assert best and best[0]["measured"] == pytest.approx(4.0) and best[0]["met"] is True
    note = compress.speed_source(by["efficientnet_b0 int8"], by["efficientnet_b0 fp32"])
    # Amdahl on the measured split: 40% dense time at <= 4x gives at most 1/(0.6 + 0.1) = 1.4x
    assert "only dense conv/GEMM: 40% of the fp32 time (at most ~1.4x overall)" in note
    assert "(de)quantise steps take 10% of the int8 time" in note
    assert compress.speed_source(by["resnet50 fp32"], None).startswith("reference; time: 95% dense conv/GEMM")
    assert "8.0x fewer MACs" in compress.speed_source(by["student int8"], by["efficientnet_b0 fp32"])
    assert "NO" in compress.targets_markdown(list(checks.values()))


def test_compress_package_and_measuring_child_import_no_torch():
    code = "import sys, common.compress; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # what `python -m common.compress` (the measuring child) loads: its peak RSS must be the serving process's
    code = ("import sys, common.compress.timing; heavy = {'torch', 'pandas', 'sklearn'} & set(sys.modules); "
            "assert not heavy, f'{heavy} imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_split_images_is_the_stored_split_after_images_are_added(teacher: Path, cardiomegaly_64: Path,
                                                                 tmp_path: Path):
    before = compress.split_images(teacher, "test")
    data = tmp_path / "data"
    shutil.copytree(cardiomegaly_64, data)
    # a new patient's images, added to the official test list after training: not in the run's split
    new = [f"99999999_{i:03d}.png" for i in range(3)]
    for name, src in zip(new, sorted((data / "test").glob("*.png"))):
        shutil.copy(src, data / "test" / name)
    with open(data / "test.csv", "a") as f:
        f.writelines(f"{name},Cardiomegaly\n" for name in new)
    after = compress.split_images(teacher, "test", data=[data])
    assert [Path(p).name for p in after.paths] == [Path(p).name for p in before.paths]
    assert not set(new) & {Path(p).name for p in after.paths}
    np.testing.assert_array_equal(after.y, before.y)


def test_cached_compress_reuses_only_finished_outputs(tmp_path: Path):
    source = tmp_path / "all14-efficientnet_b0-abc"
    made = []

    def make(out: Path) -> Path:
        made.append(out)
        runs.save_json(out / EXPORT_DIR / "model.json", {})
        if len(made) > 1:  # the first attempt is "interrupted": no compression.json
            runs.save_json(out / compress.COMPRESSION_JSON, {"method": "prune"})
        return out

    params = {"sparsity": 0.5, "structured": False}
    first, reused = cached_compress("prune", source, params, tmp_path, make)
    assert not reused and first.name.startswith("all14-efficientnet_b0-abc--prune-")
    again, reused = cached_compress("prune", source, params, tmp_path, make)
    assert again == first and not reused and len(made) == 2  # unfinished: made again
    third, reused = cached_compress("prune", source, params, tmp_path, make)
    assert third == first and reused and len(made) == 2
    other, _ = cached_compress("prune", source, {**params, "sparsity": 0.7}, tmp_path, make)
    assert other != first  # other knobs, another run


def test_check_targets_lists_the_fastest_model_when_it_costs_too_much_auroc():
    def row(name, method, ms, auroc, baseline=None):
        return {"name": name, "method": method, "backbone": "efficientnet_b0" if method == "fp32" else "x",
                "model_ms": ms, "file_mb": 4.0, "mean_auroc": auroc, "baseline": baseline, "int8": method == "int8",
                "size_x": 4.0 if baseline else None, "speed_x": None, "d_auroc": None}

    rows = [row("b0 fp32", "fp32", 12.0, 0.80), row("b0 int8", "int8", 8.0, 0.795, "b0 fp32"),
            row("student", "distill", 2.0, 0.70, "b0 fp32")]
    checks = {c["target"]: c for c in compress.check_targets(rows)}
    assert checks["best compressed (b0 int8) >= 3x faster than b0 fp32"]["met"] is False  # 1.5x
    fastest = checks["fastest compressed (student) mean AUROC lower by <= 0.02 vs b0 fp32"]
    assert fastest["met"] is False and fastest["measured"] == pytest.approx(-0.10)
    assert checks["fastest compressed (student) >= 3x faster than b0 fp32"]["measured"] == pytest.approx(6.0)
