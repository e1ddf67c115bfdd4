"""MedImaging demo: upload a chest X-ray, see the 14 findings and where the model looked.

    .venv/bin/streamlit run app/app.py          # runs under $MEDIMAGING_RUNS, else the run cache, runs/, results/

A thin view: it reads its settings and shows; `common` does the work. Models are found and named by
`common.catalog` (grouped by experiment and role, as `medimaging reproduce` recorded them; the page
opens on the best stage-2 run by test mean AUROC, real data before synthetic), uploads decoded by
`common.images` (DICOM too, with pydicom), predictions made by `common.onnx_predict` (ONNX
Runtime), overlays by `common.explain`. Predicting never
imports torch: a run without an ONNX export is exported once, in a separate process
(`medimaging export`). Grad-CAM is computed in numpy for CNNs; only models whose Grad-CAM needs
torch (ViTs) import it, lazily, when an overlay is asked for, and the page says so.

When the export folder also holds an int8 model (`medimaging export --run RUN --int8`, or
`medimaging compress --method int8`), the sidebar offers fp32 / int8; fp32, the reference, is the
default.

Settings (environment), none needed: MEDIMAGING_RUNS (folders with runs, separated by the OS path
separator; default: the run cache, then runs/ and results/), MEDIMAGING_MAX_UPLOAD_MB (default 50).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import streamlit as st

from common.catalog import catalog, default_entry, model_roots
from common.images import UnreadableImage, dicom_available, read_grayscale
from common.onnx_predict import OnnxPredictor
from common.serving import EXPORT_DIR, FP32, INT8, OnnxModelError, needs_export, resolve_export_dir

MAX_UPLOAD_MB = float(os.environ.get("MEDIMAGING_MAX_UPLOAD_MB", "50"))
UPLOAD_SLOTS = 2  # uploads decoded and predicted at once, whatever the number of sessions (see upload_slots)
CHART_ROW_PX = 26  # bar chart height per finding: every label stays readable
PRECISIONS = {"fp32": FP32, "int8": INT8}  # fp32 first: the reference accuracy is the default
DISCLAIMER = ("**Research prototype - not for diagnosis.** The probabilities come from a model trained on "
              "NIH ChestX-ray14's text-mined labels; they are not validated for clinical use and must not "
              "guide the care of any patient.")
# The empty page's advice: commands that work on a fresh clone (tests/test_newcomer.py runs them).
MAKE_A_RUN = (
    "make reproduce   # every experiment (~20 min on a 2-core CPU); this page then opens on its best stage-2 run\n"
    "# or one run in a few minutes:\n"
    ".venv/bin/medimaging train --task all14 --model efficientnet_b0 --image-size 64 --epochs 1 --out runs/first")
# What `medimaging export --run RUN` does when needed (common.export.ensure_export), without the whole CLI.
EXPORT_CODE = "import sys; from common.export import ensure_export; ensure_export(sys.argv[1], int8=False)"


def export_folder(path: Path) -> Path:
    """The model's ONNX export folder, made on first use or when the run's weights are newer
    (`common.serving.needs_export`), in a separate process, so torch stays out of here.

    A re-export is fp32 only (int8 needs the run's data to calibrate, and minutes): an int8 model
    older than the weights is removed with the old export, and the page says how to remake it."""
    if not needs_export(path):
        return resolve_export_dir(path)
    had_int8 = (path / EXPORT_DIR / INT8).is_file()
    with st.spinner(f"Exporting this run to ONNX (`medimaging export --run {path}`): first use or new weights..."):
        done = subprocess.run([sys.executable, "-c", EXPORT_CODE, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise OnnxModelError(f"exporting {path} failed:\n{tail}\nRun `medimaging export --run {path}` to see why.")
    if had_int8:
        st.info(f"This run's weights are newer than its int8 model, which was removed with the old export; "
                f"remake it with `medimaging export --run {path} --int8`.")
    return resolve_export_dir(path)


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def load_predictor(model_file: str, stamp: float) -> OnnxPredictor:
    """Loaded once per model file (model.onnx or model.int8.onnx) and its mtime, so a re-export is
    picked up."""
    path = Path(model_file)
    return OnnxPredictor(path.parent, int8=path.name == INT8)


def served_caption(model_file: Path, meta: dict) -> str:
    """Which file answers, its size, and for int8 how close it came to fp32 at export."""
    text = f"Serving `{model_file.name}` ({model_file.stat().st_size / 1e6:.2f} MB)"
    q = meta.get("int8") or {}
    if model_file.name == INT8 and q.get("max_abs_prob_diff_vs_fp32") is not None:
        text += (f": {q.get('method', 'int8')} quantisation, probabilities within "
                 f"{q['max_abs_prob_diff_vs_fp32']:.2g} of fp32 on {q.get('n_compared', '?')} calibration images")
    return text + "."


@st.cache_resource
def upload_slots() -> threading.BoundedSemaphore:
    """How many uploads are decoded and predicted at once, shared by every session of the server (a
    cached resource outlives reruns): a 50 MP upload decodes to ~0.4 GB, and on a small CPU more at
    once only queue for the same cores."""
    return threading.BoundedSemaphore(UPLOAD_SLOTS)


def decode_upload(name: str, data: bytes) -> np.ndarray:
    """Uploaded bytes → 2-D uint8 grayscale (DICOM too, `common.images`); UnreadableImage with a
    reason a user can act on."""
    if len(data) > MAX_UPLOAD_MB * 1e6:
        raise UnreadableImage(name, f"file too large ({len(data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_MB:.0f} MB)")
    return read_grayscale(data, name=name)


def probability_chart(table):
    """Horizontal bars sorted by probability, each finding's threshold marked by a black tick."""
    import altair as alt

    order = list(table["Finding"])
    base = alt.Chart(table)
    bars = base.mark_bar().encode(
        x=alt.X("Probability:Q", scale=alt.Scale(domain=[0, 1]), title="probability"),
        y=alt.Y("Finding:N", sort=order, title=None, axis=alt.Axis(labelOverlap=False, labelLimit=200)),
        color=alt.Color("Above threshold:N", scale=alt.Scale(domain=[True, False], range=["#d62728", "#7f9fbf"]),
                        legend=alt.Legend(title="above threshold", orient="bottom")),
        tooltip=["Finding", alt.Tooltip("Probability:Q", format=".3f"), alt.Tooltip("Threshold:Q", format=".3f")],
    )
    ticks = base.mark_tick(color="black", thickness=2, size=16).encode(
        x="Threshold:Q", y=alt.Y("Finding:N", sort=order))
    return (bars + ticks).properties(height=CHART_ROW_PX * len(order))


def show_gradcam(predictor: OnnxPredictor, gray: np.ndarray, ranked: list[str]) -> None:
    from common.explain import normalize_cam, overlay, upsample

    st.subheader("Where the model looked")
    label = st.selectbox("Grad-CAM for the finding", ranked, index=0, key="cam_label")
    if predictor.cam_method == "numpy":
        cam, prob = predictor.gradcam(gray, label)
        if predictor.int8:
            how = ("Grad-CAM computed from the int8 ONNX model's last feature map (numpy, no torch); the head's "
                   "gradient uses its fp32 weights (head.npz), so the map is close to, not exactly, int8's.")
        else:
            how = "Grad-CAM computed from the ONNX model's last feature map (numpy, no torch)."
    else:
        st.caption(f"This model's Grad-CAM needs torch ({predictor.cam_note}); it is imported now, for the "
                   "overlay only. Predictions above came from ONNX Runtime."
                   + (" Torch cannot run the int8 model: the overlay is the run's fp32 model's, and so is its p."
                      if predictor.int8 else ""))
        from common.explain import explain

        with st.spinner("Loading torch for this model's Grad-CAM..."):
            try:
                e = explain(predictor, gray, label)
            except (FileNotFoundError, ValueError) as err:
                st.error(f"No Grad-CAM for this model: {err}")
                return
        cam, prob = e.cam, e.probability
        how = "Grad-CAM computed with torch (this model's head is not on a plain pooled feature map)."
    heat = upsample(normalize_cam(cam), gray.shape)
    note = "" if float(cam.max(initial=0.0)) > 0 else " (no positive evidence: the map is empty)"
    title = ("SYNTHETIC data - " if predictor.synthetic else "") + f"{label}: p = {prob:.3f}{note}"
    st.image(overlay(gray, np.clip(heat, 0, 1), alpha=0.4), caption=title, width="stretch")
    st.caption(how)


def main() -> None:
    st.set_page_config(page_title="MedImaging - chest X-ray findings", layout="wide")
    st.title("MedImaging: chest X-ray findings")
    st.warning(DISCLAIMER)

    roots = model_roots(os.environ.get("MEDIMAGING_RUNS"))
    entries = catalog(roots)
    with st.sidebar:
        st.header("Model")
        if not entries:
            st.info("No run found.")
    if not entries:
        where = ", ".join(str(r) for r in roots)
        st.info(
            f"No trained run found under {where}. From the checkout, make one, then reload this page "
            "(on a fresh clone both train on the suite's synthetic data; put NIH data in dataset_full/ first "
            f"for real results):\n\n```bash\n{MAKE_A_RUN}\n```\n"
            "or point the app to your runs with `MEDIMAGING_RUNS=/path/to/runs streamlit run app/app.py`.")
        return
    by_path = {e.path: e for e in entries}
    with st.sidebar:
        choice = st.selectbox("Run (grouped by experiment)", list(by_path), index=entries.index(default_entry(entries)),
                              format_func=lambda p: by_path[p].label, key="run",
                              help="Opens on the best stage-2 run by test mean AUROC, real data before synthetic.")
        st.caption(by_path[choice].label)  # in full: the picker cuts long lines
        st.caption(by_path[choice].details)
    try:
        export_dir = export_folder(Path(choice))
    except (OnnxModelError, FileNotFoundError, ValueError) as err:
        st.error(f"Cannot load this model: {err}")
        return
    precision = "fp32"
    if (export_dir / INT8).is_file():
        with st.sidebar:
            precision = st.radio(
                "Precision", list(PRECISIONS), index=0, horizontal=True, key="precision",
                help="fp32: the exported model, the reference accuracy. int8: the quantised model beside it "
                     "(smaller; faster only where dense convolutions dominate, see bench/bench_compress.py; "
                     "probabilities differ slightly).")
    model_file = export_dir / PRECISIONS[precision]
    try:
        predictor = load_predictor(str(model_file), model_file.stat().st_mtime)
    except (OnnxModelError, FileNotFoundError, ValueError) as err:
        st.error(f"Cannot load this model: {err}")
        return
    with st.sidebar:
        st.caption(served_caption(model_file, predictor.meta))
        st.caption(f"{predictor.model_name}, input {predictor.image_size} px, ONNX Runtime "
                   f"({predictor.session.get_session_options().intra_op_num_threads} threads)")
        if predictor.synthetic:
            st.warning("This run was trained on SYNTHETIC data: its outputs mean nothing medically.")
        if predictor.meta.get("untrained"):
            st.warning("This run holds an untrained (randomly initialised) model: its outputs mean nothing.")

    kinds = ["png", "jpg", "jpeg"] + (["dcm", "dicom"] if dicom_available() else [])
    upload = st.file_uploader(f"Upload a chest X-ray ({', '.join(k.upper() for k in kinds)})", type=kinds, key="upload")
    if upload is None:
        st.info("Upload a frontal chest X-ray to see the 14 findings.")
        return
    with upload_slots():  # however many sessions upload at once, a few decode at a time: memory stays bounded
        try:
            gray = decode_upload(upload.name, upload.getvalue())
        except UnreadableImage as err:
            st.error(f"Could not read {upload.name}: {err.reason}. Upload a PNG or JPEG chest X-ray.")
            return
        t0 = time.perf_counter()
        pred = predictor.predict(gray, name=upload.name)
        ms = (time.perf_counter() - t0) * 1000
    import pandas as pd

    table = pd.DataFrame({
        "Finding": predictor.labels,
        "Probability": [pred.probabilities[k] for k in predictor.labels],
        "Threshold": [predictor.thresholds[k] for k in predictor.labels],
    })
    table["Above threshold"] = table["Probability"] >= table["Threshold"]
    table = table.sort_values("Probability", ascending=False, kind="stable").reset_index(drop=True)

    left, right = st.columns([1, 1])
    with left:
        st.image(gray, caption=f"{upload.name} ({gray.shape[1]}x{gray.shape[0]})", width="stretch")
    with right:
        st.subheader("Findings above threshold")
        if pred.positive:
            st.markdown(", ".join(f"**{k}** ({pred.probabilities[k]:.2f})" for k in table["Finding"] if k in pred.positive))
        else:
            st.markdown("None of the findings is above its threshold.")
        st.altair_chart(probability_chart(table), width="stretch", height=CHART_ROW_PX * len(table) + 60)
        st.caption(f"Predicted in {ms:.0f} ms with ONNX Runtime ({model_file.name}). Black ticks: each finding's "
                   "threshold, tuned on the run's dev split.")
    left, right = st.columns([1, 1])
    with left:
        show_gradcam(predictor, gray, list(table["Finding"]))
    with right:
        st.subheader("All findings")
        st.dataframe(table, hide_index=True, width="stretch", height=36 * (len(table) + 1) + 2,
                     column_config={"Probability": st.column_config.NumberColumn(format="%.3f"),
                                    "Threshold": st.column_config.NumberColumn(format="%.3f")})


if __name__ == "__main__":  # Streamlit runs the script as __main__; tests import its functions
    main()
