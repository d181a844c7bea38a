"""Tests of the HTML report (cytopretrain.report) on inputs built here by the real stages.

Shards come from ``write_shards`` over crops of real cells (yeast_toy TIFFs: 1- and 2-channel,
bbbc021_cells: 3-channel); evaluation records from ``cytopretrain.evaluation.protocols`` run on generated
profile tables and tabulated by ``cytopretrain.evaluation.summary``; a recorded training run
(tests/data/report_run); outlier scores from ``cytopretrain.evaluation.outliers.score_crops`` on latents
with planted outliers. Expected values are computed here from those inputs, never read back
from the report module.
"""

from __future__ import annotations

import base64
import collections
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cell_images import BBBC_CELLS, DATA, YEAST, to_uint8

from cytopretrain import report
from cytopretrain.core.errors import ReportInputError
from cytopretrain.core.schema import conform
from cytopretrain.core.tables import ParquetStreamWriter, encode_pixels, write_table
from cytopretrain.curation import shards
from cytopretrain.curation.crops import CROP_SCHEMA
from cytopretrain.evaluation import protocols as evaluate
from cytopretrain.evaluation.outliers import score_crops
from cytopretrain.evaluation.summary import summarize
from cytopretrain.learning.checkpoints import read_metrics
from cytopretrain.report.curation import MONTAGE_PER_LABEL
from cytopretrain.report.evaluation import normalized_confusion
from cytopretrain.report.samples import collect_samples, display_image, fit_tile
from cytopretrain.report.training import metric_series

YEAST_IMAGES = {"AAC1": 8, "AAC3": 6, "AAH1": 4, "AAP1": 5, "AAR2": 3}
BBBC_IMAGES = 8  # per MOA
DROPPED_LABEL = "aah1"
SECTION_HEADINGS = [
    "1. Data funnel",
    "2. Label distribution",
    "3. Sample crops per label",
    "4. Training curves",
    "5. Evaluation",
    "6. Outlier tiles",
]


# --------------------------------------------------------------------------- HTML parsing


class Page(HTMLParser):
    """Images, links, headings, notes and tables (lists of rows of cell texts) of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict] = []
        self.references: list[str] = []
        self.headings: list[str] = []
        self.notes: list[str] = []
        self.paragraphs: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._capture: list[str] | None = None
        self._target: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.references.append(attrs[key])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("h2", "h3", "h4", "td", "th", "p"):
            self._capture, self._target = [], tag if tag != "p" else attrs.get("class", "p")

    def handle_data(self, data):
        if self._capture is not None:
            self._capture.append(data)

    def handle_endtag(self, tag):
        if self._capture is None or tag not in ("h2", "h3", "h4", "td", "th", "p"):
            return
        text = "".join(self._capture).strip()
        if tag in ("td", "th"):
            self.tables[-1][-1].append(text)
        elif tag == "p":
            (self.notes if self._target == "note" else self.paragraphs).append(text)
        else:
            self.headings.append(text)
        self._capture = None

    def table_with(self, header: str) -> pd.DataFrame:
        for rows in self.tables:
            if rows and header in rows[0]:
                return pd.DataFrame(rows[1:], columns=rows[0])
        raise AssertionError(f"no table with column {header!r}")


# --------------------------------------------------------------------------- inputs


def real_images() -> list[dict]:
    """Yeast cells (alternately GFP only and GFP + RFP) and BBBC021 cells (DAPI, tubulin, actin)."""
    images = []
    for protein, count in YEAST_IMAGES.items():
        for gfp in sorted((YEAST / protein).glob("*_gfp.tif"))[:count]:
            rfp = gfp.with_name(gfp.name.replace("_gfp.tif", "_rfp.tif"))
            channels = [tifffile.imread(gfp), tifffile.imread(rfp)][: 1 + len(images) % 2]
            images.append(
                {
                    "idx": f"yeast-{len(images)}",
                    "label": protein.lower(),
                    "category": "gene",
                    "pixels": to_uint8(channels),
                    "paths": [str(gfp), str(rfp)],
                }
            )
    cells = pd.read_csv(BBBC_CELLS / "cells.csv").sort_values("file")
    for moa, rows in cells.groupby("moa"):
        for row in rows.head(BBBC_IMAGES).itertuples():
            array = np.load(BBBC_CELLS / row.file)
            images.append(
                {
                    "idx": f"bbbc021-{len(images)}",
                    "label": moa.lower(),
                    "category": "phenotype",
                    "pixels": to_uint8([array[..., c] for c in range(3)]),
                    "paths": [str(BBBC_CELLS / row.file)] * 3,
                }
            )
    return images


def write_crops(images: list[dict], path: Path) -> dict[str, dict]:
    """One crop file: every image whole, every second one also its top-left quadrant."""
    crops = {}
    for number, image in enumerate(images):
        h, w = image["pixels"].shape[:2]
        windows = [(0, w, 0, h)] + ([(0, w // 2, 0, h // 2)] if number % 2 == 0 else [])
        for j, (x0, x1, y0, y1) in enumerate(windows):
            crops[f"{image['idx']}-crop{j}"] = {
                "idx": image["idx"],
                "label": image["label"],
                "category": image["category"],
                "crop": j > 0,
                "scaling": (x1 - x0) / w,
                "x_min": x0,
                "x_max": x1,
                "y_min": y0,
                "y_max": y1,
                **encode_pixels(np.ascontiguousarray(image["pixels"][y0:y1, x0:x1])),
            }
    with ParquetStreamWriter(path, CROP_SCHEMA, rows_per_group=16) as writer:
        for crop_id, row in crops.items():
            writer.write({"crop_id": crop_id, **row})
    return crops


def write_funnel(
    images: list[dict], crops: dict, index: pd.DataFrame, excluded: pd.DataFrame, folder: Path
) -> tuple[Path, Path]:
    """A funnel whose last stage is the real shard run, and a quarantine with its excluded crops."""
    n_images, n_crops = len(images), len(crops)
    source_issues = [
        {
            "idx": f"yeast-bad-{i}",
            "stage": "clean_metadata",
            "reason": "unreadable",
            "detail": f"/data/yeast/broken-{i}.tif: truncated TIFF",
            "crop_id": "",
        }
        for i in range(2)
    ]
    qc = [
        {
            "idx": f"yeast-{i}",
            "stage": "quality_control",
            "reason": "crop_too_dark",
            "detail": "crop mean 0.4 <= 1",
            "crop_id": f"yeast-{i}-dark",
        }
        for i in range(5)
    ]
    qc.append(
        {
            "idx": "yeast-0",
            "stage": "quality_control",
            "reason": "binary_mask",
            "detail": "two distinct values",
            "crop_id": "yeast-0-mask",
        }
    )
    funnel = pd.DataFrame(
        [
            ("clean_metadata", "images", n_images + 2, n_images, 2, "unreadable: 2"),
            ("standardize", "images", n_images, n_images, 0, ""),
            ("assign_labels", "images", n_images, n_images, 0, "not chosen by any weak label"),
            ("upsample_crops", "images", n_images, n_images, 0, ""),
            (
                "quality_control",
                "crops",
                n_crops + len(qc),
                n_crops,
                len(qc),
                "crop_too_dark: 5, binary_mask: 1",
            ),
            (
                "write_shards",
                "crops",
                n_crops,
                int(index["n_samples"].sum()),
                len(excluded),
                "labels dropped: 1",
            ),
        ],
        columns=["stage", "unit", "n_in", "n_kept", "n_removed", "removed_as"],
    )
    quarantine = pd.concat(
        [
            pd.DataFrame(source_issues),
            pd.DataFrame(qc),
            excluded.assign(crop_id=excluded["detail"].str.split(" ").str[1]),
        ],
        ignore_index=True,
    )
    write_table(funnel, folder / "funnel.tsv")
    write_table(quarantine, folder / "quarantine.tsv")
    return folder / "funnel.tsv", folder / "quarantine.tsv"


def clustered_profiles(n_labels: int, per_label: int, seed: int, splits: list[str] | None = None) -> pd.DataFrame:
    """Rows around one random centre per label (16 features); labels "class-00", ..."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.7, (n_labels, 16))
    labels = np.repeat([f"class-{i:02d}" for i in range(n_labels)], per_label)
    features = centres[np.repeat(np.arange(n_labels), per_label)] + rng.normal(0, 1.0, (len(labels), 16))
    meta = {"Metadata_idx": [f"img-{i}" for i in range(len(labels))], "Metadata_phenotype": labels}
    if splits:
        meta["Metadata_split"] = [splits[i % len(splits)] for i in range(len(labels))]
    return pd.concat([pd.DataFrame(meta), pd.DataFrame(features, columns=[f"f{i}" for i in range(16)])], axis=1)


EVALUATIONS = [
    # benchmark, model, published, protocols, profile table, embedding written
    ("cyclops_demo", "weak_label", "cyclops", ("knn_loo", "map"), lambda: clustered_profiles(5, 12, 1), True),
    (
        "cyclops_demo",
        "random_init",
        "cyclops",
        ("knn_loo", "map"),
        lambda: clustered_profiles(5, 12, 2),
        True,
    ),
    (
        "coos7_demo",
        "weak_label",
        "coos7",
        ("knn_holdout", "clustering"),
        lambda: clustered_profiles(4, 15, 3, ["train", "train", "train", "test1", "test2"]),
        True,
    ),
    ("many_labels", "weak_label", None, ("knn_loo",), lambda: clustered_profiles(24, 5, 4), True),
    ("hpa_bench", "weak_label", None, ("map",), lambda: clustered_profiles(3, 8, 5), False),
]
PROTOCOLS = {
    "knn_loo": lambda p: evaluate.knn_loo(p, label_col="Metadata_phenotype", k=5),
    "knn_holdout": lambda p: evaluate.knn_holdout(p, label_col="Metadata_phenotype", k=5),
    "map": lambda p: evaluate.mean_average_precision(p, label_col="Metadata_phenotype", null_size=1000),
    "clustering": lambda p: evaluate.clustering(p, label_col="Metadata_phenotype", restarts=3),
}


def write_evaluations(folder: Path) -> tuple[list[Path], list[dict], Path]:
    paths, records = [], []
    for benchmark, model, published, protocols, make, with_embedding in EVALUATIONS:
        profiles = make()
        results = {protocol: PROTOCOLS[protocol](profiles) for protocol in protocols}
        record = {
            "benchmark": benchmark,
            "model": model,
            "published": published,
            "label": "phenotype",
            "n_profiles": len(profiles),
            "results": results,
        }
        path = folder / "eval" / benchmark / f"{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, default=float))
        if with_embedding:
            xy = evaluate.embedding_2d(profiles, method="pca")
            write_table(
                pd.DataFrame(
                    {
                        "idx": profiles["Metadata_idx"],
                        "label": profiles["Metadata_phenotype"],
                        "x": xy[:, 0],
                        "y": xy[:, 1],
                    }
                ),
                path.with_name(f"{model}.embedding.tsv"),
            )
        paths.append(path)
        records.append(record)
    summary_path = folder / "eval" / "summary.tsv"
    write_table(summarize(records), summary_path)
    return paths, records, summary_path


RECORDED_RUN = Path(__file__).parent / "data" / "report_run"


def write_runs(folder: Path) -> list[Path]:
    """A recorded short weak-label run (tests/data/report_run: its model card and metrics log, as
    learning.train wrote them for 6 steps at 32 px on these shards), and a copy of it whose log
    lost its validation records."""
    cards = []
    for run in ("weak_label", "no_validation"):
        run_dir = folder / "train" / run
        run_dir.mkdir(parents=True)
        shutil.copyfile(RECORDED_RUN / "model_card.json", run_dir / "model_card.json")
        records = read_metrics(RECORDED_RUN / "metrics.jsonl")
        if run == "no_validation":
            records = [{k: v for k, v in r.items() if not k.startswith("val_")} for r in records]
            records = [r for r in records if "loss" in r]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        cards.append(run_dir / "model_card.json")
    return cards


def write_outliers(shard_dir: Path, index: pd.DataFrame, planted: set[str], folder: Path) -> Path:
    """Scores of random 8-d latents and reconstruction errors per shard crop; crops of
    ``planted`` images lie far out and are rebuilt worst."""
    names = ("crop_id", "idx", "label", "x_min", "x_max", "y_min", "y_max")
    rows = [tuple(s[name] for name in names) for shard in index["shard"] for s in shards.iter_shard(shard_dir / shard)]
    latents = pd.DataFrame(rows, columns=[f"Metadata_{name}" for name in names])
    rng = np.random.default_rng(9)
    values = rng.normal(0, 1, (len(rows), 8))
    is_planted = latents["Metadata_idx"].isin(planted).to_numpy()
    values[is_planted] += 6.0
    latents["Metadata_reconstruction_error"] = rng.uniform(0.01, 0.2, len(rows)) + 0.5 * is_planted
    latents = pd.concat([latents, pd.DataFrame(values, columns=[f"z_{i}" for i in range(8)])], axis=1)
    path = folder / "eval" / "outliers.tsv"
    whole_image = (0, 0, 1 << 20, 1 << 20)
    write_table(score_crops(latents, k=3, min_samples=3, boxes=dict.fromkeys(planted, whole_image)), path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if not (YEAST.is_dir() and BBBC_CELLS.is_dir()):
        pytest.skip(f"real test data not found under {DATA} (yeast_toy, bbbc021_cells)")
    folder = tmp_path_factory.mktemp("report-inputs")
    images = real_images()
    crops = write_crops(images, folder / "crops.parquet")
    labels = sorted({im["label"] for im in images} - {DROPPED_LABEL})
    categories = {im["label"]: im["category"] for im in images}
    kept = pd.DataFrame({"label": labels, "category": [categories[lab] for lab in labels]})
    metadata = conform(
        pd.DataFrame([{"idx": im["idx"], "microscopy": "fluorescence", "channel_paths": im["paths"]} for im in images]),
        "test metadata",
    )
    shard_dir = folder / "shards"
    index = shards.write_shards(
        [folder / "crops.parquet"],
        kept,
        metadata,
        shard_dir,
        samples_per_shard=12,
        validation_fraction=0.25,
        seed=2,
    )
    excluded = pd.read_csv(shard_dir / "excluded.tsv", sep="\t", dtype=str, keep_default_na=False)
    funnel, quarantine = write_funnel(images, crops, index, excluded, folder)
    evaluations, records, summary = write_evaluations(folder)
    planted = {"yeast-1", "bbbc021-27"}
    return {
        "folder": folder,
        "crops": crops,
        "shard_dir": shard_dir,
        "records": records,
        "planted": planted,
        "args": {
            "funnel": funnel,
            "quarantine": quarantine,
            "labels": shard_dir / "labels.tsv",
            "index": shard_dir / "index.tsv",
            "summary": summary,
            "evaluations": evaluations,
            "cards": write_runs(folder),
            "outliers": [write_outliers(shard_dir, index, planted, folder)],
        },
    }


@pytest.fixture(scope="module")
def built(inputs):
    out = inputs["folder"] / "report" / "report.html"
    report.build_report(**inputs["args"], out_html=out)
    text = out.read_text()
    return {"path": out, "text": text, "page": Page(text)}


def shard_samples(shard_dir: Path) -> list[dict]:
    index = pd.read_csv(shard_dir / "index.tsv", sep="\t")
    return [s for shard in index["shard"] for s in shards.iter_shard(shard_dir / shard)]


# --------------------------------------------------------------------------- the full report


def test_report_is_self_contained(built):
    text, page = built["text"], built["page"]
    assert built["path"].exists()
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text and "url(" not in text
    for reference in page.references:
        assert reference.startswith(("data:image/png;base64,", "#")), reference[:60]
    for image in page.images:
        png = base64.b64decode(image["src"].removeprefix("data:image/png;base64,"))
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert image.get("alt")
    assert not list(built["path"].parent.glob(".*.part"))


def test_map_groups_are_listed_with_their_significance(built, inputs):
    """Each record with a map result shows its labels by descending mAP with p, q and whether
    the label is retrieved, as the record says."""
    tables = [rows for rows in built["page"].tables if rows and rows[0][:3] == ["group", "queries", "mAP"]]
    records = [r for r in inputs["records"] if "map" in r["results"]]
    assert len(tables) == len(records) > 0
    for rows, record in zip(tables, records):
        shown = pd.DataFrame(rows[1:], columns=rows[0])
        truth = record["results"]["map"]["per_class"]
        assert set(shown["group"]) == set(truth)
        assert list(shown["mAP"].astype(float)) == sorted(shown["mAP"].astype(float), reverse=True)
        for row in shown.itertuples():
            assert float(row.mAP) == pytest.approx(truth[row.group]["mean_average_precision"], abs=5e-4)
            assert row.retrieved == ("yes" if truth[row.group]["retrieved"] else "no")


def test_sections_and_figure_count(built, inputs):
    page = built["page"]
    for heading in SECTION_HEADINGS:
        assert heading in page.headings
    with_confusion = sum(any(p in ("knn_loo", "knn_holdout") for p in e[3]) for e in EVALUATIONS)
    with_embedding = sum(e[5] for e in EVALUATIONS)
    benchmarks = len({e[0] for e in EVALUATIONS})
    with_map = sum("map" in e[3] for e in EVALUATIONS)
    runs_with_metrics = len(inputs["args"]["cards"])
    with_clustering = sum("clustering" in e[3] for e in EVALUATIONS)
    # funnel, labels, montage; curves per run; a bar chart per benchmark; embeddings;
    # confusion matrices; mAP against significance; clustering contingency heat maps;
    # outlier histogram and montage.
    expected = 3 + runs_with_metrics + benchmarks + with_embedding + with_confusion + with_map + with_clustering + 2
    assert len(page.images) == expected
    assert [image["alt"] for image in page.images].count("clusters of coos7_demo / weak_label") == 1


def test_funnel_and_quarantine_tables(built, inputs):
    page = built["page"]
    funnel = pd.read_csv(inputs["args"]["funnel"], sep="\t", keep_default_na=False)
    shown = page.table_with("n_removed")
    assert shown["stage"].tolist() == funnel["stage"].tolist()
    assert shown["n_in"].astype(int).tolist() == funnel["n_in"].tolist()
    quarantine = pd.read_csv(inputs["args"]["quarantine"], sep="\t", dtype=str, keep_default_na=False)
    expected = collections.Counter(zip(quarantine["stage"], quarantine["reason"]))
    reasons = page.table_with("reason")
    assert dict(zip(zip(reasons["stage"], reasons["reason"]), reasons["count"].astype(int))) == expected
    for row in reasons.itertuples():
        examples = row[4].split("\n")
        assert len(examples) == min(3, expected[(row.stage, row.reason)])
        idx = examples[0].split(":")[0].split(" / ")[0]
        assert idx in set(quarantine.loc[quarantine["reason"] == row.reason, "idx"])
    assert ("write_shards", "label_dropped") in expected  # the shard writer's real exclusions


def test_label_table_counts_the_shards(built, inputs):
    samples = shard_samples(inputs["shard_dir"])
    per_label = collections.Counter(s["label"] for s in samples)
    table = built["page"].table_with("n_validation")
    assert dict(zip(table["label"], table["total"].astype(int))) == per_label
    assert DROPPED_LABEL not in set(table["label"])


def test_montage_notes_short_labels(built, inputs):
    samples = shard_samples(inputs["shard_dir"])
    per_label = collections.Counter(s["label"] for s in samples)
    short = sorted(label for label, n in per_label.items() if n < MONTAGE_PER_LABEL)
    assert short, "the inputs should hold a label with fewer crops than a montage row"
    note = next(n for n in built["page"].notes if n.startswith("Fewer than"))
    assert sorted(note.split(": ")[1].rstrip(".").split(", ")) == short


def test_summary_values_are_formatted(built, inputs):
    text = built["text"]
    for record in inputs["records"]:
        for protocol, result in record["results"].items():
            if protocol == "clustering":  # one row per assignment and metric, beside its floor
                for subset in ("kmeans", "own"):
                    for score in result.get(subset, {}).get("metrics", {}).values():
                        assert f"{100 * score['value']:.1f}" in text and f"{100 * score['floor']:.1f} %" in text
                continue
            parts = [result] + list(result.get("splits", {}).values())
            for part in parts:
                if "accuracy" in part:
                    acc, ci = part["accuracy"], 1.96 * np.sqrt(part["accuracy"] * (1 - part["accuracy"]) / part["n"])
                    assert f"{100 * acc:.1f} ± {100 * ci:.1f} %" in text
                else:
                    assert f"{100 * part['mean_average_precision']:.1f} %" in text
    summary = built["page"].table_with("ours")
    # CytoImageNet preprint Table 2, CyCLOPS: 53.06 / 68.47 / 65.19 / 77.97 %.
    cyclops = summary[(summary["benchmark"] == "cyclops_demo") & (summary["protocol"] == "knn_loo")]
    assert (
        cyclops[["paper: random init", "paper: ImageNet", "paper: CytoImageNet", "paper: both"]].values.tolist()
        == [["53.1 %", "68.5 %", "65.2 %", "78.0 %"]] * 2
    )
    coos = summary[(summary["benchmark"] == "coos7_demo") & (summary["subset"] == "test2")]
    assert coos["paper: CytoImageNet"].tolist() == ["89.4 %"]
    clustering = summary[summary["protocol"] == "clustering"]
    assert clustering["metric"].tolist() == ["nmi", "ari", "unsupervised_accuracy"]
    assert (clustering["floor"] != "—").all() and (
        summary.loc[summary["protocol"] != "clustering", "floor"] == "—"
    ).all()
    assert set(summary.loc[summary["benchmark"] == "many_labels", "paper: CytoImageNet"]) == {"—"}


def test_evaluation_notes(built):
    notes = built["page"].notes
    assert any("No embedding table beside" in n and "hpa_bench" in n for n in notes)
    assert any(n.startswith("No accuracy-type protocol among map") for n in notes)


def test_training_section(built, inputs):
    page = built["page"]
    assert "Run weak_label" in page.headings and "Run no_validation" in page.headings
    validation_notes = [n for n in page.notes if n.startswith("This run logged no validation records")]
    assert len(validation_notes) == 1
    card = json.loads(Path(inputs["args"]["cards"][0]).read_text())
    facts = page.table_with("fact")  # the first run's card
    values = dict(zip(facts["fact"], facts["value"]))
    assert values["backbone"] == "resnet18" and values["pretext method"] == "weak_label"
    assert values["steps (epochs)"].startswith(f"{card['steps']} (")
    assert f"loss {card['final_metrics']['loss']:.4g}" in values["final metrics"]
    assert "val_loss" in values["final metrics"]


def test_outlier_section(built, inputs):
    page, text = built["page"], built["text"]
    outliers = pd.read_csv(inputs["args"]["outliers"][0], sep="\t")
    injected = outliers[outliers["injected_text"]].sort_values("rank")
    assert len(injected) > 0
    ranks_line = next(p for p in page.paragraphs if p.startswith("Ranks of the injected-text crops"))
    assert ranks_line.split(": ")[1].split(", ") == [str(r) for r in injected["rank"]]
    # The planted crops have the largest errors and lie far from the rest: top ranks on both.
    assert sorted(injected["rank"]) == list(range(1, len(injected) + 1))
    assert sorted(injected["latent_rank"]) == list(range(1, len(injected) + 1))
    top = page.tables[[i for i, t in enumerate(page.tables) if t and "rank" in t[0]][-1]]
    top = pd.DataFrame(top[1:], columns=top[0])
    assert top["crop_id"].tolist() == outliers.sort_values("rank")["crop_id"].head(20).tolist()
    assert "Not found in the shards" not in text


# --------------------------------------------------------------------------- parts


def test_collect_samples_streams_the_wanted_crops(inputs):
    shard_dir = inputs["shard_dir"]
    index = pd.read_csv(shard_dir / "index.tsv", sep="\t")
    kept = {c for c in sorted(inputs["crops"])[::7] if inputs["crops"][c]["label"] != DROPPED_LABEL}
    by_label, by_id = collect_samples(shard_dir / "index.tsv", index, {"aac1": 3, "dmso": 2}, kept)
    assert set(by_id) == kept
    for crop_id, sample in by_id.items():
        assert sample["pixels"] == inputs["crops"][crop_id]["pixels"]
    assert [len(by_label["aac1"]), len(by_label["dmso"])] == [3, 2]
    assert all(s["label"] == label for label, samples in by_label.items() for s in samples)


def test_display_image_channels():
    rng = np.random.default_rng(0)
    for channels in (1, 2, 3, 4):
        image = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
        shown = display_image(encode_pixels(image))
        if channels == 1:
            assert np.array_equal(shown, image[:, :, 0])
        elif channels == 3:
            assert np.array_equal(shown, image)
        else:
            assert np.array_equal(shown, np.round(image.astype(float).mean(axis=2)).astype(np.uint8))


def test_fit_tile_keeps_aspect_and_pixels():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    enlarged = fit_tile(grey, 8)
    assert enlarged.shape == (6, 8, 3)
    assert np.array_equal(enlarged[:, :, 1], np.repeat(np.repeat(grey, 2, axis=0), 2, axis=1))
    rgb = np.random.default_rng(1).integers(0, 256, (300, 600, 3), dtype=np.uint8)
    shrunk = fit_tile(rgb, 100)
    assert shrunk.shape == (50, 100, 3)
    # Area averaging: each output pixel is the mean of its 6 x 6 input block.
    block = rgb[:6, :6].reshape(-1, 3).mean(axis=0)
    assert np.abs(shrunk[0, 0].astype(float) - block).max() <= 1


def test_confusion_is_normalized_per_true_label(inputs, tmp_path):
    result = inputs["records"][3]["results"]["knn_loo"]
    labels, shares = normalized_confusion(result["confusion"], tmp_path / "x.json")
    matrix = np.array(result["confusion"]["matrix"], dtype=float)
    for i, label in enumerate(labels):
        assert shares[i].sum() == pytest.approx(1.0)
        assert shares[i, i] == pytest.approx(result["per_class"][label]["accuracy"])
    assert matrix.sum() == result["n"]
    with pytest.raises(ReportInputError, match="x.json"):
        normalized_confusion({"labels": ["a", "b"], "matrix": [[1]]}, tmp_path / "x.json")


# --------------------------------------------------------------------------- absent and bad input


def test_missing_optional_inputs_give_notes(inputs, tmp_path):
    args = dict(inputs["args"])
    empty_summary = tmp_path / "summary.tsv"
    empty_summary.write_text("\t".join(pd.read_csv(args["summary"], sep="\t", nrows=0).columns) + "\n")
    run_dir = tmp_path / "train" / "lonely"
    run_dir.mkdir(parents=True)
    shutil.copyfile(args["cards"][0], run_dir / "model_card.json")  # no metrics.jsonl beside it
    empty_quarantine = tmp_path / "quarantine.tsv"
    empty_quarantine.write_text("idx\tstage\treason\tdetail\tcrop_id\n")
    out = tmp_path / "report.html"
    report.build_report(
        **{
            **args,
            "quarantine": empty_quarantine,
            "summary": empty_summary,
            "evaluations": [],
            "cards": [run_dir / "model_card.json"],
            "outliers": [],
        },
        out_html=out,
    )
    page = Page(out.read_text())
    for heading in SECTION_HEADINGS:
        assert heading in page.headings
    assert len(page.images) == 3  # funnel, labels, montage
    notes = " ".join(page.notes)
    assert "The evaluation summary is empty" in notes
    assert "No evaluation results were given" in notes
    assert "No metrics.jsonl beside" in notes
    assert "Outlier scoring is not configured" in notes
    assert "Nothing was quarantined" in notes


def test_metric_series_reads_both_validation_styles():
    records = [
        {"step": 2, "epoch": 0, "loss": 2.0, "lr": 0.1, "images_per_s": 30.0, "cosine": 0.1},
        {
            "step": 4,
            "epoch": 0,
            "loss": 1.5,
            "lr": 0.05,
            "images_per_s": 31.0,
            "cosine": 0.3,
            "val_loss": 1.8,
        },
        {"step": 4, "epoch": 0, "split": "validation", "cosine": 0.25},
        {"step": 6, "epoch": 1, "val_loss": 1.6, "val_cosine": 0.35},
    ]
    series = metric_series(records)
    assert sorted(series) == ["cosine", "images_per_s", "loss", "lr", "val_cosine", "val_loss"]
    assert series["val_loss"][0].tolist() == [4, 6] and series["val_loss"][1].tolist() == [1.8, 1.6]
    assert series["val_cosine"][1].tolist() == [0.25, 0.35]
    assert series["loss"][0].tolist() == [2, 4]


def corrupt(args: dict, name: str, folder: Path) -> tuple[dict, Path]:
    """A copy of ``args`` in which input ``name`` is malformed; the bad file's path."""
    if name == "funnel":
        frame = pd.read_csv(args["funnel"], sep="\t", dtype=str, keep_default_na=False)
        frame.loc[2, "n_in"] = "many"
        bad = folder / "funnel.tsv"
        frame.to_csv(bad, sep="\t", index=False)
    elif name == "summary":
        bad = folder / "summary.tsv"
        pd.read_csv(args["summary"], sep="\t").drop(columns="value").to_csv(bad, sep="\t", index=False)
    elif name == "labels":
        bad = folder / "labels.tsv"
        bad.write_text("")
    elif name == "quarantine":
        bad = folder / "quarantine.tsv"
        bad.write_text("idx\tstage\treason\tdetail\na\tb\tc\td\te\tf\tg\n")
    elif name == "outliers":
        frame = pd.read_csv(args["outliers"][0], sep="\t", dtype=str, keep_default_na=False)
        frame.loc[0, "injected_text"] = "maybe"
        bad = folder / "outliers.tsv"
        frame.to_csv(bad, sep="\t", index=False)
        return {**args, "outliers": [bad]}, bad
    elif name == "evaluations":
        bad = folder / "coos7_demo" / "weak_label.json"
        bad.parent.mkdir()
        bad.write_text(Path(args["evaluations"][0]).read_text()[:200])
        return {**args, "evaluations": [bad]}, bad
    else:  # a metrics.jsonl line cut short
        run_dir = folder / "train" / "broken"
        run_dir.mkdir(parents=True)
        shutil.copyfile(args["cards"][0], run_dir / "model_card.json")
        good = Path(args["cards"][0]).with_name("metrics.jsonl").read_text().splitlines()
        bad = run_dir / "metrics.jsonl"
        bad.write_text(good[0] + "\n" + good[1][:15] + "\n")
        return {**args, "cards": [run_dir / "model_card.json"]}, bad
    return {**args, name: bad}, bad


@pytest.mark.parametrize("name", ["funnel", "summary", "labels", "quarantine", "outliers", "evaluations", "metrics"])
def test_malformed_input_raises_naming_the_file(inputs, tmp_path, name):
    args, bad = corrupt(inputs["args"], name, tmp_path)
    out = tmp_path / "report.html"
    with pytest.raises(ReportInputError, match=str(bad).replace(".", r"\.")):
        report.build_report(**args, out_html=out)
    assert not out.exists()


def test_missing_shard_raises_naming_the_index(inputs, tmp_path):
    shard_dir = tmp_path / "shards"
    shutil.copytree(inputs["shard_dir"], shard_dir)
    first = pd.read_csv(shard_dir / "index.tsv", sep="\t")["shard"].iloc[0]
    (shard_dir / first).unlink()
    with pytest.raises(ReportInputError, match=rf"{shard_dir / 'index.tsv'}: shard '{first}' not found"):
        report.build_report(**{**inputs["args"], "index": shard_dir / "index.tsv"}, out_html=tmp_path / "r.html")
