"""Repairing a model's failures with targeted data, and proving the repair on held-out data.

arXiv 2312.05464 retrains only the classifier head on the frozen backbone's penultimate
features, on a mix of real training data and synthetic images of the failure mode weighted
``(1 - lambda)`` real and ``lambda`` synthetic; Jain et al. add real images from a pool
selected by the failure direction, or upweight the direction-selected examples.

- :mod:`.head`: :class:`LinearHead`, the anchored multinomial head (scikit-learn contract),
  solved in torch on the features' device, moving all of its rows or some;
- :mod:`.classes`: which rows a fit moves (the hard classes and their main confusions);
- :mod:`.reference`: the scipy solver it replaced, kept as the tests' oracle;
- :mod:`.select`: selections (indices) and :func:`choose` (a candidate, on the fit split);
- :mod:`.gain`: :func:`paired_gain`, a before/after difference with a bootstrap interval;
- :mod:`.synthetic`: the run's generated images, indexed, and the zoo's outputs on them;
- :mod:`.methods`: the registry of methods (one small function each);
- :mod:`.task`: one model's fix as one executor task.

The stage that wires it to a run is :mod:`audit.pipeline.mitigate`.
"""

from audit.mitigate.gain import paired_gain
from audit.mitigate.head import LinearHead, mix_weights
from audit.mitigate.select import choose, select_lowest, select_random, stratified_subsample

__all__ = [
    "LinearHead",
    "choose",
    "mix_weights",
    "paired_gain",
    "select_lowest",
    "select_random",
    "stratified_subsample",
]
