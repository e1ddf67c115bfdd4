"""The ablations: backbones trained the same way, and freezing early layers in stage 2."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open

from common import runs as runfiles
from common.experiments.notebooks import STAGE1
from common.experiments.paired import paired_table
from common.experiments.plots import figure
from common.experiments.profiles import BACKBONES, STUDY_MODEL, Knobs
from common.experiments.records import Experiment
from common.experiments.runcache import RunRef
from common.experiments.stages import setup, stage1_run, stage2_run
from common.experiments.tables import Table, baseline_row, model_row, num, pct
from common.labels import CHEXNET_AUROC, CHEXNET_MEAN_AUROC, LABELS


def _weights_millions(run: RunRef) -> float | None:
    """Parameters (+ buffers) in the run's weights, read from the safetensors header only."""
    path = run.run_dir / runfiles.BEST
    if not path.is_file():
        return None
    total = 0
    with safe_open(str(path), framework="numpy") as f:
        for k in f.keys():
            total += int(np.prod(f.get_slice(k).get_shape()))
    return total / 1e6


def _train_speed(run: RunRef) -> str:
    h = run.history()
    if h.empty or "images_per_s" not in h or h["images_per_s"].dropna().empty:
        return "n/a"
    return f"{h['images_per_s'].dropna().mean():.0f}"


def backbone_ablation(backbones: Sequence[str] | Sequence[tuple[str, str]] | None = None, knobs: Knobs | None = None,
                      **kw) -> Experiment:
    """Every backbone of `BACKBONES` (or the named subset / (row, timm name) pairs) trained the
    same way on all 14 labels (stage 2 without stage 1, the profile's initialisation)."""
    s = setup(Knobs.of(knobs, **kw))
    exp = Experiment("backbone_ablation", "Backbone ablation: all 14 labels, same recipe", s.label, s.data)
    chosen = choose_backbones(backbones)
    # rows whose backbones this profile trains as the same model share one run, and one table row
    groups: dict[Path, list[tuple[str, str]]] = {}
    for row_name, timm_name in chosen:
        run = stage2_run(s, timm_name, None, row_name, as_named=True)
        exp.runs[row_name] = run
        groups.setdefault(run.run_dir, []).append((row_name, timm_name))
    rows, per_label = [], {}
    first = None
    for members in groups.values():
        row_name = " / ".join(r for r, _ in members)
        run = exp.runs[members[0][0]]
        m = run.metrics()
        first = first or m
        per_label[row_name] = m.get("auroc", {})
        rows.append({"Backbone": row_name, "Named": ", ".join(t for _, t in members),
                     "Trained (this profile)": run.model_name, "Weights (M)": num(_weights_millions(run), 1),
                     "Train images/s": _train_speed(run), **model_row(m, "Backbone", row_name)})
    rows.append({"Backbone": "Trivial baselines", "Named": "", "Trained (this profile)": "", "Weights (M)": "",
                 "Train images/s": "", **baseline_row(first, "Backbone")})
    rows.append({"Backbone": "CheXNet (published)", "Named": "densenet121", "Trained (this profile)":
                 "ImageNet-pretrained, 112k NIH images", "Weights (M)": "8.0", "Train images/s": "",
                 "Accuracy (%)": "not reported", "AUROC [95% CI]": f"{CHEXNET_MEAN_AUROC:.3f}",
                 "AUPRC": "not reported"})
    frame = pd.DataFrame(rows).rename(columns={"Accuracy (%)": "Test mean accuracy (%)", "AUROC [95% CI]": "Test mean AUROC [95% CI]",
                                  "AUPRC": "Test mean AUPRC"})
    mapped = [f"{n} -> {run.model_name}" for n, run in ((t, exp.runs[r]) for r, t in chosen) if run.model_name != n]
    note = (f"Profile {s.profile.name}: " + ("each named backbone is trained as its listed small variant ("
            + "; ".join(mapped) + "); backbones trained as the same model share a row. " if mapped
            else "every backbone trained as named. ")
            + ("VGG: RepVGG-A0 (VGG-style plain 3x3 stack) stands in for VGG-16, because timm's smallest VGG "
               "has a 102M-weight classifier block that alone exceeds this profile's CPU budget. "
               if "repvgg_a0" in [r.model_name for r in exp.runs.values()] else "")
            + "Random initialisation unless the profile loads hub weights. The study named VGG, ResNet, DarkNet "
              "and ViT 'all below EfficientNet' without numbers.")
    exp.tables.append(Table(exp.title_for("Backbone ablation: all 14 labels, test split"), frame, note))
    auroc = pd.DataFrame({r: {lab: num(v) for lab, v in aurocs.items()} for r, aurocs in per_label.items()})
    auroc.insert(0, "Label", auroc.index)
    auroc["CheXNet (published)"] = [num(CHEXNET_AUROC[lab], 4) for lab in auroc["Label"]]
    exp.tables.append(Table(exp.title_for("Backbone ablation: per-label test AUROC"), auroc.reset_index(drop=True),
                            "Chance is 0.500 for every label."))
    exp.headline = {"backbones": {r: exp.runs[r].metrics().get("mean_auroc") for r, _ in chosen}}
    return exp


def plot_backbones(exp: Experiment):
    """Test mean AUROC (95% interval) per backbone, with chance and CheXNet's published mean."""
    fig = figure(10, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    names, vals, err = [], [], []
    groups: dict[Path, list[str]] = {}
    for role, run in exp.runs.items():
        groups.setdefault(run.run_dir, []).append(role)
    for roles in groups.values():
        run = exp.runs[roles[0]]
        m = run.metrics()
        v, ci = m.get("mean_auroc"), m.get("mean_auroc_ci")
        names.append(f"{' / '.join(roles)}\n({run.model_name})")
        vals.append(np.nan if v is None else v)
        err.append([v - ci[0], ci[1] - v] if (v is not None and ci) else [0, 0])
    x = np.arange(len(names))
    ax.bar(x, vals, yerr=np.array(err).T if err else None, capsize=3, color="tab:blue", label="test mean AUROC (95% CI)")
    ax.axhline(0.5, color="red", linestyle=":", label="chance (0.5)")
    ax.axhline(CHEXNET_MEAN_AUROC, color="grey", linestyle="--", label=f"CheXNet published ({CHEXNET_MEAN_AUROC})")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean AUROC over 14 labels")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(exp.title_for("Backbone ablation: test mean AUROC"))
    fig.tight_layout()
    return fig


def choose_backbones(backbones: Sequence[str] | Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """(row name, timm name) pairs: all of `BACKBONES` for None; a name is a row name or a timm name."""
    if backbones is None:
        return list(BACKBONES)
    out = []
    by_row = {r: t for r, t in BACKBONES}
    by_timm = {t: r for r, t in BACKBONES}
    for b in backbones:
        if isinstance(b, (tuple, list)):
            out.append((str(b[0]), str(b[1])))
        elif b in by_row:
            out.append((b, by_row[b]))
        else:
            out.append((by_timm.get(b, b), b))
    return out


def freeze_ablation(model_name: str = STUDY_MODEL, freeze_early: int = 3, knobs: Knobs | None = None,
                    **kw) -> Experiment:
    """Stage 2 from stage 1 with nothing frozen, the first `freeze_early` backbone groups frozen,
    and the whole backbone frozen (head only)."""
    from common.models import backbone_groups, build_model  # torch: only when an experiment trains

    s = setup(Knobs.of(knobs, **kw))
    exp = Experiment("freeze_ablation", "Freezing ablation: stage 2 from stage 1", s.label, s.data)
    stage1 = stage1_run(s, model_name)
    exp.runs[STAGE1] = stage1
    n_groups = len(backbone_groups(build_model(s.model_for(model_name), num_labels=len(LABELS), pretrained=None)))
    early = max(1, min(int(freeze_early), n_groups - 1))
    variants = [("nothing frozen", 0), (f"early stages frozen (first {early} of {n_groups} groups)", early),
                ("all but the head frozen", -1)]
    rows, first = [], None
    for role, k in variants:
        run = stage2_run(s, model_name, stage1, role, freeze=k)
        exp.runs[role] = run
        m = run.metrics()
        first = first or m
        frozen = run.config().get("frozen") or []
        rows.append({"Frozen": role, "Groups frozen": ", ".join(frozen) if frozen else "none",
                     "Dev mean accuracy (%)": pct((m.get("dev") or {}).get("mean_accuracy")),
                     "Train images/s": _train_speed(run), **model_row(m, "Frozen", role)})
    rows.append({"Frozen": "Trivial baselines", "Groups frozen": "", "Train images/s": "",
                 "Dev mean accuracy (%)": pct(((first or {}).get("dev") or {}).get("mean_baseline_all_absent_accuracy")),
                 **baseline_row(first, "Frozen")})
    rows.append({"Frozen": "Original study (reported)", "Groups frozen": "initial layers", "Train images/s": "",
                 "Dev mean accuracy (%)": "not reported", "Accuracy (%)": "'degrades performance considerably' (no numbers)",
                 "AUROC [95% CI]": "not reported", "AUPRC": "not reported"})
    frame = pd.DataFrame(rows).rename(columns={"Accuracy (%)": "Test mean accuracy (%)",
                                               "AUROC [95% CI]": "Test mean AUROC [95% CI]", "AUPRC": "Test mean AUPRC"})
    exp.tables.append(Table(exp.title_for(f"Freezing ablation: {stage1.model_label()}, stage 2 from stage 1, test split"),
                            frame, "Frozen BatchNorm layers keep their stage-1 statistics. Trivial baselines as in "
                                   "every table: 'absent' everywhere for accuracy, chance for AUROC."))
    table, effect = paired_table(exp.title_for("Does freezing hurt? The same test images"), (variants[0][0], exp.runs[variants[0][0]]),
                                 [(role, exp.runs[role]) for role, _ in variants[1:]], s.profile.n_boot,
                                 note="The study's claim: freezing the initial layers degrades performance considerably.")
    exp.tables.append(table)
    exp.headline = {"freeze": {role: exp.runs[role].metrics().get("mean_auroc") for role, _ in variants},
                    "freeze_effect": effect}
    return exp


