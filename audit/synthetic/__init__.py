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

__all__ = [
    "RetrievalSetGenerator",
    "SetUnreadable",
    "check_set_id",
    "image_seed",
    "read_set_meta",
    "read_set_pngs",
    "request_seeds",
    "set_path",
    "write_set",
]
