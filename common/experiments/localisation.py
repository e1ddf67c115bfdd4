"""Localisation: the Grad-CAM pointing game of the study's stage-2 run on radiologist boxes.

Scores the multi-task notebook's stage-2 run (or any run or export folder) on the held-out test
images of its data that carry NIH's BBox_List_2017.csv boxes: does the Grad-CAM peak of a finding
fall inside its box? The pointing game itself is `common.explain.pointing_game`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common.experiments.datasets import DataSpec, display_path, resolve_data
from common.experiments.notebooks import STAGE2, TABLES_DIR
from common.experiments.profiles import get_profile
from common.experiments.records import Experiment, record_runs
from common.experiments.stages import use_profile_threads
from common.experiments.tables import Table
from common.explain import (
    POINTING_GAME_COLUMNS,
    bbox_file,
    pointing_game,
    pointing_game_display,
    pointing_game_summary,
    read_bboxes,
)
from common.io import load_json
from common.predict import Predictor, load_predictor
from common.runs import read_config
from common.splits import IMAGE, SPLIT, run_split


def held_out_images(run: str | os.PathLike) -> set[str]:
    """Names of the images in a trained run's test split (patients it never trained on), as the run
    stored it (`common.splits`); an image that is also in its train or dev rows is left out."""
    if "train" not in read_config(run):
        raise ValueError(f"{Path(run) / 'config.json'}: not a run trained by `medimaging train` (no training "
                         "section), so it has no test split; score every boxed image instead (Images = 'all')")
    split = run_split(run)
    test = split[SPLIT] == "test"
    return set(split.loc[test, IMAGE]) - set(split.loc[~test, IMAGE])


def recorded_run(out_dir: str | os.PathLike, data: Any = None, notebook: str = "multi_task",
                 role: str = STAGE2) -> Path:
    """The run a reproduce notebook recorded in OUT/tables/<notebook>.json under `role` (by default
    the multi-task notebook's stage 2), checked to be on `data` (a DataSpec)."""
    path = Path(out_dir) / TABLES_DIR / f"{notebook}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run {notebook} first (medimaging reproduce --only "
                                f"{notebook} localisation), or give the run to explain (RunDir)")
    record = load_json(path)
    ref = record_runs(record).get(role)
    if ref is None:
        raise FileNotFoundError(f"{path}: records no finished {role!r} run (recorded: "
                                f"{sorted((record.get('runs') or {}))}); run {notebook} again")
    if data is not None:
        spec = DataSpec.from_dict(record.get("data_spec") or {})
        if (spec.full, spec.cardiomegaly) != (data.full, data.cardiomegaly):
            raise ValueError(f"{path}: its {role} run was trained on {record.get('data')}, not on this data "
                             f"({data.describe()}); run {notebook} on the same data first")
    return ref.run_dir


@dataclass
class Localisation:
    """What notebooks/localisation.ipynb reports: its experiment record and what the figure needs."""

    experiment: Experiment  # "localisation": the table, headed by data and profile
    boxes: Any  # pointing_game's DataFrame, one row per box scored (empty when nothing was)
    predictor: Predictor
    image_dir: Path | None


def localisation(run: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                 images: str = "test", profile: str = "quick", smoke: bool = False, data_full=None,
                 data_cardiomegaly=None, out_dir: str | os.PathLike | None = None,
                 progress: bool = False) -> Localisation:
    """The pointing game as `medimaging reproduce` runs it.

    run: the run (or export folder) to explain; None: the multi-task notebook's stage-2 run
    recorded in OUT/tables/multi_task.json for this data. data_dir: the NIH-layout folder whose
    BBox_List_2017.csv and images to use; None: the 14-label folder of data_full / data_cardiomegaly
    as the experiments resolve them (dataset_full/, else the synthetic default, which has boxes).
    images: "test" scores only the run's held-out test images, "all" every boxed image.
    No box file, or no box on a scored image, gives a table saying so rather than an error.
    """
    if images not in ("test", "all"):
        raise ValueError(f"images={images!r}: expected 'test' (the run's held-out test images) or 'all'")
    prof = get_profile(profile, smoke)
    use_profile_threads(prof)  # as the profile trains: the smoke reproduces run side by side, one thread each
    data = resolve_data(data_dir if data_dir is not None else data_full, data_cardiomegaly)
    if run is None:
        if out_dir is None:
            raise ValueError("no run to explain: give the run (RunDir), or the reproduce output folder (OutDir) "
                             "where the multi-task notebook recorded its stage-2 run")
        run = recorded_run(out_dir, data)
    predictor = load_predictor(run)
    data = dataclasses.replace(data, synthetic=data.synthetic or bool(predictor.synthetic))
    exp = Experiment("localisation", "Localisation: the Grad-CAM pointing game",
                                 prof.label, data)
    where = display_path(data.full) if data.full is not None else None
    bbox = bbox_file(data.full)
    scored = held_out_images(run) if images == "test" else None
    boxes = pointing_game(predictor, bbox, data.full, progress, images=scored) if bbox is not None else None
    which = "held-out test images" if images == "test" else "every boxed image"
    title = exp.title_for(f"Pointing game: {predictor.model_name}, {which}")
    if where is None:
        why = "not measured: no 14-label dataset (DataFull), so no BBox_List_2017.csv"
    elif bbox is None:
        why = f"not measured: no BBox_List_2017.csv in {where}"
    elif not len(boxes):
        n = len(read_bboxes(bbox))
        why = (f"not measured: none of the {n} boxes in {display_path(bbox)} is on a "
               f"{'held-out test image of this run' if scored is not None else 'image in the folder'} "
               "with a finding the run outputs")
    else:
        why = ""
    exp.notes = f"Grad-CAM of the run `{display_path(run)}` ({predictor.model_name})."
    if why:
        exp.tables.append(Table(title, pd.DataFrame({"Pointing game": [why]})))
        boxes = pd.DataFrame(columns=POINTING_GAME_COLUMNS)
    else:
        summary = pointing_game_summary(boxes)
        exp.tables.append(Table(
            title, pointing_game_display(summary),
            f"Boxes from {display_path(bbox)}. Hit: the Grad-CAM maximum of the finding lies inside one "
            "of its boxes on that image (one verdict per image and finding). Chance: the share of the image inside "
            "those boxes, the hit rate of a point dropped at random. Empty maps: Grad-CAMs with no positive evidence "
            "for the finding (never a hit)."))
        total = summary.iloc[-1]
        exp.headline = {"images": int(total["images"]), "boxes": int(total["boxes"]), "hits": int(total["hits"]),
                        "hit_rate": float(total["hit_rate"]), "chance": float(total["chance"])}
    return Localisation(exp, boxes, predictor, data.full)
