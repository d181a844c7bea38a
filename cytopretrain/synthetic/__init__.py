"""The embedded default dataset: a deterministic, seeded synthetic microscopy collection.

generate_collection (synthetic.collection) renders fluorescence-like fields of view (and a few brightfield
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

Modules: biology (hidden factors), rendering (fields, cells, optics), defects (defects and
writers), layouts (the six layouts' designs and metadata) and collection (rendering jobs,
ground truth, archives).
"""

from cytopretrain.synthetic.collection import GROUND_TRUTH_COLUMNS, generate_collection
from cytopretrain.synthetic.defects import DEFECT_KINDS
from cytopretrain.synthetic.layouts import LAYOUTS

__all__ = ["DEFECT_KINDS", "GROUND_TRUTH_COLUMNS", "LAYOUTS", "generate_collection"]
