"""Merging canonical tables, reading issue tables, describing the merged table."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cell_images import DATA

from cytopretrain.core.errors import SchemaError
from cytopretrain.core.schema import CANONICAL_FIELDS, CANONICAL_SCHEMA, LABEL_COLUMNS
from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.metadata import describe, merge_tables, plot_description, read_issue_tables
from cytopretrain.curation.sources import run_adapter


def real(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (see ../shared/data/README.md)")
    return path


def synthetic_table(source: str, n: int, seed: int = 0) -> pd.DataFrame:
    """A canonical-looking table with multi-valued labels drawn at random."""
    rng = np.random.default_rng(seed)
    phenotypes = np.array(["mitotic", "apoptotic|mitotic", "", "large|round|mitotic"])
    return pd.DataFrame(
        {
            "idx": [f"{source}-{i}" for i in range(n)],
            "database": rng.choice(["recursion", "broad bioimage benchmark collection"], n),
            "name": source,
            "dir_name": source,
            "organism": rng.choice(["human", "mouse"], n),
            "phenotype": rng.choice(phenotypes, n),
            "gene": rng.choice(["tp53 targeted", "", "brca1 targeted|tp53 targeted"], n),
            "microscopy": rng.choice(["fluorescence", "brightfield"], n),
            "channels": "dna|actin",
            "channel_paths": [[f"/data/{source}/{i}_dna.tif", f"/data/{source}/{i}_actin.tif"] for i in range(n)],
            "concentration": rng.random(n),
        }
    )


def test_merge_real_sources_keeps_order_and_counts():
    yeast = run_adapter("cyclops", real("yeast_toy") / "images", "yeast", {"category": "gene"}).table
    hpa = run_adapter("hpa", real("hpa_toy"), "hpa", {"layout": "cells"}).table
    merged = merge_tables({"yeast": yeast, "hpa": hpa})
    assert list(merged.columns) == list(CANONICAL_FIELDS)
    assert len(merged) == len(yeast) + len(hpa)
    assert merged["idx"].tolist() == yeast["idx"].tolist() + hpa["idx"].tolist()
    assert merged["channel_paths"].iloc[-1] == hpa["channel_paths"].iloc[-1]


def test_merge_after_parquet_round_trip(tmp_path):
    tables = {}
    for source in ("a", "b"):
        path = tmp_path / f"{source}.parquet"
        write_table(merge_tables({source: synthetic_table(source, 50)}), path, schema=CANONICAL_SCHEMA)
        tables[str(path)] = read_table(path)  # list columns come back as numpy arrays
    merged = merge_tables(tables)
    assert len(merged) == 100
    assert merged["channel_paths"].iloc[60] == ["/data/b/10_dna.tif", "/data/b/10_actin.tif"]


def test_merge_refuses_duplicate_ids_naming_both_sources():
    first = synthetic_table("cells", 10)
    second = synthetic_table("cells", 5, seed=1)
    with pytest.raises(SchemaError) as error:
        merge_tables({"results/one.parquet": first, "results/two.parquet": second})
    assert "results/one.parquet" in str(error.value) and "results/two.parquet" in str(error.value)
    assert "cells-0" in str(error.value)


def test_merge_rechecks_the_schema():
    table = synthetic_table("a", 3)
    table.loc[1, "microscopy"] = "confocal"
    with pytest.raises(SchemaError, match="bad_source.*confocal"):
        merge_tables({"bad_source": table})
    with pytest.raises(SchemaError, match="no tables"):
        merge_tables({})


def test_merge_benchmark_200k_rows():
    tables = {"a": synthetic_table("a", 100_000), "b": synthetic_table("b", 100_000, seed=1)}
    start = time.perf_counter()
    merged = merge_tables(tables)
    elapsed = time.perf_counter() - start
    print(f"merge_tables: 200,000 rows in {elapsed:.2f} s")
    assert len(merged) == 200_000 and merged["idx"].is_unique
    assert elapsed < 60  # about 1 s here; the bound only catches a quadratic blow-up


def test_describe_counts_tokens_per_label_column():
    table = merge_tables({"a": synthetic_table("a", 500), "b": synthetic_table("b", 300, seed=2)})
    description = describe(table)
    assert set(description) == {"database", "source", "microscopy", *LABEL_COLUMNS}
    for frame in description.values():
        assert list(frame.columns) == ["value", "n_images"]
        assert frame["n_images"].is_monotonic_decreasing
    source = description["source"]
    assert dict(zip(source["value"], source["n_images"], strict=True)) == {"a": 500, "b": 300}
    for column in ("phenotype", "gene", "organism"):
        expected = Counter(token for value in table[column] for token in value.split("|") if token)
        got = dict(zip(description[column]["value"], description[column]["n_images"], strict=True))
        assert got == expected
    assert description["compound"].empty  # all values empty
    assert description["microscopy"]["n_images"].sum() == 800


def test_plot_description_writes_a_png(tmp_path):
    description = describe(merge_tables({"a": synthetic_table("a", 200)}))
    out = tmp_path / "figures" / "summary.png"
    plot_description(description, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["summary.png"]  # no temporary file left


def test_read_issue_tables(tmp_path):
    rxrx = run_adapter("rxrx1", real("rxrx1"), "rx", {}).issues
    write_table(rxrx, tmp_path / "rx.issues.tsv")
    empty = run_adapter("hpa", real("hpa_toy"), "hpa", {"layout": "cells"}).issues
    write_table(empty, tmp_path / "hpa.issues.tsv")
    issues = read_issue_tables([tmp_path / "rx.issues.tsv", tmp_path / "hpa.issues.tsv"])
    assert len(issues) == len(rxrx) + len(empty) and len(issues) > 0
    assert issues["idx"].tolist() == rxrx["idx"].tolist()
    assert list(read_issue_tables([]).columns) == ["idx", "stage", "reason", "detail"]
    (tmp_path / "bad.tsv").write_text("idx\treason\nx\ty\n")
    with pytest.raises(SchemaError, match="bad.tsv"):
        read_issue_tables([tmp_path / "bad.tsv"])
