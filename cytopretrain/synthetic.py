"""The embedded default dataset: a deterministic, seeded synthetic microscopy collection.

:func:`generate_collection` renders fluorescence-like fields of view (and a few brightfield
ones) plus single-cell crops, and writes them in the layouts of six real sources so the
workflow's adapters, curation, quality control and transfer evaluations have realistic work
without a network:

========== ==================================================== ===========================
layout     what                                                 images at ``scale=1``
========== ==================================================== ===========================
bbbc021    MCF7 fields, DAPI / Tubulin / Actin, 16-bit TIFF;    280 fields (140 wells x 2
           4 weeks x 2 plates; 18 compounds of 7 MOAs at 3-4    sites)
           doses (58 treatments x 2 replicate wells) + 3 DMSO
           wells per plate
rxrx1      HEPG2 / HUVEC / RPE / U2OS, 6 channels, 8-bit PNG;   96 fields (8 experiments x
           6 train + 2 test experiments; siRNAs + controls      1 plate x 6 wells x 2 sites)
hpa        4 stains, 8-bit PNG, 14 renderable HPA classes,      120 fields
           1-3 labels per image
cyclops    yeast single cells, gfp + rfp, 64x64 float32 TIFF;   380 cells (14 labels x 25,
           16 labels incl. DEAD, GHOST, SPINDLE, SPINDLEPOLE     DEAD and GHOST x 15)
coos7      mouse single cells, protein + nucleus, 64x64 uint16; 770 cells (7 classes x
           train + test1..test4                                 (50 + 4 x 15))
synthetic  native layout: 16-bit TIFF, multi-page TIFF, 8-bit   396 fields: 6 compounds x 36,
           PNG, brightfield; 4 cell types (3 human, 1 mouse);   48 DMSO, 3 genes x 36 (6
           8 plates in 4 batches                                siRNAs x 18), 24 brightfield
========== ==================================================== ===========================

That is 892 fields of ``image_size`` pixels and 1150 single-cell crops (always 64x64).
``scale`` multiplies the images per design cell (sites per well, plates per experiment,
images per class or condition); the design itself (treatments, classes, plates) is fixed, so
small scales bottom out at one image per design cell (two per single-cell class).

Hidden factors drive the pixels: cell type (size, elongation, nuclear ratio, density,
clustering), compound -> MOA with an effect that grows linearly with log-dose, siRNA -> gene
knockdown (subtle), protein localization (single cells), and per-batch / per-plate intensity
scale, background and illumination (vignetting + plane gradient), so not-same-compound and
not-same-batch evaluations are meaningful.  Noise is shot noise (Gaussian approximation of
Poisson, accurate at these counts) plus read noise.

Defective images are written on purpose (blank, saturated, binary mask, burned-in annotation
text, truncated TIFF, zero-byte TIFF, and the missing w5/w6 files of one RxRx1 site).  They
stay listed in the layouts' own metadata like real defects; ``<out>/ground_truth.csv``
(columns layout, path, defect, then the lettering's box x_min, y_min, x_max, y_max in pixels
for text; path relative to the layout root, one row per affected file)
records them and is not part of any layout.

Every image is rendered from its own random stream derived from (seed, layout, image index),
so the output bytes do not depend on ``workers``; zip entries carry a fixed timestamp.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from cytopretrain.sources.synthetic import NATIVE_COLUMNS
from cytopretrain.tables import atomic_path

LAYOUTS = ("bbbc021", "rxrx1", "hpa", "cyclops", "coos7", "synthetic")
GROUND_TRUTH_COLUMNS = ("layout", "path", "defect", "x_min", "y_min", "x_max", "y_max")
NO_BOX = ("",) * 4  # ground-truth box columns of defects other than text
DEFECT_KINDS = ("blank", "saturated", "binary", "text", "truncated", "empty_file", "missing")
CROP_SIZE = 64
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Biology: cell types, perturbation effects
# --------------------------------------------------------------------------------------------


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


def _effect(deltas: dict[str, float], strength: float) -> Effect:
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
    return _effect(MOA_EFFECTS[moa], strength)


def dose_strength(dose_index: int, n_doses: int, potency: float) -> float:
    """Effect strength for the dose_index-th of n log-spaced doses: linear in log-dose."""
    return potency * (dose_index + 1) / n_doses


# --------------------------------------------------------------------------------------------
# Rendering: cell geometry and stained structures
# --------------------------------------------------------------------------------------------


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth noise of spatial scale sigma with unit standard deviation (about Gaussian)."""
    sigma = max(sigma, 0.5)
    # Uniform white noise is cheaper to draw than normal; after smoothing it is near Gaussian.
    white = rng.random(shape, dtype=np.float32) - np.float32(0.5)
    gain = np.float32(2.0 * math.sqrt(math.pi) * sigma * math.sqrt(12.0))
    return ndimage.gaussian_filter(white, sigma, mode="wrap", truncate=3.0) * gain


def _soft_inside(d: np.ndarray, width: float) -> np.ndarray:
    """~1 where a normalised distance d < 1, ~0 outside, with a soft edge."""
    return (1.0 / (1.0 + np.exp(np.clip((d - 1.0) / width, -30, 30)))).astype(np.float32)


def _ring(d: np.ndarray, width: float, at: float = 1.0) -> np.ndarray:
    return np.exp(-(((d - at) / width) ** 2)).astype(np.float32)


def _ramp(x: np.ndarray, low: float, width: float) -> np.ndarray:
    return np.clip((x - low) / width, 0.0, 1.0)


@dataclass
class _Shape:
    """One ellipse with a perturbed boundary: centre, semi-axes, orientation, harmonics."""

    cx: float
    cy: float
    su: float
    sv: float
    theta: float
    harmonics: tuple[tuple[int, float, float], ...]

    def patch(self, size: int, margin: float):
        """Normalised distance (1 on the boundary) over the bounding box of the shape.

        Returns (box, d, v, phi): v is the coordinate across the long axis in pixels, phi
        the polar angle in the shape's frame.
        """
        grow = (1.0 + sum(h[1] for h in self.harmonics)) * margin
        c, s = math.cos(self.theta), math.sin(self.theta)
        half_x = math.hypot(self.su * c, self.sv * s) * grow + 2.0
        half_y = math.hypot(self.su * s, self.sv * c) * grow + 2.0
        x0, x1 = max(0, int(self.cx - half_x)), min(size, int(self.cx + half_x) + 2)
        y0, y1 = max(0, int(self.cy - half_y)), min(size, int(self.cy + half_y) + 2)
        if x0 >= x1 or y0 >= y1:
            return None
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(self.cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(self.cy)
        u = dx * np.float32(c) + dy * np.float32(s)
        v = dy * np.float32(c) - dx * np.float32(s)
        un, vn = u / np.float32(self.su), v / np.float32(self.sv)
        phi = np.arctan2(vn, un)
        boundary = np.ones_like(phi)
        for k, a, p in self.harmonics:
            boundary += np.float32(a) * np.cos(k * phi + np.float32(p))
        return (slice(y0, y1), slice(x0, x1)), np.hypot(un, vn) / boundary, v, phi


def _harmonics(rng: np.random.Generator, amplitude: float) -> tuple[tuple[int, float, float], ...]:
    amps = rng.uniform(0.3, 1.0, 3) * amplitude / np.array([1.0, 1.6, 2.4])
    return tuple((k, float(a), float(rng.uniform(0, 2 * math.pi))) for k, a in zip((2, 3, 5), amps))


class Field:
    """A field of view (or a crop) of cells: geometry plus lazily built structure maps.

    Structure maps are float32 images of roughly unit brightness (nucleus, actin, ...);
    a stain is a weighted sum of structures; :func:`acquire` turns it into camera counts.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        size: int,
        cell_type: CellType,
        effect: Effect = NEUTRAL,
        px_scale: float | None = None,
        centred: bool = False,
        yeast: bool = False,
        force_bud: bool = False,
    ) -> None:
        self.rng = rng
        self.size = size
        self.cell_type = cell_type
        self.effect = effect
        self.px = size / 256.0 if px_scale is None else px_scale
        self.yeast = yeast
        self._cache: dict[str, np.ndarray] = {}
        shape = (size, size)
        self.best_d = np.full(shape, 9.0, np.float32)
        self.owner = np.full(shape, -1, np.int32)
        self.frame_v = np.zeros(shape, np.float32)
        self.frame_phi = np.zeros(shape, np.float32)
        self.nuc_d = np.full(shape, 9.0, np.float32)
        self.nuc_owner = np.full(shape, -1, np.int32)
        self.vac_d = np.full(shape, 9.0, np.float32)
        self.points: dict[str, list[tuple[float, float]]] = {
            k: [] for k in ("nucleoli", "golgi", "centrosome", "bodies", "peroxisomes", "budneck", "spindle", "poles")
        }
        self.cyto_gain: list[float] = []
        self.dna_gain: list[float] = []
        centres = self._centres(centred)
        for i, (cx, cy) in enumerate(centres):
            self._add_cell(cx, cy, bud=force_bud and i == 0)

    # -- geometry ------------------------------------------------------------------------------

    def _centres(self, centred: bool) -> np.ndarray:
        rng, ct, size = self.rng, self.cell_type, self.size
        radius = ct.radius * self.px * self.effect.cell_scale
        if centred:
            # The crop's own cell in the middle, a few neighbours cut by the crop edge.
            n_neigh = int(rng.integers(1, 4))
            angles = rng.uniform(0, 2 * math.pi, n_neigh)
            dist = radius * rng.uniform(2.1, 2.6, n_neigh)
            neigh = np.stack([size / 2 + dist * np.cos(angles), size / 2 + dist * np.sin(angles)], 1)
            return np.vstack([[[size / 2 + rng.normal(0, 0.7), size / 2 + rng.normal(0, 0.7)]], neigh])
        n = max(2, int(rng.poisson(ct.density * self.effect.density)))
        lo, hi = -0.5 * radius, size + 0.5 * radius
        n_colonies = max(1, n // 6)
        colonies = rng.uniform(lo, hi, (n_colonies, 2))
        clustered = colonies[rng.integers(n_colonies, size=3 * n)] + rng.normal(0, 2.2 * radius, (3 * n, 2))
        scattered = rng.uniform(lo, hi, (3 * n, 2))
        candidates = np.where((rng.random(3 * n) < ct.clustering)[:, None], clustered, scattered)
        kept: list[np.ndarray] = []
        min_dist = 1.1 * radius
        for p in candidates:
            if len(kept) == n:
                break
            if kept and np.min(np.hypot(*(np.asarray(kept) - p).T)) < min_dist:
                continue
            kept.append(p)
        return np.asarray(kept)

    def _add_cell(self, cx: float, cy: float, bud: bool) -> None:
        rng, ct, eff = self.rng, self.cell_type, self.effect
        index = len(self.cyto_gain)
        mitotic = rng.random() < (0.03 + eff.mitotic) and not self.yeast
        radius = ct.radius * self.px * eff.cell_scale * float(rng.lognormal(0, 0.13))
        aspect = 1.0 + (ct.aspect * eff.elongation - 1.0) * (1.0 - eff.roundness) * float(rng.lognormal(0, 0.2))
        if mitotic:
            radius, aspect = radius * 0.7, 1.05
        aspect = max(aspect, 1.0)
        theta = float(rng.uniform(0, math.pi))
        cell = _Shape(cx, cy, radius * math.sqrt(aspect), radius / math.sqrt(aspect), theta,
                      _harmonics(rng, ct.irregularity * (0.4 if mitotic else 1.0)))
        self._claim_cell(cell, index)
        self.cyto_gain.append(float(rng.lognormal(0, 0.22)) * eff.cytoplasm)
        self.dna_gain.append(float(rng.lognormal(0, 0.15)) * (1.8 if mitotic else 1.0))
        direction = float(rng.uniform(0, 2 * math.pi))
        nuclei = self._add_nuclei(cell, index, radius, mitotic)
        if self.yeast:
            self._add_vacuole(cell, nuclei[0], radius)
            self._add_peroxisomes(cell, 2, 5)
            if bud or rng.random() < 0.35:
                self._add_bud(cell, nuclei[0], radius)
            return
        ncx, ncy, rn = nuclei[0]
        self.points["golgi"].append((ncx + 1.5 * rn * math.cos(direction), ncy + 1.5 * rn * math.sin(direction)))
        for t in (direction, direction + 0.5):
            self.points["golgi"].append((ncx + 1.25 * rn * math.cos(t), ncy + 1.25 * rn * math.sin(t)))
        self.points["centrosome"].append((ncx + 1.15 * rn * math.cos(direction + 0.3), ncy + 1.15 * rn * math.sin(direction + 0.3)))
        self._add_peroxisomes(cell, 3, 8)
        self._scatter(cell, "bodies", int(rng.integers(0, 3)), 0.55, 0.85)

    def _claim_cell(self, cell: _Shape, index: int) -> None:
        """Write the cell into the z-buffer: a pixel belongs to the cell nearest in d."""
        patch = cell.patch(self.size, 1.3)
        if patch is None:
            return
        box, d, v, phi = patch
        take = (d < self.best_d[box]) & (d < 1.3)
        self.best_d[box][take] = d[take]
        self.owner[box][take] = index
        self.frame_v[box][take] = v[take]
        self.frame_phi[box][take] = phi[take]

    def _add_nuclei(self, cell: _Shape, index: int, radius: float, mitotic: bool) -> list[tuple[float, float, float]]:
        rng, ct, eff = self.rng, self.cell_type, self.effect
        multi = (not mitotic) and (not self.yeast) and rng.random() < eff.multinucleate
        count = int(rng.integers(2, 5)) if multi else 1
        rn_base = radius * ct.nuclear_ratio * eff.nuclear_scale * float(rng.lognormal(0, 0.08))
        rn_base = min(rn_base, 0.85 * radius) * (0.75 if multi else 1.0) * (0.75 if mitotic else 1.0)
        out = []
        for k in range(count):
            spread = 0.45 if multi else 0.2
            if self.yeast:
                offset = 0.35 * radius
                t = float(rng.uniform(0, 2 * math.pi))
                ncx, ncy = cell.cx + offset * math.cos(t), cell.cy + offset * math.sin(t)
            else:
                along = rng.uniform(-spread, spread) * cell.su
                across = rng.uniform(-0.5 * spread, 0.5 * spread) * cell.sv
                c, s = math.cos(cell.theta), math.sin(cell.theta)
                ncx, ncy = cell.cx + along * c - across * s, cell.cy + along * s + across * c
            rn = rn_base * float(rng.lognormal(0, 0.06))
            n_aspect = 1.0 + abs(rng.normal(0, 0.18))
            irregular = 0.03 + 0.25 * eff.nuclear_irregularity
            nucleus = _Shape(ncx, ncy, rn * math.sqrt(n_aspect), rn / math.sqrt(n_aspect),
                             cell.theta + rng.normal(0, 0.3), _harmonics(rng, irregular))
            patch = nucleus.patch(self.size, 1.3)
            if patch is not None:
                box, d, _, _ = patch
                take = d < self.nuc_d[box]
                self.nuc_d[box][take] = d[take]
                self.nuc_owner[box][take] = index
            self._scatter(nucleus, "nucleoli", int(rng.integers(1, 4)), 0.0, 0.5)
            out.append((ncx, ncy, rn))
        return out

    def _add_vacuole(self, cell: _Shape, nucleus: tuple[float, float, float], radius: float) -> None:
        ncx, ncy, _ = nucleus
        away = math.atan2(cell.cy - ncy, cell.cx - ncx)
        rv = radius * float(self.rng.uniform(0.38, 0.5))
        vac = _Shape(cell.cx + 0.3 * radius * math.cos(away), cell.cy + 0.3 * radius * math.sin(away),
                     rv, rv * 0.92, float(self.rng.uniform(0, math.pi)), _harmonics(self.rng, 0.04))
        patch = vac.patch(self.size, 1.3)
        if patch is not None:
            box, d, _, _ = patch
            np.minimum(self.vac_d[box], d, out=self.vac_d[box])

    def _add_bud(self, mother: _Shape, nucleus: tuple[float, float, float], radius: float) -> None:
        rng = self.rng
        t = float(rng.uniform(0, 2 * math.pi))
        rb = radius * float(rng.uniform(0.45, 0.7))
        dist = radius * 0.95 + 0.6 * rb
        bud = _Shape(mother.cx + dist * math.cos(t), mother.cy + dist * math.sin(t), rb, rb * 0.92, t,
                     _harmonics(rng, 0.03))
        self._claim_cell(bud, len(self.cyto_gain))
        self.cyto_gain.append(self.cyto_gain[-1])
        self.dna_gain.append(0.0)
        neck_x, neck_y = mother.cx + 0.97 * radius * math.cos(t), mother.cy + 0.97 * radius * math.sin(t)
        for w in (-0.35, 0.0, 0.35):
            self.points["budneck"].append((neck_x - w * rb * math.sin(t), neck_y + w * rb * math.cos(t)))
        ncx, ncy, rn = nucleus
        # A short spindle through the nucleus pointing at the bud, poles at its ends.
        ends = [(ncx + e * rn * math.cos(t), ncy + e * rn * math.sin(t)) for e in (-0.9, 0.9)]
        for f in np.linspace(0.0, 1.0, 7):
            self.points["spindle"].append((ends[0][0] + f * (ends[1][0] - ends[0][0]), ends[0][1] + f * (ends[1][1] - ends[0][1])))
        self.points["poles"].extend(ends)

    def _add_peroxisomes(self, cell: _Shape, low: int, high: int) -> None:
        self._scatter(cell, "peroxisomes", int(self.rng.integers(low, high + 1)), 0.3, 0.85)

    def _scatter(self, cell: _Shape, kind: str, count: int, r_low: float, r_high: float) -> None:
        """``count`` points at random inside the cell's ellipse (between two radii)."""
        t = self.rng.uniform(0, 2 * math.pi, count)
        rr = self.rng.uniform(r_low, r_high, count)
        u, v = rr * cell.su * np.cos(t), rr * cell.sv * np.sin(t)
        c, s = math.cos(cell.theta), math.sin(cell.theta)
        self.points[kind].extend(zip((cell.cx + u * c - v * s).tolist(), (cell.cy + u * s + v * c).tolist()))

    # -- structure maps --------------------------------------------------------------------------

    def n(self, sigma: float) -> np.ndarray:
        """Fresh unit-variance smooth noise; sigma in pixels of a 256-px field."""
        return _noise(self.rng, (self.size, self.size), sigma * self.px)

    def _points(self, name: str, sigma: float) -> np.ndarray:
        image = np.zeros((self.size, self.size), np.float32)
        pts = np.asarray(self.points[name], dtype=np.float64).reshape(-1, 2)
        xy = np.rint(pts).astype(int)
        inside = (xy >= 0).all(1) & (xy < self.size).all(1)
        np.add.at(image, (xy[inside, 1], xy[inside, 0]), 1.0)
        s = sigma * self.px
        return ndimage.gaussian_filter(image, s, truncate=3.0) * np.float32(2 * math.pi * s * s)

    def _per_cell(self, gains: list[float], owner: np.ndarray) -> np.ndarray:
        table = np.asarray(gains + [0.0], dtype=np.float32)
        return table[owner]  # owner -1 picks the trailing 0

    def structure(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = getattr(self, f"_s_{name}")().astype(np.float32, copy=False)
        return self._cache[name]

    def _s_cell_d(self):
        # Smooth noise on the distance ruffles the cell edge (lamellipodia, blebs).
        return self.best_d + 0.07 * self.n(3)

    def _s_body(self):
        return _soft_inside(self.structure("cell_d"), 0.04)

    def _s_nucleus(self):
        return _soft_inside(self.nuc_d, 0.05)

    def _s_nuc_gain(self):
        return self._per_cell(self.dna_gain, self.nuc_owner)

    def _s_cyto_gain(self):
        return self._per_cell(self.cyto_gain, self.owner)

    def _s_vacuole(self):
        return _soft_inside(self.vac_d, 0.06)

    def _s_vacuole_rim(self):
        return _ring(self.vac_d, 0.09)

    def _s_dna(self):
        nucleus, gain = self.structure("nucleus"), self.structure("nuc_gain")
        threshold = 2.0 - 0.9 * self.effect.chromatin_spots
        spots = _ramp(self.n(0.9), threshold, 0.3)
        return nucleus * gain * (0.85 + 0.1 * self.n(1.5) + 0.9 * spots)

    def _s_nucleoplasm(self):
        return self.structure("nucleus") * (0.9 + 0.1 * self.n(1.5)) * (1.0 - 0.8 * self.structure("nucleoli"))

    def _s_nucleoli(self):
        blobs = self._points("nucleoli", 1.5) * (0.8 + 0.2 * np.clip(self.n(0.8), -1, 1))
        return self.structure("nucleus") * np.minimum(blobs, 1.2)

    def _s_nuclear_rim(self):
        return _ring(self.nuc_d, 0.08)

    def _s_speckles(self):
        return self.structure("nucleus") * _ramp(self.n(0.9), 1.1, 0.4)

    def _s_nuclear_bodies(self):
        return self.structure("nucleus") * _ramp(self.n(1.2), 1.9, 0.3)

    def _s_cytoplasm(self):
        c = self.structure("body") * self.structure("cyto_gain") * (0.85 + 0.12 * self.n(4))
        c = c * (1.0 - 0.45 * self.structure("nucleus"))
        if self.yeast:
            c = c * (1.0 - 0.8 * self.structure("vacuole"))
        return c

    def _s_actin(self):
        eff = self.effect
        base = self.structure("body") * self.structure("cyto_gain") * eff.actin
        rim = _ring(self.structure("cell_d"), 0.08, at=0.96)
        # Stress fibres: thin wavy lines along the cell's long axis, present in patches.
        wavelength = 5.0 * max(self.px, 0.5)
        stripes = (0.5 + 0.5 * np.cos(2 * math.pi * self.frame_v / wavelength + 3.0 * self.n(8))) ** 10
        fibres = stripes * _ramp(self.n(6), -0.2, 1.0)
        frag = eff.actin_fragmentation
        cortex = 0.35 + 0.1 * self.n(2) + 0.5 * fibres + 0.7 * rim
        actin = base * cortex
        if frag > 0:
            aggregates = _ramp(self.n(1.5), 1.4, 0.5)
            actin = actin * (1 - frag) + base * frag * (0.25 + 2.0 * aggregates)
        if eff.vesicles > 0:
            actin = actin + base * eff.vesicles * 1.4 * self.structure("vesicles")
        return actin

    def _s_tubulin(self):
        eff = self.effect
        base = self.structure("body") * self.structure("cyto_gain") * eff.tubulin
        # Microtubules: radial filaments from the centre plus a fine mesh, denser inside.
        radial = (0.5 + 0.5 * np.cos(18 * self.frame_phi + 3.5 * self.n(6))) ** 3
        mesh = np.exp(-((self.n(1.3) / 0.5) ** 2))
        diff = eff.tubulin_diffusion
        filaments = (0.15 + 0.4 * radial + 0.35 * mesh) * (1.25 - 0.45 * np.minimum(self.best_d, 1.0))
        if diff > 0:
            filaments = filaments * (1 - diff) + (0.55 + 0.05 * self.n(2)) * diff
        tub = base * filaments * (1.0 - 0.5 * self.structure("nucleus"))
        return tub + 0.8 * (1 - diff) * self.structure("centrosome")

    def _s_mitochondria(self):
        tubules = np.exp(-((self.n(1.6) / 0.35) ** 2)) * np.clip(self.n(4) + 0.6, 0, 1)
        perinuclear = np.exp(-1.5 * self.best_d) + 0.15
        return (self.structure("body") * self.structure("cyto_gain") * self.effect.mitochondria
                * tubules * perinuclear * (1.0 - 0.8 * self.structure("nucleus")) * 1.6)

    def _s_er(self):
        network = 0.2 + np.exp(-((self.n(1.1) / 0.45) ** 2))
        perinuclear = np.exp(-2.2 * self.best_d) + 0.1
        er = self.structure("body") * self.structure("cyto_gain") * network * perinuclear
        return er * (1.0 - 0.85 * self.structure("nucleus")) * 1.5 + 0.5 * self.structure("nuclear_rim")

    def _s_golgi(self):
        return self._points("golgi", 2.0) * (0.6 + 0.4 * np.clip(self.n(1.0), -1, 1)) * 0.8

    def _s_centrosome(self):
        return self._points("centrosome", 0.9)

    def _s_membrane(self):
        rim = _ring(self.structure("cell_d"), 0.05) * (self.owner >= 0)
        # Contacts between touching cells: owner changes between two pixels inside cells.
        inside = self.structure("cell_d") < 1.0
        boundary = np.zeros(self.owner.shape, np.float32)
        for axis in (0, 1):
            boundary += (self.owner != np.roll(self.owner, 1, axis)) & inside & np.roll(inside, 1, axis)
        boundary = ndimage.gaussian_filter(boundary, 0.7, truncate=3.0) * 2.0
        return np.clip(rim + boundary, 0, 1.2) * (0.8 + 0.2 * np.clip(self.n(2), -1, 1))

    def _s_vesicles(self):
        return self.structure("body") * (1 - self.structure("nucleus")) * _ramp(self.n(0.9), 1.6, 0.4)

    def _s_cyto_bodies(self):
        return self._points("bodies", 1.6)

    def _s_peroxisomes(self):
        return self._points("peroxisomes", 0.8)

    def _s_budneck(self):
        return self._points("budneck", 1.0)

    def _s_spindle(self):
        return self._points("spindle", 0.8) * 0.6

    def _s_poles(self):
        return self._points("poles", 0.8)

    def _s_brightfield(self):
        """Phase-like contrast: dark cell edge, bright halo outside, faint interior texture."""
        d = self.structure("cell_d")
        body = self.structure("body")
        edge = _ring(d, 0.06)
        halo = _ring(d, 0.08, at=1.14) * (d > 1.0)
        return (1.0 - 0.35 * edge + 0.22 * halo + body * (0.04 * self.n(2) - 0.03)
                - 0.08 * self.structure("nucleus") - 0.12 * _ring(self.nuc_d, 0.08))

    def stain(self, recipe: dict[str, float]) -> np.ndarray:
        out = np.zeros((self.size, self.size), np.float32)
        for name, weight in recipe.items():
            out += np.float32(weight) * self.structure(name)
        return out


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


# --------------------------------------------------------------------------------------------
# Acquisition: illumination, batch scale, noise, quantisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optics:
    """Per-image acquisition; ``scales`` is the batch x plate intensity factor per channel."""

    scales: tuple[float, ...]
    background_scale: float = 1.0
    vignetting: float = 0.2
    gradient: float = 0.05
    gradient_angle: float = 0.0
    blur: float = 0.7
    gain: float = 2.0  # ADU per photo-electron: shot-noise variance = gain * signal
    read_noise: float = 8.0
    step: int = 1  # quantisation step (16: a 12-bit camera stored in 16 bits)
    max_value: int = 65535


def _illumination(size: int, optics: Optics) -> np.ndarray:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    x, y = coords[None, :], coords[:, None]
    radial = 1.0 - optics.vignetting * 2.0 * (x * x + y * y)
    plane = 1.0 + optics.gradient * 2.0 * (x * math.cos(optics.gradient_angle) + y * math.sin(optics.gradient_angle))
    return (radial * plane).astype(np.float32)


def acquire(
    rng: np.random.Generator,
    signal: np.ndarray,
    background: float,
    amplitude: float,
    optics: Optics,
    channel: int,
    illumination: np.ndarray,
) -> np.ndarray:
    """Expected counts -> noisy, quantised counts (float, clipped to the camera range)."""
    if optics.blur > 0:
        signal = ndimage.gaussian_filter(signal, optics.blur, truncate=3.0)
    expected = (background * optics.background_scale + amplitude * signal) * illumination * optics.scales[channel]
    expected = np.maximum(expected, 0.0)
    std = np.sqrt(optics.gain * expected + optics.read_noise**2)
    counts = expected + std * rng.standard_normal(expected.shape, dtype=np.float32)
    counts = np.rint(counts / optics.step) * optics.step
    return np.clip(counts, 0, optics.max_value)


# --------------------------------------------------------------------------------------------
# Defects and file writers
# --------------------------------------------------------------------------------------------


def text_overlay(shape: tuple[int, int], text: str) -> np.ndarray:
    """Pixels of annotation lettering (bool, ``shape``), like a chart label burned into a field.

    Its place depends only on the text and the image shape, so the ground truth can state the
    lettering's box (:func:`text_box`) without rendering the field.
    """
    h, w = shape
    digest = zlib.crc32(text.encode())
    x, y = 1 + digest % max(1, w // 6 - 1), 1 + (digest >> 16) % max(1, h // 3 - 1)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    font = ImageFont.load_default(size=max(8, h // 9))
    for line in text.split("\n"):
        draw.text((x, y), line, fill=255, font=font)
        y += max(9, h // 8)
    return np.asarray(mask) > 96


def text_box(shape: tuple[int, int], text: str) -> tuple[int, int, int, int]:
    """(x_min, y_min, x_max, y_max), half-open: the smallest box holding the lettering."""
    rows, cols = np.nonzero(text_overlay(shape, text))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def apply_defect(planes: list[np.ndarray], defect: str, max_value: float, text: str = "") -> list[np.ndarray]:
    """Pixel defects on all channels of one image (file-level defects are written later)."""
    if defect == "blank":
        return [np.full_like(p, np.round(np.median(p))) for p in planes]
    if defect == "saturated":
        # Overexposed: 99.95 % of the pixels hit the camera maximum.
        return [np.clip((p + 1.0) * (max_value * 1.05 / (np.percentile(p, 0.05) + 1.0)), 0, max_value) for p in planes]
    if defect == "binary":
        return [np.where(p > p.mean(), max_value, 0.0) for p in planes]
    if defect == "text":
        # One overlay at one place in every channel, as annotation software burns it in.
        lettering = text_overlay(planes[0].shape, text)
        return [np.where(lettering, max_value, p) for p in planes]
    return planes


def _to_dtype(plane: np.ndarray, fmt: str) -> np.ndarray:
    if fmt in ("tiff16", "stack16"):
        return np.rint(plane).astype(np.uint16)
    if fmt == "png8":
        return np.rint(plane).astype(np.uint8)
    if fmt == "float32":
        return (plane / 65535.0).astype(np.float32)
    raise ValueError(f"unknown image format {fmt!r}")


def _write_tiff(path: Path, array: np.ndarray) -> None:
    tifffile.imwrite(path, array, photometric="minisblack", metadata=None)


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_image(paths: tuple[str, ...], planes: list[np.ndarray], fmt: str, file_defect: str = "") -> None:
    """Write channel planes (one file each, or one multi-page file for ``stack16``).

    ``truncated`` keeps 60 % of the first file's bytes; ``empty_file`` leaves it with 0 bytes.
    """
    arrays = [_to_dtype(p, fmt) for p in planes]
    targets = [Path(p) for p in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "stack16":
        _write_tiff(targets[0], np.stack(arrays))
    else:
        for target, array in zip(targets, arrays):
            (_write_png if fmt == "png8" else _write_tiff)(target, array)
    if file_defect == "truncated":
        data = targets[0].read_bytes()
        targets[0].write_bytes(data[: int(len(data) * 0.6)])
    elif file_defect == "empty_file":
        targets[0].write_bytes(b"")


FILE_DEFECTS = ("truncated", "empty_file")


# --------------------------------------------------------------------------------------------
# Render jobs: one per image, each with its own random stream
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldJob:
    """One field of view: every hidden factor needed to render and write it."""

    seed: tuple[int, ...]
    size: int
    cell_type: str
    effect: Effect
    stains: tuple[str, ...]
    levels: tuple[tuple[float, float], ...]  # (background, amplitude) per channel, in counts
    optics: Optics
    fmt: str
    paths: tuple[str, ...]
    defect: str = ""
    text: str = ""


@dataclass(frozen=True)
class CellJob:
    """One single-cell crop: protein pattern + reference channel."""

    seed: tuple[int, ...]
    organism: str  # "yeast" (CyCLOPS-like) or "mouse" (COOS-7-like)
    pattern: str
    protein_level: float
    levels: tuple[tuple[float, float], ...]
    optics: Optics
    fmt: str
    paths: tuple[str, ...]
    defect: str = ""


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


def _job_rng(seed: tuple[int, ...]) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(seed)))


def render_field(job: FieldJob) -> list[np.ndarray]:
    """Camera counts (float) of every channel of a field, defects applied."""
    rng = _job_rng(job.seed)
    field_ = Field(rng, job.size, CELL_TYPES[job.cell_type], job.effect)
    illumination = _illumination(job.size, job.optics)
    planes = []
    for c, (stain, (bg, amp)) in enumerate(zip(job.stains, job.levels)):
        recipe = _protein_recipe(stain) if stain.startswith("protein:") else STAINS[stain]
        signal = field_.stain(recipe)
        planes.append(acquire(rng, signal, bg, amp, job.optics, c, illumination))
    return apply_defect(planes, job.defect, job.optics.max_value, job.text)


def _protein_recipe(stain: str) -> dict[str, float]:
    """``protein:a+b`` -> the summed recipes of patterns a and b (HPA multi-label green)."""
    recipe: dict[str, float] = {}
    for part in stain.removeprefix("protein:").split("+"):
        for name, weight in PATTERNS[part].items():
            recipe[name] = recipe.get(name, 0.0) + weight
    return recipe


def render_cell(job: CellJob) -> list[np.ndarray]:
    """Camera counts of a single-cell crop: [protein, reference]."""
    rng = _job_rng(job.seed)
    dead, ghost = job.pattern == "dead", job.pattern == "ghost"
    yeast = job.organism == "yeast"
    effect = Effect(cell_scale=0.8) if dead else NEUTRAL
    field_ = Field(rng, CROP_SIZE, YEAST if yeast else MOUSE_CROP, effect, px_scale=1.0, centred=True,
                   yeast=yeast, force_bud=job.pattern in ("budneck", "spindle", "spindle_pole"))
    if dead:
        protein = 2.2 * field_.structure("body") + 0.4 * field_.structure("cytoplasm")
        reference = 2.5 * field_.structure("body")
    elif ghost:
        protein = 0.06 * field_.structure("cytoplasm")
        reference = 0.25 * field_.structure("membrane") + 0.06 * field_.structure("body")
    else:
        protein = field_.stain(PATTERNS[job.pattern])
        reference = field_.stain({"cytoplasm": 1.0} if yeast else {"dna": 1.0})
    illumination = _illumination(CROP_SIZE, job.optics)
    (bg_p, amp_p), (bg_r, amp_r) = job.levels
    planes = [
        acquire(rng, protein, bg_p, amp_p * job.protein_level, job.optics, 0, illumination),
        acquire(rng, reference, bg_r, amp_r, job.optics, 1, illumination),
    ]
    return apply_defect(planes, job.defect, job.optics.max_value)


def run_job(job: FieldJob | CellJob) -> None:
    planes = render_field(job) if isinstance(job, FieldJob) else render_cell(job)
    file_defect = job.defect if job.defect in FILE_DEFECTS else ""
    write_image(job.paths, planes, job.fmt, file_defect)


def _run_jobs(jobs: list, workers: int) -> None:
    if workers <= 1 or len(jobs) < 8:
        for job in jobs:
            run_job(job)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(run_job, jobs, chunksize=8):
            pass


# --------------------------------------------------------------------------------------------
# Layout plans
# --------------------------------------------------------------------------------------------


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


# -- bbbc021 ------------------------------------------------------------------------------------

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
BBBC021_CHANNELS = (("DAPI", "dna", 1, (700.0, 7000.0)), ("Tubulin", "tubulin", 2, (1300.0, 6000.0)),
                    ("Actin", "actin", 4, (1100.0, 4500.0)))
BBBC021_COLUMNS = [
    "TableNumber", "ImageNumber", "Image_FileName_DAPI", "Image_PathName_DAPI", "Image_FileName_Tubulin",
    "Image_PathName_Tubulin", "Image_FileName_Actin", "Image_PathName_Actin", "Image_Metadata_Plate_DAPI",
    "Image_Metadata_Well_DAPI", "Replicate", "Image_Metadata_Compound", "Image_Metadata_Concentration",
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
                    fields_.append(dict(week=week, replicate=replicate, plate=plate, well=str(well), site=site,
                                        compound=compound, moa=moa, conc=conc, strength=strength))
    dmso = [i for i, f in enumerate(fields_) if f["compound"] == "DMSO"]
    defects = _pick_defects(rng, dmso, ("blank", "saturated", "text", "truncated", "empty_file"))
    jobs, rows, gt = [], [BBBC021_COLUMNS], []
    image_number = {w: 0 for w in BBBC021_PLATES}
    for i, f in enumerate(fields_):
        names = [f"{f['well']}_s{f['site']}_w{w}{_uuid(rng)}.tif" for _, _, w, _ in BBBC021_CHANNELS]
        path_name = f"Week{f['week']}/{f['plate']}"
        job = FieldJob(
            seed=(seed, 1, i), size=size, cell_type="mcf7", effect=moa_effect(f["moa"], f["strength"]),
            stains=tuple(s for _, s, _, _ in BBBC021_CHANNELS), levels=tuple(l for *_, l in BBBC021_CHANNELS),
            optics=plate_optics[(f["week"], f["replicate"])], fmt="tiff16",
            paths=tuple(str(root / f["plate"] / n) for n in names), defect=defects.get(i, ""),
            text=f"{f['plate']}\n{f['well']} s{f['site']}",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
        image_number[f["week"]] += 1
        rows.append([f["week"], image_number[f["week"]], names[0], path_name, names[1], path_name, names[2],
                     path_name, f["plate"], f["well"], f["replicate"], f["compound"],
                     _format_concentration(f["conc"])])
    moa_lines = ['"compound",concentration,"moa"']
    moa_lines += [f'"{c}",{conc:.6f},"{m}"' for c, m, _, concs in BBBC021_COMPOUNDS for conc in concs]
    moa_lines.append('"DMSO",0.000000,"DMSO"')
    compounds = [["compound", "smiles"]] + [[c, _fake_smiles(rng)] for c, *_ in BBBC021_COMPOUNDS] + [["DMSO", "CS(C)=O"]]
    return LayoutPlan(jobs, {"BBBC021_v1_image.csv": rows, "BBBC021_v1_compound.csv": compounds}, gt, len(jobs),
                      raw_tables={"BBBC021_v1_moa.csv": "\n".join(moa_lines) + "\n"})


# -- rxrx1 ----------------------------------------------------------------------------------------

RXRX1_TRAIN = ("HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01", "HUVEC-02", "U2OS-02")
RXRX1_TEST = ("HEPG2-02", "RPE-02")
# siRNA -> (gene, knockdown efficiency); the last two are the positive controls.
RXRX1_SIRNAS: dict[str, tuple[str, float]] = {
    "sirna_101": ("TUBB", 1.0), "sirna_102": ("TUBB", 0.7), "sirna_203": ("ACTB", 1.0),
    "sirna_204": ("LMNA", 1.0), "sirna_305": ("CCNB1", 1.0), "sirna_306": ("MFN2", 1.0),
    "sirna_407": ("PLK1", 0.8), "sirna_408": ("ACTB", 0.7),
}
RXRX1_POSITIVE = {"sirna_1108": ("PLK1", 2.5), "sirna_1109": ("CCNB1", 3.0)}
# w1 nucleus, w2 ER, w3 actin, w4 nucleoli + RNA, w5 mitochondria, w6 Golgi + membrane
RXRX1_CHANNELS = (("dna", (4.0, 55.0)), ("er", (6.0, 80.0)), ("actin", (5.0, 60.0)), ("rna", (5.0, 55.0)),
                  ("mitochondria", (6.0, 70.0)), ("golgi_membrane", (4.0, 45.0)))
RXRX1_TREATED_PER_PLATE = 4


def _gene_effect(gene: str, efficiency: float) -> Effect:
    return _effect(GENE_EFFECTS[gene], efficiency)


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
            treated = [sirnas[(RXRX1_TREATED_PER_PLATE * (plate - 1) + k) % len(sirnas)]
                       for k in range(RXRX1_TREATED_PER_PLATE)]
            free = rng.permutation([w for w in _wells("BCDEFGHIJKLMNO", range(2, 24)) if w != "B02"])
            entries = [("B02", "UNTREATED", "negative_control"), (str(free[0]), positive, "positive_control")]
            entries += [(str(w), s, "treatment") for w, s in zip(free[1:], treated)]
            for well, sirna, well_type in entries:
                gene, eff = ({**RXRX1_SIRNAS, **RXRX1_POSITIVE}.get(sirna) or ("", 0.0))
                wells.append(dict(split=split, experiment=experiment, plate=plate, well=well, sirna=sirna,
                                  well_type=well_type, cell_type=cell_type, optics=plate_optics,
                                  effect=_gene_effect(gene, eff) if gene else NEUTRAL))
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
            seed=(seed, 2, i), size=size, cell_type=w["cell_type"], effect=w["effect"],
            stains=tuple(s for s, _ in RXRX1_CHANNELS[:n_channels]),
            levels=tuple(l for _, l in RXRX1_CHANNELS[:n_channels]), optics=w["optics"], fmt="png8",
            paths=paths, defect=defects.get(i, ""), text=f"{w['experiment']} P{w['plate']}\n{w['well']}",
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


# -- hpa -------------------------------------------------------------------------------------------

HPA_CLASSES = (
    "Nucleoplasm", "Nuclear membrane", "Nucleoli", "Nucleoli fibrillar center", "Nuclear speckles",
    "Nuclear bodies", "Endoplasmic reticulum", "Golgi apparatus", "Peroxisomes", "Endosomes", "Lysosomes",
    "Intermediate filaments", "Actin filaments", "Focal adhesion sites", "Microtubules", "Microtubule ends",
    "Cytokinetic bridge", "Mitotic spindle", "Microtubule organizing center", "Centrosome", "Lipid droplets",
    "Plasma membrane", "Cell junctions", "Mitochondria", "Aggresome", "Cytosol", "Cytoplasmic bodies",
    "Rods & rings",
)
# Rendered HPA class -> (pattern, relative frequency), imbalanced like the competition.
HPA_RENDERED: dict[int, tuple[str, float]] = {
    0: ("nucleus", 0.28), 1: ("nuclear_periphery", 0.04), 2: ("nucleolus", 0.08), 4: ("speckles", 0.04),
    5: ("nuclear_bodies", 0.05), 6: ("er", 0.05), 7: ("golgi", 0.06), 12: ("actin", 0.03),
    14: ("microtubules", 0.04), 19: ("centrosome", 0.03), 21: ("plasma_membrane", 0.07),
    23: ("mitochondria", 0.08), 25: ("cytoplasm", 0.2), 26: ("cytoplasmic_bodies", 0.03),
}
# (file colour, stain, (background, amplitude))
HPA_CHANNELS = (("red", "tubulin", (6.0, 110.0)), ("green", None, (3.0, 150.0)), ("blue", "dna", (5.0, 170.0)),
                ("yellow", "er", (6.0, 120.0)))


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
            seed=(seed, 3, i), size=size, cell_type=str(rng.choice(["u2os", "rpe", "hepg2"])), effect=NEUTRAL,
            stains=tuple(s or protein for _, s, _ in HPA_CHANNELS), levels=tuple(l for *_, l in HPA_CHANNELS),
            optics=_batch_optics(rng, 4, gain=0.25, read_noise=0.8, max_value=255), fmt="png8",
            paths=tuple(str(root / "train" / f"{image_id}_{colour}.png") for colour, _, _ in HPA_CHANNELS),
            defect=defects.get(i, ""), text=f"HPA {image_id[:8]}\n63x",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
        rows.append([image_id, " ".join(str(c) for c in labels)])
    return LayoutPlan(jobs, {"train.csv": rows}, gt, n_images)


# -- cyclops ---------------------------------------------------------------------------------------

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
            seed=(seed, 4, i), organism="yeast", pattern=pattern, protein_level=float(rng.lognormal(0, 0.35)),
            levels=((110.0, 900.0), (230.0, 2500.0)), optics=_plate_optics(rng, screen), fmt="float32",
            paths=(str(root / label / f"{name}_gfp.tif"), str(root / label / f"{name}_rfp.tif")),
            defect=defects.get(i, ""),
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
    return LayoutPlan(jobs, {}, gt, len(jobs))


# -- coos7 ------------------------------------------------------------------------------------------

COOS7_CLASSES = ("cytoplasm", "endoplasmic_reticulum", "mitochondria", "nucleolus", "nucleus", "peroxisomes",
                 "plasma_membrane")
COOS7_PATTERN = {"endoplasmic_reticulum": "er", "plasma_membrane": "plasma_membrane"}
COOS7_SPLITS = {"train": 50, "test1": 15, "test2": 15, "test3": 15, "test4": 15}


def _coos7_condition(rng: np.random.Generator, split: str, reference: Optics) -> tuple[Optics, float]:
    """Acquisition and protein-expression factor of a split, drifting further from train."""
    optics = _plate_optics(rng, reference)
    expression = float(rng.lognormal(0, 0.25))
    if split == "test2":  # new plates: batch intensity and illumination drift
        optics = replace(optics, scales=tuple(s * f for s, f in zip(optics.scales, (0.7, 1.35))),
                         background_scale=optics.background_scale * 1.3, gradient=optics.gradient + 0.15)
    elif split == "test3":  # another microscope: blur, noisier camera, other background
        optics = replace(optics, blur=1.6, gain=optics.gain * 4, read_noise=optics.read_noise * 3,
                         background_scale=optics.background_scale * 1.8, vignetting=0.45)
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
    defects = {**_pick_defects(rng, train, ("saturated", "truncated", "empty_file")),
               **_pick_defects(rng, test1, ("blank",))}
    jobs, gt = [], []
    for i, (split, loc, k) in enumerate(cells):
        optics, expression = _coos7_condition(rng, split, reference)
        protein = f"p{COOS7_CLASSES.index(loc)}{k % 3:02d}"
        name = f"{protein}_plate{1 + k // 8:02d}_{k:04d}"
        folder = root / split / loc
        job = CellJob(
            seed=(seed, 5, i), organism="mouse", pattern=COOS7_PATTERN.get(loc, loc), protein_level=expression,
            levels=((400.0, 3000.0), (350.0, 5000.0)), optics=optics, fmt="tiff16",
            paths=(str(folder / f"{name}_protein.tif"), str(folder / f"{name}_nucleus.tif")),
            defect=defects.get(i, ""),
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
    return LayoutPlan(jobs, {}, gt, len(jobs))


# -- synthetic (native layout) -----------------------------------------------------------------------

# (compound, MOA, potency, concentrations in µM) — two doses each
SYNTHETIC_COMPOUNDS = (
    ("nocodazole", "Microtubule destabilizers", 1.0, (0.3, 1.0)),
    ("colchicine", "Microtubule destabilizers", 0.9, (0.1, 0.3)),
    ("cytochalasin D", "Actin disruptors", 1.0, (0.3, 1.0)),
    ("etoposide", "DNA damage", 0.9, (10.0, 30.0)),
    ("cycloheximide", "Protein synthesis", 0.9, (10.0, 30.0)),
    ("AZ841", "Aurora kinase inhibitors", 0.9, (0.3, 1.0)),
)
SYNTHETIC_SIRNAS = {"s1011": ("TUBB", 1.0), "s1012": ("TUBB", 0.8), "s2021": ("LMNA", 1.0),
                    "s2022": ("LMNA", 0.8), "s3031": ("CCNB1", 1.0), "s3032": ("CCNB1", 0.8)}
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
SYNTHETIC_LEVELS16 = {"dna": (500.0, 5000.0), "actin": (800.0, 2800.0), "tubulin": (900.0, 3200.0),
                      "brightfield": (0.0, 20000.0)}
SYNTHETIC_LEVELS8 = {"dna": (5.0, 120.0), "mitochondria": (6.0, 110.0), "er": (6.0, 100.0),
                     "brightfield": (0.0, 140.0)}
SYNTHETIC_N_PLATES = 8  # plate p belongs to batch (p - 1) // 2 + 1


def _synthetic_conditions(scale: float) -> list[dict]:
    """Treatment groups with their image counts (before spreading over plates)."""
    conds = []
    for compound, moa, potency, concs in SYNTHETIC_COMPOUNDS:
        for j, conc in enumerate(concs):
            conds.append(dict(kind="compound", compound=compound, phenotype=moa, concentration=conc,
                              effect=moa_effect(moa, dose_strength(j + 1, len(concs) + 1, potency)),
                              n=_count(18, scale)))
    conds.append(dict(kind="compound", compound="DMSO", phenotype="", concentration=0.0, effect=NEUTRAL,
                      n=_count(48, scale, minimum=6)))
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
        for k in range(cond["n"]):
            images.append(dict(cond, plate=1 + (len(images) % SYNTHETIC_N_PLATES),
                               cell_type=SYNTHETIC_CELL_TYPES[int(rng.integers(len(SYNTHETIC_CELL_TYPES)))]))
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
        paths = ((str(folder / f"{image_id}_stack.tif"),) if fmt == "stack16"
                 else tuple(str(folder / f"{image_id}_{s}.{ext}") for s in stains))
        levels = SYNTHETIC_LEVELS8 if fmt == "png8" else SYNTHETIC_LEVELS16
        base_optics = plates[im["plate"]]
        optics = replace(base_optics, gain=0.3, read_noise=0.8, max_value=255) if fmt == "png8" else base_optics
        job = FieldJob(
            seed=(seed, 6, i), size=size, cell_type=im["cell_type"], effect=im["effect"], stains=stains,
            levels=tuple(levels[s] for s in stains), optics=optics, fmt=fmt, paths=paths, defect=defect,
            text=f"{plate} {well}\nsite {site}",
        )
        jobs.append(job)
        gt += _defect_rows(job, root)
        ct = CELL_TYPES[im["cell_type"]]
        bright = im["kind"] == "brightfield"
        rows.append([
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
        ])
    return LayoutPlan(jobs, {"metadata.csv": rows}, gt, len(jobs))


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------


def _plan(layout: str, root: Path, seed: int, scale: float, size: int) -> LayoutPlan:
    if layout == "bbbc021":
        return plan_bbbc021(root, seed, scale, size)
    if layout == "rxrx1":
        return plan_rxrx1(root, seed, scale, size)
    if layout == "hpa":
        return plan_hpa(root, seed, scale, size)
    if layout == "cyclops":
        return plan_cyclops(root, seed, scale)
    if layout == "coos7":
        return plan_coos7(root, seed, scale)
    return plan_synthetic(root, seed, scale, size)


def _write_csv(path: Path, rows: list[list]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerows(rows)


def zip_folder(root: Path, archive: Path) -> int:
    """Zip every file under ``root`` (entries relative to it) with fixed timestamps; return count.

    Entries are stored, not deflated: noisy 16-bit pixels deflate to only about half their
    size, and deflating would take a large share of the generation time.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with atomic_path(archive) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for path in files:
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
    return len(files)


def generate_collection(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    scale: float = 1.0,
    layouts: list[str] | tuple[str, ...] | None = None,
    image_size: int = 256,
    workers: int = 1,
) -> dict:
    """Write the synthetic collection under ``out_dir`` and zip each layout.

    Each layout goes to ``out_dir/<layout>/`` (replaced if present) and to
    ``out_dir/archives/<layout>.zip`` (entries relative to the layout root);
    ``out_dir/ground_truth.csv`` lists the defective files of the generated layouts.
    Returns a summary: per layout its image count (fields or crops), file count, defect
    count, root and archive path. Same seed -> same bytes, for any ``workers``.
    """
    chosen = list(LAYOUTS if layouts is None else layouts)
    unknown = sorted(set(chosen) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown synthetic layout(s) {unknown}; choose from {list(LAYOUTS)}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    out = Path(out_dir)
    summary: dict = {"seed": seed, "scale": scale, "image_size": image_size, "layouts": {}}
    ground_truth: list[list[str]] = [list(GROUND_TRUTH_COLUMNS)]
    for layout in chosen:
        root = out / layout
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        plan = _plan(layout, root.resolve(), seed, scale, image_size)
        _run_jobs(plan.jobs, workers)
        for name, rows in plan.tables.items():
            _write_csv(root / name, rows)
        for name, text in (plan.raw_tables or {}).items():
            with atomic_path(root / name) as tmp:
                tmp.write_text(text)
        archive = out / "archives" / f"{layout}.zip"
        n_files = zip_folder(root, archive)
        ground_truth += [[layout, *row] for row in sorted(plan.defects)]
        summary["layouts"][layout] = {
            "images": plan.images,
            "files": n_files,
            "defects": len(plan.defects),
            "root": str(root),
            "archive": str(archive),
        }
    _write_csv(out / "ground_truth.csv", ground_truth)
    summary["ground_truth"] = str(out / "ground_truth.csv")
    return summary
