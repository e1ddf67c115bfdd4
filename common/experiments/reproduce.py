"""`medimaging reproduce`: execute every experiment notebook headlessly and collect OUT (by default
`results/local/`, ignored by git: the committed results of the real NIH sample in `results/` stay as
they are, to compare with).

    OUT/notebooks/<name>.ipynb   each notebook as executed (kept even when it failed)
    OUT/figures/*.png            plots the notebooks saved
    OUT/tables/<name>.json       each notebook's tables (written by common.experiments.records.Experiment.save)
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
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from common.experiments.datasets import resolve_data
from common.experiments.notebooks import (DEFAULT_OUT, FIGURES_DIR, NOTEBOOKS, NOTEBOOKS_DIR, TABLES_DIR, Notebook,
                                          notebook_names)
from common.experiments.notebooks import runs_dir as find_runs_dir
from common.experiments.profiles import BACKBONES, REPRODUCE_PROFILES, WEIGHTS_ENV, check_weights, get_profile
from common.experiments.records import write_tables_md
from common.experiments.stages import settings_label, small_data_recipe
from common.labelfiles import strict_labels
from common.paths import REPO_ROOT
from common.weights import LOCAL

KERNEL_NAME = "python3"


def repo_root() -> Path:
    """The checkout holding the notebooks (common/ is installed editable from it)."""
    root = REPO_ROOT
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
    found, missing = [], []
    for _, name in BACKBONES:
        model = prof.model_for(name)
        try:
            prof.pretrained_for(model)
            found.append(model)
        except FileNotFoundError:
            missing.append(model)
    print(f"reproduce: weights folder {prof.weights.source}: weights for {', '.join(found) or 'none of the backbones'}"
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
    dst = out / NOTEBOOKS_DIR / f"{nb.name}.ipynb"
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
    out: str | Path = DEFAULT_OUT,
    only: Sequence[str] | None = None,
    runs_dir: str | Path | None = None,
    progress: bool = True,
    weights: str | Path | None = None,
    strict: bool = False,
) -> ReproduceResult:
    """Execute the notebooks (all, or `only` these) and write OUT/tables.md.

    Data folders left None mean `dataset_full/` and `dataset_cardiomegaly/` (found from the working
    directory upwards), or the synthetic default when those are empty. `weights` ("hub", "none" or a
    folder of downloaded weights) overrides the profile's pretrained weights in every notebook (through
    $MEDIMAGING_WEIGHTS). `strict` refuses a label file with any problem row ($MEDIMAGING_STRICT_LABELS).
    Never raises for a failing notebook: see `ReproduceResult.failed`.
    """
    if profile not in REPRODUCE_PROFILES:
        raise ValueError(f"profile {profile!r}: expected one of {list(REPRODUCE_PROFILES)}")
    notebooks = select(only)
    weights = check_weights(weights) if weights is not None else None
    prof = get_profile(profile, smoke, weights)
    if prof.weights.kind == LOCAL:
        _report_weights_folder(prof)
    root = repo_root()
    out = Path(out).expanduser().resolve()
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    (out / TABLES_DIR).mkdir(parents=True, exist_ok=True)
    # strict label files: for the data resolved here and, inherited, in every notebook's kernel
    with strict_labels(strict):
        data = resolve_data(data_full, data_cardiomegaly)
        runs = find_runs_dir(runs_dir)
        parameters = {
            "Profile": profile,
            "Smoke": bool(smoke),
            "DataFull": data.full,
            "DataCardiomegaly": data.cardiomegaly,
            "OutDir": out,
            # None lets each notebook find the same default cache itself (no machine path in its copy)
            "RunsDir": runs if runs_dir is not None else None,
        }
        label = settings_label(prof, small_data_recipe(prof, data))
        print(f"reproduce: profile {label}, data: {data.describe()}", file=sys.stderr)
        print(f"reproduce: runs cached in {runs}; results in {out}", file=sys.stderr)
        result = ReproduceResult(out)
        with python_kernel() as kernel_name, _environ(WEIGHTS_ENV, weights):
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
