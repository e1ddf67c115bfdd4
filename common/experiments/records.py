"""Experiment records: what one notebook reports, and the output folder it is saved to.

    OUT/tables/<name>.json   an experiment's record (runs, tables, figures, headline numbers)
    OUT/figures/*.png        the figures it saved
    OUT/tables.md            every record's tables (`write_tables_md`), in reproduce order

OUT is `common.experiments.notebooks.DEFAULT_OUT` (results/local/, ignored by git) unless given;
the committed results of the real NIH sample are in its `RESULTS_DIR` (results/).
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.experiments.datasets import DataSpec, title
from common.experiments.notebooks import FIGURES_DIR, TABLES_DIR, TABLES_MD, in_reproduce_order
from common.experiments.runcache import RunRef, is_finished
from common.experiments.tables import Table
from common.io import atomic_write_text, load_json, save_json
from common.paths import REPO_ROOT


def git_commit(cwd: str | Path | None = None, exclude: str | Path | None = None) -> str:
    """The checkout's commit (short hash, "+ uncommitted changes" when dirty), or "unknown".

    `exclude`: a folder whose changes do not count, e.g. the results folder being rewritten now.
    """
    cwd = Path(cwd) if cwd else REPO_ROOT
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


@dataclass
class Experiment:
    """What one notebook reports: its runs, tables, figures and headline numbers."""

    name: str  # the reproduce notebook name: OUT/tables/<name>.json
    title: str
    profile: str
    data: DataSpec
    runs: dict[str, RunRef] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    headline: dict[str, Any] = field(default_factory=dict)  # numbers the results notebook compares
    notes: str = ""

    @property
    def synthetic(self) -> bool:
        return self.data.synthetic

    def title_for(self, text: str) -> str:
        return title(text, self.synthetic)

    def report(self) -> str:
        """Every table as markdown, headed by the data and the profile."""
        parts = [f"# {self.title_for(self.title)}", "", f"Data: {self.data.describe()}", f"Profile: {self.profile}", ""]
        if self.notes:
            parts += [self.notes, ""]
        for t in self.tables:
            parts += [f"## {t.title}", "", t.markdown(), ""]
            if t.note:
                parts += [t.note, ""]
        return "\n".join(parts)

    def _repr_markdown_(self) -> str:
        return self.report()

    def save_figure(self, fig, out_dir: str | Path | None, name: str) -> Path | None:
        """Write a matplotlib Figure to OUT/figures/<experiment>_<name>.png (None: not saved)."""
        if out_dir is None:
            return None
        path = Path(out_dir) / FIGURES_DIR / f"{self.name}_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        if path.name not in self.figures:
            self.figures.append(path.name)
        return path

    def figure(self, fig, out_dir: str | Path | None, name: str):
        """Save a Figure (see `save_figure`) and return it as an image for the notebook to show."""
        from IPython.display import Image  # notebooks only

        self.save_figure(fig, out_dir, name)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        return Image(data=buf.getvalue(), format="png")

    def to_dict(self, out_dir: str | Path | None = None) -> dict:
        """A JSON-able record; `out_dir`'s own changes do not make the commit count as dirty."""
        return {
            "name": self.name, "title": self.title_for(self.title), "profile": self.profile,
            "data": self.data.describe(), "data_spec": self.data.to_dict(), "synthetic": self.synthetic,
            "commit": git_commit(exclude=out_dir), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "runs": {k: r.to_dict() for k, r in self.runs.items()}, "tables": [t.to_dict() for t in self.tables],
            "figures": self.figures, "headline": self.headline, "notes": self.notes,
        }

    def save(self, out_dir: str | Path | None) -> Path | None:
        """Write OUT/tables/<name>.json (what `medimaging reproduce` collects into tables.md)."""
        if out_dir is None:
            return None
        path = Path(out_dir) / TABLES_DIR / f"{self.name}.json"
        save_json(path, self.to_dict(out_dir))
        return path


def load_experiments(out_dir: str | Path) -> dict[str, dict]:
    """The saved experiment records under OUT/tables, by name, in reproduce order."""
    folder = Path(out_dir) / TABLES_DIR
    found = {p.stem: load_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    return {n: found[n] for n in in_reproduce_order(found)}


def record_runs(record: Mapping) -> dict[str, RunRef]:
    """The runs of a saved experiment record whose folders still exist (role -> RunRef)."""
    out = {}
    for role, d in (record.get("runs") or {}).items():
        ref = RunRef.from_dict(d)
        if is_finished(ref.run_dir):
            out[role] = ref
    return out


def record_tables(record: Mapping) -> list[Table]:
    return [Table.from_dict(t) for t in record.get("tables", [])]


def write_tables_md(out: str | Path, profile: str | None = None) -> Path:
    """Collect OUT/tables/<name>.json (notebook order, then any others) into OUT/tables.md.

    A notebook that writes a plain OUT/tables/<name>.md instead of a record (common.experiments.
    Experiment.save) has it appended as is, headed by what reproduce knows: its profile, the
    commit and the file's date.
    """
    out = Path(out)
    files = {p.stem: p for p in sorted((out / TABLES_DIR).glob("*.json"))}
    plain = {p.stem: p for p in sorted((out / TABLES_DIR).glob("*.md")) if p.stem not in files}
    order = in_reproduce_order(files)
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
    path = out / TABLES_MD
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
