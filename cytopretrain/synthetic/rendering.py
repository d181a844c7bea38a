"""Rendering: cell shapes and textures on a field of view, the optics that acquire it (illumination,
shot and read noise), and the render jobs of fields and single cells."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cytopretrain.synthetic.biology import (
    CELL_TYPES,
    MOUSE_CROP,
    NEUTRAL,
    PATTERNS,
    STAINS,
    YEAST,
    CellType,
    Effect,
    _protein_recipe,
)
from cytopretrain.synthetic.defects import apply_defect

CROP_SIZE = 64


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
        cell = _Shape(
            cx,
            cy,
            radius * math.sqrt(aspect),
            radius / math.sqrt(aspect),
            theta,
            _harmonics(rng, ct.irregularity * (0.4 if mitotic else 1.0)),
        )
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
        self.points["centrosome"].append(
            (ncx + 1.15 * rn * math.cos(direction + 0.3), ncy + 1.15 * rn * math.sin(direction + 0.3))
        )
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
        for _ in range(count):
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
            nucleus = _Shape(
                ncx,
                ncy,
                rn * math.sqrt(n_aspect),
                rn / math.sqrt(n_aspect),
                cell.theta + rng.normal(0, 0.3),
                _harmonics(rng, irregular),
            )
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
        vac = _Shape(
            cell.cx + 0.3 * radius * math.cos(away),
            cell.cy + 0.3 * radius * math.sin(away),
            rv,
            rv * 0.92,
            float(self.rng.uniform(0, math.pi)),
            _harmonics(self.rng, 0.04),
        )
        patch = vac.patch(self.size, 1.3)
        if patch is not None:
            box, d, _, _ = patch
            np.minimum(self.vac_d[box], d, out=self.vac_d[box])

    def _add_bud(self, mother: _Shape, nucleus: tuple[float, float, float], radius: float) -> None:
        rng = self.rng
        t = float(rng.uniform(0, 2 * math.pi))
        rb = radius * float(rng.uniform(0.45, 0.7))
        dist = radius * 0.95 + 0.6 * rb
        bud = _Shape(
            mother.cx + dist * math.cos(t), mother.cy + dist * math.sin(t), rb, rb * 0.92, t, _harmonics(rng, 0.03)
        )
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
            self.points["spindle"].append(
                (ends[0][0] + f * (ends[1][0] - ends[0][0]), ends[0][1] + f * (ends[1][1] - ends[0][1]))
            )
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
        return (
            self.structure("body")
            * self.structure("cyto_gain")
            * self.effect.mitochondria
            * tubules
            * perinuclear
            * (1.0 - 0.8 * self.structure("nucleus"))
            * 1.6
        )

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
        return (
            1.0
            - 0.35 * edge
            + 0.22 * halo
            + body * (0.04 * self.n(2) - 0.03)
            - 0.08 * self.structure("nucleus")
            - 0.12 * _ring(self.nuc_d, 0.08)
        )

    def stain(self, recipe: dict[str, float]) -> np.ndarray:
        out = np.zeros((self.size, self.size), np.float32)
        for name, weight in recipe.items():
            out += np.float32(weight) * self.structure(name)
        return out


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


def render_cell(job: CellJob) -> list[np.ndarray]:
    """Camera counts of a single-cell crop: [protein, reference]."""
    rng = _job_rng(job.seed)
    dead, ghost = job.pattern == "dead", job.pattern == "ghost"
    yeast = job.organism == "yeast"
    effect = Effect(cell_scale=0.8) if dead else NEUTRAL
    field_ = Field(
        rng,
        CROP_SIZE,
        YEAST if yeast else MOUSE_CROP,
        effect,
        px_scale=1.0,
        centred=True,
        yeast=yeast,
        force_bud=job.pattern in ("budneck", "spindle", "spindle_pole"),
    )
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
