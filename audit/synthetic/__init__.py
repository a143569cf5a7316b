"""Synthetic sets: their one storage format in the run directory (:mod:`.sets`), the set-id
claim for concurrent writers (:mod:`.claims`), and retrieval, the generator that needs no
generative model (:mod:`.retrieval`). Both the Serve app and the audit write sets here."""

from audit.synthetic.retrieval import RetrievalSetGenerator
from audit.synthetic.sets import (
    SetUnreadable,
    check_set_id,
    image_seed,
    read_set_meta,
    read_set_pngs,
    request_seeds,
    set_path,
    write_set,
)

#: generators that are the data's own generator: figures made with them are upper bounds
ORACLES = ("world",)
ORACLE_NOTE = "oracle: the data's own generator, an upper bound"


def is_oracle(generator: str | None) -> bool:
    """Whether images of ``generator`` come from the data's own generator (the world renderer)."""
    return bool(generator) and str(generator).split(":")[0] in ORACLES


def generator_label(generator: str | None) -> str:
    """``generator`` as printed: an oracle says so."""
    if not generator:
        return ""
    return f"{generator} ({ORACLE_NOTE})" if is_oracle(generator) else str(generator)


__all__ = [
    "ORACLES",
    "ORACLE_NOTE",
    "RetrievalSetGenerator",
    "generator_label",
    "is_oracle",
    "SetUnreadable",
    "check_set_id",
    "image_seed",
    "read_set_meta",
    "read_set_pngs",
    "request_seeds",
    "set_path",
    "write_set",
]
