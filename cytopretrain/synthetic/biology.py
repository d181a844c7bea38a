"""The hidden factors of the demo collection: cell types, compound and gene effects, dose responses,
stains and protein localization patterns."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CellType:
    name: str
    organism: str
    radius: float  # cell-body radius in pixels of a 256-px field (or of a crop)
    aspect: float  # major / minor axis
    nuclear_ratio: float  # nucleus radius / cell radius
    density: float  # mean cells per field
    clustering: float  # 0 = scattered, 1 = colonies
    irregularity: float  # amplitude of the boundary harmonics


CELL_TYPES: dict[str, CellType] = {
    c.name: c
    for c in (
        CellType("mcf7", "human", 17, 1.3, 0.52, 38, 0.6, 0.12),
        CellType("hepg2", "human", 15, 1.2, 0.55, 44, 0.8, 0.10),
        CellType("huvec", "human", 21, 2.6, 0.36, 22, 0.1, 0.14),
        CellType("rpe", "human", 19, 1.3, 0.42, 30, 0.3, 0.10),
        CellType("u2os", "human", 25, 1.7, 0.36, 17, 0.1, 0.22),
        CellType("nih3t3", "mouse", 21, 2.1, 0.38, 20, 0.2, 0.20),
    )
}


# Single-cell crops: radius in crop pixels (independent of image_size).
YEAST = CellType("yeast", "yeast", 10.5, 1.12, 0.36, 0, 0.0, 0.04)
MOUSE_CROP = CellType("mouse", "mouse", 21, 1.35, 0.42, 0, 0.0, 0.16)


@dataclass(frozen=True)
class Effect:
    """Phenotype parameters; the neutral value of each field is its default."""

    cell_scale: float = 1.0
    nuclear_scale: float = 1.0
    elongation: float = 1.0
    density: float = 1.0
    cytoplasm: float = 1.0
    actin: float = 1.0
    tubulin: float = 1.0
    mitochondria: float = 1.0
    roundness: float = 0.0
    multinucleate: float = 0.0
    mitotic: float = 0.0
    chromatin_spots: float = 0.0
    nuclear_irregularity: float = 0.0
    actin_fragmentation: float = 0.0
    tubulin_diffusion: float = 0.0
    vesicles: float = 0.0


NEUTRAL = Effect()


def effect_of(deltas: dict[str, float], strength: float) -> Effect:
    """Scale factors become 1 + delta*strength, additive factors delta*strength."""
    values = {}
    for f in fields(Effect):
        if f.name in deltas:
            change = deltas[f.name] * strength
            values[f.name] = max(0.05, 1.0 + change) if f.default == 1.0 else min(max(change, 0.0), 1.0)
    return Effect(**values)


# MOA -> parameter change at full strength.
MOA_EFFECTS: dict[str, dict[str, float]] = {
    "DMSO": {},
    "Microtubule destabilizers": {"tubulin_diffusion": 0.9, "roundness": 0.7, "cell_scale": -0.25, "mitotic": 0.35},
    "Actin disruptors": {"actin_fragmentation": 1.0, "cell_scale": -0.15, "nuclear_irregularity": 0.2},
    "DNA damage": {"nuclear_scale": 0.3, "chromatin_spots": 1.0, "cell_scale": 0.25, "density": -0.4},
    "Protein synthesis": {"cytoplasm": -0.65, "cell_scale": -0.1},
    "Aurora kinase inhibitors": {"multinucleate": 0.85, "cell_scale": 0.45, "nuclear_scale": 0.2, "density": -0.45},
    "Kinase inhibitors": {"elongation": 0.9, "actin": 0.5},
    "Cholesterol-lowering": {"vesicles": 1.0, "mitochondria": 0.3},
}


# Knockdown of a gene at full efficiency: subtle, consistent changes.
GENE_EFFECTS: dict[str, dict[str, float]] = {
    "TUBB": {"tubulin": -0.3},
    "ACTB": {"actin": -0.3},
    "LMNA": {"nuclear_irregularity": 0.35},
    "CCNB1": {"nuclear_scale": 0.15, "cell_scale": 0.1},
    "PLK1": {"mitotic": 0.25, "roundness": 0.2},
    "MFN2": {"mitochondria": 0.4},
}


def moa_effect(moa: str, strength: float) -> Effect:
    return effect_of(MOA_EFFECTS[moa], strength)


def dose_strength(dose_index: int, n_doses: int, potency: float) -> float:
    """Effect strength for the dose_index-th of n log-spaced doses: linear in log-dose."""
    return potency * (dose_index + 1) / n_doses


# Stain -> weighted structures.
STAINS: dict[str, dict[str, float]] = {
    "dna": {"dna": 1.0},
    "actin": {"actin": 1.0},
    "tubulin": {"tubulin": 1.0},
    "mitochondria": {"mitochondria": 1.0, "cytoplasm": 0.08},
    "er": {"er": 1.0, "cytoplasm": 0.12},
    "rna": {"nucleoli": 0.9, "cytoplasm": 0.35, "dna": 0.1},
    "golgi_membrane": {"golgi": 0.9, "membrane": 0.55, "cytoplasm": 0.08},
    "brightfield": {"brightfield": 1.0},
}


# Names a stain is published under ("cell_visible" metadata).
VISIBLE = {
    "dna": "nucleus",
    "actin": "actin",
    "tubulin": "microtubules",
    "mitochondria": "mitochondria",
    "er": "endoplasmic reticulum",
}


# Protein pattern -> structures (single cells and the HPA green channel).
PATTERNS: dict[str, dict[str, float]] = {
    "cytoplasm": {"cytoplasm": 1.0},
    "nucleus": {"nucleoplasm": 1.0},
    "nucleolus": {"nucleoli": 1.2, "nucleoplasm": 0.08},
    "nuclear_periphery": {"nuclear_rim": 1.0},
    "mitochondria": {"mitochondria": 1.2},
    "er": {"er": 1.0},
    "er_yeast": {"membrane": 0.6, "nuclear_rim": 0.9, "cytoplasm": 0.1},
    "plasma_membrane": {"membrane": 1.0},
    "vacuole": {"vacuole": 1.0},
    "vacuolar_membrane": {"vacuole_rim": 1.0},
    "peroxisomes": {"peroxisomes": 1.3, "cytoplasm": 0.04},
    "budneck": {"budneck": 1.3, "cytoplasm": 0.05},
    "actin_patches": {"membrane": 0.3, "vesicles": 1.0, "budneck": 0.5},
    "spindle": {"spindle": 1.5, "nucleoplasm": 0.06},
    "spindle_pole": {"poles": 1.5, "nucleoplasm": 0.04},
    "speckles": {"speckles": 1.0, "nucleoplasm": 0.1},
    "nuclear_bodies": {"nuclear_bodies": 1.2, "nucleoplasm": 0.08},
    "golgi": {"golgi": 1.2},
    "actin": {"actin": 1.0},
    "microtubules": {"tubulin": 1.0},
    "centrosome": {"centrosome": 1.4, "cytoplasm": 0.05},
    "cytoplasmic_bodies": {"cyto_bodies": 1.3, "cytoplasm": 0.08},
}


def _protein_recipe(stain: str) -> dict[str, float]:
    """``protein:a+b`` -> the summed recipes of patterns a and b (HPA multi-label green)."""
    recipe: dict[str, float] = {}
    for part in stain.removeprefix("protein:").split("+"):
        for name, weight in PATTERNS[part].items():
            recipe[name] = recipe.get(name, 0.0) + weight
    return recipe
