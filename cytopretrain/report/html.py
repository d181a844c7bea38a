"""HTML and figure helpers of the report: escaping, tables, sections, PNG figures and tile grids."""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba_array
from matplotlib.figure import Figure

from cytopretrain.report.samples import fit_tile

TILE_PX = 112  # side of a montage tile's box, output pixels
TILE_GAP = 10
TILE_BACKGROUND = 235  # light grey box behind tiles that do not fill it
CAPTION_PX = 16
CAPTION_CHARS = 22
ROW_TITLE_PX = 170
TITLE_PX = 34
DPI = 100


KEPT_COLOUR, REMOVED_COLOUR = "#4c9a2a", "#c0392b"


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def figure_img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def explain(text: str) -> str:
    return f'<p class="explain">{escape(text)}</p>'


def cell_html(value: object) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return escape(value)


def html_table(frame: pd.DataFrame, *, scroll: bool = False) -> str:
    """An HTML table of ``frame`` (cells escaped; line breaks kept by the CSS)."""
    head = "".join(f"<th>{escape(column)}</th>" for column in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell_html(value)}</td>" for value in row) + "</tr>\n"
        for row in frame.itertuples(index=False, name=None)
    )
    markup = f'<table class="data">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody>\n</table>'
    return f'<div class="scroll">{markup}</div>' if scroll else markup


def section_html(anchor: str, title: str, body: Sequence[str]) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def percent(value: float, ci95: float = math.nan) -> str:
    if not math.isfinite(value):
        return "—"
    if math.isfinite(ci95):
        return f"{100 * value:.1f} ± {100 * ci95:.1f} %"
    return f"{100 * value:.1f} %"


def label_colours(labels: Sequence[str]) -> dict[str, tuple]:
    """Distinct colours: tab10 / tab20 for up to 10 / 20 labels, turbo samples beyond."""
    n = len(labels)
    if n <= 10:
        colours = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colours = [colormaps["tab20"](i) for i in range(n)]
    else:
        colours = [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]
    return dict(zip(labels, colours))


def tile_grid(rows: list[tuple[str, list[tuple[np.ndarray, str, bool]]]], columns: int, title: str) -> Figure:
    """Image tiles, one row per (row title, [(image, caption, highlighted)]), pasted into one
    canvas drawn 1:1 on a figure of the same pixel size (one axes: fast, and crisp)."""
    cell_width, cell_height = TILE_PX + TILE_GAP, TILE_PX + TILE_GAP + CAPTION_PX
    left = ROW_TITLE_PX if any(row_title for row_title, _ in rows) else TILE_GAP
    width, height = left + columns * cell_width, TITLE_PX + len(rows) * cell_height
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    texts = [(width / 2, TITLE_PX / 2, title, "center", 11)]
    for number, (row_title, tiles) in enumerate(rows):
        top = TITLE_PX + number * cell_height
        texts.append((left - TILE_GAP, top + TILE_PX / 2, textwrap.fill(row_title, 22), "right", 9))
        for column, (image, caption, highlighted) in enumerate(tiles):
            x = left + column * cell_width
            if highlighted:  # a frame just outside the tile's box
                canvas[top - 4 : top + TILE_PX + 4, x - 4 : x + TILE_PX + 4] = (
                    to_rgba_array(REMOVED_COLOUR)[0, :3] * 255
                )
            canvas[top : top + TILE_PX, x : x + TILE_PX] = TILE_BACKGROUND
            tile = fit_tile(image, TILE_PX)
            y0, x0 = top + (TILE_PX - tile.shape[0]) // 2, x + (TILE_PX - tile.shape[1]) // 2
            canvas[y0 : y0 + tile.shape[0], x0 : x0 + tile.shape[1]] = tile
            texts.append((x + TILE_PX / 2, top + TILE_PX + CAPTION_PX / 2 + 2, caption[:CAPTION_CHARS], "center", 7))
    figure = new_figure(width / DPI, height / DPI, layout=None)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0), aspect="auto")
    for x, y, text, align, size in texts:
        ax.text(x, y, text, ha=align, va="center", fontsize=size)
    ax.set_axis_off()
    return figure
