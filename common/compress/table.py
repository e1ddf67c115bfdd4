"""The compression table: its columns, markdown, title and note, the note on where speed comes
from, and the issue's targets checked against the measured rows.

Everything here reads rows (dicts, as `common.compress.measure.measure_table` makes them) and
returns text or plain values; nothing measures.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TABLE_COLUMNS = (
    # (key, header, format)
    ("name", "model", "{}"),
    ("detail", "how", "{}"),
    ("file_mb", "file MB", "{:.2f}"),
    ("size_x", "size x", "{:.1f}x"),
    ("zipped_mb", "zipped MB", "{:.2f}"),
    ("params", "params M", "{:.2f}"),
    ("nonzero_params", "non-zero M", "{:.2f}"),
    ("gmacs", "GMACs", "{:.3f}"),
    ("depthwise_share", "depthwise MACs", "{:.0%}"),
    ("model_ms", "model ms", "{:.2f}"),
    ("speed_x", "speed x", "{:.2f}x"),
    ("e2e_ms", "end-to-end ms", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("mean_auroc", "mean AUROC", "{:.4f}"),
    ("d_auroc", "AUROC change", "{:+.4f}"),
    ("mean_accuracy", "mean accuracy", "{:.4f}"),
    ("speed_from", "where speed comes from", "{}"),
)
# the random-init speed table: random weights have no AUROC worth showing
SPEED_COLUMNS = tuple(c for c in TABLE_COLUMNS if c[0] not in ("mean_auroc", "d_auroc", "mean_accuracy"))


def format_cell(value, fmt: str, key: str) -> str:
    """One cell of the table as text ("n/a" for a missing value; parameters in millions)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if key in ("params", "nonzero_params"):
        value = value / 1e6
    return fmt.format(value).replace("|", "/")


def table_markdown(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]] = TABLE_COLUMNS) -> str:
    """The rows as one markdown table (ratios and AUROC change against each row's baseline)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_cell(r.get(k), f, k) for k, _, f in columns) + " |")
    return "\n".join(lines)


def table_title(rows: Sequence[dict], threads: int = 2) -> str:
    """The table's title; says SYNTHETIC when any row was scored on synthetic data."""
    text = f"Compression trade-offs: size, speed (batch 1, {threads} CPU threads, ONNX Runtime) and test AUROC"
    # the suite's convention for every table title (common.experiments.title)
    return f"SYNTHETIC DATA - {text}" if any(r.get("synthetic") for r in rows) else text


def table_note(rows: Sequence[dict]) -> str:
    """What the columns mean and where speed does (not) come from, for under the table."""
    return (
        "Ratios (size x, speed x, AUROC change) compare each row with its baseline: an int8 row with its own fp32 "
        "row, a pruned or distilled row with the fp32 run it came from. model ms: median ONNX Runtime latency of "
        "one preprocessed image (batch 1); end-to-end ms: image file decode + resize + normalise + model; peak RSS: "
        "the serving process (torch-free, measured in a fresh process). Mean accuracy is at 0.5, the original "
        "study's metric. Where speed comes from (the last column is measured: ONNX Runtime's profiler splits each "
        "fp32 model's time by kernel type): int8 kernels (VNNI / AMX on x86) speed up dense convolutions and matrix "
        "products only. Depthwise convolutions are a few percent of EfficientNet's and MobileNet's MACs but, being "
        "memory-bound, a large share of their time, like their activations and squeeze-excite products; those gain "
        "nothing from int8 and each quantise / dequantise step adds time, so depthwise nets get smaller in int8 but "
        "not faster. Pruned weights are zeros stored densely: the same dense kernels multiply them, so pruning alone "
        "saves no time and only shrinks the zipped file; channel pruning would be faster only after removing the "
        "zeroed channels, which changes the architecture. Distillation is faster because the student does fewer "
        "MACs (a smaller network at a lower resolution)."
    )


def check_targets(rows: Sequence[dict], teacher: str | None = None) -> list[dict]:
    """The issue's targets, each with what was measured and whether it is met (None: not measurable).

    int8 >= 3x smaller than fp32 for every backbone; >= 2.5x faster for ResNet-50; mean AUROC
    lower by <= 0.01. The best compressed model (the fastest whose mean AUROC is at most 0.02 below
    the fp32 `teacher` row, default: the EfficientNet-B0 fp32 row) >= 3x faster model-only; when
    the fastest compressed model of all is another one, it is listed too, with its AUROC cost.
    """
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        if r["method"] != "int8" or not r.get("baseline"):
            continue
        out.append({"target": f"{r['backbone']}: int8 >= 3x smaller", "measured": r["size_x"],
                    "met": r["size_x"] >= 3.0})
        if r["backbone"].split(".")[0] == "resnet50":
            out.append({"target": "resnet50: int8 >= 2.5x faster (model only)", "measured": r["speed_x"],
                        "met": r["speed_x"] >= 2.5})
        d = r.get("d_auroc")
        out.append({"target": f"{r['backbone']}: int8 mean AUROC lower by <= 0.01", "measured": d,
                    "met": None if d is None else d >= -0.01})
    if teacher is None:
        teacher = next((n for n, r in by_name.items() if r["method"] == "fp32"
                        and r["backbone"].split(".")[0] == "efficientnet_b0"), None)
    t = by_name.get(teacher) if teacher else None
    if t is not None:
        scored = []
        for r in rows:
            if r["method"] == "fp32" or r["name"] == t["name"]:
                continue
            d = None if None in (r.get("mean_auroc"), t.get("mean_auroc")) else r["mean_auroc"] - t["mean_auroc"]
            scored.append((t["model_ms"] / r["model_ms"], d, r))
        # the best compressed model: the fastest within the AUROC budget; and, when that is another
        # model, the fastest of all with what it costs, so the trade-off is in plain sight
        within = [x for x in scored if x[1] is None or x[1] >= -0.02]
        picks = []
        if within:
            picks.append(("best compressed", max(within, key=lambda x: x[0])))
        if scored:
            fastest = max(scored, key=lambda x: x[0])
            if not picks or fastest[2] is not picks[0][1][2]:
                picks.append(("fastest compressed", fastest))
        for label, (speed, d, r) in picks:
            out.append({"target": f"{label} ({r['name']}) >= 3x faster than {t['name']}", "measured": speed,
                        "met": speed >= 3.0})
            out.append({"target": f"{label} ({r['name']}) mean AUROC lower by <= 0.02 vs {t['name']}",
                        "measured": d, "met": None if d is None else d >= -0.02})
    return out


def targets_markdown(checks: Sequence[dict]) -> str:
    """The target checks as a small markdown table."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for c in checks:
        shown = format_measured(c)
        met = {True: "yes", False: "NO", None: "n/a (no AUROC)"}[c["met"]]
        lines.append(f"| {c['target']} | {shown} | {met} |")
    return "\n".join(lines)


def format_measured(check: dict) -> str:
    """A target check's measured value as text: an AUROC change, or a ratio ("3.10x")."""
    m = check["measured"]
    return "n/a" if m is None else (f"{m:+.4f}" if "AUROC" in check["target"] else f"{m:.2f}x")


def _shares_text(shares: dict | None) -> str:
    if not shares:
        return "time split not measured"
    top = ", ".join(f"{op} {t:.0%}" for op, t in shares.get("top", [])[:2])
    return (f"time: {shares['dense']:.0%} dense conv/GEMM, {shares['depthwise']:.0%} depthwise conv, "
            f"{shares['other'] + shares['qdq']:.0%} other ops (top: {top})")


def speed_source(row: dict, base: dict | None) -> str:
    """A short, honest note on where a row's speed-up comes from (or why there is none).

    Built from what was measured: the fp32 model's time split by kernel type (ONNX Runtime's
    profiler), the MACs, and for int8 the share its (de)quantise steps take.
    """
    if row["method"] == "fp32":
        return "reference; " + _shares_text(row.get("time_shares"))
    parts = []
    if row["method"] == "distill" and base is not None:
        parts.append(f"{base['gmacs'] / max(row['gmacs'], 1e-12):.1f}x fewer MACs (smaller net at {row['image_size']} px)")
    if row["method"] == "prune":
        parts.append("none expected: the zeros are still multiplied by dense kernels"
                     + ("; zeroed channels are not removed" if row.get("structured") else "")
                     + " (smaller only when zipped)")
    if row["int8"]:
        ref = (base or {}).get("time_shares") if row["method"] == "int8" else None
        if ref:
            # Amdahl: only the dense share can get faster; int8 GEMM kernels give at most ~4x on it
            bound = 1.0 / ((1.0 - ref["dense"]) + ref["dense"] / 4.0)
            parts.append(f"int8 kernels speed up only dense conv/GEMM: {ref['dense']:.0%} of the fp32 time "
                         f"(at most ~{bound:.1f}x overall)")
        else:
            parts.append("int8 kernels on dense conv/GEMM")
        own = row.get("time_shares")
        if own:
            parts.append(f"(de)quantise steps take {own['qdq']:.0%} of the int8 time, other int8 ops "
                         f"{own['other']:.0%}")
    return "; ".join(parts)
