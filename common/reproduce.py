"""`medimaging reproduce`: execute every experiment notebook headlessly and collect `results/`.

    OUT/notebooks/<name>.ipynb   each notebook as executed (kept even when it failed)
    OUT/figures/*.png            plots the notebooks saved
    OUT/tables/<name>.json       each notebook's tables (written by common.experiments.Experiment.save)
    OUT/tables.md                every table, each headed by the data, profile, commit and date

Notebooks run with papermill's Python API, in the order of `NOTEBOOKS`, each in a fresh kernel of
*this* interpreter (a kernelspec pointing at sys.executable is installed in a temporary folder, so
a stray `python3` kernelspec elsewhere cannot run them with another Python), with the notebook's
own folder as working directory (so `import trainer` finds the trainer file beside it).
A failing notebook does not stop the others; the command then exits non-zero naming it and the
failing cell's error.

Every notebook receives the same parameters (its `parameters` cell must define them all):
    Profile           "quick" | "paper"
    Smoke             bool: a couple of optimiser steps per training (tests)
    DataFull          absolute path of the full (14-label) dataset folder, or None
    DataCardiomegaly  absolute path of the Cardiomegaly dataset folder, or None
    OutDir            absolute path of OUT (tables go to OUT/tables, figures to OUT/figures)
    RunsDir           absolute path of the run cache
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.runs import atomic_write_text, load_json

KERNEL_NAME = "python3"
PROFILES = ("quick", "paper")


@dataclass(frozen=True)
class Notebook:
    """One entry of the reproduce order."""

    name: str  # what `--only` takes; also the name of its tables file (OUT/tables/<name>.json)
    path: str  # relative to the repository root
    what: str  # one line for `--help` and the log


# The one ordered table of notebooks: each may reuse the cached runs of those above it (the
# multi-task notebook's stage 1 is the single-task run; the freezing ablation starts from it).
# To add a notebook, add a line here before "results", which collects every table written above it.
NOTEBOOKS: tuple[Notebook, ...] = (
    Notebook("data_exploration", "notebooks/data_exploration.ipynb", "label frequencies, co-occurrence, demographics, images"),
    Notebook("single_task", "single-task/single_task.ipynb", "stage 1: Cardiomegaly vs No Finding"),
    Notebook("multi_task", "multi-task/multi_task.ipynb", "stage 2: 14 labels from stage 1, and without it"),
    Notebook("transformer", "transformer/transformer.ipynb", "the two stages with a ViT"),
    Notebook("backbone_ablation", "notebooks/backbone_ablation.ipynb", "VGG, ResNet, DenseNet, CSPDarkNet, EfficientNet, ViT, ConvNeXt"),
    Notebook("freeze_ablation", "notebooks/freeze_ablation.ipynb", "nothing / early stages / all but the head frozen"),
    Notebook("compression", "notebooks/compression.ipynb", "int8 / pruning / distillation: size, speed and AUROC in one table"),
    Notebook("localisation", "notebooks/localisation.ipynb", "Grad-CAM pointing game of the stage-2 run on the data's radiologist boxes"),
    Notebook("results", "notebooks/results.ipynb", "every table, ROC curves, training curves, CheXNet comparison"),
)


def notebook_names() -> list[str]:
    return [nb.name for nb in NOTEBOOKS]


def repo_root() -> Path:
    """The checkout holding the notebooks (common/ is installed editable from it)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / NOTEBOOKS[0].path).is_file():
        raise FileNotFoundError(
            f"{root}: the experiment notebooks are not here ({NOTEBOOKS[0].path} is missing); "
            "run `medimaging reproduce` from a checkout with `pip install -e .`"
        )
    return root


def select(only: Sequence[str] | None) -> list[Notebook]:
    """The notebooks to run, in reproduce order; unknown names are an error listing the known ones."""
    if not only:
        return list(NOTEBOOKS)
    known = notebook_names()
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown notebook name(s) {unknown}; choose from {known}")
    return [nb for nb in NOTEBOOKS if nb.name in set(only)]


# ------------------------------------------------------------------------------------- kernel
@contextlib.contextmanager
def python_kernel() -> Iterator[str]:
    """A `python3` kernelspec that runs *this* interpreter, found first while the block runs.

    jupyter_client searches $JUPYTER_PATH before the user's and the system's folders, so a
    kernelspec written to a temporary folder on it wins over any other `python3`.
    """
    with tempfile.TemporaryDirectory(prefix="medimaging-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            # ERROR: the kernel app's own notices (e.g. "running over TCP without encryption" on
            # localhost) would otherwise interleave with the progress bar for every notebook
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=ERROR"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "metadata": {"debugger": True},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        # the kernel's debugger otherwise prints a frozen-modules note into every notebook;
        # OpenMP threads that spin while waiting make CPU training 10x slower as soon as anything
        # else wants the cores (measured: EfficientNet-B0 at 64 px, 2 threads, a busy 2-core
        # machine: 1.6 images/s spinning, 17-26 passive); sleeping threads cost little when idle
        with (_environ("JUPYTER_PATH", os.pathsep.join(p for p in (tmp, os.environ.get("JUPYTER_PATH")) if p)),
              _environ("PYDEVD_DISABLE_FILE_VALIDATION", "1"),
              _environ("OMP_WAIT_POLICY", None if "OMP_WAIT_POLICY" in os.environ else "PASSIVE")):
            yield KERNEL_NAME


def _report_weights_folder(prof) -> None:
    """Say up front which of the suite's backbones the weights folder covers (a missing one fails
    only the notebook that trains it, with the file names it looked for)."""
    from common.experiments import BACKBONES

    found, missing = [], []
    for _, name in BACKBONES:
        model = prof.model_for(name)
        try:
            prof.pretrained_for(model)
            found.append(model)
        except FileNotFoundError:
            missing.append(model)
    print(f"reproduce: weights folder {prof.weights}: weights for {', '.join(found) or 'none of the backbones'}"
          + (f"; none for {', '.join(missing)} (trainings of those fail)" if missing else ""), file=sys.stderr)


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """$name = value while the block runs (the notebooks' kernels inherit it); None: unchanged."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# ----------------------------------------------------------------------------------- running
@dataclass
class NotebookOutcome:
    name: str
    output: Path
    seconds: float
    error: str | None = None  # "cell N: Ename: message" when it failed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ReproduceResult:
    out: Path
    outcomes: list[NotebookOutcome] = field(default_factory=list)
    tables_md: Path | None = None

    @property
    def failed(self) -> list[NotebookOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failed


def _cell_error(err: BaseException) -> str:
    """One line naming the failing cell and its error (papermill's PapermillExecutionError)."""
    ename = getattr(err, "ename", None)
    if ename is not None:
        evalue = str(getattr(err, "evalue", "")).strip().splitlines()
        count = getattr(err, "exec_count", None)
        source = str(getattr(err, "source", "")).strip().splitlines()
        where = f"cell In [{count}]" if count is not None else f"cell {getattr(err, 'cell_index', '?')}"
        if source:
            where += f" `{source[0][:80]}`"
        return f"{where}: {ename}: {evalue[0] if evalue else ''}".rstrip(": ")
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}"


def notebook_parameters(parameters: dict, nb_dir: Path, root: Path) -> dict:
    """Paths as the notebook (working directory: its own folder) should see them: relative when
    they lie in or beside the checkout (../results, ../../shared/data/...), else absolute; so the
    executed notebooks written to OUT carry no machine-specific paths where avoidable."""
    beside = root.resolve().parent
    out = {}
    for name, value in parameters.items():
        if isinstance(value, Path):
            p = value.resolve()
            value = os.path.relpath(p, nb_dir.resolve()) if p == beside or beside in p.parents else str(p)
        out[name] = value
    return out


def run_notebook(nb: Notebook, parameters: dict, out: Path, kernel_name: str, root: Path) -> NotebookOutcome:
    """Execute one notebook into OUT/notebooks/<name>.ipynb; errors become the outcome's `error`."""
    import papermill as pm

    src = root / nb.path
    dst = out / "notebooks" / f"{nb.name}.ipynb"
    dst.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error = None
    if not src.is_file():
        error = f"notebook file {src} not found"
    else:
        try:
            pm.execute_notebook(
                str(src), str(dst), parameters=parameters, kernel_name=kernel_name,
                cwd=str(src.parent), progress_bar=False, log_output=False,
            )
        except Exception as err:  # papermill's cell errors, a dead kernel, a broken notebook file
            error = _cell_error(err)
    return NotebookOutcome(nb.name, dst, time.perf_counter() - start, error)


def reproduce(
    profile: str = "quick",
    smoke: bool = False,
    data_full: str | Path | None = None,
    data_cardiomegaly: str | Path | None = None,
    out: str | Path = "results",
    only: Sequence[str] | None = None,
    runs_dir: str | Path | None = None,
    progress: bool = True,
    weights: str | Path | None = None,
) -> ReproduceResult:
    """Execute the notebooks (all, or `only` these) and write OUT/tables.md.

    Data folders left None mean `dataset_full/` and `dataset_cardiomegaly/` (found from the working
    directory upwards), or the synthetic default when those are empty. `weights` ("hub", "none" or a
    folder of downloaded weights) overrides the profile's pretrained weights in every notebook (through
    $MEDIMAGING_WEIGHTS). Never raises for a failing notebook: see `ReproduceResult.failed`.
    """
    from tqdm.auto import tqdm

    from common import experiments

    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: expected one of {list(PROFILES)}")
    notebooks = select(only)
    weights = experiments.check_weights(weights) if weights is not None else None
    prof = experiments.get_profile(profile, smoke, weights)
    if prof.weights not in (None, "hub", "none"):
        _report_weights_folder(prof)
    root = repo_root()
    out = Path(out).expanduser().resolve()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    data = experiments.resolve_data(data_full, data_cardiomegaly)
    runs = experiments.runs_dir(runs_dir)
    parameters = {
        "Profile": profile,
        "Smoke": bool(smoke),
        "DataFull": data.full,
        "DataCardiomegaly": data.cardiomegaly,
        "OutDir": out,
        # None lets each notebook find the same default cache itself (no machine path in its copy)
        "RunsDir": runs if runs_dir is not None else None,
    }
    print(f"reproduce: profile {prof.label}, data: {data.describe()}", file=sys.stderr)
    print(f"reproduce: runs cached in {runs}; results in {out}", file=sys.stderr)
    result = ReproduceResult(out)
    with python_kernel() as kernel_name, _environ(experiments.WEIGHTS_ENV, weights):
        bar = tqdm(notebooks, desc="notebooks", unit="nb", disable=not progress)
        for nb in bar:
            bar.set_postfix_str(nb.name)
            outcome = run_notebook(nb, notebook_parameters(parameters, (root / nb.path).parent, root), out,
                                   kernel_name, root)
            result.outcomes.append(outcome)
            status = "ok" if outcome.ok else f"FAILED ({outcome.error})"
            tqdm.write(f"{nb.name}: {status} in {outcome.seconds:.0f} s -> {outcome.output}", file=sys.stderr)
    result.tables_md = write_tables_md(out, profile=prof.name)
    return result


# ------------------------------------------------------------------------------- tables.md
def git_commit(cwd: str | Path | None = None, exclude: str | Path | None = None) -> str:
    """The checkout's commit (short hash, "+ uncommitted changes" when dirty), or "unknown".

    `exclude`: a folder whose changes do not count, e.g. the results folder being rewritten now.
    """
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parents[1]
    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    if exclude is not None:
        rel = os.path.relpath(Path(exclude).resolve(), cwd.resolve())
        if not rel.startswith(os.pardir):
            status += ["--", ".", f":(exclude){rel}"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(status, cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes" if dirty else head


def write_tables_md(out: str | Path, profile: str | None = None) -> Path:
    """Collect OUT/tables/<name>.json (notebook order, then any others) into OUT/tables.md.

    A notebook that writes a plain OUT/tables/<name>.md instead of a record (common.experiments.
    Experiment.save) has it appended as is, headed by what reproduce knows: its profile, the
    commit and the file's date.
    """
    out = Path(out)
    files = {p.stem: p for p in sorted((out / "tables").glob("*.json"))}
    plain = {p.stem: p for p in sorted((out / "tables").glob("*.md")) if p.stem not in files}
    order = [n for n in notebook_names() if n in files] + [n for n in files if n not in notebook_names()]
    lines = [
        "# MedImaging results",
        "",
        f"Collected by `medimaging reproduce` on {_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. "
        "Each table is headed by the data it was computed on, the profile, the commit and the date.",
        "",
    ]
    for name in order:
        try:
            record = load_json(files[name])
        except ValueError as err:
            lines += [f"## {name}", "", f"(tables file unreadable: {err})", ""]
            continue
        lines += [f"## {record.get('title', name)}", ""]
        if record.get("notes"):
            lines += [record["notes"], ""]
        for table in record.get("tables", []):
            lines += [f"### {table['title']}", ""]
            lines += [
                f"- Data: {record.get('data', 'unknown')}",
                f"- Profile: {record.get('profile', 'unknown')}",
                f"- Commit: {record.get('commit', 'unknown')}",
                f"- Date: {record.get('date', 'unknown')}",
                "",
                table["markdown"].rstrip(),
                "",
            ]
            if table.get("note"):
                lines += [table["note"], ""]
    commit = git_commit(exclude=out) if plain else ""
    for name, p in plain.items():
        date = _dt.datetime.fromtimestamp(p.stat().st_mtime).astimezone().isoformat(timespec="seconds")
        lines += [f"## {name}", "", "- Data: as stated in the table's title",
                  f"- Profile: {profile or 'unknown'}", f"- Commit: {commit}", f"- Date: {date}", "",
                  p.read_text().strip(), ""]
    path = out / "tables.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
