"""Failure directions: where in a joint image/text space a model's errors lie.

Jain et al., "Distilling Model Failures as Directions in Latent Space" (Sections 2, A.3):
per class, standardise the embeddings with train-split statistics, L2-normalise them, and
fit a linear SVM with balanced class weights that predicts whether the model got each
example right; the regularisation ``C`` comes from a log grid by 2-fold cross-validated
balanced accuracy, and that CV score is the failure's strength. The SVM's normal vector
is the failure *direction*: negative decision values are hard, positive ones easy.

Beyond the paper, :class:`FailureDirections` reports per class and mode a bootstrap
confidence interval of the CV score, a permutation p-value, a status instead of an
exception for classes with too few errors or correct examples, and several failure modes
per class (mode 0 is always the paper's direction over all errors). ``correct`` may hold
several models' columns ``[N, M]`` to fit a cluster's pooled failures (:func:`fit_collective`).

Modules: :mod:`~audit.directions.svm` (the libsvm core), :mod:`~audit.directions.fitter`
(one mode's grid search, bootstrap and permutations), :mod:`~audit.directions.inputs` (input
checks, standardisation, per-class data), :mod:`~audit.directions.modes` (a class's mode
search), :mod:`~audit.directions.estimator` (the estimator), :mod:`~audit.directions.tables`
(many models, clusters, ``directions.parquet``).
"""

from audit.directions.estimator import (
    DEFAULT_CS,
    GRAM_LIMIT,
    STATUSES,
    FailureDirections,
    FailureMode,
    standardize,
)
from audit.directions.tables import (
    DIRECTIONS_SCHEMA,
    clusters_from_table,
    decision_from_row,
    direction_similarity,
    directions_table,
    fit_collective,
    fit_directions,
    with_q_values,
)

__all__ = [
    "DEFAULT_CS",
    "DIRECTIONS_SCHEMA",
    "GRAM_LIMIT",
    "STATUSES",
    "FailureDirections",
    "FailureMode",
    "clusters_from_table",
    "decision_from_row",
    "direction_similarity",
    "directions_table",
    "fit_collective",
    "fit_directions",
    "standardize",
    "with_q_values",
]
