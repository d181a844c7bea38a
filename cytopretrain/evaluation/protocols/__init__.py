"""Evaluation protocols of the learning half: one function per protocol, each documented exactly.

Input is a profile table (pandas DataFrame, the pycytominer / copairs convention):
``Metadata_``-prefixed metadata columns (e.g. Metadata_idx, Metadata_label, Metadata_compound,
Metadata_concentration, Metadata_plate, Metadata_well, Metadata_batch, Metadata_split,
Metadata_moa) and numeric feature columns (every other column). Missing columns, non-numeric or
non-finite features and missing labels are errors that name the column.

Accuracy-type protocols return a JSON-serializable dict with: protocol, n, correct, accuracy,
ci95 (1.96·sqrt(acc·(1-acc)/n), the normal-approximation half-width of the 95 % interval),
per_class (true label -> n, correct, accuracy), confusion (labels, matrix: rows = true label,
columns = predicted label; a prediction None, where no neighbour was eligible, is the column
"<none>"), plus protocol-specific details. Labels are compared and reported as strings.

The clustering protocol (protocols.clustering) instead reports, per assignment (its k-means,
and a model's own clusters), NMI, ARI and unsupervised accuracy, each beside its value for
random clusters of the same sizes (the floor), and the contingency table of labels x clusters.

Shared rules. z-scoring is scikit-learn's StandardScaler (core.numerics.zscore: mean and
population standard deviation of the rows named in each protocol; a constant feature is only
centred). Nearest neighbours come from
``cytopretrain.evaluation.knn`` and are exact: equal distances go to the smaller row index (row order of the
table, or of the sorted treatments). k-NN votes: the label with most of the k neighbours wins; a
tie between labels goes to the tied label whose nearest neighbour comes first.
"""

from cytopretrain.evaluation.protocols.clustering import CLUSTER_COLUMN, clustering
from cytopretrain.evaluation.protocols.embedding import embedding_2d, nn_agreement
from cytopretrain.evaluation.protocols.mean_ap import mean_average_precision, replicate_map
from cytopretrain.evaluation.protocols.moa import nsc, nscb
from cytopretrain.evaluation.protocols.multilabel import multilabel_f1
from cytopretrain.evaluation.protocols.neighbours import knn_holdout, knn_loo
from cytopretrain.evaluation.protocols.retrieval import pair_threshold

__all__ = [
    "CLUSTER_COLUMN",
    "clustering",
    "embedding_2d",
    "knn_holdout",
    "knn_loo",
    "mean_average_precision",
    "multilabel_f1",
    "nn_agreement",
    "nsc",
    "nscb",
    "pair_threshold",
    "replicate_map",
]
