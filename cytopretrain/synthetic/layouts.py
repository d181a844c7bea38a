"""The six layouts of the demo collection (BBBC021, RxRx1, HPA, CyCLOPS, COOS-7 and the native
one): what each renders, with which design, in the real source's folder and metadata format."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cytopretrain.curation.sources.synthetic import NATIVE_COLUMNS
from cytopretrain.synthetic.biology import (
    CELL_TYPES,
    GENE_EFFECTS,
    NEUTRAL,
    VISIBLE,
    Effect,
    dose_strength,
    effect_of,
    moa_effect,
)
from cytopretrain.synthetic.defects import FILE_DEFECTS, NO_BOX, text_box
from cytopretrain.synthetic.rendering import CellJob, FieldJob, Optics

LAYOUTS = ("bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "synthetic")


@dataclass
class LayoutPlan:
    """What one layout writes: render jobs, metadata files, ground-truth defect rows."""

    jobs: list
    tables: dict[str, list[list]]  # relative path -> rows (first row = header)
    defects: list[tuple]  # (relative path, defect kind, text box or 4 x "")
    images: int
    raw_tables: dict[str, str] | None = None  # relative path -> verbatim text


def _count(base: float, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(base * scale)))


def _uuid(rng: np.random.Generator, upper: bool = True) -> str:
    h = "".join(f"{b:02x}" for b in rng.integers(0, 256, 16))
    u = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    return u.upper() if upper else u


def _batch_optics(rng: np.random.Generator, n_channels: int, **base) -> Optics:
    """A batch's acquisition: intensity scale, background, illumination drift."""
    return Optics(
        scales=tuple(float(s) for s in rng.lognormal(0, 0.22, n_channels)),
        background_scale=float(rng.lognormal(0, 0.12)),
        vignetting=float(rng.uniform(0.05, 0.4)),
        gradient=float(rng.uniform(0.0, 0.2)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)),
        **base,
    )


def _plate_optics(rng: np.random.Generator, batch: Optics) -> Optics:
    """A plate within a batch: the batch's acquisition with a small jitter."""
    return replace(
        batch,
        scales=tuple(float(s * rng.lognormal(0, 0.05)) for s in batch.scales),
        vignetting=float(np.clip(batch.vignetting + rng.normal(0, 0.03), 0, 0.6)),
        gradient_angle=float(batch.gradient_angle + rng.normal(0, 0.2)),
    )


def _wells(rows: str, columns: range) -> list[str]:
    return [f"{r}{c:02d}" for r in rows for c in columns]


def _pick_defects(rng: np.random.Generator, candidates: list[int], kinds: tuple[str, ...]) -> dict[int, str]:
    chosen = rng.choice(len(candidates), size=min(len(kinds), len(candidates)), replace=False)
    return {candidates[int(i)]: kind for i, kind in zip(chosen, kinds)}


def _defect_rows(job: FieldJob | CellJob, root: Path) -> list[tuple]:
    """Ground-truth rows (path, defect, x_min, y_min, x_max, y_max) of one job's files.

    The box is the lettering's for text, empty otherwise.
    """
    if not job.defect:
        return []
    paths = job.paths[:1] if job.defect in FILE_DEFECTS else job.paths
    box = text_box((job.size, job.size), job.text) if job.defect == "text" else NO_BOX
    return [(Path(p).relative_to(root).as_posix(), job.defect, *box) for p in paths]


# (compound, MOA, potency, concentrations in µM)
BBBC021_COMPOUNDS: tuple[tuple[str, str, float, tuple[float, ...]], ...] = (
    ("nocodazole", "Microtubule destabilizers", 1.0, (0.03, 0.1, 0.3, 1.0)),
    ("colchicine", "Microtubule destabilizers", 0.9, (0.03, 0.1, 0.3)),
    ("vincristine", "Microtubule destabilizers", 1.0, (0.003, 0.01, 0.03)),
    ("cytochalasin B", "Actin disruptors", 0.9, (1.0, 3.0, 10.0)),
    ("cytochalasin D", "Actin disruptors", 1.0, (0.1, 0.3, 1.0)),
    ("latrunculin B", "Actin disruptors", 0.85, (0.3, 1.0, 3.0)),
    ("etoposide", "DNA damage", 0.9, (1.0, 3.0, 10.0, 30.0)),
    ("camptothecin", "DNA damage", 1.0, (0.03, 0.1, 0.3)),
    ("cisplatin", "DNA damage", 0.75, (3.0, 10.0, 30.0)),
    ("emetine", "Protein synthesis", 1.0, (0.03, 0.1, 0.3, 1.0)),
    ("cycloheximide", "Protein synthesis", 0.9, (3.0, 10.0, 30.0)),
    ("anisomycin", "Protein synthesis", 0.95, (0.3, 1.0, 3.0)),
    ("AZ258", "Aurora kinase inhibitors", 1.0, (0.1, 0.3, 1.0, 3.0)),
    ("AZ841", "Aurora kinase inhibitors", 0.9, (0.1, 0.3, 1.0)),
    ("PP-2", "Kinase inhibitors", 0.9, (1.0, 3.0, 10.0)),
    ("alsterpaullone", "Kinase inhibitors", 0.85, (1.0, 3.0, 10.0)),
    ("mevinolin/lovastatin", "Cholesterol-lowering", 0.9, (1.5, 5.0, 15.0)),
    ("simvastatin", "Cholesterol-lowering", 0.9, (1.0, 3.0, 10.0)),
)


# MOAs imaged in one batch only (dropped by the NSCB protocol), and that batch.
BBBC021_SINGLE_BATCH = {"Kinase inhibitors": 2, "Cholesterol-lowering": 3}
BBBC021_PLATES = {1: ("22123", "22141"), 2: ("24121", "24141"), 3: ("25421", "25441"), 4: ("27481", "27521")}
BBBC021_CHANNELS = (
    ("DAPI", "dna", 1, (700.0, 7000.0)),
    ("Tubulin", "tubulin", 2, (1300.0, 6000.0)),
    ("Actin", "actin", 4, (1100.0, 4500.0)),
)


BBBC021_COLUMNS = [
    "TableNumber",
    "ImageNumber",
    "Image_FileName_DAPI",
    "Image_PathName_DAPI",
    "Image_FileName_Tubulin",
    "Image_PathName_Tubulin",
    "Image_FileName_Actin",
    "Image_PathName_Actin",
    "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI",
    "Replicate",
    "Image_Metadata_Compound",
    "Image_Metadata_Concentration",
]


_SMILES_PARTS = ("c1ccccc1", "C(=O)N", "CCO", "c1ccncc1", "C(F)(F)F", "OC", "N1CCOCC1", "Cl", "C(=O)O", "CC(C)")


def _fake_smiles(rng: np.random.Generator) -> str:
    """A plausible-looking SMILES string (the compounds' structures are not modelled)."""
    return "".join(_SMILES_PARTS[i] for i in rng.integers(0, len(_SMILES_PARTS), int(rng.integers(3, 7))))


def _format_concentration(value: float) -> str:
    return f"{value:g}"


def plan_bbbc021(root: Path, seed: int, scale: float, size: int) -> LayoutPlan:
    rng = np.random.default_rng([seed, 1, 0])
    n_sites = _count(2, scale)
    week_optics = {w: _batch_optics(rng, 3, gain=2.0, read_noise=8.0, step=16) for w in BBBC021_PLATES}
    plate_optics = {(w, r): _plate_optics(rng, week_optics[w]) for w in BBBC021_PLATES for r in (1, 2)}
    # Treatments -> week: a compound's doses rotate over weeks, except single-batch MOAs.
    by_week: dict[int, list[tuple[str, str, float, float]]] = {w: [] for w in BBBC021_PLATES}
    for k, (compound, moa, potency, concs) in enumerate(BBBC021_COMPOUNDS):
        for j, conc in enumerate(concs):
            week = BBBC021_SINGLE_BATCH.get(moa) or 1 + (k + j) % len(BBBC021_PLATES)
            by_week[week].append((compound, moa, conc, dose_strength(j, len(concs), potency)))
    for week in by_week:
        by_week[week] += [("DMSO", "DMSO", 0.0, 0.0)] * 3
    fields_: list[dict] = []
    for week, treatments in by_week.items():
        for replicate, barcode in enumerate(BBBC021_PLATES[week], start=1):
            plate = f"Week{week}_{barcode}"
            wells = rng.permutation(_wells("BCDEFG", range(2, 12)))[: len(treatments)]
            for (compound, moa, conc, strength), well in sorted(zip(treatments, wells), key=lambda t: t[1]):
                for site in range(1, n_sites + 1):
                    fields_.append(
                        dict(
                            week=week,
                            replicate=replicate,
                            plate=plate,
                            well=str(well),
                            site=site,
                            compound=compound,
                            moa=moa,
                            conc=conc,
                            strength=strength,
                        )
                    )
    dmso = [i for i, f in enumerate(fields_) if f["compound"] == "DMSO"]
    defects = _pick_defects(rng, dmso, ("blank", "saturated", "text", "truncated", "empty_file"))
    jobs, rows, gt = [], [BBBC021_COLUMNS], []
    image_number = {w: 0 for w in BBBC021_PLATES}
    for i, f in enumerate(fields_):
        names = [f"{f['well']}_s{f['site']}_w{w}{_uuid(rng)}.tif" for _, _, w, _ in BBBC021_CHANNELS]
        path_name = f"Week{f['week']}/{f['plate']}"
        job = FieldJob(
            seed=(seed, 1, i),
            size=size,
            cell_type="mcf7",
            effect=moa_effect(f["moa"], f["strength"]),
            stains=tuple(s for _, s, _, _ in BBBC021_CHANNELS),
            levels=tuple(level for *_, level in BBBC021_CHANNELS),
            optics=plate_optics[(f["week"], f["replicate"])],
            fmt="tiff16",
            paths=tuple(str(root / f["plate"] / n) for n in names),
            defect=defects.get(i, ""),
            text=f"{f['plate']}\n{f['well']} s{f['site']}",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
        image_number[f["week"]] += 1
        rows.append(
            [
                f["week"],
                image_number[f["week"]],
                names[0],
                path_name,
                names[1],
                path_name,
                names[2],
                path_name,
                f["plate"],
                f["well"],
                f["replicate"],
                f["compound"],
                _format_concentration(f["conc"]),
            ]
        )
    moa_lines = ['"compound",concentration,"moa"']
    moa_lines += [f'"{c}",{conc:.6f},"{m}"' for c, m, _, concs in BBBC021_COMPOUNDS for conc in concs]
    moa_lines.append('"DMSO",0.000000,"DMSO"')
    compounds = (
        [["compound", "smiles"]] + [[c, _fake_smiles(rng)] for c, *_ in BBBC021_COMPOUNDS] + [["DMSO", "CS(C)=O"]]
    )
    return LayoutPlan(
        jobs,
        {"BBBC021_v1_image.csv": rows, "BBBC021_v1_compound.csv": compounds},
        gt,
        len(jobs),
        raw_tables={"BBBC021_v1_moa.csv": "\n".join(moa_lines) + "\n"},
    )


RXRX1_TRAIN = ("HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01", "HUVEC-02", "U2OS-02")
RXRX1_TEST = ("HEPG2-02", "RPE-02")
# siRNA -> (gene, knockdown efficiency); the last two are the positive controls.
RXRX1_SIRNAS: dict[str, tuple[str, float]] = {
    "sirna_101": ("TUBB", 1.0),
    "sirna_102": ("TUBB", 0.7),
    "sirna_203": ("ACTB", 1.0),
    "sirna_204": ("LMNA", 1.0),
    "sirna_305": ("CCNB1", 1.0),
    "sirna_306": ("MFN2", 1.0),
    "sirna_407": ("PLK1", 0.8),
    "sirna_408": ("ACTB", 0.7),
}


RXRX1_POSITIVE = {"sirna_1108": ("PLK1", 2.5), "sirna_1109": ("CCNB1", 3.0)}
# w1 nucleus, w2 ER, w3 actin, w4 nucleoli + RNA, w5 mitochondria, w6 Golgi + membrane
RXRX1_CHANNELS = (
    ("dna", (4.0, 55.0)),
    ("er", (6.0, 80.0)),
    ("actin", (5.0, 60.0)),
    ("rna", (5.0, 55.0)),
    ("mitochondria", (6.0, 70.0)),
    ("golgi_membrane", (4.0, 45.0)),
)


RXRX1_TREATED_PER_PLATE = 4


def _gene_effect(gene: str, efficiency: float) -> Effect:
    return effect_of(GENE_EFFECTS[gene], efficiency)


def plan_rxrx1(root: Path, seed: int, scale: float, size: int) -> LayoutPlan:
    rng = np.random.default_rng([seed, 2, 0])
    n_plates = _count(1, scale)
    sirnas = list(RXRX1_SIRNAS)
    wells: list[dict] = []
    for experiment in RXRX1_TRAIN + RXRX1_TEST:
        split = "train" if experiment in RXRX1_TRAIN else "test"
        cell_type = experiment.split("-")[0].lower()
        optics = _batch_optics(rng, 6, gain=0.3, read_noise=0.8, max_value=255)
        for plate in range(1, n_plates + 1):
            plate_optics = _plate_optics(rng, optics)
            positive = list(RXRX1_POSITIVE)[(plate - 1) % 2]
            treated = [
                sirnas[(RXRX1_TREATED_PER_PLATE * (plate - 1) + k) % len(sirnas)]
                for k in range(RXRX1_TREATED_PER_PLATE)
            ]
            free = rng.permutation([w for w in _wells("BCDEFGHIJKLMNO", range(2, 24)) if w != "B02"])
            entries = [("B02", "UNTREATED", "negative_control"), (str(free[0]), positive, "positive_control")]
            entries += [(str(w), s, "treatment") for w, s in zip(free[1:], treated)]
            for well, sirna, well_type in entries:
                gene, eff = {**RXRX1_SIRNAS, **RXRX1_POSITIVE}.get(sirna) or ("", 0.0)
                wells.append(
                    dict(
                        split=split,
                        experiment=experiment,
                        plate=plate,
                        well=well,
                        sirna=sirna,
                        well_type=well_type,
                        cell_type=cell_type,
                        optics=plate_optics,
                        effect=_gene_effect(gene, eff) if gene else NEUTRAL,
                    )
                )
    fields_ = [(w, site) for w in wells for site in (1, 2)]
    incomplete = 1  # site 2 of the first experiment's first negative-control well
    candidates = [i for i in range(len(fields_)) if i != incomplete]
    defects = _pick_defects(rng, candidates, ("blank", "saturated", "binary", "text"))
    jobs, gt = [], []
    for i, (w, site) in enumerate(fields_):
        folder = root / w["split"] / w["experiment"] / f"Plate{w['plate']}"
        n_channels = 4 if i == incomplete else 6
        paths = tuple(str(folder / f"{w['well']}_s{site}_w{c}.png") for c in range(1, n_channels + 1))
        if i == incomplete:
            gt += [
                ((folder / f"{w['well']}_s{site}_w{c}.png").relative_to(root).as_posix(), "missing", *NO_BOX)
                for c in (5, 6)
            ]
        job = FieldJob(
            seed=(seed, 2, i),
            size=size,
            cell_type=w["cell_type"],
            effect=w["effect"],
            stains=tuple(s for s, _ in RXRX1_CHANNELS[:n_channels]),
            levels=tuple(level for _, level in RXRX1_CHANNELS[:n_channels]),
            optics=w["optics"],
            fmt="png8",
            paths=paths,
            defect=defects.get(i, ""),
            text=f"{w['experiment']} P{w['plate']}\n{w['well']}",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
    tables: dict[str, list[list]] = {}
    for split in ("train", "test"):
        treated = [["id_code", "experiment", "plate", "well"] + (["sirna"] if split == "train" else [])]
        controls = [["id_code", "experiment", "plate", "well", "sirna", "well_type"]]
        for w in wells:
            if w["split"] != split:
                continue
            key = [f"{w['experiment']}_{w['plate']}_{w['well']}", w["experiment"], w["plate"], w["well"]]
            if w["well_type"] == "treatment":
                treated.append(key + ([w["sirna"]] if split == "train" else []))
            else:
                controls.append(key + [w["sirna"], w["well_type"]])
        tables[f"{split}.csv"] = treated
        tables[f"{split}_controls.csv"] = controls
    return LayoutPlan(jobs, tables, gt, len(jobs))


HPA_CLASSES = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Peroxisomes",
    "Endosomes",
    "Lysosomes",
    "Intermediate filaments",
    "Actin filaments",
    "Focal adhesion sites",
    "Microtubules",
    "Microtubule ends",
    "Cytokinetic bridge",
    "Mitotic spindle",
    "Microtubule organizing center",
    "Centrosome",
    "Lipid droplets",
    "Plasma membrane",
    "Cell junctions",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Cytoplasmic bodies",
    "Rods & rings",
)


# Rendered HPA class -> (pattern, relative frequency), imbalanced like the competition.
HPA_RENDERED: dict[int, tuple[str, float]] = {
    0: ("nucleus", 0.28),
    1: ("nuclear_periphery", 0.04),
    2: ("nucleolus", 0.08),
    4: ("speckles", 0.04),
    5: ("nuclear_bodies", 0.05),
    6: ("er", 0.05),
    7: ("golgi", 0.06),
    12: ("actin", 0.03),
    14: ("microtubules", 0.04),
    19: ("centrosome", 0.03),
    21: ("plasma_membrane", 0.07),
    23: ("mitochondria", 0.08),
    25: ("cytoplasm", 0.2),
    26: ("cytoplasmic_bodies", 0.03),
}


# (file colour, stain, (background, amplitude))
HPA_CHANNELS = (
    ("red", "tubulin", (6.0, 110.0)),
    ("green", None, (3.0, 150.0)),
    ("blue", "dna", (5.0, 170.0)),
    ("yellow", "er", (6.0, 120.0)),
)


def plan_hpa(root: Path, seed: int, scale: float, size: int) -> LayoutPlan:
    rng = np.random.default_rng([seed, 3, 0])
    n_images = _count(120, scale)
    classes = np.array(list(HPA_RENDERED))
    weights = np.array([w for _, w in HPA_RENDERED.values()])
    defects = _pick_defects(rng, list(range(n_images)), ("blank", "binary", "text"))
    jobs, gt, rows = [], [], [["Id", "Target"]]
    for i in range(n_images):
        n_labels = int(rng.choice([1, 2, 3], p=[0.55, 0.35, 0.10]))
        labels = sorted(int(c) for c in rng.choice(classes, n_labels, replace=False, p=weights / weights.sum()))
        image_id = _uuid(rng, upper=False)
        protein = "protein:" + "+".join(HPA_RENDERED[c][0] for c in labels)
        job = FieldJob(
            seed=(seed, 3, i),
            size=size,
            cell_type=str(rng.choice(["u2os", "rpe", "hepg2"])),
            effect=NEUTRAL,
            stains=tuple(s or protein for _, s, _ in HPA_CHANNELS),
            levels=tuple(level for *_, level in HPA_CHANNELS),
            optics=_batch_optics(rng, 4, gain=0.25, read_noise=0.8, max_value=255),
            fmt="png8",
            paths=tuple(str(root / "train" / f"{image_id}_{colour}.png") for colour, _, _ in HPA_CHANNELS),
            defect=defects.get(i, ""),
            text=f"HPA {image_id[:8]}\n63x",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
        rows.append([image_id, " ".join(str(c) for c in labels)])
    return LayoutPlan(jobs, {"train.csv": rows}, gt, n_images)


# CyCLOPS label -> (pattern, yeast proteins localised there)
CYCLOPS_LABELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ACTIN": ("actin_patches", ("ABP1", "SAC6")),
    "BUDNECK": ("budneck", ("CDC3", "SHS1")),
    "CELLPERIPHERY": ("plasma_membrane", ("PMA1", "SUR7")),
    "CYTOPLASM": ("cytoplasm", ("PGK1", "TDH3")),
    "ER": ("er_yeast", ("SEC63", "HMG1")),
    "MITOCHONDRIA": ("mitochondria", ("CIT1", "ATP2")),
    "NUCLEARPERIPHERY": ("nuclear_periphery", ("NUP49", "NIC96")),
    "NUCLEI": ("nucleus", ("HTB2", "NHP6A")),
    "NUCLEOLUS": ("nucleolus", ("NOP56", "NSR1")),
    "PEROXISOME": ("peroxisomes", ("PEX3", "POX1")),
    "SPINDLE": ("spindle", ("ASE1", "BIM1")),
    "SPINDLEPOLE": ("spindle_pole", ("SPC42", "SPC110")),
    "VACUOLARMEMBRANE": ("vacuolar_membrane", ("VPH1", "VTC3")),
    "VACUOLE": ("vacuole", ("PEP4", "CPS1")),
    "DEAD": ("dead", ("PGK1", "NUP49", "PMA1")),
    "GHOST": ("ghost", ("TDH3", "HTB2", "VPH1")),
}


def plan_cyclops(root: Path, seed: int, scale: float) -> LayoutPlan:
    rng = np.random.default_rng([seed, 4, 0])
    screen = _batch_optics(rng, 2, gain=1.5, read_noise=5.0, blur=0.6)
    cells = []
    for label, (pattern, proteins) in CYCLOPS_LABELS.items():
        n = _count(15 if label in ("DEAD", "GHOST") else 25, scale, minimum=2)
        for k in range(n):
            cells.append((label, pattern, proteins[k % len(proteins)], k))
    normal = [i for i, c in enumerate(cells) if c[0] not in ("DEAD", "GHOST")]
    defects = _pick_defects(rng, normal, ("blank", "truncated", "empty_file"))
    jobs, gt = [], []
    for i, (label, pattern, protein, k) in enumerate(cells):
        name = f"{protein}_{1 + k // 6}_rfp_{k % 6 + 1}"
        job = CellJob(
            seed=(seed, 4, i),
            organism="yeast",
            pattern=pattern,
            protein_level=float(rng.lognormal(0, 0.35)),
            levels=((110.0, 900.0), (230.0, 2500.0)),
            optics=_plate_optics(rng, screen),
            fmt="float32",
            paths=(str(root / label / f"{name}_gfp.tif"), str(root / label / f"{name}_rfp.tif")),
            defect=defects.get(i, ""),
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
    return LayoutPlan(jobs, {}, gt, len(jobs))


COOS7_CLASSES = (
    "cytoplasm",
    "endoplasmic_reticulum",
    "mitochondria",
    "nucleolus",
    "nucleus",
    "peroxisomes",
    "plasma_membrane",
)


COOS7_PATTERN = {"endoplasmic_reticulum": "er", "plasma_membrane": "plasma_membrane"}
COOS7_SPLITS = {"train": 50, "test1": 15, "test2": 15, "test3": 15, "test4": 15}


def _coos7_condition(rng: np.random.Generator, split: str, reference: Optics) -> tuple[Optics, float]:
    """Acquisition and protein-expression factor of a split, drifting further from train."""
    optics = _plate_optics(rng, reference)
    expression = float(rng.lognormal(0, 0.25))
    if split == "test2":  # new plates: batch intensity and illumination drift
        optics = replace(
            optics,
            scales=tuple(s * f for s, f in zip(optics.scales, (0.7, 1.35))),
            background_scale=optics.background_scale * 1.3,
            gradient=optics.gradient + 0.15,
        )
    elif split == "test3":  # another microscope: blur, noisier camera, other background
        optics = replace(
            optics,
            blur=1.6,
            gain=optics.gain * 4,
            read_noise=optics.read_noise * 3,
            background_scale=optics.background_scale * 1.8,
            vignetting=0.45,
        )
    elif split == "test4":  # other protein-expression levels (both dimmer and brighter)
        expression *= float(rng.choice([0.25, 3.0]))
    return optics, expression


def plan_coos7(root: Path, seed: int, scale: float) -> LayoutPlan:
    rng = np.random.default_rng([seed, 5, 0])
    reference = _batch_optics(rng, 2, gain=1.5, read_noise=6.0)
    cells = []
    for split, base in COOS7_SPLITS.items():
        for loc in COOS7_CLASSES:
            for k in range(_count(base, scale, minimum=2)):
                cells.append((split, loc, k))
    train = [i for i, c in enumerate(cells) if c[0] == "train"]
    test1 = [i for i, c in enumerate(cells) if c[0] == "test1"]
    defects = {
        **_pick_defects(rng, train, ("saturated", "truncated", "empty_file")),
        **_pick_defects(rng, test1, ("blank",)),
    }
    jobs, gt = [], []
    for i, (split, loc, k) in enumerate(cells):
        optics, expression = _coos7_condition(rng, split, reference)
        protein = f"p{COOS7_CLASSES.index(loc)}{k % 3:02d}"
        name = f"{protein}_plate{1 + k // 8:02d}_{k:04d}"
        folder = root / split / loc
        job = CellJob(
            seed=(seed, 5, i),
            organism="mouse",
            pattern=COOS7_PATTERN.get(loc, loc),
            protein_level=expression,
            levels=((400.0, 3000.0), (350.0, 5000.0)),
            optics=optics,
            fmt="tiff16",
            paths=(str(folder / f"{name}_protein.tif"), str(folder / f"{name}_nucleus.tif")),
            defect=defects.get(i, ""),
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
    return LayoutPlan(jobs, {}, gt, len(jobs))


# (compound, MOA, potency, concentrations in µM) — two doses each
SYNTHETIC_COMPOUNDS = (
    ("nocodazole", "Microtubule destabilizers", 1.0, (0.3, 1.0)),
    ("colchicine", "Microtubule destabilizers", 0.9, (0.1, 0.3)),
    ("cytochalasin D", "Actin disruptors", 1.0, (0.3, 1.0)),
    ("etoposide", "DNA damage", 0.9, (10.0, 30.0)),
    ("cycloheximide", "Protein synthesis", 0.9, (10.0, 30.0)),
    ("AZ841", "Aurora kinase inhibitors", 0.9, (0.3, 1.0)),
)


SYNTHETIC_SIRNAS = {
    "s1011": ("TUBB", 1.0),
    "s1012": ("TUBB", 0.8),
    "s2021": ("LMNA", 1.0),
    "s2022": ("LMNA", 0.8),
    "s3031": ("CCNB1", 1.0),
    "s3032": ("CCNB1", 0.8),
}


SYNTHETIC_CELL_TYPES = ("u2os", "hepg2", "huvec", "nih3t3")
# Image formats of fluorescence images, cycled: (format, stains)
SYNTHETIC_VARIANTS = (
    ("tiff16", ("dna", "actin", "tubulin")),
    ("png8", ("dna", "mitochondria", "er")),
    ("stack16", ("dna", "actin", "tubulin")),
    ("tiff16", ("dna", "actin", "tubulin")),
    ("png8", ("dna", "mitochondria", "er")),
    ("png8", ("mitochondria",)),
)


SYNTHETIC_LEVELS16 = {
    "dna": (500.0, 5000.0),
    "actin": (800.0, 2800.0),
    "tubulin": (900.0, 3200.0),
    "brightfield": (0.0, 20000.0),
}


SYNTHETIC_LEVELS8 = {"dna": (5.0, 120.0), "mitochondria": (6.0, 110.0), "er": (6.0, 100.0), "brightfield": (0.0, 140.0)}


SYNTHETIC_N_PLATES = 8  # plate p belongs to batch (p - 1) // 2 + 1


def _synthetic_conditions(scale: float) -> list[dict]:
    """Treatment groups with their image counts (before spreading over plates)."""
    conds = []
    for compound, moa, potency, concs in SYNTHETIC_COMPOUNDS:
        for j, conc in enumerate(concs):
            conds.append(
                dict(
                    kind="compound",
                    compound=compound,
                    phenotype=moa,
                    concentration=conc,
                    effect=moa_effect(moa, dose_strength(j + 1, len(concs) + 1, potency)),
                    n=_count(18, scale),
                )
            )
    conds.append(
        dict(
            kind="compound",
            compound="DMSO",
            phenotype="",
            concentration=0.0,
            effect=NEUTRAL,
            n=_count(48, scale, minimum=6),
        )
    )
    for sirna, (gene, eff) in SYNTHETIC_SIRNAS.items():
        conds.append(dict(kind="sirna", sirna=sirna, gene=gene, effect=_gene_effect(gene, eff), n=_count(18, scale)))
    conds.append(dict(kind="brightfield", effect=NEUTRAL, n=_count(24, scale, minimum=2)))
    return conds


def plan_synthetic(root: Path, seed: int, scale: float, size: int) -> LayoutPlan:
    rng = np.random.default_rng([seed, 6, 0])
    batches = {b: _batch_optics(rng, 3, gain=2.0, read_noise=8.0) for b in range(1, SYNTHETIC_N_PLATES // 2 + 1)}
    plates = {p: _plate_optics(rng, batches[(p - 1) // 2 + 1]) for p in range(1, SYNTHETIC_N_PLATES + 1)}
    images: list[dict] = []
    for cond in _synthetic_conditions(scale):
        for _ in range(cond["n"]):
            images.append(
                dict(
                    cond,
                    plate=1 + (len(images) % SYNTHETIC_N_PLATES),
                    cell_type=SYNTHETIC_CELL_TYPES[int(rng.integers(len(SYNTHETIC_CELL_TYPES)))],
                )
            )
    # Wells: images of one condition on one plate share wells; more sites per well at larger
    # scales so the 308 wells of a plate always suffice.
    sites_per_well = 3 * math.ceil(scale)
    well_of: dict[tuple, str] = {}
    free = {p: list(rng.permutation(_wells("BCDEFGHIJKLMNO", range(2, 24)))) for p in plates}
    site_count: dict[tuple, int] = {}
    variants = 0
    dmso = [i for i, im in enumerate(images) if im.get("compound") == "DMSO"]
    defects = _pick_defects(rng, dmso, ("blank", "saturated", "binary", "text", "truncated", "empty_file"))
    jobs, gt, rows = [], [], [list(NATIVE_COLUMNS)]
    for i, im in enumerate(images):
        group = (im["plate"], im.get("compound"), im.get("concentration"), im.get("sirna"), im["kind"], im["cell_type"])
        site_count[group] = site_count.get(group, 0) + 1
        key = group + ((site_count[group] - 1) // sites_per_well,)
        if key not in well_of:
            well_of[key] = str(free[im["plate"]].pop())
        well, site = well_of[key], (site_count[group] - 1) % sites_per_well + 1
        plate = f"plate{im['plate']:02d}"
        image_id = f"{plate}_{well}_s{site}"
        if im["kind"] == "brightfield":
            fmt, stains = ("tiff16" if i % 2 else "png8"), ("brightfield",)
        else:
            fmt, stains = SYNTHETIC_VARIANTS[variants % len(SYNTHETIC_VARIANTS)]
            variants += 1
        defect = defects.get(i, "")
        if defect in FILE_DEFECTS and fmt != "tiff16":  # file defects belong to per-channel TIFFs
            fmt, stains = "tiff16", ("dna", "actin", "tubulin")
        ext = "png" if fmt == "png8" else "tif"
        folder = root / "images" / plate
        paths = (
            (str(folder / f"{image_id}_stack.tif"),)
            if fmt == "stack16"
            else tuple(str(folder / f"{image_id}_{s}.{ext}") for s in stains)
        )
        levels = SYNTHETIC_LEVELS8 if fmt == "png8" else SYNTHETIC_LEVELS16
        base_optics = plates[im["plate"]]
        optics = replace(base_optics, gain=0.3, read_noise=0.8, max_value=255) if fmt == "png8" else base_optics
        job = FieldJob(
            seed=(seed, 6, i),
            size=size,
            cell_type=im["cell_type"],
            effect=im["effect"],
            stains=stains,
            levels=tuple(levels[s] for s in stains),
            optics=optics,
            fmt=fmt,
            paths=paths,
            defect=defect,
            text=f"{plate} {well}\nsite {site}",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
        ct = CELL_TYPES[im["cell_type"]]
        bright = im["kind"] == "brightfield"
        rows.append(
            [
                image_id,
                ";".join(Path(p).relative_to(root).as_posix() for p in paths),
                "|".join(stains),
                ct.organism,
                ct.name,
                "" if bright else "|".join(VISIBLE[s] for s in stains),
                im.get("phenotype", ""),
                im.get("compound", ""),
                _format_concentration(im["concentration"]) if "concentration" in im else "",
                im.get("sirna", ""),
                im.get("gene", ""),
                "brightfield" if bright else "fluorescence",
                plate,
                well,
                f"batch{(im['plate'] - 1) // 2 + 1}",
            ]
        )
    return LayoutPlan(jobs, {"metadata.csv": rows}, gt, len(jobs))
