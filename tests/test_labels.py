"""Weak-label assignment: hand-checkable tables, a slow reference checker, real BBBC021 metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from cell_images import DATA
from fake_metadata import make_metadata

from cytopretrain.core.errors import SchemaError
from cytopretrain.core.schema import CANONICAL_FIELDS, LABEL_COLUMNS, conform
from cytopretrain.core.tables import read_table, write_table
from cytopretrain.curation.labels import (
    REPORT_SCHEMA,
    SELECTION_SCHEMA,
    assign_weak_labels,
    final_strata,
    prelim_strata,
    split_tokens,
)

NEEDED = ("idx", "name", *LABEL_COLUMNS)


def table(n: int, **columns) -> pd.DataFrame:
    """``n`` rows, every needed column "" unless given (a list of n values or one value)."""
    frame = pd.DataFrame({c: pd.Series([""] * n, dtype=object) for c in NEEDED})
    frame["idx"] = [f"t-{i}" for i in range(n)]
    frame["name"] = "src"
    for column, values in columns.items():
        frame[column] = pd.Series(values if isinstance(values, list) else [values] * n, dtype=object)
    return frame


def rows_of(selection: pd.DataFrame, label: str, category: str) -> list[int]:
    chosen = selection[(selection.label == label) & (selection.category == category)]
    return sorted(int(i.split("-")[1]) for i in chosen.idx)


def bare(label: str) -> str:
    """The token behind a class name ("dmso [compound]" -> "dmso")."""
    return label.split(" [", 1)[0]


def report_row(report: pd.DataFrame, token: str, category: str) -> pd.Series:
    match = report[(report.token == token) & (report.category == category)]
    assert len(match) == 1, f"{category}:{token} appears {len(match)} times in the report"
    return match.iloc[0]


def check_largest_remainder(sizes: pd.Series, counts: pd.Series, target: int) -> None:
    """counts per stratum follow largest-remainder allocation of target over sizes."""
    counts = counts.reindex(sizes.index, fill_value=0)
    total = int(sizes.sum())
    floor = sizes * target // total
    remainder = sizes * target % total
    extra = counts - floor
    assert set(extra.unique()) <= {
        0,
        1,
    }, f"a stratum is off its proportional share: {extra.to_dict()}"
    assert int(counts.sum()) == target
    if 0 < extra.sum() < len(extra):
        assert remainder[extra == 1].min() >= remainder[extra == 0].max()


# --- tokens ------------------------------------------------------------------------------------


def test_split_tokens_whole_pieces_stripped_deduplicated():
    assert split_tokens("nucleus| actin ||actin|f-actin") == ["nucleus", "actin", "f-actin"]
    assert split_tokens("") == []
    assert split_tokens(" | ") == []


def test_labels_match_whole_tokens_only():
    compound = (
        ["dmso"] * 3 + ["dmso2"] * 4 + ["dmso2|taxol"] * 2 + [" dmso | taxol"] + ["(+)-camptothecin"] * 2 + [""] * 3
    )
    visible = ["tubulin|actin"] * 5 + ["f-actin"] * 6 + ["nucleus||actin"] * 4
    frame = table(15, compound=compound, cell_visible=visible)
    selection, report = assign_weak_labels(frame, min_count=1, take_all_max=100, prelim_max=100)

    assert report_row(report, "dmso", "compound").n_total == 4  # not the 6 rows of "dmso2"
    assert report_row(report, "dmso2", "compound").n_total == 6
    assert report_row(report, "(+)-camptothecin", "compound").n_total == 2  # no regex
    assert report_row(report, "actin", "cell_visible").n_total == 9  # not the "f-actin" rows
    assert not (report.label == "").any()
    for label, category, column in [
        ("dmso", "compound", compound),
        ("actin", "cell_visible", visible),
    ]:
        for i in rows_of(selection, label, category):
            assert label in [t.strip() for t in column[i].split("|")]


# --- order, exclusivity, branches --------------------------------------------------------------


def test_rarest_label_first_and_an_image_serves_one_label():
    # compound "a" on rows 0-5, cell_type "b" on rows 0-9: "a" is rarer, so it keeps rows 0-5.
    frame = table(12, compound=["a"] * 6 + [""] * 6, cell_type=["b"] * 10 + [""] * 2)
    selection, report = assign_weak_labels(frame, min_count=4, take_all_max=50, prelim_max=50)
    assert rows_of(selection, "a", "compound") == list(range(6))
    assert rows_of(selection, "b", "cell_type") == [6, 7, 8, 9]
    b = report_row(report, "b", "cell_type")
    assert (b.n_total, b.n_available, b.n_selected, b.outcome) == (10, 4, 4, "taken_all")
    assert list(report.label) == ["a", "b"]
    assert selection.idx.is_unique


def test_skip_when_earlier_labels_consumed_the_rows():
    frame = table(12, compound=["a"] * 6 + [""] * 6, cell_type=["b"] * 10 + [""] * 2)
    selection, report = assign_weak_labels(frame, min_count=5, take_all_max=50, prelim_max=50)
    b = report_row(report, "b", "cell_type")
    assert (b.n_total, b.n_available, b.n_selected, b.outcome) == (10, 4, 0, "skipped_below_min")
    assert rows_of(selection, "b", "cell_type") == []
    assert len(selection) == 6


def test_ties_follow_column_order_then_token():
    frame = table(
        9,
        organism=["zebra"] * 3 + ["yak"] * 3 + [""] * 3,
        compound=[""] * 6 + ["x"] * 3,
    )
    _, report = assign_weak_labels(frame, columns=("organism", "compound"), min_count=3, take_all_max=10, prelim_max=10)
    assert list(zip(report.category, report.token)) == [
        ("organism", "yak"),
        ("organism", "zebra"),
        ("compound", "x"),
    ]
    _, report = assign_weak_labels(frame, min_count=3, take_all_max=10, prelim_max=10)
    assert list(zip(report.category, report.token)) == [
        ("compound", "x"),
        ("organism", "yak"),
        ("organism", "zebra"),
    ]
    assert list(report.order) == [0, 1, 2]


def test_same_token_in_two_columns_is_two_labels_with_distinct_names():
    frame = table(8, compound=["dmso"] * 8, phenotype=["dmso"] * 4 + [""] * 4, organism=["yak"] * 8)
    selection, report = assign_weak_labels(frame, min_count=1, take_all_max=10, prelim_max=10)
    assert rows_of(selection, "dmso [phenotype]", "phenotype") == [0, 1, 2, 3]
    assert rows_of(selection, "dmso [compound]", "compound") == [4, 5, 6, 7]
    # A token taken from one column only keeps its bare name.
    assert set(report.label) == {"dmso [phenotype]", "dmso [compound]", "yak"}
    assert report.set_index("label").loc["dmso [compound]", "token"] == "dmso"


def test_take_all_up_to_the_limit_then_exactly_the_limit():
    frame = table(30, compound=["a"] * 10 + ["b"] * 11 + [""] * 9, cell_type=[f"c{i % 4}" for i in range(30)])
    selection, report = assign_weak_labels(frame, columns=("compound",), min_count=2, take_all_max=10, prelim_max=20)
    a, b = report_row(report, "a", "compound"), report_row(report, "b", "compound")
    assert (a.outcome, a.n_selected) == ("taken_all", 10)
    assert (b.outcome, b.n_selected) == ("downsampled", 10)
    assert set(rows_of(selection, "b", "compound")) <= set(range(10, 21))


@pytest.mark.parametrize("seed", range(5))
def test_downsampling_is_proportional_over_the_final_strata(seed):
    rng = np.random.default_rng(100 + seed)
    n = 1000
    frame = table(
        n,
        compound="x",
        cell_type=list(
            rng.choice(
                ["hela", "u2os", "mcf7", "a549", "rpe", "huvec", "jurkat"],
                n,
                p=[0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02],
            )
        ),
        phenotype=list(rng.choice(["", "g1", "mitosis"], n, p=[0.5, 0.3, 0.2])),
        organism="human",
        # One distinct siRNA per row: a compound label must not stratify by it, or every stratum
        # would be a single row and the cell_type x phenotype shares would come out at random.
        sirna=[f"s{i}" for i in range(n)],
    )
    selection, report = assign_weak_labels(
        frame, columns=("compound",), min_count=10, take_all_max=97, prelim_max=5000, seed=seed
    )
    assert report_row(report, "x", "compound").outcome == "downsampled"
    chosen = frame.iloc[rows_of(selection, "x", "compound")]
    sizes = frame.groupby(["cell_type", "phenotype"]).size()
    check_largest_remainder(sizes, chosen.groupby(["cell_type", "phenotype"]).size(), 97)


def test_preliminary_pass_is_proportional_over_dataset_organism_and_cell_type():
    rng = np.random.default_rng(7)
    n = 3000
    frame = table(
        n,
        gene="kif11 targeted",
        name=list(rng.choice(["bbbc021", "rxrx1", "idr0001"], n, p=[0.6, 0.3, 0.1])),
        organism=list(rng.choice(["human", "mouse"], n, p=[0.8, 0.2])),
        cell_type=list(rng.choice(["hela", "u2os", "rpe"], n)),
    )
    # take_all_max == prelim_max: the second pass keeps all, so the first pass is observable.
    selection, report = assign_weak_labels(frame, columns=("gene",), min_count=10, take_all_max=500, prelim_max=500)
    assert report_row(report, "kif11 targeted", "gene").outcome == "downsampled_prelim"
    chosen = frame.iloc[rows_of(selection, "kif11 targeted", "gene")]
    keys = ["name", "organism", "cell_type"]
    check_largest_remainder(frame.groupby(keys).size(), chosen.groupby(keys).size(), 500)


def test_two_stage_downsampling_gives_the_final_size():
    frame = table(2500, compound="y", cell_type=[f"c{i % 9}" for i in range(2500)])
    selection, report = assign_weak_labels(frame, columns=("compound",), min_count=5, take_all_max=40, prelim_max=300)
    y = report_row(report, "y", "compound")
    assert (y.outcome, y.n_available, y.n_selected) == ("downsampled_prelim", 2500, 40)
    assert len(rows_of(selection, "y", "compound")) == 40


def test_strata_columns_per_category():
    assert final_strata("gene") == (
        "organism",
        "cell_type",
        "cell_visible",
        "sirna",
        "compound",
        "phenotype",
    )
    assert final_strata("sirna") == ("organism", "cell_type", "cell_visible", "phenotype")
    assert final_strata("compound") == ("organism", "cell_type", "cell_visible", "phenotype")
    assert final_strata("cell_visible") == (
        "organism",
        "cell_type",
        "sirna",
        "compound",
        "phenotype",
    )
    assert prelim_strata("phenotype") == ("name", "organism", "cell_type")
    assert prelim_strata("organism") == ("name", "cell_type")


# --- determinism and errors --------------------------------------------------------------------


def test_same_seed_same_result_other_seed_other_draw():
    meta = make_metadata(6000, seed=11)
    kwargs = dict(min_count=30, take_all_max=100, prelim_max=800)
    first = assign_weak_labels(meta, seed=3, **kwargs)
    second = assign_weak_labels(meta, seed=3, **kwargs)
    other = assign_weak_labels(meta, seed=4, **kwargs)
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    assert (first[1].outcome != "taken_all").any()
    assert set(first[0].idx) != set(other[0].idx)


def test_bad_input_is_rejected_with_the_culprit_named():
    frame = table(5, compound="a")
    with pytest.raises(SchemaError, match="name"):
        assign_weak_labels(frame.drop(columns="name"))
    with pytest.raises(ValueError, match="take_all_max"):
        assign_weak_labels(frame, take_all_max=100, prelim_max=50)
    with pytest.raises(ValueError, match="min_count"):
        assign_weak_labels(frame, min_count=0)
    with pytest.raises(ValueError, match="columns"):
        assign_weak_labels(frame, columns=("compound", "plate"))
    dup = frame.copy()
    dup.loc[3, "idx"] = "t-0"
    with pytest.raises(SchemaError, match="t-0"):
        assign_weak_labels(dup)
    bad = frame.copy()
    bad["phenotype"] = pd.Series([1.5, "", "", "", ""], dtype=object)
    with pytest.raises(SchemaError, match="phenotype"):
        assign_weak_labels(bad)


def test_empty_and_label_free_tables():
    selection, report = assign_weak_labels(table(0), min_count=1, take_all_max=1, prelim_max=1)
    assert list(selection.columns) == ["idx", "label", "category"] and len(selection) == 0
    assert list(report.columns) == [
        "label",
        "token",
        "category",
        "n_total",
        "n_available",
        "n_selected",
        "outcome",
        "order",
    ]
    selection, report = assign_weak_labels(table(50), min_count=1)
    assert len(selection) == 0 and len(report) == 0


def test_outputs_fit_their_parquet_schemas(tmp_path):
    selection, report = assign_weak_labels(make_metadata(3000, seed=1), min_count=20, take_all_max=60, prelim_max=600)
    write_table(selection, tmp_path / "selection.parquet", schema=SELECTION_SCHEMA)
    write_table(report, tmp_path / "report.parquet", schema=REPORT_SCHEMA)
    back = read_table(tmp_path / "report.parquet")
    assert back.n_selected.sum() == len(read_table(tmp_path / "selection.parquet")) > 0
    assert list(back.label) == list(report.label)


# --- against a slow reference ------------------------------------------------------------------


def reference_candidates(meta: pd.DataFrame, columns, min_count: int) -> tuple[list, dict]:
    """(category, token, n_total) in visiting order, and the row set of every candidate."""
    holders: dict[tuple[str, str], set[int]] = {}
    for category in columns:
        for row, value in enumerate(meta[category]):
            for token in {piece.strip() for piece in value.split("|")} - {""}:
                holders.setdefault((category, token), set()).add(row)
    position = {c: i for i, c in enumerate(columns)}
    candidates = sorted(((len(rows), position[c], t) for (c, t), rows in holders.items() if len(rows) >= min_count))
    return [(columns[p], t, n) for n, p, t in candidates], holders


@pytest.mark.parametrize("seed", [0, 5])
def test_matches_a_slow_reference_on_a_realistic_table(seed):
    meta = make_metadata(20000, seed=seed)
    min_count, take_all_max, prelim_max = 40, 150, 1500
    selection, report = assign_weak_labels(
        meta, min_count=min_count, take_all_max=take_all_max, prelim_max=prelim_max, seed=seed
    )
    position = pd.Series(np.arange(len(meta)), index=meta.idx)
    candidates, holders = reference_candidates(meta, LABEL_COLUMNS, min_count)
    assert list(zip(report.category, report.token, report.n_total)) == candidates

    used: set[int] = set()
    seen_outcomes = set()
    for (category, token, _), got in zip(candidates, report.itertuples()):
        available = holders[(category, token)] - used
        chosen = set(position[selection.idx[(selection.label.map(bare) == token) & (selection.category == category)]])
        if len(available) < min_count:
            expected, size = "skipped_below_min", 0
        elif len(available) <= take_all_max:
            expected, size = "taken_all", len(available)
        else:
            expected = "downsampled" if len(available) <= prelim_max else "downsampled_prelim"
            size = take_all_max
        seen_outcomes.add(expected)
        assert (got.n_available, got.outcome, got.n_selected, len(chosen)) == (
            len(available),
            expected,
            size,
            size,
        ), (category, token)
        assert chosen <= available
        if expected == "downsampled":
            strata = list(final_strata(category))
            pool = meta.iloc[sorted(available)]
            picked = meta.iloc[sorted(chosen)]
            check_largest_remainder(pool.groupby(strata).size(), picked.groupby(strata).size(), size)
        used |= chosen
    assert seen_outcomes == {"skipped_below_min", "taken_all", "downsampled", "downsampled_prelim"}
    assert selection.idx.is_unique
    assert report.n_selected.sum() == len(selection) == len(used)
    # Assignment order: the labels appear in the selection in visiting order.
    first_seen = selection.drop_duplicates(["category", "label"])
    taken = report[report.n_selected > 0]
    assert list(zip(first_seen.category, first_seen.label)) == list(zip(taken.category, taken.label))


# --- real metadata -----------------------------------------------------------------------------


def bbbc021_metadata() -> pd.DataFrame:
    if not (DATA / "bbbc021").is_dir():
        pytest.skip(f"real data folder {DATA / 'bbbc021'} is absent")
    images = pd.read_csv(DATA / "bbbc021" / "BBBC021_v1_image.csv.gz")
    moa = pd.read_csv(DATA / "bbbc021" / "BBBC021_v1_moa.csv")
    images = images.merge(
        moa,
        how="left",
        left_on=["Image_Metadata_Compound", "Image_Metadata_Concentration"],
        right_on=["compound", "concentration"],
    )
    n = len(images)
    return table(
        n,
        name="bbbc021",
        organism="human",
        cell_type="mcf7",
        cell_visible="nucleus|microtubules|actin",
        compound=list(images.Image_Metadata_Compound.str.lower()),
        phenotype=list(images.moa.fillna("").str.lower()),
    )


def test_real_bbbc021_metadata():
    meta = bbbc021_metadata()
    selection, report = assign_weak_labels(meta, min_count=90, take_all_max=150, prelim_max=1000)
    compound_counts = meta.compound.value_counts()
    for compound, count in compound_counts[compound_counts >= 90].items():
        row = report_row(report, compound, "compound")
        assert row.n_total == count
    # Compounds with 96 images are the rarest candidates: nothing has been used before them.
    for compound in compound_counts[compound_counts == 96].index:
        assert report_row(report, compound, "compound").outcome == "taken_all"
    taxol = report_row(report, "taxol", "compound")
    assert (taxol.outcome, taxol.n_selected) == ("downsampled_prelim", 150)
    # "dmso" is both a compound and a MOA: two labels, the compound first (column order).
    dmso_compound, dmso_moa = report_row(report, "dmso", "compound"), report_row(report, "dmso", "phenotype")
    assert dmso_compound.order < dmso_moa.order
    assert (dmso_compound.label, dmso_moa.label) == ("dmso [compound]", "dmso [phenotype]")
    assert dmso_moa.n_available == dmso_moa.n_total - 150
    # Every row holds the organism, cell type and stain tokens: each of those finds every row
    # not used by the labels visited before it.
    for label, category in [
        ("mcf7", "cell_type"),
        ("human", "organism"),
        ("actin", "cell_visible"),
    ]:
        row = report_row(report, label, category)
        assert row.n_available == len(meta) - report.n_selected[report.order < row.order].sum()
    held = meta.set_index("idx")
    for idx, label, category in selection.sample(300, random_state=0).itertuples(index=False):
        assert bare(label) in split_tokens(held.at[idx, category])


# --- the synthetic metadata generator ----------------------------------------------------------


def test_fake_metadata_is_canonical_and_deterministic():
    meta = make_metadata(5000, seed=2)
    assert list(meta.columns) == list(CANONICAL_FIELDS)
    pd.testing.assert_frame_equal(conform(meta, "fake"), meta)
    pd.testing.assert_frame_equal(make_metadata(5000, seed=2), meta)
    assert not make_metadata(5000, seed=3)["compound"].equals(meta["compound"])
    assert len(meta) == 5000 and meta.idx.is_unique
    for row in meta.sample(200, random_state=1).itertuples():
        assert len(row.channel_paths) == len(row.channels.split("|"))
        assert all(p.startswith(row.path + "/") for p in row.channel_paths)
        assert row.channel_paths[0].endswith("/" + row.filename)
    with pytest.raises(ValueError, match="n_rows"):
        make_metadata(0)


def test_fake_metadata_has_the_shape_of_a_cytoimagenet_search_table():
    meta = make_metadata(300_000, seed=0)
    sizes = meta.name.value_counts()
    assert 60 <= len(sizes) <= 65
    # heavy-tailed source sizes
    assert sizes.iloc[0] > 10 * sizes.median() and sizes.iloc[0] > 100 * sizes.iloc[-1]

    def tokens(column: str) -> pd.Series:
        """Rows per token, from the counts of the distinct values (splitting every row is slow)."""
        counts: dict[str, int] = {}
        for value, n in meta[column].value_counts().items():
            for token in {t.strip() for t in value.split("|")} - {""}:
                counts[token] = counts.get(token, 0) + n
        return pd.Series(counts).sort_values(ascending=False)

    assert set(tokens("organism").index) == {"human", "mouse", "yeast"}
    compounds = tokens("compound")
    assert len(compounds) >= 1000 and compounds.iloc[1] > 50 * compounds.median()  # Zipf-like
    assert 100 <= len(tokens("sirna")) and 100 <= len(tokens("gene"))
    assert tokens("gene").index.str.endswith(" targeted").all()
    assert 10 <= len(tokens("cell_type")) < 100
    for column in ("cell_visible", "phenotype"):
        assert meta[column].str.contains("|", regex=False).mean() > 0.05
    for column in ("compound", "sirna", "gene", "phenotype"):
        assert (meta[column] == "").mean() > 0.3
    assert {"actin", "f-actin"} <= set(tokens("cell_visible").index)
