"""The config checked against the data and the zoo, once both are loaded and before any work.

What the config can check alone (types, ranges, registered names) is checked in
:mod:`audit.pipeline.config`; what needs the data or the zoo is checked here, so that a key
that would fail a stage after the sweep (or is accepted while its stage is off) is one line
naming the key and the fix before Ray starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from audit.data.table import ImageTable
from audit.pipeline.config import AuditConfig
from audit.zoo.spec import ZooSpec


def _close(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_clusters(cfg: AuditConfig, zoo: ZooSpec) -> None:
    """``[stats] n_clusters`` cuts the zoo's models into at most as many clusters as models."""
    n = cfg.stats.n_clusters
    if n is not None and n > len(zoo):
        raise ValueError(
            f"[stats] n_clusters = {n}, but the zoo {zoo.name!r} has {len(zoo)} models "
            f"({', '.join(zoo.names)}); give at most {len(zoo)}, or leave it unset "
            "(as many clusters as families)"
        )


def check_attributes(cfg: AuditConfig, data: ImageTable) -> None:
    """``[data] attributes`` and ``attribute_templates`` fit the data's columns (checked even
    when no stage reads them, so a typo shows before it matters): the caption slots are
    resolved as the directions stage resolves them."""
    from audit.pipeline.inputs import caption_attributes

    caption_attributes(cfg, data)


def check_embedder_model(cfg: AuditConfig, zoo: ZooSpec) -> None:
    """``[directions] embedder = "features:MODEL"`` names a member of the zoo."""
    name = cfg.directions.embedder
    backend, _, model = name.partition(":")
    if backend == "features" and model and model not in zoo.names:
        raise ValueError(
            f"[directions] embedder {name!r}: no zoo member {model!r}{_close(model, zoo.names)}; "
            f"the zoo {zoo.name!r} has {zoo.names} (or give 'features' for its first member)"
        )


def check_train_split(cfg: AuditConfig, data: ImageTable, zoo: ZooSpec) -> None:
    """Members trained here (``weights = "train"``) need a train split to train on."""
    trained_here = [m.name for m in zoo if m.trained_here]
    if trained_here and not len(data.split("train")):
        raise ValueError(
            f"the data ({cfg.data.path or cfg.data.world_spec}) has no train split, but the zoo "
            f'{zoo.name!r} trains {trained_here} here (weights = "train"): add rows with '
            "split = 'train' for them to learn from, or audit members with weights of their own "
            "([zoo] models, or a zoo whose weights are a file, 'timm' or 'hf-hub:ORG/NAME')"
        )


def check_inputs(cfg: AuditConfig, data: ImageTable, zoo: ZooSpec) -> None:
    """Every check of the config against the loaded data and zoo; the first mistake raises
    a ValueError naming the key and the fix."""
    check_clusters(cfg, zoo)
    check_attributes(cfg, data)
    check_embedder_model(cfg, zoo)
    check_train_split(cfg, data, zoo)
