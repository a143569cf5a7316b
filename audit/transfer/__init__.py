"""Collective debugging applied to members the audit never saw (``zoo-audit fix RUN --zoo NEW``).

:mod:`~audit.transfer.assign` assigns each new member to the audited cluster whose failures it
shares most; :mod:`~audit.transfer.fix` runs it once over the run's data and generated images
and retrains its head with that cluster's shared set (:mod:`~audit.transfer.members`);
:mod:`~audit.transfer.tables` describes what it writes.
"""

from audit.transfer.fix import FixOutcome, fix_zoo
from audit.transfer.summary import fix_summary, mean_gains
from audit.transfer.tables import ASSIGN, TRANSFER

__all__ = ["ASSIGN", "TRANSFER", "FixOutcome", "fix_summary", "fix_zoo", "mean_gains"]
