"""Report section 4: training curves and model-card facts per run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cytopretrain.report.html import escape, explain, figure_img, html_table, new_figure, note, section_html
from cytopretrain.report.inputs import _is_number

TRAINING_TEXT = (
    "Each run trains a network on the crops with a pretext task (weak-label classification, "
    "BYOL, DINO, patch location or an autoencoder). The loss should fall; the validation curve "
    "(held-out images, computed now and then) shows whether the network generalizes rather than "
    "memorizes. Two monitors watch every run on the validation images: the kNN accuracy of the "
    "network's features against the weak labels (which the self-supervised methods never train on; "
    "it should rise) and the embedding spread (the standard deviation of the normalised features; a "
    "fall towards 0 means the features are collapsing onto one point). The best checkpoint is the one "
    "with the highest kNN accuracy. The learning rate follows a warm-up and cosine schedule; "
    "throughput is images per second of training."
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
        k.removeprefix("val_") for k in series if k.startswith("val_") and k.removeprefix("val_") not in series
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
    figure = new_figure(3.3 * columns, 2.9 * rows + 0.4)
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


def _best_text(best: object) -> str:
    if not isinstance(best, dict):
        return "—"
    if best.get("monitor"):
        return f"step {best['step']} ({best['monitor']} {best['value']:.4g})"
    return f"the last step ({best.get('reason', 'no monitor')})"


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
        ("best checkpoint", _best_text(card.get("best"))),
        ("warnings", "; ".join(card.get("warnings") or []) or "none"),
        ("wall time", _duration(card.get("wall_time_s"))),
        (
            "device, precision, ranks",
            f"{card.get('device', '—')}, {card.get('precision', '—')}, {card.get('world_size', '—')}",
        ),
        ("config hash", str(card.get("config_hash", "—"))[:12]),
    ]
    return pd.DataFrame(facts, columns=["fact", "value"]).astype(str)


def training_section(runs: list[dict]) -> str:
    body = [explain(TRAINING_TEXT)]
    if not runs:
        body.append(note("No training runs are configured."))
    for run in runs:
        body.append(f"<h3>Run {escape(run['name'])}</h3>")
        records = run["metrics"]
        if records is None:
            body.append(note(f"No metrics.jsonl beside {run['path']}: no curves to draw."))
        elif not records:
            body.append(note(f"{run['path'].with_name('metrics.jsonl')} holds no records."))
        else:
            series = metric_series(records)
            body.append(figure_img(_training_figure(run["name"], series), f"training curves of {run['name']}"))
            if not any(key.startswith("val_") for key in series):
                body.append(
                    note(
                        "This run logged no validation records (no validation split, or it never reached a "
                        "validation step)."
                    )
                )
        body.append(html_table(card_facts(run["card"])))
    return section_html("training", "4. Training curves", body)
