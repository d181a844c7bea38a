"""The run's report: one self-contained HTML file (inline CSS, figures as base64 PNG).

Sections, each opened by a short explanation for microscopists:

1. Data funnel: images and crops in, kept and removed per curation stage; quarantine
   reasons counted per stage with a few examples.
2. Label distribution: crops per weak label, train and validation, coloured by category.
3. Sample crops per label: up to ``MONTAGE_PER_LABEL`` crops of the ``MONTAGE_LABELS``
   largest labels, streamed from the shards.
4. Training curves: loss, method metrics (training and validation), learning rate and
   throughput per run, with the model card's key facts.
5. Evaluation: the summary table beside the published figures, a bar chart per benchmark,
   and per benchmark x model the 2-D embedding and the confusion matrix of the first
   accuracy-type protocol.
6. Outlier tiles: autoencoder outlier scores, where the crops with injected text rank, and
   the top outliers.

Absent optional inputs (no runs, no outlier scoring, a benchmark without an accuracy
protocol, a run without validation records) give a note in their section; a malformed file
raises :class:`ReportInputError` naming it. Figures are drawn with matplotlib's Agg canvas,
never through pyplot, so building a report leaves no global figure state behind.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import os
import textwrap
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba, to_rgba_array
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter
from PIL import Image

from .shards import iter_shard
from .summary import PUBLISHED_COLUMNS, SUMMARY_COLUMNS
from .tables import atomic_path, decode_pixels

MONTAGE_LABELS = 12
MONTAGE_PER_LABEL = 8
BAR_CHART_MAX_LABELS = 60
QUARANTINE_EXAMPLES = 3
LEGEND_MAX_LABELS = 20
CONFUSION_FULL_TICKS = 20  # up to this many classes the matrix sits beside the embedding
CONFUSION_MAX_TICKS = 60  # above: only every n-th tick label is drawn
CONFUSION_ANNOTATE = 12  # up to this many classes: the share is written in each cell
OUTLIER_TABLE_ROWS = 20
OUTLIER_TILES = 12
OUTLIER_TILE_COLUMNS = 6
RANKS_LISTED = 200
INJECTED_TABLE_ROWS = 50
TILE_PX = 112  # side of a montage tile's box, output pixels
TILE_GAP = 10
TILE_BACKGROUND = 235  # light grey box behind tiles that do not fill it
CAPTION_PX = 16
CAPTION_CHARS = 22
ROW_TITLE_PX = 170
TITLE_PX = 34
DETAIL_CHARS = 160
CSV_CHUNK_ROWS = 200_000
DPI = 100

PUBLISHED_NAMES = {
    "published_random_init": "paper: random init",
    "published_imagenet": "paper: ImageNet",
    "published_cytoimagenet": "paper: CytoImageNet",
    "published_both": "paper: both",
}
SAMPLE_COLUMNS = ["crop_id", "label", "pixels", "height", "width", "n_channels"]
KEPT_COLOUR, REMOVED_COLOUR = "#4c9a2a", "#c0392b"
PUBLISHED_GREYS = ("#bdbdbd", "#969696", "#737373", "#525252")

FUNNEL_COLUMNS = ("stage", "unit", "n_in", "n_kept", "n_removed", "removed_as")
QUARANTINE_COLUMNS = ("idx", "stage", "reason", "detail")
LABEL_COLUMNS = ("class_index", "label", "category", "n_train", "n_validation")
INDEX_COLUMNS = ("split", "shard", "format", "n_samples")
EMBEDDING_COLUMNS = ("idx", "label", "x", "y")
OUTLIER_COLUMNS = (
    "crop_id", "idx", "label", "score", "rank", "latent_distance", "latent_rank", "dbscan_label", "is_outlier",
    "injected_text",
)


class ReportInputError(ValueError):
    """A malformed input of the report; the message names the file."""


# --------------------------------------------------------------------------- reading inputs


# All cells as text (blank stays ""); no implicit index column (see _tsv_errors).
TSV_OPTIONS = {"sep": "\t", "dtype": str, "keep_default_na": False, "index_col": False}


@contextlib.contextmanager
def _tsv_errors(path: Path, what: str) -> Iterator[None]:
    """Turn pandas' read failures into ReportInputError naming the file. A row with more
    fields than the header raises too (pandas would only warn and drop the surplus)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            yield
        except FileNotFoundError:
            raise ReportInputError(f"{path}: {what} not found") from None
        except pd.errors.EmptyDataError:
            raise ReportInputError(f"{path}: {what} is empty (not even a header line)") from None
        except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as error:
            raise ReportInputError(f"{path}: {what} is not a readable TSV: {error}") from None


def _read_tsv(path: Path, required: Sequence[str], what: str) -> pd.DataFrame:
    """The table, with the required columns checked."""
    with _tsv_errors(path, what):
        frame = pd.read_csv(path, **TSV_OPTIONS)
    _require_columns(frame.columns, required, path, what)
    return frame


def _require_columns(columns: Sequence[str], required: Sequence[str], path: Path, what: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ReportInputError(f"{path}: {what} lacks column(s) {missing} (has {list(columns)})")


def _numeric(
    frame: pd.DataFrame, columns: Sequence[str], path: Path, *, blank_ok: bool = False, integer: bool = False
) -> None:
    """Parse ``columns`` in place (int64 with ``integer``, else float); a cell that is not a
    number (or not a whole number) raises naming the file, column and row."""
    for column in columns:
        text = frame[column].astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce")
        blank = text.isin(["", "nan", "NaN"])
        bad = values.isna() & ~(blank & blank_ok)
        if integer:
            bad |= values.notna() & (values % 1 != 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            kind = "a whole number" if integer else "a number"
            raise ReportInputError(
                f"{path}: column {column!r} row {row + 1}: {frame[column].iloc[row]!r} is not {kind}"
            )
        frame[column] = values.astype(np.int64) if integer else values.astype(float)


def _boolean(frame: pd.DataFrame, column: str, path: Path) -> None:
    values = frame[column].map({"True": True, "False": False, "true": True, "false": False})
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ReportInputError(
            f"{path}: column {column!r} row {row + 1}: {frame[column].iloc[row]!r} is not True/False"
        )
    frame[column] = values.astype(bool)


def read_funnel(path: Path) -> pd.DataFrame:
    funnel = _read_tsv(path, FUNNEL_COLUMNS, "funnel table")
    _numeric(funnel, ["n_in", "n_kept", "n_removed"], path, integer=True)
    return funnel


def read_quarantine(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts per (stage, reason) and the first few examples of each, read in chunks so a
    quarantine of millions of rows never sits in memory at once."""
    counts: dict[tuple[str, str], int] = {}
    examples: list[pd.DataFrame] = []
    with _tsv_errors(path, "quarantine table"):
        for chunk in pd.read_csv(path, chunksize=CSV_CHUNK_ROWS, **TSV_OPTIONS):
            _require_columns(chunk.columns, QUARANTINE_COLUMNS, path, "quarantine table")
            for key, n in chunk.groupby(["stage", "reason"], sort=False).size().items():
                counts[key] = counts.get(key, 0) + int(n)
            examples.append(chunk.groupby(["stage", "reason"], sort=False).head(QUARANTINE_EXAMPLES))
    table = pd.DataFrame(
        [(stage, reason, n) for (stage, reason), n in counts.items()], columns=["stage", "reason", "n"]
    )
    sample = pd.concat(examples, ignore_index=True) if examples else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    sample = sample.groupby(["stage", "reason"], sort=False).head(QUARANTINE_EXAMPLES)
    return table, sample


def read_labels(path: Path) -> pd.DataFrame:
    labels = _read_tsv(path, LABEL_COLUMNS, "label table")
    _numeric(labels, ["n_train", "n_validation"], path, integer=True)
    return labels


def read_index(path: Path) -> pd.DataFrame:
    index = _read_tsv(path, INDEX_COLUMNS, "shard index")
    _numeric(index, ["n_samples"], path, integer=True)
    return index


def read_summary(path: Path) -> pd.DataFrame:
    summary = _read_tsv(path, SUMMARY_COLUMNS, "evaluation summary")
    _numeric(summary, ["value"], path)
    _numeric(summary, ["ci95", "n", "correct", *PUBLISHED_COLUMNS], path, blank_ok=True)
    return summary


def _read_json(path: Path, what: str) -> dict:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportInputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportInputError(f"{path}: {what} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ReportInputError(f"{path}: {what} must be a JSON object, got {type(record).__name__}")
    return record


def read_evaluation(path: Path) -> dict:
    """One evaluation record, with its embedding table (None when the file is absent)."""
    record = _read_json(path, "evaluation result")
    missing = [key for key in ("benchmark", "model", "results") if key not in record]
    if missing:
        raise ReportInputError(f"{path}: evaluation result lacks key(s) {missing}")
    if not isinstance(record["results"], dict):
        raise ReportInputError(f"{path}: 'results' must map protocol names to result objects")
    embedding_path = path.with_name(f"{path.stem}.embedding.tsv")
    record["embedding"] = None
    if embedding_path.exists():
        embedding = _read_tsv(embedding_path, EMBEDDING_COLUMNS, "embedding table")
        _numeric(embedding, ["x", "y"], embedding_path)
        record["embedding"] = embedding
    record["path"] = path
    return record


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file (train.py: one object per logged step)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportInputError(f"{path}: line {number} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise ReportInputError(f"{path}: line {number} is not a record with a numeric 'step'")
        records.append(record)
    return records


def read_run(card_path: Path) -> dict:
    """A training run: its name (the card's folder), model card and metrics (None if absent)."""
    card = _read_json(card_path, "model card")
    metrics_path = card_path.with_name("metrics.jsonl")
    metrics = read_metrics(metrics_path) if metrics_path.exists() else None
    return {"name": card_path.parent.name, "card": card, "metrics": metrics, "path": card_path}


def read_outliers(path: Path) -> pd.DataFrame:
    outliers = _read_tsv(path, OUTLIER_COLUMNS, "outlier table")
    _numeric(outliers, ["score", "latent_distance"], path)
    _numeric(outliers, ["rank", "latent_rank"], path, integer=True)
    for column in ("is_outlier", "injected_text"):
        _boolean(outliers, column, path)
    return outliers.sort_values("rank", ignore_index=True)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- shard samples


def _wanted_samples(path: Path, wanted: Callable[[str, str], bool]) -> Iterator[dict]:
    """Samples of one shard whose (crop_id, label) is wanted. Parquet shards are filtered on
    their id columns first, so pixels are decoded only for the rows asked for."""
    if path.suffix != ".parquet":
        yield from (s for s in iter_shard(path) if wanted(s["crop_id"], s["label"]))
        return
    with pq.ParquetFile(path) as handle:
        for group in range(handle.num_row_groups):
            keys = handle.read_row_group(group, columns=["crop_id", "label"])
            rows = [
                i
                for i, (crop_id, label) in enumerate(
                    zip(keys["crop_id"].to_pylist(), keys["label"].to_pylist())
                )
                if wanted(crop_id, label)
            ]
            if rows:
                yield from handle.read_row_group(group, columns=SAMPLE_COLUMNS).take(rows).to_pylist()


def collect_samples(
    index_path: Path, index: pd.DataFrame, quotas: dict[str, int], crop_ids: set[str]
) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Up to ``quotas[label]`` samples per label and the samples of ``crop_ids``, in one pass
    over the shards that stops as soon as both are complete."""
    by_label: dict[str, list[dict]] = {label: [] for label in quotas}
    by_id: dict[str, dict] = {}

    def wanted(crop_id: str, label: str) -> bool:
        missing_id = crop_id in crop_ids and crop_id not in by_id
        return missing_id or len(by_label.get(label, ())) < quotas.get(label, 0)

    def complete() -> bool:
        return len(by_id) == len(crop_ids) and all(len(by_label[k]) >= n for k, n in quotas.items())

    for shard in index["shard"]:
        if complete():
            break
        path = index_path.parent / shard
        if not path.exists():
            raise ReportInputError(f"{index_path}: shard {shard!r} not found at {path}")
        for sample in _wanted_samples(path, wanted):
            if sample["crop_id"] in crop_ids:
                by_id[sample["crop_id"]] = sample
            if len(by_label.get(sample["label"], ())) < quotas.get(sample["label"], 0):
                by_label[sample["label"]].append(sample)
    return by_label, by_id


def display_image(sample: dict) -> np.ndarray:
    """uint8 image to show: (H, W) grey for one channel, (H, W, 3) RGB for three, the
    channel mean (grey) otherwise."""
    image = decode_pixels(sample["pixels"], sample["height"], sample["width"], sample["n_channels"])
    if image.shape[2] == 1:
        return image[:, :, 0]
    if image.shape[2] == 3:
        return image
    return np.round(image.mean(axis=2)).astype(np.uint8)


def fit_tile(image: np.ndarray, side: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB of ``image`` scaled to fit a side x side box (aspect kept):
    enlarged with nearest neighbours so pixels stay visible, shrunk with area averaging."""
    height, width = image.shape[:2]
    factor = side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resample = Image.NEAREST if factor >= 1 else Image.BOX
    scaled = np.asarray(Image.fromarray(image).resize(size, resample))
    return np.repeat(scaled[:, :, None], 3, axis=2) if scaled.ndim == 2 else scaled


# --------------------------------------------------------------------------- HTML helpers


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _img(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _explain(text: str) -> str:
    return f'<p class="explain">{_esc(text)}</p>'


def _cell(value: object) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return _esc(value)


def _table(frame: pd.DataFrame, *, scroll: bool = False) -> str:
    """An HTML table of ``frame`` (cells escaped; line breaks kept by the CSS)."""
    head = "".join(f"<th>{_esc(column)}</th>" for column in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(value)}</td>" for value in row) + "</tr>\n"
        for row in frame.itertuples(index=False, name=None)
    )
    markup = f'<table class="data">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody>\n</table>'
    return f'<div class="scroll">{markup}</div>' if scroll else markup


def _section(anchor: str, title: str, body: Sequence[str]) -> str:
    return f'<section id="{anchor}">\n<h2>{_esc(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def _percent(value: float, ci95: float = math.nan) -> str:
    if not math.isfinite(value):
        return "—"
    if math.isfinite(ci95):
        return f"{100 * value:.1f} ± {100 * ci95:.1f} %"
    return f"{100 * value:.1f} %"


def _label_colours(labels: Sequence[str]) -> dict[str, tuple]:
    """Distinct colours: tab10 / tab20 for up to 10 / 20 labels, turbo samples beyond."""
    n = len(labels)
    if n <= 10:
        colours = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colours = [colormaps["tab20"](i) for i in range(n)]
    else:
        colours = [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]
    return dict(zip(labels, colours))


def _tile_grid(
    rows: list[tuple[str, list[tuple[np.ndarray, str, bool]]]], columns: int, title: str
) -> Figure:
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
            texts.append(
                (x + TILE_PX / 2, top + TILE_PX + CAPTION_PX / 2 + 2, caption[:CAPTION_CHARS], "center", 7)
            )
    figure = _figure(width / DPI, height / DPI, layout=None)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0), aspect="auto")
    for x, y, text, align, size in texts:
        ax.text(x, y, text, ha=align, va="center", fontsize=size)
    ax.set_axis_off()
    return figure


# --------------------------------------------------------------------------- 1. funnel


FUNNEL_TEXT = (
    "Every image found in the sources passes these curation stages in order. At each stage, "
    "images (or, from quality control on, crops) in = kept + removed. Nothing is lost silently: "
    "each removed image or crop is listed in the quarantine table with the stage and the reason "
    "(unreadable file, uniform or dim image, binary mask, crop almost black or white, label too rare, ...)."
)


def _funnel_figure(funnel: pd.DataFrame) -> Figure:
    names = [f"{stage}\n({unit})" for stage, unit in zip(funnel["stage"], funnel["unit"])]
    y = np.arange(len(funnel))
    figure = _figure(10, 0.5 * len(funnel) + 1.4)
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


def funnel_section(
    funnel: pd.DataFrame, quarantine_counts: pd.DataFrame, quarantine_examples: pd.DataFrame
) -> str:
    body = [_explain(FUNNEL_TEXT)]
    if funnel.empty:
        body.append(_note("The funnel table has no stages."))
    else:
        body += [_img(_funnel_figure(funnel), "funnel chart"), _table(funnel)]
    body.append("<h3>Quarantine reasons</h3>")
    if quarantine_counts.empty:
        body.append(_note("Nothing was quarantined: every image and crop passed every stage."))
    else:
        body.append(_table(_quarantine_table(quarantine_counts, quarantine_examples), scroll=True))
    return _section("funnel", "1. Data funnel", body)


# --------------------------------------------------------------------------- 2. labels


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
    figure = _figure(10, 0.24 * len(shown) + 1.6)
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
        "Crops per weak label"
        + (f" (the {len(shown)} largest of {len(labels)})" if len(shown) < len(labels) else "")
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
    body = [_explain(LABELS_TEXT)]
    if labels.empty:
        body.append(_note("The label table is empty: no label was kept."))
        return _section("labels", "2. Label distribution", body)
    figure, shown = _labels_figure(labels)
    body.append(_img(figure, "crops per label"))
    if shown < len(labels):
        body.append(
            _note(f"The chart shows the {shown} largest of {len(labels)} labels; the table lists all.")
        )
    table = labels[list(LABEL_COLUMNS)].assign(total=labels["n_train"] + labels["n_validation"])
    body.append(_table(table, scroll=True))
    return _section("labels", "2. Label distribution", body)


# --------------------------------------------------------------------------- 3. montages


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
    ordered = labels.assign(total=total).sort_values(
        ["total", "label"], ascending=[False, True], kind="stable"
    )
    ordered = ordered[ordered["total"] > 0].head(MONTAGE_LABELS)
    return {label: min(MONTAGE_PER_LABEL, int(n)) for label, n in zip(ordered["label"], ordered["total"])}


def montage_section(labels: pd.DataFrame, by_label: dict[str, list[dict]]) -> str:
    body = [_explain(MONTAGE_TEXT)]
    rows = []
    for label, samples in by_label.items():
        if samples:
            category = labels.loc[labels["label"] == label, "category"].iloc[0]
            tiles = [
                (display_image(s), f"{s['height']}×{s['width']}×{s['n_channels']}", False) for s in samples
            ]
            rows.append((f"{label}\n({category})", tiles))
    if not rows:
        body.append(_note("No crops to show: none of the largest labels has a crop in the shards."))
    else:
        body.append(
            _img(
                _tile_grid(rows, MONTAGE_PER_LABEL, "Sample crops (height × width × channels)"),
                "sample crops",
            )
        )
        short = [label for label, samples in by_label.items() if len(samples) < MONTAGE_PER_LABEL]
        if short:
            body.append(_note(f"Fewer than {MONTAGE_PER_LABEL} crops in the shards for: {', '.join(short)}."))
    return _section("montages", "3. Sample crops per label", body)


# --------------------------------------------------------------------------- 4. training


TRAINING_TEXT = (
    "Each run trains a network on the crops with a pretext task (weak-label classification, "
    "BYOL, patch location or an autoencoder). The loss should fall; the validation curve "
    "(held-out images, computed now and then) shows whether the network generalizes rather than "
    "memorizes. The learning rate follows a warm-up and cosine schedule; throughput is images "
    "per second of training."
)
BOOKKEEPING = ("step", "epoch", "split")


def metric_series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values); records with split == "validation" get the "val_" prefix."""
    points: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        prefix = "val_" if record.get("split") == "validation" else ""
        for key, value in record.items():
            if key not in BOOKKEEPING and _is_number(value):
                points.setdefault(prefix + key, []).append((record["step"], value))
    return {key: tuple(np.array(v, dtype=float) for v in zip(*pairs)) for key, pairs in points.items()}


def _training_panels(series: dict) -> list[tuple[str, list[str]]]:
    """(panel title, series keys): loss, each method metric, learning rate, throughput."""
    train_keys = [k for k in series if not k.startswith("val_") and k not in ("lr", "images_per_s")]
    validation_only = [
        k.removeprefix("val_")
        for k in series
        if k.startswith("val_") and k.removeprefix("val_") not in series
    ]
    metrics = sorted(set(train_keys + validation_only) - {"loss"})
    panels = []
    for name in (["loss"] if "loss" in train_keys or "val_loss" in series else []) + metrics:
        panels.append((name, [k for k in (name, f"val_{name}") if k in series]))
    panels += [(name, [name]) for name in ("lr", "images_per_s") if name in series]
    return panels


PANEL_TITLES = {"loss": "Loss", "lr": "Learning rate", "images_per_s": "Throughput (images/s)"}


def _training_figure(run: str, series: dict) -> Figure:
    panels = _training_panels(series)
    columns = len(panels) if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / columns)
    figure = _figure(3.3 * columns, 2.9 * rows + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            steps, values = series[key]
            validation = key.startswith("val_")
            ax.plot(
                steps,
                values,
                marker="o" if validation or len(steps) < 20 else None,
                markersize=4,
                linestyle="--" if validation else "-",
                color="#d35400" if validation else "#1f77b4",
                label="validation" if validation else "train",
            )
        ax.set_title(PANEL_TITLES.get(name, name.replace("_", " ").capitalize()), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel({"lr": "learning rate", "images_per_s": "images / s"}.get(name, name.replace("_", " ")))
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    figure.suptitle(f"Training run {run}", fontsize=11)
    return figure


def _duration(seconds: object) -> str:
    if not _is_number(seconds):
        return "—"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d} (h:mm:ss)"


def _metrics_text(metrics: object) -> str:
    if not isinstance(metrics, dict) or not metrics:
        return "—"
    return ", ".join(f"{k} {v:.4g}" if _is_number(v) else f"{k} {v}" for k, v in metrics.items())


def card_facts(card: dict) -> pd.DataFrame:
    """The model card's key facts as (fact, value) rows."""
    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    settings = card.get("settings") if isinstance(card.get("settings"), dict) else {}
    epochs = card.get("epochs")
    facts = [
        ("backbone", card.get("backbone", "—")),
        ("pretext method", card.get("method", "—")),
        ("input", f"{card.get('in_channels', '—')} channel(s), {card.get('image_size', '—')} px"),
        ("weights at start", settings.get("weights") or "random initialization"),
        (
            "steps (epochs)",
            f"{card.get('steps', '—')} ({epochs:.2f})" if _is_number(epochs) else card.get("steps", "—"),
        ),
        (
            "batch size, peak lr, optimizer",
            f"{settings.get('batch_size', '—')}, {settings.get('lr', '—')}, {settings.get('optimizer', '—')}",
        ),
        ("training / validation crops", f"{data.get('n_train', '—')} / {data.get('n_validation', '—')}"),
        ("classes (weak labels)", data.get("n_classes", "—")),
        ("final metrics", _metrics_text(card.get("final_metrics"))),
        ("wall time", _duration(card.get("wall_time_s"))),
        (
            "device, precision, ranks",
            f"{card.get('device', '—')}, {card.get('precision', '—')}, {card.get('world_size', '—')}",
        ),
        ("config hash", str(card.get("config_hash", "—"))[:12]),
    ]
    return pd.DataFrame(facts, columns=["fact", "value"]).astype(str)


def training_section(runs: list[dict]) -> str:
    body = [_explain(TRAINING_TEXT)]
    if not runs:
        body.append(_note("No training runs are configured."))
    for run in runs:
        body.append(f"<h3>Run {_esc(run['name'])}</h3>")
        records = run["metrics"]
        if records is None:
            body.append(_note(f"No metrics.jsonl beside {run['path']}: no curves to draw."))
        elif not records:
            body.append(_note(f"{run['path'].with_name('metrics.jsonl')} holds no records."))
        else:
            series = metric_series(records)
            body.append(_img(_training_figure(run["name"], series), f"training curves of {run['name']}"))
            if not any(key.startswith("val_") for key in series):
                body.append(
                    _note(
                        "This run logged no validation records (no validation split, or it never reached a validation step)."
                    )
                )
        body.append(_table(card_facts(run["card"])))
    return _section("training", "4. Training curves", body)


# --------------------------------------------------------------------------- 5. evaluation


EVALUATION_TEXT = (
    "The trained networks (and baselines) turn benchmark images into feature profiles, which "
    "are scored without further training: k-nearest-neighbour classification of the phenotype "
    "or localization (accuracy, ± the 95 % interval 1.96·√(acc·(1−acc)/n)), same-label "
    "retrieval (mean average precision) or a linear probe (macro F1). Where the benchmark "
    "has a published figure (CytoImageNet preprint, Table 2) it is shown beside ours."
)


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "benchmark": summary["benchmark"],
            "model": summary["model"],
            "protocol": summary["protocol"],
            "subset": summary["subset"].replace("", "all"),
            "metric": summary["metric"],
            "ours": [_percent(v, c) for v, c in zip(summary["value"], summary["ci95"])],
            "n": [f"{int(n):,}" if math.isfinite(n) else "—" for n in summary["n"]],
            "correct": [f"{int(c):,}" if math.isfinite(c) else "—" for c in summary["correct"]],
        }
    )
    for column in PUBLISHED_COLUMNS:
        if summary[column].notna().any():
            table[PUBLISHED_NAMES[column]] = [_percent(v) for v in summary[column]]
    return table


def _benchmark_bars(rows: pd.DataFrame) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """Per protocol (and subset), its tick label and bars (series, value, ci95): every model
    with a result, then the published figures present."""
    groups = []
    for (protocol, subset, metric), part in rows.groupby(["protocol", "subset", "metric"], sort=False):
        bars = list(zip(part["model"], part["value"], part["ci95"]))
        bars += [(c, part[c].dropna().iloc[0], math.nan) for c in PUBLISHED_COLUMNS if part[c].notna().any()]
        groups.append((f"{protocol}{' ' + subset if subset else ''}\n({metric.replace('_', ' ')})", bars))
    return groups


def _benchmark_figure(benchmark: str, rows: pd.DataFrame) -> Figure:
    """Grouped bars: one group per protocol (and subset), one bar per model (± ci95), then
    the published figures in hatched greys."""
    groups = _benchmark_bars(rows)
    models = list(dict.fromkeys(rows["model"]))
    styles = {m: {"color": colormaps["tab10"](i % 10)} for i, m in enumerate(models)}
    styles.update(
        {
            c: {"color": g, "hatch": "..", "edgecolor": "white"}
            for c, g in zip(PUBLISHED_COLUMNS, PUBLISHED_GREYS)
        }
    )
    names = {**{m: m for m in models}, **PUBLISHED_NAMES}
    n_bars = sum(len(bars) for _, bars in groups)
    width = 0.8 / max(len(bars) for _, bars in groups)
    figure = _figure(min(max(4.5, 3.0 + 0.4 * n_bars + 0.4 * len(groups)), 12.5), 4.0)
    ax = figure.add_subplot()
    labelled: set[str] = set()
    for number, (_, bars) in enumerate(groups):
        for slot, (key, value, ci95) in enumerate(bars):
            x = number + width * (slot + 0.5 - len(bars) / 2)
            ax.bar(x, 100 * value, width, label=None if key in labelled else names[key], **styles[key])
            labelled.add(key)
            top = 100 * value
            if math.isfinite(ci95):
                # The normal-approximation interval can pass 0 or 1; a score cannot.
                low, high = min(ci95, value), min(ci95, 1 - value)
                ax.errorbar(
                    x,
                    100 * value,
                    yerr=[[100 * low], [100 * high]],
                    fmt="none",
                    ecolor="black",
                    elinewidth=0.8,
                    capsize=2,
                )
                top += 100 * high
            if n_bars <= 30:
                ax.text(x, top + 1, f"{100 * value:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(groups)), [tick for tick, _ in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, 112)
    ax.set_ylabel("score (%)")
    ax.set_title(f"Benchmark {benchmark}: models per protocol", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return figure


def _embedding_figure(record: dict) -> Figure:
    embedding = record["embedding"]
    labels = sorted(embedding["label"].unique())
    colours = _label_colours(labels)
    with_legend = len(labels) <= LEGEND_MAX_LABELS
    figure = _figure(5.8 if with_legend else 5.0, 4.6)
    ax = figure.add_subplot()
    size = 14 if len(embedding) <= 500 else 4
    for label in labels:
        points = embedding[embedding["label"] == label]
        ax.scatter(
            points["x"], points["y"], s=size, color=colours[label], alpha=0.75, linewidths=0, label=label
        )
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    title = f"{record['benchmark']} / {record['model']}: 2-D embedding"
    if with_legend:
        ax.legend(
            fontsize=7,
            markerscale=2,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            title=record.get("label") or "label",
            title_fontsize=8,
        )
    else:
        title += f"\n({len(labels)} labels, legend omitted)"
    ax.set_title(title, fontsize=10)
    return figure


def first_accuracy_protocol(results: dict) -> str | None:
    """The first protocol whose result has a confusion matrix."""
    for protocol, result in results.items():
        if isinstance(result, dict) and isinstance(result.get("confusion"), dict):
            return protocol
    return None


def normalized_confusion(confusion: dict, path: Path) -> tuple[list[str], np.ndarray]:
    """Labels and the matrix divided by its row sums (rows = true labels; an empty row stays 0)."""
    labels = [str(label) for label in confusion.get("labels", [])]
    matrix = np.asarray(confusion.get("matrix", []), dtype=float)
    if matrix.shape != (len(labels), len(labels)):
        raise ReportInputError(f"{path}: confusion matrix of shape {matrix.shape} for {len(labels)} labels")
    totals = matrix.sum(axis=1, keepdims=True)
    return labels, np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def _confusion_figure(record: dict, protocol: str) -> Figure:
    result = record["results"][protocol]
    labels, shares = normalized_confusion(result["confusion"], record["path"])
    n = len(labels)
    # Up to CONFUSION_FULL_TICKS classes the figure fits beside the embedding (together at
    # most the page width, 1,256 px); more classes get the full width.
    side = min(max(4.2, 2.8 + 0.16 * n), 5.3) if n <= CONFUSION_FULL_TICKS else min(3.0 + 0.2 * n, 10.5)
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fontsize = 8 if n <= CONFUSION_ANNOTATE else 7 if n <= 40 else 6
    every = max(1, math.ceil(n / CONFUSION_MAX_TICKS))
    ticks = np.arange(0, n, every)
    ax.set_xticks(
        ticks, [labels[i] for i in ticks], rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize
    )
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
    if n <= CONFUSION_ANNOTATE:
        for (i, j), share in np.ndenumerate(shares):
            if share > 0:
                ax.text(
                    j,
                    i,
                    f"{100 * share:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share > 0.6 else "black",
                )
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    accuracy = result.get("accuracy")
    score = f" (accuracy {_percent(accuracy, result.get('ci95', math.nan))})" if _is_number(accuracy) else ""
    ax.set_title(f"{record['benchmark']} / {record['model']}: {protocol}{score}", fontsize=10)
    colorbar = figure.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("share of the true label's items", fontsize=8)
    return figure


def evaluation_section(summary: pd.DataFrame, evaluations: list[dict]) -> str:
    body = [_explain(EVALUATION_TEXT)]
    if summary.empty:
        body.append(_note("The evaluation summary is empty: no benchmark was evaluated."))
    else:
        body.append(_table(summary_table(summary), scroll=True))
        charts = [
            _img(_benchmark_figure(str(benchmark), rows), f"scores of {benchmark}")
            for benchmark, rows in summary.groupby("benchmark", sort=False)
        ]
        body.append('<div class="row">' + "".join(charts) + "</div>")
    body.append("<h3>Embeddings and confusion matrices</h3>")
    body.append(
        _explain(
            "First: the profiles projected to two dimensions, one dot per image (or profile), coloured "
            "by its true label; well separated colours mean the features tell the classes apart. Then, "
            "for the first accuracy-type protocol, how often items of each true label (row) were "
            "predicted as each label (column), as a share of the row; a strong diagonal is good."
        )
    )
    if not evaluations:
        body.append(_note("No evaluation results were given."))
    for record in evaluations:
        body.append(f"<h4>{_esc(record['benchmark'])} / {_esc(record['model'])}</h4>")
        figures, wide, notes = [], [], []
        if record["embedding"] is None:
            notes.append(f"No embedding table beside {record['path']}.")
        elif record["embedding"].empty:
            notes.append("The embedding table is empty.")
        else:
            figures.append(
                _img(_embedding_figure(record), f"embedding of {record['benchmark']} / {record['model']}")
            )
        protocol = first_accuracy_protocol(record["results"])
        if protocol is None:
            notes.append(
                f"No accuracy-type protocol among {', '.join(record['results']) or 'no protocols'}: no confusion matrix."
            )
        else:
            n_labels = len(record["results"][protocol]["confusion"].get("labels", []))
            # Many classes need the full page width for legible ticks; few fit beside the embedding.
            target = wide if n_labels > CONFUSION_FULL_TICKS else figures
            target.append(
                _img(
                    _confusion_figure(record, protocol),
                    f"confusion matrix of {record['benchmark']} / {record['model']}",
                )
            )
        if figures:
            body.append('<div class="row">' + "".join(figures) + "</div>")
        body += wide
        body += [_note(text) for text in notes]
    return _section("evaluation", "5. Evaluation", body)


# --------------------------------------------------------------------------- 6. outliers


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
    figure = _figure(9, 3.8)
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
        return [_note("No crop shows injected text (no planted defects, or none kept).")]
    ranks = injected["rank"].to_numpy()
    text = (
        f"{len(injected)} of {len(outliers):,} crops show injected text. Their ranks "
        f"(1 = most unusual): median {int(np.median(ranks))}; {int((ranks <= OUTLIER_TABLE_ROWS).sum())} "
        f"among the top {OUTLIER_TABLE_ROWS}; {int(injected['is_outlier'].sum())} flagged as DBSCAN noise."
    )
    listed = ", ".join(str(r) for r in ranks[:RANKS_LISTED]) + (" …" if len(ranks) > RANKS_LISTED else "")
    body = [f"<p>{_esc(text)}</p>", f'<p class="ranks">Ranks of the injected-text crops: {_esc(listed)}</p>']
    if len(injected) > INJECTED_TABLE_ROWS:
        body.append(_note(f"The table lists the {INJECTED_TABLE_ROWS} best-ranked of them."))
    body.append(_table(_outlier_rows(injected.head(INJECTED_TABLE_ROWS)), scroll=True))
    return body


def _outlier_rows(frame: pd.DataFrame) -> pd.DataFrame:
    columns = ["rank", "crop_id", "idx", "label", "score", "latent_rank", "dbscan_label", "is_outlier", "injected_text"]
    return frame[columns]


def outlier_section(outliers: pd.DataFrame | None, by_id: dict[str, dict]) -> str:
    body = [_explain(OUTLIER_TEXT)]
    if outliers is None:
        body.append(_note("Outlier scoring is not configured for this run (config outliers.run is empty)."))
        return _section("outliers", "6. Outlier tiles", body)
    if outliers.empty:
        body.append(_note("The outlier table is empty."))
        return _section("outliers", "6. Outlier tiles", body)
    body.append(_img(_outlier_histogram(outliers), "outlier score histogram"))
    body += ["<h3>Crops with injected text</h3>", *_injected_summary(outliers)]
    body += [
        f"<h3>Top {min(OUTLIER_TABLE_ROWS, len(outliers))} outliers</h3>",
        _table(_outlier_rows(outliers.head(OUTLIER_TABLE_ROWS))),
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
        body.append(_img(_tile_grid(rows, step, title), "top outlier crops"))
    if missing:
        body.append(_note(f"Not found in the shards: {', '.join(missing)}."))
    return _section("outliers", "6. Outlier tiles", body)


# --------------------------------------------------------------------------- page


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1320px; margin: 0 auto; padding: 1em 2em 4em; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2.2em; border-bottom: 1px solid #bbb; }
nav a { margin-right: 1.2em; }
p.explain { max-width: 60em; color: #333; }
p.note { background: #fff6dd; border-left: 4px solid #e0a800; padding: .4em .8em; }
p.ranks { font-family: monospace; word-wrap: break-word; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; }
div.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
div.scroll { max-height: 28em; overflow: auto; border: 1px solid #ddd; margin: .8em 0; width: fit-content; max-width: 100%; }
table.data { border-collapse: collapse; font-size: 0.85em; }
table.data th, table.data td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; white-space: pre-line; }
table.data th { background: #f0f0f0; position: sticky; top: 0; }
table.data tr:nth-child(even) td { background: #fafafa; }
"""
SECTIONS = (
    ("funnel", "Data funnel"),
    ("labels", "Labels"),
    ("montages", "Sample crops"),
    ("training", "Training"),
    ("evaluation", "Evaluation"),
    ("outliers", "Outliers"),
)


def _page(sections: list[str]) -> str:
    nav = " ".join(f'<a href="#{anchor}">{_esc(name)}</a>' for anchor, name in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>cytopretrain run report</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>cytopretrain run report</h1>\n"
        f"<nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )


def build_report(
    *,
    funnel: str | os.PathLike,
    quarantine: str | os.PathLike,
    labels: str | os.PathLike,
    index: str | os.PathLike,
    summary: str | os.PathLike,
    evaluations: Sequence[str | os.PathLike],
    cards: Sequence[str | os.PathLike],
    outliers: Sequence[str | os.PathLike],
    out_html: str | os.PathLike,
) -> None:
    """Write the run's report to ``out_html`` (atomically); see the module docstring.

    ``evaluations`` are results/eval/<benchmark>/<model>.json files (each with its
    ``<model>.embedding.tsv`` beside it), ``cards`` results/train/<run>/model_card.json files
    (each with ``metrics.jsonl`` beside it) and ``outliers`` holds zero or one outlier table.
    Every input is read and checked before anything is drawn, so a malformed file fails fast.
    """
    if len(outliers) > 1:
        raise ValueError(f"build_report: at most one outlier table, got {len(outliers)}")
    index_path = Path(index)
    funnel_table = read_funnel(Path(funnel))
    quarantine_counts, quarantine_examples = read_quarantine(Path(quarantine))
    label_table = read_labels(Path(labels))
    shard_index = read_index(index_path)
    summary_frame = read_summary(Path(summary))
    records = [read_evaluation(Path(p)) for p in evaluations]
    runs = [read_run(Path(p)) for p in cards]
    outlier_table = read_outliers(Path(outliers[0])) if outliers else None

    quotas = montage_quotas(label_table)
    wanted_ids = set(outlier_table["crop_id"].head(OUTLIER_TILES)) if outlier_table is not None else set()
    by_label, by_id = collect_samples(index_path, shard_index, quotas, wanted_ids)

    page = _page(
        [
            funnel_section(funnel_table, quarantine_counts, quarantine_examples),
            labels_section(label_table),
            montage_section(label_table, by_label),
            training_section(runs),
            evaluation_section(summary_frame, records),
            outlier_section(outlier_table, by_id),
        ]
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
