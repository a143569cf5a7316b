"""What the report's pages share, computed once per build: the run (a :class:`RunView`), the
accuracy rows per model, the clusters' members and titles, and the failure modes."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from audit.pipeline.config import ReportSection
from audit.report.common import _cluster_title, _f
from audit.report.images import Thumbs
from audit.report.modes import _Modes
from audit.synthetic import is_oracle
from audit.view import RunView


def accuracy_rows(acc: pa.Table | None) -> tuple[dict, dict, dict]:
    """``(overall, classes, groups)``: per model its overall row, class rows, attribute-group rows."""
    overall, classes, groups = {}, defaultdict(list), defaultdict(list)
    if acc is None:
        return overall, classes, groups
    for r in acc.to_pylist():
        row = {
            **{k: r[k] for k in ("attribute", "value")},
            **{"cls": r["class"], "n": int(r["n"]), "acc": _f(r["accuracy"])},
            **{"lo": _f(r["ci_low"]), "hi": _f(r["ci_high"]), "class_acc": _f(r["class_accuracy"])},
        }
        if row["cls"] == "*":
            overall[r["model"]] = row
        elif row["attribute"] == "*":
            classes[r["model"]].append(row)
        else:
            row["gap"] = row["acc"] - row["class_acc"]
            groups[r["model"]].append(row)
    return overall, classes, groups


def _scope_order(scope: str):
    n = scope.split(":")[1]
    return (0, int(n), "") if n.isdigit() else (1, 0, n)


@dataclass
class ReportContext:
    view: RunView
    opts: ReportSection
    modes: _Modes
    overall: dict = field(default_factory=dict)
    class_acc: dict = field(default_factory=dict)
    group_acc: dict = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)  # cluster scope -> models

    @classmethod
    def build(cls, view: RunView, opts: ReportSection, thumbs: Thumbs) -> ReportContext:
        overall, class_acc, group_acc = accuracy_rows(view.table("accuracy.parquet"))
        members: dict[str, list[str]] = defaultdict(list)
        for m in view.models:
            if m in view.clusters:
                members[view.clusters[m]].append(m)
        modes = _Modes(view, view.data, opts, thumbs)
        return cls(view, opts, modes, overall, class_acc, group_acc, dict(members))

    @property
    def scopes(self) -> list[str]:
        """The clusters, in their number's order."""
        return sorted(self.members, key=_scope_order)

    @property
    def titles(self) -> dict[str, str]:
        return {s: _cluster_title(s, self.members[s], self.view.families) for s in self.scopes}

    def families_of(self, scope: str) -> str:
        mem = self.members.get(scope, [scope])
        return self.view.families.get(scope) or ", ".join(
            sorted({self.view.families.get(m, "") for m in mem})
        )

    def mode_summary(self, scope: str) -> tuple[int, str, float]:
        """``(number of modes, "class (strength)" of the strongest, its strength)``."""
        ms = self.modes.by_scope.get(scope, [])
        if not ms:
            return 0, "", math.nan
        return len(ms), f"{ms[0]['cls']} (strength {ms[0]['cv']:.2f})", ms[0]["cv"]

    def gain_of(self, model: str) -> float:
        """Mean gain of the model's targeted fix: its "synthetic" rows from a generator a user has
        (the oracle world renderer's rows only when no other generator ran), else every
        non-control method."""
        rows = [r for r in self.modes.mitigation_rows(model) if r.get("gain") is not None]
        synth = [r for r in rows if r.get("method") == "synthetic"]
        real = [r for r in synth if not is_oracle(r.get("generator"))]
        if synth:
            g = [r["gain"] for r in (real or synth)]
        else:
            g = [r["gain"] for r in rows if r.get("method") != "control"]
        return float(np.nanmean(g)) if g else math.nan
