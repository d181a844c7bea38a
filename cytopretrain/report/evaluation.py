"""Report section 5: the summary beside the published figures, bar charts, embeddings and confusion matrices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from cytopretrain.core.errors import ReportInputError
from cytopretrain.evaluation.summary import PUBLISHED_COLUMNS
from cytopretrain.report.html import (
    escape,
    explain,
    figure_img,
    html_table,
    label_colours,
    new_figure,
    note,
    percent,
    section_html,
)
from cytopretrain.report.inputs import _is_number

LEGEND_MAX_LABELS = 20
CONFUSION_FULL_TICKS = 20  # up to this many classes the matrix sits beside the embedding
CONFUSION_MAX_TICKS = 60  # above: only every n-th tick label is drawn
CONFUSION_ANNOTATE = 12  # up to this many classes: the share is written in each cell
PUBLISHED_NAMES = {
    "published_random_init": "paper: random init",
    "published_imagenet": "paper: ImageNet",
    "published_cytoimagenet": "paper: CytoImageNet",
    "published_both": "paper: both",
}


PUBLISHED_GREYS = ("#bdbdbd", "#969696", "#737373", "#525252")
EVALUATION_TEXT = (
    "The trained networks (and baselines) turn benchmark images into feature profiles, which "
    "are scored without further training: k-nearest-neighbour classification of the phenotype "
    "or localization (accuracy, ± the 95 % interval 1.96·√(acc·(1−acc)/n)), same-label "
    "retrieval (mean average precision) or a linear probe (macro F1). Where the benchmark "
    "has a published figure (CytoImageNet preprint, Table 2) it is shown beside ours. The "
    "clustering protocol asks whether the profiles fall into the classes without any labels: "
    "k-means with as many clusters as classes (and a DEC model's own clusters), scored by NMI, "
    "ARI and unsupervised accuracy; its floor (dotted line on the bars) is the score of random "
    "clusters of the same sizes, so only the height above the floor is learned structure."
)
CONTINGENCY_ANNOTATE = 12  # up to this many labels and clusters the count is written in each cell


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "benchmark": summary["benchmark"],
            "model": summary["model"],
            "protocol": summary["protocol"],
            "subset": summary["subset"].replace("", "all"),
            "metric": summary["metric"],
            "ours": [percent(v, c) for v, c in zip(summary["value"], summary["ci95"])],
            "n": [f"{int(n):,}" if math.isfinite(n) else "—" for n in summary["n"]],
            "correct": [f"{int(c):,}" if math.isfinite(c) else "—" for c in summary["correct"]],
        }
    )
    if summary["floor"].notna().any():
        table.insert(table.columns.get_loc("ours") + 1, "floor", [percent(v) for v in summary["floor"]])
    for column in PUBLISHED_COLUMNS:
        if summary[column].notna().any():
            table[PUBLISHED_NAMES[column]] = [percent(v) for v in summary[column]]
    return table


def _benchmark_bars(rows: pd.DataFrame) -> list[tuple[str, list[tuple[str, float, float, float]]]]:
    """Per protocol (and subset), its tick label and bars (series, value, ci95, floor): every
    model with a result, then the published figures present."""
    groups = []
    for (protocol, subset, metric), part in rows.groupby(["protocol", "subset", "metric"], sort=False):
        bars = list(zip(part["model"], part["value"], part["ci95"], part["floor"]))
        bars += [(c, part[c].dropna().iloc[0], math.nan, math.nan) for c in PUBLISHED_COLUMNS if part[c].notna().any()]
        groups.append((f"{protocol}{' ' + subset if subset else ''}\n({metric.replace('_', ' ')})", bars))
    return groups


def _benchmark_figure(benchmark: str, rows: pd.DataFrame) -> Figure:
    """Grouped bars: one group per protocol (and subset), one bar per model (± ci95), then
    the published figures in hatched greys."""
    groups = _benchmark_bars(rows)
    models = list(dict.fromkeys(rows["model"]))
    styles = {m: {"color": colormaps["tab10"](i % 10)} for i, m in enumerate(models)}
    styles.update(
        {c: {"color": g, "hatch": "..", "edgecolor": "white"} for c, g in zip(PUBLISHED_COLUMNS, PUBLISHED_GREYS)}
    )
    names = {**{m: m for m in models}, **PUBLISHED_NAMES}
    n_bars = sum(len(bars) for _, bars in groups)
    width = 0.8 / max(len(bars) for _, bars in groups)
    figure = new_figure(min(max(4.5, 3.0 + 0.4 * n_bars + 0.4 * len(groups)), 12.5), 4.0)
    ax = figure.add_subplot()
    labelled: set[str] = set()
    for number, (_, bars) in enumerate(groups):
        for slot, (key, value, ci95, floor) in enumerate(bars):
            x = number + width * (slot + 0.5 - len(bars) / 2)
            ax.bar(x, 100 * value, width, label=None if key in labelled else names[key], **styles[key])
            labelled.add(key)
            if math.isfinite(floor):
                label = None if "floor" in labelled else "random-cluster floor"
                ax.hlines(100 * floor, x - width / 2, x + width / 2, colors="black", linestyles=":", label=label)
                labelled.add("floor")
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
    lowest = min((value for _, bars in groups for _, value, _, _ in bars if math.isfinite(value)), default=0.0)
    ax.set_ylim(min(0.0, 100 * lowest - 5), 112)  # an ARI can fall below 0
    ax.set_ylabel("score (%)")
    ax.set_title(f"Benchmark {benchmark}: models per protocol", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return figure


def _embedding_figure(record: dict) -> Figure:
    embedding = record["embedding"]
    labels = sorted(embedding["label"].unique())
    colours = label_colours(labels)
    with_legend = len(labels) <= LEGEND_MAX_LABELS
    figure = new_figure(5.8 if with_legend else 5.0, 4.6)
    ax = figure.add_subplot()
    size = 14 if len(embedding) <= 500 else 4
    for label in labels:
        points = embedding[embedding["label"] == label]
        ax.scatter(points["x"], points["y"], s=size, color=colours[label], alpha=0.75, linewidths=0, label=label)
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


RETRIEVAL_PROTOCOLS = {"map": "label", "replicate_map": "perturbation"}
RETRIEVAL_TABLE_ROWS = 30


def retrieval_protocols(results: dict) -> list[str]:
    """The mAP protocols of a record whose result carries per-group significance."""
    return [
        name
        for name in RETRIEVAL_PROTOCOLS
        if isinstance(results.get(name), dict)
        and all(isinstance(group, dict) and "q_value" in group for group in results[name].get("per_class", {}).values())
        and results[name].get("per_class")
    ]


def _retrieval_figure(record: dict, protocol: str) -> Figure:
    """Per group: mAP against -log10 of its permutation p-value; retrieved groups (corrected
    p-value below the threshold) in colour."""
    result = record["results"][protocol]
    groups = result["per_class"]
    mean_ap = np.array([g["mean_average_precision"] for g in groups.values()])
    score = -np.log10(np.maximum([g["p_value"] for g in groups.values()], 1e-300))
    retrieved = np.array([g["retrieved"] for g in groups.values()])
    figure = new_figure(5.0, 4.0)
    ax = figure.add_subplot()
    ax.scatter(mean_ap[~retrieved], score[~retrieved], s=18, color="#9e9e9e", label="not retrieved")
    ax.scatter(mean_ap[retrieved], score[retrieved], s=18, color="#1f77b4", label="retrieved (q < threshold)")
    ax.set_xlabel(f"mAP per {RETRIEVAL_PROTOCOLS[protocol]}")
    ax.set_ylabel("-log10 p-value")
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(
        f"{record['benchmark']} / {record['model']}: {protocol}\nmAP {result['mean_average_precision']:.3f}, "
        f"retrieved {result['fraction_retrieved']:.0%} of {len(groups)}",
        fontsize=10,
    )
    return figure


def retrieval_table(result: dict) -> pd.DataFrame:
    """The groups by descending mAP (at most RETRIEVAL_TABLE_ROWS) with their significance."""
    rows = [
        {
            "group": name,
            "queries": g["n"],
            "mAP": g["mean_average_precision"],
            "p": g["p_value"],
            "q": g["q_value"],
            "retrieved": "yes" if g["retrieved"] else "no",
        }
        for name, g in result["per_class"].items()
    ]
    table = pd.DataFrame(rows).sort_values(["mAP", "group"], ascending=[False, True]).head(RETRIEVAL_TABLE_ROWS)
    return table.assign(
        mAP=table["mAP"].map("{:.3f}".format), p=table["p"].map("{:.2g}".format), q=table["q"].map("{:.2g}".format)
    )


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
    figure = new_figure(side + 1.0, side)
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fontsize = 8 if n <= CONFUSION_ANNOTATE else 7 if n <= 40 else 6
    every = max(1, math.ceil(n / CONFUSION_MAX_TICKS))
    ticks = np.arange(0, n, every)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize)
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
    score = f" (accuracy {percent(accuracy, result.get('ci95', math.nan))})" if _is_number(accuracy) else ""
    ax.set_title(f"{record['benchmark']} / {record['model']}: {protocol}{score}", fontsize=10)
    colorbar = figure.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("share of the true label's items", fontsize=8)
    return figure


def _contingency_figure(record: dict, subset: str) -> Figure:
    """Labels (rows) x clusters (columns) of one clustering assignment, as shares of each label's
    items; a cluster matched to a label (Hungarian matching) is named after it."""
    result = record["results"]["clustering"][subset]
    table = result["contingency"]
    labels, clusters = [str(label) for label in table["labels"]], [str(c) for c in table["clusters"]]
    counts = np.asarray(table["matrix"], dtype=float)
    if counts.shape != (len(labels), len(clusters)):
        raise ReportInputError(
            f"{record['path']}: clustering {subset} contingency of shape {counts.shape} "
            f"for {len(labels)} labels and {len(clusters)} clusters"
        )
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    matching = result.get("matching", {})
    names = [f"{c} → {matching[c]}" if c in matching else f"{c} (unmatched)" for c in clusters]
    width = min(max(4.2, 2.8 + 0.3 * len(clusters)), 10.5)
    height = min(max(3.6, 2.2 + 0.22 * len(labels)), 10.5)
    figure = new_figure(width + 1.0, height)
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Purples", vmin=0, vmax=1, aspect="auto")
    fontsize = 8 if max(len(labels), len(clusters)) <= CONTINGENCY_ANNOTATE else 6
    ax.set_xticks(np.arange(len(clusters)), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=fontsize)
    if max(len(labels), len(clusters)) <= CONTINGENCY_ANNOTATE:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                colour = "white" if shares[i, j] > 0.6 else "black"
                ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("cluster → matched label")
    ax.set_ylabel("true label")
    scores = ", ".join(
        f"{name} {result['metrics'][metric]['value']:.2f} (floor {result['metrics'][metric]['floor']:.2f})"
        for metric, name in (("nmi", "NMI"), ("ari", "ARI"), ("unsupervised_accuracy", "acc."))
    )
    what = "k-means" if subset == "kmeans" else "own clusters"
    ax.set_title(f"{record['benchmark']} / {record['model']}: {what}\n{scores}", fontsize=9)
    colorbar = figure.colorbar(image, ax=ax, shrink=0.8)
    colorbar.set_label("share of the true label's items", fontsize=8)
    return figure


def _contingency_figures(record: dict) -> list[str]:
    result = record["results"].get("clustering")
    if not isinstance(result, dict):
        return []
    return [
        figure_img(_contingency_figure(record, subset), f"clusters of {record['benchmark']} / {record['model']}")
        for subset in ("kmeans", "own")
        if isinstance(result.get(subset), dict)
    ]


def evaluation_section(summary: pd.DataFrame, evaluations: list[dict]) -> str:
    body = [explain(EVALUATION_TEXT)]
    if summary.empty:
        body.append(note("The evaluation summary is empty: no benchmark was evaluated."))
    else:
        body.append(html_table(summary_table(summary), scroll=True))
        charts = [
            figure_img(_benchmark_figure(str(benchmark), rows), f"scores of {benchmark}")
            for benchmark, rows in summary.groupby("benchmark", sort=False)
        ]
        body.append('<div class="row">' + "".join(charts) + "</div>")
    body.append("<h3>Embeddings and confusion matrices</h3>")
    body.append(
        explain(
            "First: the profiles projected to two dimensions, one dot per image (or profile), coloured "
            "by its true label; well separated colours mean the features tell the classes apart. Then, "
            "for the first accuracy-type protocol, how often items of each true label (row) were "
            "predicted as each label (column), as a share of the row; a strong diagonal is good. For "
            "mean average precision (map, replicate_map): each label's (or perturbation's) mAP against "
            "its permutation p-value, and the table of groups; a group is retrieved when its "
            "Benjamini-Hochberg corrected p-value is below the threshold (0.05 by default). With "
            "the clustering protocol, the clusters found without labels (columns, each named after the "
            "label it is matched to) against the true labels (rows): one dark cell per row means the "
            "label forms a cluster of its own; a row spread over many columns, a label the features do "
            "not set apart."
        )
    )
    if not evaluations:
        body.append(note("No evaluation results were given."))
    for record in evaluations:
        body.append(f"<h4>{escape(record['benchmark'])} / {escape(record['model'])}</h4>")
        figures, wide, notes = [], [], []
        if record["embedding"] is None:
            notes.append(f"No embedding table beside {record['path']}.")
        elif record["embedding"].empty:
            notes.append("The embedding table is empty.")
        else:
            figures.append(
                figure_img(_embedding_figure(record), f"embedding of {record['benchmark']} / {record['model']}")
            )
        protocol = first_accuracy_protocol(record["results"])
        if protocol is None:
            notes.append(
                f"No accuracy-type protocol among {', '.join(record['results']) or 'no protocols'}: "
                "no confusion matrix."
            )
        else:
            n_labels = len(record["results"][protocol]["confusion"].get("labels", []))
            # Many classes need the full page width for legible ticks; few fit beside the embedding.
            target = wide if n_labels > CONFUSION_FULL_TICKS else figures
            target.append(
                figure_img(
                    _confusion_figure(record, protocol),
                    f"confusion matrix of {record['benchmark']} / {record['model']}",
                )
            )
        retrieval = retrieval_protocols(record["results"])
        figures += [
            figure_img(_retrieval_figure(record, protocol), f"{protocol} of {record['benchmark']} / {record['model']}")
            for protocol in retrieval
        ]
        figures += _contingency_figures(record)
        if figures:
            body.append('<div class="row">' + "".join(figures) + "</div>")
        body += wide
        for protocol in retrieval:
            body.append(html_table(retrieval_table(record["results"][protocol]), scroll=True))
        body += [note(text) for text in notes]
    return section_html("evaluation", "5. Evaluation", body)
