"""Synthetic canonical metadata tables shaped like CytoImageNet's 2.7 M-row search table.

For benchmarks and dry runs of the curation stages at full scale without any image. The table
follows ``schema.CANONICAL_SCHEMA`` exactly (``schema.conform`` leaves it unchanged) and mimics
the structure that matters for weak labels:

* about 65 sources of heavy-tailed (log-normal) sizes from the 5 CytoImageNet databases, each an
  assay of one kind: compound screen, siRNA screen, protein localization, phenotype collection,
  or plain imaging (only organism / cell type / stains known);
* thousands of compounds with Zipf-like counts shared across screens, plus large DMSO controls;
  hundreds of siRNAs each targeting one of hundreds of genes (values ``"<gene> targeted"``);
* tens of cell types, 3 organisms (one co-culture source holds ``"human|mouse"``);
* ``|``-joined stain sets in cell_visible and multi-valued localizations in phenotype, including
  tokens that are substrings of others (``actin`` / ``f-actin``, ``golgi`` / ``golgi apparatus``);
* empty fields wherever a source has no such annotation; one channel file path per channel.

Rows are built per source with numpy arrays (no Python loop per row); 2.7 M rows take seconds.
Same ``(n_rows, seed)`` gives the same table.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cytopretrain.core.schema import CANONICAL_FIELDS
from cytopretrain.curation.sources.hpa import LOCALIZATIONS as HPA_LOCALIZATIONS

DATABASES = (
    "recursion",
    "image data resource",
    "broad bioimage benchmark collection",
    "kaggle",
    "cell image library",
)
DATABASE_PREFIX = {
    "recursion": "rxrx",
    "image data resource": "idr",
    "broad bioimage benchmark collection": "bbbc",
    "kaggle": "kaggle",
    "cell image library": "cil",
}
# Which databases host each assay kind, with weights.
KIND_DATABASES = {
    "compound": {
        "recursion": 2,
        "image data resource": 2,
        "broad bioimage benchmark collection": 2,
    },
    "sirna": {"recursion": 3, "image data resource": 2, "broad bioimage benchmark collection": 1},
    "localization": {"kaggle": 2, "image data resource": 2, "cell image library": 1},
    "phenotype": {"broad bioimage benchmark collection": 2, "kaggle": 2, "image data resource": 1},
    "plain": {"broad bioimage benchmark collection": 3, "image data resource": 1},
}
KIND_WEIGHTS = {
    "compound": 0.3,
    "sirna": 0.2,
    "localization": 0.15,
    "phenotype": 0.2,
    "plain": 0.15,
}
# The largest collections are screens (RxRx, IDR genome-wide screens), as in CytoImageNet.
LARGE_KIND_WEIGHTS = {
    "compound": 0.5,
    "sirna": 0.25,
    "localization": 0.25,
    "phenotype": 0.0,
    "plain": 0.0,
}
N_LARGE = 10

CELL_TYPES = {
    "human": (
        "u2os",
        "hela",
        "mcf7",
        "a549",
        "hepg2",
        "huvec",
        "rpe",
        "hek293",
        "ht29",
        "jurkat",
        "mcf10a",
        "huh7",
        "caco2",
        "pc3",
        "du145",
        "skov3",
        "imr90",
        "ipsc",
        "hct116",
        "red blood cell",
        "white blood cell",
        "neutrophil",
        "lymphoblast",
        "hepatocyte",
        "fibroblast",
        "keratinocyte",
        "kidney cortex cell",
        "t cell",
    ),
    "mouse": (
        "nih3t3",
        "macrophage",
        "fibroblast",
        "embryonic stem cell",
        "myoblast",
        "mouse hepatocyte",
        "neuron",
        "b16",
    ),
    "yeast": ("s. cerevisiae", "s. pombe", "budding yeast zygote"),
}
# (cell_visible, channel names): stain sets of real assay styles.
STAIN_SETS = (
    (
        "nucleus|endoplasmic reticulum|nucleoli|rna|actin|golgi apparatus|plasma membrane|mitochondria",
        ("hoechst", "concanavalin a", "syto14", "phalloidin", "mitotracker"),
    ),
    (
        "nucleus|endoplasmic reticulum|actin|nucleoli|mitochondria|golgi apparatus",
        ("hoechst", "concanavalin a", "phalloidin", "syto14", "mitotracker", "wga"),
    ),
    ("nucleus|microtubules|f-actin", ("dapi", "tubulin", "actin")),
    ("nucleus|microtubules|endoplasmic reticulum|protein", ("blue", "red", "yellow", "green")),
    ("nucleus|golgi", ("dapi", "gfp")),
    ("nucleus|actin", ("hoechst", "phalloidin")),
    ("nucleus|cytoplasm", ("dapi", "cellmask")),
    ("protein|cell wall", ("gfp", "rfp")),
    ("nucleus", ("dapi",)),
    ("dna|kinetochore|centrosome", ("dapi", "gfp", "rfp")),
    ("nucleus|membrane|lysosome", ("hoechst", "dye", "lysotracker")),
    ("pharynx|body wall", ("gfp", "mcherry")),
)
MOAS = (
    "actin disruptors",
    "aurora kinase inhibitors",
    "cholesterol-lowering",
    "dna damage",
    "dna replication",
    "eg5 inhibitors",
    "epithelial",
    "kinase inhibitors",
    "microtubule destabilizers",
    "microtubule stabilizers",
    "protein degradation",
    "protein synthesis",
    "hdac inhibitor",
    "atpase inhibitor",
    "topoisomerase inhibitor",
)
CELL_CYCLE = (
    "interphase",
    "prophase",
    "prometaphase",
    "metaphase",
    "anaphase",
    "telophase",
    "g1",
    "s",
    "g2",
    "mitosis",
    "cytokinesis",
)
DISEASES = (
    "leukemia",
    "healthy",
    "malaria",
    "infected",
    "uninfected",
    "dead",
    "alive",
    "apoptotic",
    "senescent",
    "out of focus",
    "cancer",
    "normal",
)
# HPA's 28 classes and four more localizations of other screens.
LOCALIZATIONS = HPA_LOCALIZATIONS + ("vacuole", "bud neck", "spindle pole", "cell periphery")
SCREEN_HITS = tuple(f"screen phenotype {i}" for i in range(60))

N_COMPOUNDS = 6000
N_GENES = 3000
N_SIRNAS = 900
N_SIRNA_GENES = 600
WELLS = tuple(f"{row}{col:02d}" for row in "ABCDEFGHIJKLMNOP" for col in range(1, 25))
CONCENTRATIONS = np.array([0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0])


@dataclass(frozen=True)
class Vocabulary:
    """Names shared by all sources; fixed, so tables of different seeds share their labels."""

    compounds: np.ndarray  # by global popularity, most popular first
    compound_moa: np.ndarray  # MOA or "" per compound
    genes: np.ndarray  # "<symbol> targeted"
    sirnas: np.ndarray
    sirna_gene: np.ndarray  # index into genes


def _vocabulary() -> Vocabulary:
    rng = np.random.default_rng(20211122)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    compound_ids = rng.choice(10**8, size=N_COMPOUNDS, replace=False)
    compounds = np.array([f"brd-k{i:08d}" for i in compound_ids], dtype=object)
    # A few well-known names, one with regex characters, among the most used compounds.
    compounds[[0, 3, 7, 12, 20]] = [
        "taxol",
        "(+)-camptothecin",
        "nocodazole",
        "cytochalasin b",
        "dmso2",
    ]
    compound_moa = np.where(rng.random(N_COMPOUNDS) < 0.08, rng.choice(MOAS, N_COMPOUNDS), "").astype(object)
    symbols: dict[str, None] = {}
    while len(symbols) < N_GENES:
        word = "".join(rng.choice(letters, size=int(rng.integers(3, 5))))
        symbols.setdefault(f"{word}{int(rng.integers(1, 20))}", None)
    genes = np.array([f"{s} targeted" for s in symbols], dtype=object)
    sirna_ids = rng.choice(90000, size=N_SIRNAS, replace=False) + 10000
    sirnas = np.array([f"s{i}" for i in sirna_ids], dtype=object)
    # siRNA libraries target a subset of the genes, several siRNAs per gene for some.
    return Vocabulary(compounds, compound_moa, genes, sirnas, rng.integers(0, N_SIRNA_GENES, N_SIRNAS))


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    database: str
    name: str
    organism: str
    cell_types: tuple[str, ...]
    stains: str
    channels: tuple[str, ...]
    microscopy: str
    extension: str
    sites: int
    has_split: bool


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: total - counts.sum()]] += 1
    return counts


def _kinds(sizes: np.ndarray, rng: np.random.Generator) -> list[str]:
    rank = np.empty(len(sizes), dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(sizes))
    return [
        str(rng.choice(list(weights), p=list(weights.values())))
        for weights in (LARGE_KIND_WEIGHTS if r < N_LARGE else KIND_WEIGHTS for r in rank)
    ]


def _source_specs(sizes: np.ndarray, rng: np.random.Generator) -> list[SourceSpec]:
    kinds = _kinds(sizes, rng)
    specs = []
    for number, kind in enumerate(kinds):
        hosts = KIND_DATABASES[kind]
        database = rng.choice(list(hosts), p=np.array(list(hosts.values())) / sum(hosts.values()))
        organism = rng.choice(["human", "mouse", "yeast"], p=[0.75, 0.15, 0.1])
        if kind in ("compound", "sirna"):
            organism = "human"
        cell_pool = CELL_TYPES[organism]
        n_cell_types = min(int(rng.integers(1, 5)), len(cell_pool))
        cell_types = tuple(rng.choice(cell_pool, size=n_cell_types, replace=False))
        if number == 1:  # a co-culture source, as BBBC026
            organism, cell_types = "human|mouse", ("hepatocyte|fibroblast",)
        brightfield = kind in ("phenotype", "plain") and rng.random() < 0.4
        if brightfield:
            stains, channels = "", ("brightfield",)
        else:
            stains, channels = STAIN_SETS[int(rng.integers(len(STAIN_SETS)))]
        specs.append(
            SourceSpec(
                kind=str(kind),
                database=str(database),
                name=f"{DATABASE_PREFIX[database]}{number:03d}",
                organism=str(organism),
                cell_types=tuple(str(c) for c in cell_types),
                stains=stains if rng.random() > 0.1 else "",  # some sources lack stain notes
                channels=channels,
                microscopy="brightfield" if brightfield else "fluorescence",
                extension=str(rng.choice([".tif", ".png", ".jpg"], p=[0.6, 0.3, 0.1])),
                sites=int(rng.integers(1, 10)),
                has_split=database == "kaggle",
            )
        )
    return specs


def _zipf_weights(n: int, exponent: float, offset: float = 2.0) -> np.ndarray:
    weights = 1.0 / (np.arange(n) + offset) ** exponent
    return weights / weights.sum()


def _pick(values: np.ndarray, n: int, rng: np.random.Generator, p: np.ndarray | None = None) -> np.ndarray:
    """``n`` draws from an object array (shared string objects, no per-row formatting)."""
    return np.asarray(values, dtype=object)[rng.choice(len(values), size=n, p=p)]


def _constant(n: int, value: str) -> np.ndarray:
    """``n`` references to one string (``np.full`` would make n copies of it)."""
    out = np.empty(n, dtype=object)
    out[:] = value
    return out


def _empty(n: int) -> np.ndarray:
    return _constant(n, "")


def _treatments(spec: SourceSpec, n: int, vocab: Vocabulary, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """compound, sirna, gene, phenotype and concentration of one source."""
    out = {c: _empty(n) for c in ("compound", "sirna", "gene", "phenotype")}
    out["concentration"] = np.full(n, np.nan)
    if spec.kind == "compound":
        library = np.sort(
            rng.choice(
                N_COMPOUNDS,
                size=int(rng.integers(200, 4000)),
                replace=False,
                p=_zipf_weights(N_COMPOUNDS, 0.6),
            )
        )
        compound_index = library[rng.choice(len(library), size=n, p=_zipf_weights(len(library), 1.1, 5.0))]
        out["compound"] = vocab.compounds[compound_index]
        out["phenotype"] = vocab.compound_moa[compound_index]
        out["concentration"] = rng.choice(CONCENTRATIONS, size=n)
        control = rng.random(n) < rng.uniform(0.05, 0.15)
        out["compound"][control] = "dmso"
        out["phenotype"][control] = ""
        out["concentration"][control] = 0.0
    elif spec.kind == "sirna":
        library = rng.choice(N_SIRNAS, size=int(rng.integers(200, N_SIRNAS)), replace=False)
        sirna_index = library[rng.choice(len(library), size=n, p=_zipf_weights(len(library), 0.3, 50.0))]
        out["sirna"] = vocab.sirnas[sirna_index]
        out["gene"] = vocab.genes[vocab.sirna_gene[sirna_index]]
        control = rng.random(n) < 0.05
        out["sirna"][control] = ""
        out["gene"][control] = ""
        hits = rng.random(n) < 0.03
        out["phenotype"][hits] = _pick(np.array(SCREEN_HITS), int(hits.sum()), rng)
    elif spec.kind == "localization":
        genes = rng.choice(N_GENES, size=int(rng.integers(300, N_GENES)), replace=False)
        out["gene"] = _pick(vocab.genes[genes], n, rng, _zipf_weights(len(genes), 0.5))
        combos = np.array(
            [
                "|".join(rng.choice(LOCALIZATIONS, size=int(k), replace=False))
                for k in rng.choice([1, 1, 2, 3], size=150)
            ],
            dtype=object,
        )
        out["phenotype"] = _pick(combos, n, rng, _zipf_weights(len(combos), 1.0))
    elif spec.kind == "phenotype":
        pool = np.array([*CELL_CYCLE, *DISEASES], dtype=object)
        phenotypes = rng.choice(pool, size=int(rng.integers(2, 9)), replace=False)
        out["phenotype"] = _pick(phenotypes, n, rng)
    return out


def _joined(*parts: pa.Array | pa.Scalar | str, sep: str = "") -> pa.Array:
    return pc.binary_join_element_wise(*[pa.scalar(p) if isinstance(p, str) else p for p in parts], sep)


def _strings(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(object, copy=False)


def _files(spec: SourceSpec, n: int, rng: np.random.Generator) -> dict[str, object]:
    """Plate, well, batch, split, idx, path, filename and channel_paths of one source.

    Per-plate and per-well strings are shared objects taken from small vocabularies; only the
    ids and file paths are new strings per row.
    """
    site = np.arange(n) % spec.sites
    well = (np.arange(n) // spec.sites) % len(WELLS)
    plate = np.arange(n) // (spec.sites * len(WELLS))
    plate_names = np.array([f"plate{p:04d}" for p in range(int(plate[-1]) + 1)], dtype=object)
    folders = np.array([f"/data/raw/{spec.name}/{p}" for p in plate_names], dtype=object)
    batches = np.array([f"batch{p // 4}" for p in range(len(plate_names))], dtype=object)
    wells = np.array(WELLS, dtype=object)
    folder = pa.array(folders).take(pa.array(plate))
    stem = _joined(
        pa.array(plate_names).take(pa.array(plate)),
        "_",
        pa.array(wells).take(pa.array(well)),
        "_s",
        pa.array(site + 1).cast(pa.string()),
        "_",
    )
    names = [_joined(stem, f"{c.replace(' ', '-')}{spec.extension}") for c in spec.channels]
    channel_files = [_strings(_joined(folder, "/", name)) for name in names]
    split = _empty(n)
    if spec.has_split:
        split = np.array(["train", "test"], dtype=object)[(rng.random(n) >= 0.8).astype(np.int64)]
    return {
        "idx": _strings(_joined(f"{spec.name}-", pa.array(np.arange(n)).cast(pa.string()))),
        "path": folders[plate],
        "filename": _strings(names[0]),
        "channel_paths": np.stack(channel_files, axis=1).tolist(),
        "plate": plate_names[plate],
        "well": wells[well],
        "batch": batches[plate],
        "split": split,
    }


def _source_frame(spec: SourceSpec, n: int, vocab: Vocabulary, rng: np.random.Generator) -> dict[str, object]:
    cell_weights = _zipf_weights(len(spec.cell_types), 0.8, 1.0)
    columns: dict[str, object] = {
        "database": _constant(n, spec.database),
        "name": _constant(n, spec.name),
        "dir_name": _constant(n, spec.name),
        "organism": _constant(n, spec.organism),
        "cell_type": _pick(np.array(spec.cell_types, dtype=object), n, rng, cell_weights),
        "cell_visible": _constant(n, spec.stains),
        "microscopy": _constant(n, spec.microscopy),
        "channels": _constant(n, "|".join(spec.channels)),
    }
    columns.update(_treatments(spec, n, vocab, rng))
    columns.update(_files(spec, n, rng))
    return columns


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of new lists would trigger the cyclic collector over and over; none form cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def make_metadata(n_rows: int, seed: int = 0, *, n_sources: int = 65) -> pd.DataFrame:
    """A canonical metadata table of ``n_rows`` images from up to ``n_sources`` sources."""
    if n_rows < 1 or n_sources < 1:
        raise ValueError(f"need n_rows >= 1 and n_sources >= 1, got {n_rows}, {n_sources}")
    rng = np.random.default_rng(seed)
    vocab = _vocabulary()
    sizes = _largest_remainder(rng.lognormal(0.0, 1.6, n_sources), n_rows)
    specs = _source_specs(sizes, rng)
    with _gc_paused():
        parts = [_source_frame(spec, int(n), vocab, rng) for spec, n in zip(specs, sizes) if n > 0]
        return pd.DataFrame({name: _column([p[name] for p in parts], kind) for name, kind in CANONICAL_FIELDS.items()})


def _column(pieces: list, kind: pa.DataType) -> pd.Series:
    """One canonical column from per-source pieces, with the dtypes ``schema.conform`` yields."""
    if kind == pa.float64():
        return pd.Series(np.concatenate(pieces), dtype=np.float64)
    if isinstance(pieces[0], list):  # channel_paths: keep one list per row, never a 2-D array
        return pd.concat([pd.Series(p, dtype=object) for p in pieces], ignore_index=True)
    return pd.Series(np.concatenate(pieces), dtype=object)
