"""Report sections 1-3: the data funnel, the label distribution and sample crops per label."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cytopretrain.report.html import (
    KEPT_COLOUR,
    REMOVED_COLOUR,
    explain,
    figure_img,
    html_table,
    new_figure,
    note,
    section_html,
    tile_grid,
)
from cytopretrain.report.inputs import LABEL_COLUMNS
from cytopretrain.report.samples import display_image

MONTAGE_LABELS = 12
MONTAGE_PER_LABEL = 8
BAR_CHART_MAX_LABELS = 60
DETAIL_CHARS = 160
FUNNEL_TEXT = (
    "Every image found in the sources passes these curation stages in order. At each stage, "
    "images (or, from quality control on, crops) in = kept + removed. Nothing is lost silently: "
    "each removed image or crop is listed in the quarantine table with the stage and the reason "
    "(unreadable file, uniform or dim image, binary mask, crop almost black or white, label too rare, ...)."
)


def _funnel_figure(funnel: pd.DataFrame) -> Figure:
    names = [f"{stage}\n({unit})" for stage, unit in zip(funnel["stage"], funnel["unit"])]
    y = np.arange(len(funnel))
    figure = new_figure(10, 0.5 * len(funnel) + 1.4)
    ax = figure.add_subplot()
    ax.barh(y, funnel["n_kept"], color=KEPT_COLOUR, label="kept")
    ax.barh(y, funnel["n_removed"], left=funnel["n_kept"], color=REMOVED_COLOUR, label="removed")
    widest = max(int(funnel["n_in"].max()), 1)
    for row, (n_in, kept, removed) in enumerate(zip(funnel["n_in"], funnel["n_kept"], funnel["n_removed"])):
        ax.text(n_in + 0.01 * widest, row, f"{kept:,} kept, {removed:,} removed", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.4 * widest)
    ax.set_xlabel("number of images or crops (unit under each stage)")
    ax.set_title("Images and crops through the curation stages")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _quarantine_table(counts: pd.DataFrame, examples: pd.DataFrame) -> pd.DataFrame:
    def listing(stage: str, reason: str) -> str:
        rows = examples[(examples["stage"] == stage) & (examples["reason"] == reason)]
        parts = []
        for row in rows.itertuples():
            crop = getattr(row, "crop_id", "")
            ident = f"{row.idx} / {crop}" if crop else row.idx
            detail = row.detail if len(row.detail) <= DETAIL_CHARS else row.detail[: DETAIL_CHARS - 1] + "…"
            parts.append(f"{ident}: {detail}")
        return "\n".join(parts)

    # Stages in the order the quarantine lists them (the funnel's order), largest reason first.
    stage_order = {stage: i for i, stage in enumerate(dict.fromkeys(counts["stage"]))}
    table = counts.assign(order=counts["stage"].map(stage_order)).sort_values(
        ["order", "n"], ascending=[True, False], kind="stable"
    )
    return pd.DataFrame(
        {
            "stage": table["stage"],
            "reason": table["reason"],
            "count": table["n"],
            "examples (idx / crop: detail)": [listing(s, r) for s, r in zip(table["stage"], table["reason"])],
        }
    )


def funnel_section(funnel: pd.DataFrame, quarantine_counts: pd.DataFrame, quarantine_examples: pd.DataFrame) -> str:
    body = [explain(FUNNEL_TEXT)]
    if funnel.empty:
        body.append(note("The funnel table has no stages."))
    else:
        body += [figure_img(_funnel_figure(funnel), "funnel chart"), html_table(funnel)]
    body.append("<h3>Quarantine reasons</h3>")
    if quarantine_counts.empty:
        body.append(note("Nothing was quarantined: every image and crop passed every stage."))
    else:
        body.append(html_table(_quarantine_table(quarantine_counts, quarantine_examples), scroll=True))
    return section_html("funnel", "1. Data funnel", body)


LABELS_TEXT = (
    "Weak labels come from the metadata (compound, siRNA, gene, phenotype, stained structures, "
    "cell type, organism): the colour shows which metadata column a label was taken from. Each "
    "bar counts the crops of one label in the training split (solid) and in the validation "
    "split (hatched, lighter); whole parent images go to one split, so no cell is in both."
)


def _labels_figure(labels: pd.DataFrame) -> tuple[Figure, int]:
    ordered = labels.assign(total=labels["n_train"] + labels["n_validation"]).sort_values(
        ["total", "label"], ascending=[False, True], kind="stable"
    )
    shown = ordered.head(BAR_CHART_MAX_LABELS)
    categories = sorted(labels["category"].unique())
    colours = dict(zip(categories, colormaps["tab10"](np.arange(len(categories)) % 10)))
    y = np.arange(len(shown))
    figure = new_figure(10, 0.24 * len(shown) + 1.6)
    ax = figure.add_subplot()
    colour = [colours[c] for c in shown["category"]]
    light = [to_rgba(c, 0.45) for c in colour]
    ax.barh(y, shown["n_train"], color=colour)
    ax.barh(
        y,
        shown["n_validation"],
        left=shown["n_train"],
        color=light,
        hatch="///",
        edgecolor="white",
        linewidth=0,
    )
    ax.set_yticks(y, shown["label"], fontsize=8 if len(shown) <= 30 else 6)
    ax.invert_yaxis()
    ax.set_xlabel("number of crops")
    ax.set_title(
        "Crops per weak label" + (f" (the {len(shown)} largest of {len(labels)})" if len(shown) < len(labels) else "")
    )
    handles = [Patch(color=colours[c], label=c) for c in categories]
    handles += [
        Patch(facecolor="#777777", label="train"),
        Patch(facecolor=to_rgba("#777777", 0.45), hatch="///", label="validation"),
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="category / split",
        title_fontsize=8,
    )
    return figure, len(shown)


def labels_section(labels: pd.DataFrame) -> str:
    body = [explain(LABELS_TEXT)]
    if labels.empty:
        body.append(note("The label table is empty: no label was kept."))
        return section_html("labels", "2. Label distribution", body)
    figure, shown = _labels_figure(labels)
    body.append(figure_img(figure, "crops per label"))
    if shown < len(labels):
        body.append(note(f"The chart shows the {shown} largest of {len(labels)} labels; the table lists all."))
    table = labels[list(LABEL_COLUMNS)].assign(total=labels["n_train"] + labels["n_validation"])
    body.append(html_table(table, scroll=True))
    return section_html("labels", "2. Label distribution", body)


MONTAGE_TEXT = (
    "Crops of the largest labels (the first met in the shuffled shards) as stored for training, "
    "after standardization (percentile-normalized, 8-bit): single-channel crops in grey, "
    "three-channel crops as RGB, other channel counts as their channel mean. Crops differ in "
    "size because they are cut at several scales: each is scaled to fit its box, and its caption "
    "gives its true size (height × width × channels)."
)


def montage_quotas(labels: pd.DataFrame) -> dict[str, int]:
    """Crops to show per label: the MONTAGE_LABELS largest labels, MONTAGE_PER_LABEL each."""
    total = labels["n_train"] + labels["n_validation"]
    ordered = labels.assign(total=total).sort_values(["total", "label"], ascending=[False, True], kind="stable")
    ordered = ordered[ordered["total"] > 0].head(MONTAGE_LABELS)
    return {label: min(MONTAGE_PER_LABEL, int(n)) for label, n in zip(ordered["label"], ordered["total"])}


def montage_section(labels: pd.DataFrame, by_label: dict[str, list[dict]]) -> str:
    body = [explain(MONTAGE_TEXT)]
    rows = []
    for label, samples in by_label.items():
        if samples:
            category = labels.loc[labels["label"] == label, "category"].iloc[0]
            tiles = [(display_image(s), f"{s['height']}×{s['width']}×{s['n_channels']}", False) for s in samples]
            rows.append((f"{label}\n({category})", tiles))
    if not rows:
        body.append(note("No crops to show: none of the largest labels has a crop in the shards."))
    else:
        body.append(
            figure_img(
                tile_grid(rows, MONTAGE_PER_LABEL, "Sample crops (height × width × channels)"),
                "sample crops",
            )
        )
        short = [label for label, samples in by_label.items() if len(samples) < MONTAGE_PER_LABEL]
        if short:
            body.append(note(f"Fewer than {MONTAGE_PER_LABEL} crops in the shards for: {', '.join(short)}."))
    return section_html("montages", "3. Sample crops per label", body)
