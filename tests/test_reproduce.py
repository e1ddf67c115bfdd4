"""`medimaging reproduce` and common.experiments without training: kernel, notebook table, run keys,
profiles, knobs, data resolution, tables and their collection."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

import common.data
from common import experiments
from common.cli import build_parser
from common.experiments import records
from common.experiments import reproduce as rep
from common.labels import LABELS
from common.paths import REPO_ROOT

REPO = REPO_ROOT


def test_the_kernel_runs_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    before = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "OMP_WAIT_POLICY")}
    with rep.python_kernel() as name:
        spec = KernelSpecManager().get_kernel_spec(name)
        assert spec.argv[0] == sys.executable
        assert spec.argv[1:3] == ["-m", "ipykernel_launcher"]
        if before["OMP_WAIT_POLICY"] is None:
            assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # kernels inherit it
    assert {k: os.environ.get(k) for k in before} == before


def test_the_notebook_table_is_ordered_and_complete():
    names = rep.notebook_names()
    assert len(names) == len(set(names))
    assert names[-1] == "results"  # collects the tables of every notebook above it
    assert names.index("single_task") < names.index("multi_task") < names.index("freeze_ablation")
    for nb in rep.NOTEBOOKS:
        assert (REPO / nb.path).is_file(), nb.path
    assert [nb.name for nb in rep.select(["results", "single_task"])] == ["single_task", "results"]
    with pytest.raises(ValueError, match="unknown notebook name.*nope.*choose from"):
        rep.select(["nope"])


def test_cli_lists_the_notebooks_and_rejects_bad_options(capsys):
    parser = build_parser()
    args = parser.parse_args(["reproduce", "--smoke", "--only", "single_task", "--out", "x"])
    assert args.smoke and args.only == ["single_task"] and args.profile == "quick" and args.data_full is None
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "--profile", "huge"])
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "--help"])
    assert "freeze_ablation" in capsys.readouterr().out


def test_unknown_only_name_is_a_clear_error(capsys, cardiomegaly_64, tmp_path):
    from common.cli import main

    code = main(["reproduce", "--only", "no_such", "--data-cardiomegaly", str(cardiomegaly_64), "--out", str(tmp_path)])
    assert code == 2
    assert "no_such" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- profiles
def test_profiles_map_backbones_as_documented():
    quick, paper, smoke = (experiments.get_profile(n) for n in ("quick", "paper", "smoke"))
    assert experiments.get_profile("paper", smoke=True) is smoke
    assert paper.model_for(experiments.STUDY_MODEL) == experiments.STUDY_MODEL
    assert (paper.image_size, paper.epochs, paper.batch_size, paper.lr, paper.weights.kind) == (224, 5, 16, 5e-4, "hub")
    assert quick.weights.is_random and quick.image_size <= 96
    for _, name in experiments.BACKBONES:
        small = quick.model_for(name)
        assert small and smoke.model_for(name).startswith("test_")
    assert quick.model_for("resnet34") == "resnet34"  # a name you chose is trained as given
    assert smoke.model_for(experiments.STUDY_VIT) == "test_vit"
    with pytest.raises(ValueError, match="profile 'huge'"):
        experiments.get_profile("huge")


def test_profile_workers_never_exceed_the_cores(monkeypatch, cardiomegaly_64):
    from common.experiments import stages

    data = experiments.DataSpec(None, cardiomegaly_64, False)
    paper = experiments.get_profile("paper", weights="none")
    for cores, expected in ((2, 2), (16, paper.num_workers)):
        monkeypatch.setattr(stages, "default_workers", lambda: cores)
        cfg = experiments.train_config(paper, experiments.STUDY_MODEL, "cardiomegaly", data)
        assert cfg.num_workers == expected


def test_every_quick_model_is_a_timm_model():
    import timm

    available = set(timm.list_models())
    for name in experiments.QUICK_MODELS.values():
        assert name in available, name
    for _, name in experiments.BACKBONES:
        assert name.split(".")[0] in available, name


def test_knobs_merge_with_overrides():
    knobs = {"ModelName": "resnet18", "Profile": "quick", "Epochs": None}
    assert experiments.knobs_to_kwargs(knobs, {"ModelName": None, "Epochs": 2}) == {
        "model_name": "resnet18", "profile": "quick", "epochs": 2}
    with pytest.raises(TypeError, match="unknown knob 'Epoch'"):
        experiments.knobs_to_kwargs(knobs, {"Epoch": 2})


def test_trainer_files_expose_the_same_knobs_to_their_notebooks():
    import importlib.util

    for folder, fn in (("single-task", "single_task"), ("multi-task", "multi_task"), ("transformer", "transformer")):
        spec = importlib.util.spec_from_file_location(f"trainer_{fn}", REPO / folder / "trainer.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.ModelName and module.Profile == "quick"
        knobs = [k for k in vars(module) if k[:1].isupper()]
        assert set(knobs) <= set(experiments.KNOBS), set(knobs) - set(experiments.KNOBS)
        with pytest.raises(TypeError, match="unknown knob"):
            module.run(NotAKnob=1)


# --------------------------------------------------------------------------------------- data
def test_explicit_data_folders_and_their_description(nih_sample, cardiomegaly_64, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = experiments.resolve_data(nih_sample, cardiomegaly_64)
    assert spec.full == nih_sample.resolve() and spec.cardiomegaly == cardiomegaly_64.resolve() and not spec.synthetic
    assert spec.dirs() == [str(cardiomegaly_64.resolve()), str(nih_sample.resolve())]
    text = spec.describe()
    assert "400 images, 400 patients" in text and "577 images" in text and "SYNTHETIC" not in text
    assert experiments.DataSpec.from_dict(spec.to_dict()) == spec
    only = experiments.resolve_data(None, cardiomegaly_64)
    assert only.full is None and only.dirs() == [str(cardiomegaly_64.resolve())]


def test_a_missing_data_folder_is_named(tmp_path, monkeypatch):
    from common.data import DatasetError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="nowhere"):
        experiments.resolve_data(tmp_path / "nowhere", None)


def test_repository_data_folders_are_found_from_a_notebook_folder(tmp_path, monkeypatch, cardiomegaly_64):
    import shutil

    repo = tmp_path / "repo"
    (repo / "single-task").mkdir(parents=True)
    (repo / "dataset_full").mkdir()
    (repo / "dataset_full" / "README.md").write_text("put data here")
    shutil.copytree(cardiomegaly_64, repo / "dataset_cardiomegaly")
    monkeypatch.chdir(repo / "single-task")
    spec = experiments.resolve_data()
    assert spec.cardiomegaly == (repo / "dataset_cardiomegaly").resolve()
    assert spec.full is None and not spec.synthetic  # a README alone is no data


# ------------------------------------------------------------------------------------ run keys
def _config(data_dirs, **kw):
    from common.train import TrainConfig

    base = dict(data=[str(d) for d in data_dirs], task="cardiomegaly", model_name="test_efficientnet", image_size=32,
                out="")
    return TrainConfig(**{**base, **kw})


def test_run_keys_follow_the_configuration_and_the_data(cardiomegaly_64, tmp_path):
    import shutil

    key = experiments.run_key(_config([cardiomegaly_64]))
    assert key == experiments.run_key(_config([cardiomegaly_64]))
    # how to run is not what to compute
    assert key == experiments.run_key(_config([cardiomegaly_64], num_workers=3, device="cpu", out="elsewhere"))
    assert key != experiments.run_key(_config([cardiomegaly_64], lr=1e-4))
    assert key != experiments.run_key(_config([cardiomegaly_64], task="all14"))
    # the same data elsewhere is another dataset; an edited label file is another run, a touched one is not
    copy = tmp_path / "cardio"
    shutil.copytree(cardiomegaly_64, copy)
    k1 = experiments.run_key(_config([copy]))
    assert k1 != key
    csv = copy / "train.csv"
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    common.data._load_dataset_cached.cache_clear()
    assert experiments.run_key(_config([copy])) == k1
    lines = csv.read_text().splitlines()
    header, first = lines[0], lines[1].split(",")
    first[1] = "No Finding" if first[1] == "Cardiomegaly" else "Cardiomegaly"  # one label flipped, same size or not
    csv.write_text("\n".join([header, ",".join(first), *lines[2:]]) + "\n")
    common.data._load_dataset_cached.cache_clear()
    assert experiments.run_key(_config([copy])) != k1


def test_stage2_key_includes_stage1s(cardiomegaly_64, tmp_path):
    runs = []
    for name in ("cardiomegaly-a-111", "cardiomegaly-a-222"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model": {}, "labels": [], "input": {}}))
        runs.append(d)
    k1, k2 = (experiments.run_key(_config([cardiomegaly_64], task="all14", init_from=str(d))) for d in runs)
    assert k1 != k2
    # moving the run cache keeps keys: a run is named by its folder name, which holds its own key
    moved = tmp_path / "moved" / runs[0].name
    moved.parent.mkdir()
    runs[0].rename(moved)
    assert experiments.run_key(_config([cardiomegaly_64], task="all14", init_from=str(moved))) == k1


def test_runs_dir_default_is_under_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDIMAGING_RUNS", raising=False)
    assert experiments.runs_dir() == (Path(os.environ["MEDIMAGING_CACHE"]) / "runs").resolve()
    monkeypatch.setenv("MEDIMAGING_RUNS", str(tmp_path / "r"))
    assert experiments.runs_dir() == (tmp_path / "r").resolve()
    assert experiments.runs_dir(tmp_path / "x") == (tmp_path / "x").resolve()


# -------------------------------------------------------------------------------------- tables
def _metrics(n_boot=50):
    import numpy as np

    from common.metrics import evaluate_predictions

    rng = np.random.default_rng(0)
    y = (rng.random((120, 14)) < 0.2).astype(float)
    y[:40, 2:] = np.nan  # a Cardiomegaly-only source
    p = np.clip(0.6 * y + 0.4 * rng.random((120, 14)), 0, 1)
    p = np.where(np.isnan(p), rng.random((120, 14)), p)
    return evaluate_predictions(y, p, LABELS, n_boot=n_boot)


def test_per_label_table_carries_baselines_intervals_and_chexnet():
    m = _metrics()
    table = experiments.per_label_table(m, experiments.title("Stage 2", True), compare={"Other": m})
    md = table.markdown()
    assert table.title.startswith("SYNTHETIC DATA")
    assert len(table.frame) == 15 and table.frame["Label"].iloc[-1] == "Mean"
    row = table.frame.set_index("Label").loc["Cardiomegaly"]
    assert row["All-absent accuracy (%)"] == experiments.pct(m["baseline_all_absent_accuracy"]["Cardiomegaly"])
    lo, hi = m["auroc_ci"]["Cardiomegaly"]
    assert row["AUROC [95% CI]"] == f"{m['auroc']['Cardiomegaly']:.3f} [{lo:.3f}, {hi:.3f}]"
    assert row["CheXNet AUROC (published)"] == "0.9248"
    assert "chance AUROC is 0.500" in table.note
    assert md.count("\n") == 16  # header, rule, 14 labels, mean


def test_table_markdown_escapes_pipes_and_round_trips():
    t = experiments.Table("T", pd.DataFrame({"a|b": ["x|y", 1]}), "note")
    assert t.markdown().splitlines()[0] == "| a\\|b |"
    assert experiments.Table.from_dict(t.to_dict()).markdown() == t.markdown()


def test_saved_experiments_are_collected_into_tables_md(tmp_path, cardiomegaly_64):
    spec = experiments.resolve_data(None, cardiomegaly_64)
    exp = experiments.Experiment("single_task", "Stage 1", "quick", spec)
    exp.tables.append(experiments.Table(exp.title_for("First"), pd.DataFrame({"x": [1]})))
    exp.tables.append(experiments.Table(exp.title_for("Second"), pd.DataFrame({"y": [2]}), "a note"))
    exp.save(tmp_path)
    other = experiments.Experiment("compression", "Added later", "quick", spec)
    other.tables.append(experiments.Table("Third", pd.DataFrame({"z": [3]})))
    other.save(tmp_path)
    assert list(experiments.load_experiments(tmp_path)) == ["single_task", "compression"]
    (tmp_path / "tables" / "localisation.md").write_text("| a |\n|---|\n| 1 |\n")  # a plain table, no record
    text = records.write_tables_md(tmp_path, profile="quick").read_text()
    assert text.index("### Third") < text.index("## localisation") and "| 1 |" in text
    assert text.index("### First") < text.index("### Second") < text.index("### Third")
    assert text.count("- Data: dataset_cardiomegaly = ") == 3 and text.count("- Profile: quick") == 4
    assert text.count("- Commit: ") == 4 and text.count("- Date: ") == 4
    assert "a note" in text


def test_headline_table_puts_the_study_beside_ours():
    records = {"single_task": {"headline": {"stage1_accuracy": 0.8, "stage1_auroc": 0.7, "model": "m",
                                            "stage1_baseline_accuracy": 0.75}},
               "multi_task": {"headline": {"stage2_dev_mean_accuracy": 0.9, "stage2_dev_baseline_accuracy": 0.92},
                              "synthetic": True}}
    t = experiments.headline_table(records)
    md = t.markdown()
    assert t.title.startswith("SYNTHETIC DATA")
    assert "| 83.95 | 80.00 | n/a | 75.00 |" in md and "| 91.82 | 90.00 | n/a | 92.00 |" in md
    assert "87.61" in md and "0.841" in md and "Trivial baseline" in md


def test_notebooks_get_paths_relative_to_their_folder_when_beside_the_checkout(tmp_path):
    root = tmp_path / "work" / "repo"
    (root / "notebooks").mkdir(parents=True)
    params = {"OutDir": root / "results", "DataFull": tmp_path / "work" / "shared" / "data" / "nih",
              "RunsDir": Path("/elsewhere/runs"), "Profile": "quick", "DataCardiomegaly": None}
    got = rep.notebook_parameters(params, root / "notebooks", root)
    assert got == {"OutDir": "../results", "DataFull": "../../shared/data/nih", "RunsDir": "/elsewhere/runs",
                   "Profile": "quick", "DataCardiomegaly": None}


def test_commit_ignores_the_results_folder_being_rewritten(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)

    def run(*args):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)

    run("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "tables.md").write_text("old\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    clean = records.git_commit(repo)
    assert clean and "uncommitted" not in clean
    (repo / "results" / "tables.md").write_text("new\n")
    assert records.git_commit(repo).endswith("+ uncommitted changes")
    assert records.git_commit(repo, exclude=repo / "results") == clean
    (repo / "code.py").write_text("x = 2\n")
    assert records.git_commit(repo, exclude=repo / "results").endswith("+ uncommitted changes")
