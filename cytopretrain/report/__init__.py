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

import os
from collections.abc import Sequence
from pathlib import Path

from cytopretrain.core.tables import atomic_path
from cytopretrain.report.curation import funnel_section, labels_section, montage_quotas, montage_section
from cytopretrain.report.evaluation import evaluation_section
from cytopretrain.report.html import escape
from cytopretrain.report.inputs import (
    read_evaluation,
    read_funnel,
    read_index,
    read_labels,
    read_outliers,
    read_quarantine,
    read_run,
    read_summary,
)
from cytopretrain.report.outliers import OUTLIER_TILES, outlier_section
from cytopretrain.report.samples import collect_samples
from cytopretrain.report.training import training_section

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
div.scroll { max-height: 28em; overflow: auto; border: 1px solid #ddd; margin: .8em 0;
             width: fit-content; max-width: 100%; }
table.data { border-collapse: collapse; font-size: 0.85em; }
table.data th, table.data td { border: 1px solid #ddd; padding: .25em .6em; text-align: left;
                              vertical-align: top; white-space: pre-line; }
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
    nav = " ".join(f'<a href="#{anchor}">{escape(name)}</a>' for anchor, name in SECTIONS)
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
