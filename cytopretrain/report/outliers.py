"""Report section 6: autoencoder outlier scores, where injected text ranks, and the top outlier tiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cytopretrain.report.html import (
    REMOVED_COLOUR,
    escape,
    explain,
    figure_img,
    html_table,
    new_figure,
    note,
    section_html,
    tile_grid,
)
from cytopretrain.report.samples import display_image

OUTLIER_TABLE_ROWS = 20
OUTLIER_TILES = 12
OUTLIER_TILE_COLUMNS = 6
RANKS_LISTED = 200
INJECTED_TABLE_ROWS = 50
OUTLIER_TEXT = (
    "An autoencoder trained on the crops compresses each one to a short code and rebuilds the "
    "crop from it. Crops it rebuilds badly, relative to their own brightness, are unusual: the "
    "score, and the ranking. Such outliers are often artefacts: annotation text or scale bars "
    "burned into the image, debris, out-of-focus or empty fields. Each crop also has a latent "
    "rank (mean distance of its code to the nearest codes, as in seed 004), and DBSCAN noise "
    "points in the code space are flagged as outliers. Crops that show injected annotation text "
    "(the demo's planted defects) are marked in red, so you can see whether the method finds them."
)


def _outlier_histogram(outliers: pd.DataFrame) -> Figure:
    figure = new_figure(9, 3.8)
    ax = figure.add_subplot()
    bins = np.histogram_bin_edges(outliers["score"], bins=50)
    ax.hist(outliers["score"], bins=bins, color="#7f8c8d", label="all crops")
    injected = outliers.loc[outliers["injected_text"], "score"]
    if len(injected):
        ax.hist(injected, bins=bins, color=REMOVED_COLOUR, label="injected text")
        # A mark under each injected-text crop, on the axis, so single crops stay visible.
        ax.plot(
            injected,
            np.zeros(len(injected)),
            "^",
            color=REMOVED_COLOUR,
            markersize=7,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
        )
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("outlier score (relative reconstruction error of the autoencoder)")
    ax.set_ylabel("number of crops (log scale)")
    ax.set_title("Outlier scores")
    ax.legend(fontsize=8)
    return figure


def _injected_summary(outliers: pd.DataFrame) -> list[str]:
    injected = outliers[outliers["injected_text"]]
    if injected.empty:
        return [note("No crop shows injected text (no planted defects, or none kept).")]
    ranks = injected["rank"].to_numpy()
    text = (
        f"{len(injected)} of {len(outliers):,} crops show injected text. Their ranks "
        f"(1 = most unusual): median {int(np.median(ranks))}; {int((ranks <= OUTLIER_TABLE_ROWS).sum())} "
        f"among the top {OUTLIER_TABLE_ROWS}; {int(injected['is_outlier'].sum())} flagged as DBSCAN noise."
    )
    listed = ", ".join(str(r) for r in ranks[:RANKS_LISTED]) + (" …" if len(ranks) > RANKS_LISTED else "")
    body = [f"<p>{escape(text)}</p>", f'<p class="ranks">Ranks of the injected-text crops: {escape(listed)}</p>']
    if len(injected) > INJECTED_TABLE_ROWS:
        body.append(note(f"The table lists the {INJECTED_TABLE_ROWS} best-ranked of them."))
    body.append(html_table(_outlier_rows(injected.head(INJECTED_TABLE_ROWS)), scroll=True))
    return body


def _outlier_rows(frame: pd.DataFrame) -> pd.DataFrame:
    columns = ["rank", "crop_id", "idx", "label", "score", "latent_rank", "dbscan_label", "is_outlier", "injected_text"]
    return frame[columns]


def outlier_section(outliers: pd.DataFrame | None, by_id: dict[str, dict]) -> str:
    body = [explain(OUTLIER_TEXT)]
    if outliers is None:
        body.append(note("Outlier scoring is not configured for this run (config outliers.run is empty)."))
        return section_html("outliers", "6. Outlier tiles", body)
    if outliers.empty:
        body.append(note("The outlier table is empty."))
        return section_html("outliers", "6. Outlier tiles", body)
    body.append(figure_img(_outlier_histogram(outliers), "outlier score histogram"))
    body += ["<h3>Crops with injected text</h3>", *_injected_summary(outliers)]
    body += [
        f"<h3>Top {min(OUTLIER_TABLE_ROWS, len(outliers))} outliers</h3>",
        html_table(_outlier_rows(outliers.head(OUTLIER_TABLE_ROWS))),
    ]
    top = outliers.head(OUTLIER_TILES)
    tiles = [
        (display_image(by_id[c]), f"#{r} {lab}", bool(t))
        for c, r, lab, t in zip(top["crop_id"], top["rank"], top["label"], top["injected_text"])
        if c in by_id
    ]
    missing = [c for c in top["crop_id"] if c not in by_id]
    if tiles:
        step = OUTLIER_TILE_COLUMNS
        rows = [("", tiles[i : i + step]) for i in range(0, len(tiles), step)]
        title = f"The {len(tiles)} highest-scoring crops (red frame: injected text)"
        body.append(figure_img(tile_grid(rows, step, title), "top outlier crops"))
    if missing:
        body.append(note(f"Not found in the shards: {', '.join(missing)}."))
    return section_html("outliers", "6. Outlier tiles", body)
