"""The experiment notebooks: lint, and every notebook executed by `medimaging reproduce --smoke`
on the synthetic default and on the real NIH sample (one reproduce per data source, shared by the
tests of this module), stage 2 really starting from stage 1, and run caching."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from common import experiments
from common.experiments.notebooks import NOTEBOOKS
from common.experiments.records import write_tables_md
from common.experiments.reproduce import reproduce
from common.paths import REPO_ROOT

REPO = REPO_ROOT
REPRODUCE_PARAMETERS = ("Profile", "Smoke", "DataFull", "DataCardiomegaly", "OutDir", "RunsDir")
REQUIRED_PARAMETERS = ("OutDir",)  # every notebook writes where reproduce says; the rest where relevant
TRAINER_NOTEBOOKS = {"single_task", "multi_task", "transformer"}
EXPERIMENT_NOTEBOOKS = ("data_exploration", "single_task", "multi_task", "init_comparison", "transformer", "backbone_ablation",
                        "freeze_ablation", "localisation", "results")
# Text that means a notebook grew its own training loop, dataset, metric or path hack.
FORBIDDEN = (".backward(", "optimizer.step", "optim.", "roc_auc_score", "sklearn", "DataLoader", "Dataset(",
             "sys.path", "torch.load", "zero_grad", "manual_seed")


# ------------------------------------------------------------------------------------- lint
def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def notebook_problems(path: Path) -> list[str]:
    """Why a notebook breaks the house rules (empty: it follows them)."""
    nb = nbformat.read(str(path), as_version=4)
    problems = []
    cells = _code_cells(nb)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        return [f"{len(tagged)} cells tagged 'parameters' (need exactly one)"]
    if tagged[0] != 1:
        problems.append(f"the parameters cell is code cell {tagged[0]}; it must be the first after the imports")
    imports = ast.parse(cells[0].source)
    if not all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in imports.body):
        problems.append("the first code cell must hold imports only")
    names = {}
    for line in cells[tagged[0]].source.splitlines():
        if not line.strip():
            continue
        tree = ast.parse(line)
        node = tree.body[0] if len(tree.body) == 1 else None
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            problems.append(f"parameters cell line is not `Name = value`: {line!r}")
            continue
        try:
            ast.literal_eval(node.value)
        except ValueError:
            problems.append(f"parameter {node.targets[0].id} is not a literal")
        if "  # " not in line:
            problems.append(f"parameter {node.targets[0].id} has no `  # help` comment")
        names[node.targets[0].id] = line
    missing = [p for p in REQUIRED_PARAMETERS if p not in names]
    if missing:
        problems.append(f"parameters cell lacks {missing} (medimaging reproduce passes them)")
    trains = any(w in c.source for c in cells for w in ("trainer.run(", "experiments.", "compress."))
    if trains:
        missing = [p for p in REPRODUCE_PARAMETERS if p not in names]
        if missing:
            problems.append(f"parameters cell lacks {missing}: a notebook that trains takes them all")
    for i, cell in enumerate(cells):
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                problems.append(f"code cell {i} defines {getattr(node, 'name', 'a lambda')}: logic belongs in common/")
            if isinstance(node, (ast.While,)):
                problems.append(f"code cell {i} has a while loop: training loops belong in common.train")
        for text in FORBIDDEN:
            if text in cell.source:
                problems.append(f"code cell {i} contains {text!r}")
    return problems


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_notebook_follows_the_house_rules(nb):
    path = REPO / nb.path
    assert path.is_file(), f"{nb.path} listed in common.experiments.records.NOTEBOOKS but missing"
    assert notebook_problems(path) == []


@pytest.mark.parametrize("nb", [nb for nb in NOTEBOOKS if nb.name in TRAINER_NOTEBOOKS], ids=lambda nb: nb.name)
def test_trainer_notebooks_import_their_trainer_and_default_to_its_model(nb):
    path = REPO / nb.path
    cells = _code_cells(nbformat.read(str(path), as_version=4))
    assert "import trainer" in cells[0].source
    assert re.search(r"^ModelName = None  # None: the trainer file's value", cells[1].source, re.M)
    assert (path.parent / "trainer.py").is_file()
    trainer = (path.parent / "trainer.py").read_text()
    first_knob = next(line for line in trainer.splitlines() if re.match(r"^[A-Z]\w* = ", line))
    assert first_knob.startswith("ModelName = "), "ModelName must be the trainer file's first knob"
    tree = ast.parse(trainer)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.ClassDef))], "no loop of its own"
    assert [n.name for n in tree.body if isinstance(n, ast.FunctionDef)] == ["run"]
    assert "common.experiments" in trainer or "from common import experiments" in trainer


def test_lint_catches_a_notebook_with_its_own_loop_and_two_parameter_cells(tmp_path):
    bad = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import torch"),
        nbformat.v4.new_code_cell("Profile = 'quick'  # p"),
        nbformat.v4.new_code_cell("def train(model, opt):\n    loss = model()\n    loss.backward()\n    opt.step()"),
    ])
    bad.cells[1].metadata["tags"] = ["parameters"]
    path = tmp_path / "bad.ipynb"
    nbformat.write(bad, str(path))
    problems = notebook_problems(path)
    assert any("defines train" in p for p in problems)
    assert any(".backward(" in p for p in problems)
    assert any("lacks" in p for p in problems)
    bad.cells[2].metadata["tags"] = ["parameters"]
    nbformat.write(bad, str(path))
    assert notebook_problems(path) == ["2 cells tagged 'parameters' (need exactly one)"]


# ------------------------------------------------------------------------ smoke reproduces
@dataclass
class Smoke:
    """One `medimaging reproduce --smoke` run: its exit code, log and folders."""

    returncode: int
    log: str
    work: Path

    @property
    def out(self) -> Path:
        return self.work / "out"


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, request) -> dict[str, Smoke]:
    """The two smoke reproduces (synthetic default, real NIH sample), run at the same time as two
    `medimaging reproduce` processes: each trains on one thread, so two use both cores."""
    # module-scoped: conftest's per-test cache fixture is not active yet, so name the same cache here
    env = {**os.environ, "MEDIMAGING_CACHE": str(tmp_path_factory.getbasetemp() / "medimaging-cache")}
    env.pop("MEDIMAGING_RUNS", None)
    sources = {"synthetic": []}
    try:
        sources["real"] = ["--data-full", str(request.getfixturevalue("nih_sample")),
                           "--data-cardiomegaly", str(request.getfixturevalue("cardiomegaly_64"))]
    except pytest.skip.Exception:
        pass  # the real-data tests skip (or fail under CI) through their own fixture
    started = {}
    for name, data_args in sources.items():
        work = tmp_path_factory.mktemp(f"smoke-{name}")  # no dataset_full/ here or above: the synthetic default
        cmd = [sys.executable, "-m", "common", "reproduce", "--smoke", "--out", str(work / "out"),
               "--runs", str(work / "runs"), "--no-progress", *data_args]
        log = open(work / "reproduce.log", "w+")
        started[name] = (subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT), log, work)
    runs = {}
    try:
        for name, (proc, log, work) in started.items():
            code = proc.wait(timeout=900)
            log.seek(0)
            runs[name] = Smoke(code, log.read(), work)
    finally:
        for proc, log, _ in started.values():
            if proc.poll() is None:  # timed out: stop it (its kernels end with it)
                proc.kill()
                proc.wait()
            log.close()
    return runs


@pytest.fixture(scope="module")
def smoke_synthetic(smoke_runs) -> Smoke:
    return smoke_runs["synthetic"]


@pytest.fixture(scope="module")
def smoke_real(smoke_runs, nih_sample, cardiomegaly_64) -> Smoke:
    return smoke_runs["real"]


def _records(out: Path) -> dict:
    return experiments.load_experiments(out)


def _check_outputs(run: Smoke, synthetic: bool) -> str:
    assert run.returncode == 0, run.log[-3000:]
    assert f"all {len(NOTEBOOKS)} notebook(s) ran" in run.log
    out = run.out
    for nb in NOTEBOOKS:
        executed = nbformat.read(str(out / "notebooks" / f"{nb.name}.ipynb"), as_version=4)
        errors = [o for c in _code_cells(executed) for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{nb.name}: {errors[:1]}"
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "Smoke = True" in injected[0].source
    text = (out / "tables.md").read_text()
    records = _records(out)
    # the experiment notebooks save records; a notebook added later may write a plain .md table
    assert set(EXPERIMENT_NOTEBOOKS) <= set(records)
    assert list(records) == [nb.name for nb in NOTEBOOKS if nb.name in records]
    n_tables = sum(len(r["tables"]) for r in records.values())
    n_plain = len([p for p in (out / "tables").glob("*.md") if p.stem not in records])
    # every table is headed by the data, profile, commit and date
    assert text.count("\n### ") == n_tables
    for key in ("- Data: ", "- Profile: smoke", "- Commit: ", "- Date: "):
        assert text.count(key) == n_tables + n_plain, key
    for record in records.values():
        for table in record["tables"]:
            assert table["title"].startswith("SYNTHETIC DATA") == synthetic, table["title"]
    assert ("SYNTHETIC" in text) == synthetic
    # baselines and intervals beside the models, and the study's numbers where it reported them
    for needle in ("Trivial", "0.500", "83.95", "91.82", "87.61", "81.96", "0.841", "CheXNet"):
        assert needle in text, needle
    assert re.search(r"0\.\d{3} \[0\.\d{3}, [01]\.\d{3}\]", text), "AUROC rows carry their 95% interval"
    figures = {p.name for p in (out / "figures").glob("*.png")}
    for name in ("single_task_roc.png", "multi_task_chexnet.png", "results_roc.png", "results_chexnet.png",
                 "data_exploration_cooccurrence.png", "backbone_ablation_auroc.png", "freeze_ablation_curves.png"):
        assert name in figures
    return text


def test_every_notebook_runs_on_the_synthetic_default(smoke_synthetic):
    text = _check_outputs(smoke_synthetic, synthetic=True)
    assert "synthetic-v" in text  # the generated default's folder is named in the headers


def test_every_notebook_runs_on_the_real_nih_sample(smoke_real, nih_sample):
    text = _check_outputs(smoke_real, synthetic=False)
    assert f"dataset_full = {experiments.display_path(nih_sample)} (nih layout, 400 images, 400 patients)" in text
    assert "(cardiomegaly layout, 577 images" in text
    records = _records(smoke_real.out)
    # every backbone row and freezing variant is there, the quick mapping said in the table
    ablation = records["backbone_ablation"]
    assert set(ablation["runs"]) == {row for row, _ in experiments.BACKBONES}
    assert len(records["freeze_ablation"]["runs"]) == 4
    frozen = [experiments.RunRef.from_dict(d).config()["frozen"] for d in records["freeze_ablation"]["runs"].values()
              if d["role"] != "stage 1"]
    assert frozen[0] == [] and 0 < len(frozen[1]) < len(frozen[2])


@pytest.mark.filterwarnings("ignore:pretrained=False:UserWarning")  # stage 2 loads stage 1's weights right after
def test_stage2_starts_from_the_stage1_weights(smoke_real, tmp_path):
    import dataclasses

    import torch

    from common.models import build_model
    from common.runs import load_weights
    from common.train import TrainConfig, fit

    runs = experiments.record_runs(_records(smoke_real.out)["multi_task"])
    stage1, stage2, scratch = runs["stage 1"], runs["stage 2"], runs["stage 2 without stage 1"]
    cfg2 = stage2.config()
    assert cfg2["train"]["init_from"] == str(stage1.run_dir)
    assert scratch.config()["train"]["init_from"] is None and scratch.config()["init"] is None
    w1 = load_weights(stage1.run_dir / "best.safetensors")
    backbone1 = {k: v for k, v in w1.items() if k.startswith("backbone.")}
    # fit's init report: every backbone weight of stage 1 kept, the whole head new
    assert set(cfg2["init"]["kept"]) == set(backbone1)
    assert cfg2["init"]["new"] and all(k.startswith("head.") for k in cfg2["init"]["new"])
    # stage 2's exact configuration, stopped before its first step: the weights it starts from
    start_cfg = dataclasses.replace(TrainConfig.from_dict(cfg2["train"]), max_steps=0, out=str(tmp_path / "start"),
                                    progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: as the smoke profile trains it
    try:
        start = load_weights(fit(start_cfg) / "best.safetensors")
    finally:
        torch.set_num_threads(threads)
    for k, v in backbone1.items():
        assert torch.equal(start[k], v), f"{k} differs from stage 1's"
    assert start["head.5.weight"].shape[0] == 14 and w1["head.5.weight"].shape[0] == 1
    # a fresh build (what stage 2 without stage 1 starts from) is not stage 1's backbone
    torch.manual_seed(start_cfg.seed)
    fresh = build_model(**cfg2["model"], pretrained=None).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in backbone1.items() if v.is_floating_point())
    # and stage 2 then trained: its final backbone moved away from where it started
    w2 = load_weights(stage2.run_dir / "best.safetensors")
    assert any(not torch.equal(w2[k], v) for k, v in backbone1.items() if v.is_floating_point())


def test_a_second_reproduce_retrains_nothing(smoke_real, nih_sample, cardiomegaly_64, monkeypatch):
    work = smoke_real.work
    runs_root = work / "runs"
    before = {p.name: p.stat().st_mtime_ns for p in runs_root.glob("*/metrics.json")}
    monkeypatch.chdir(work)
    again = reproduce(profile="quick", smoke=True, data_full=nih_sample, data_cardiomegaly=cardiomegaly_64,
                      out=work / "out", runs_dir=runs_root, only=["single_task", "multi_task"], progress=False)
    assert again.ok, [o.error for o in again.failed]
    after = {p.name: p.stat().st_mtime_ns for p in runs_root.glob("*/metrics.json")}
    assert after == before  # no run folder added, no run rewritten
    records = _records(work / "out")
    for name in ("single_task", "multi_task"):
        assert all(r["reused"] for r in records[name]["runs"].values()), records[name]["runs"]
    # the collected tables still hold every notebook's tables, not only the two just run
    assert set(EXPERIMENT_NOTEBOOKS) <= set(_records(work / "out"))
    assert write_tables_md(work / "out").read_text().count("\n## ") >= len(EXPERIMENT_NOTEBOOKS)


def test_a_failing_notebook_fails_the_command_and_the_others_still_run(tmp_path, cardiomegaly_64, monkeypatch, capsys):
    from common.cli import main
    from common.experiments import reproduce as rep

    root = tmp_path / "repo"
    (root / "nb").mkdir(parents=True)
    params = "\n".join(f"{p} = None  # set by reproduce" for p in REPRODUCE_PARAMETERS)

    def write(name: str, body: str) -> None:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import json"),
                                             nbformat.v4.new_code_cell(params), nbformat.v4.new_code_cell(body)])
        nb.cells[1].metadata["tags"] = ["parameters"]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, str(root / "nb" / f"{name}.ipynb"))

    write("first", "open(OutDir + '/first.txt', 'w').write('ran')")
    write("broken", "raise ValueError('the broken cell says so')")
    write("last", "open(OutDir + '/last.txt', 'w').write(json.dumps(Smoke))")
    monkeypatch.setattr(rep, "NOTEBOOKS", tuple(rep.Notebook(n, f"nb/{n}.ipynb", n) for n in ("first", "broken", "last")))
    monkeypatch.setattr(rep, "repo_root", lambda: root)
    out = tmp_path / "out"
    code = main(["reproduce", "--smoke", "--data-cardiomegaly", str(cardiomegaly_64), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "notebook broken failed" in err and "ValueError: the broken cell says so" in err and "In [" in err
    assert (out / "first.txt").read_text() == "ran"
    assert (out / "last.txt").read_text() == "true"  # the notebook after the failure still ran
    executed = nbformat.read(str(out / "notebooks" / "broken.ipynb"), as_version=4)
    assert any(o.get("ename") == "ValueError" for c in _code_cells(executed) for o in c.get("outputs", []))
    assert json.loads((out / "notebooks" / "last.ipynb").read_text())["cells"]
