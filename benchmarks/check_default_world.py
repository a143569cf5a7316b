"""Do the default world's planted failure modes bite, and does the audit name them?

Reads a finished run of the demo (``make demo`` writes ``runs/demo``; any run on a world
with a ``group`` column will do) and checks the two promises the default world makes:

- every planted mode shows in at least ``--min-models`` of the zoo's models (its group is
  ``--min-gap`` or more below its class on the audit split), colour and background alike;
- the top-1 hard caption names the planted value for at least ``--min-named`` of the
  failing (model, group) pairs, with the run's own caption scoring.

    python benchmarks/check_default_world.py                 # runs/demo
    python benchmarks/check_default_world.py RUN --min-models 8 --min-named 0.95

Prints one line per planted group and per criterion, each labelled oracle (planted truth);
exits 1 when one is missed. It reads the run through RunView: the run's own settings (split,
zoo, scoring, ``[stats] min_gap``) are what is checked.
"""

from __future__ import annotations

import argparse
import sys

# every figure here is measured against the world's planted truth, which a user's data lacks
ORACLE = "oracle: the world's planted ground truth"


def _args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "run", nargs="?", default="runs/demo", help="a run directory (default runs/demo)"
    )
    ap.add_argument("--min-models", type=int, default=8, help="models a planted mode must show in")
    ap.add_argument(
        "--min-named",
        type=float,
        default=0.95,
        help="share of failing pairs the top-1 caption names",
    )
    ap.add_argument(
        "--min-gap",
        type=float,
        default=None,
        help="a group 'shows' this far below its class (default: the run's own [stats] min_gap)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from audit.pipeline.summary import planted_summary
    from audit.planted import summarize_planted
    from audit.view import RunView

    view = RunView.open(args.run)
    acc, planted = view.table("accuracy.parquet"), view.table("planted.parquet")
    if acc is None or planted is None:
        why = "no accuracy.parquet or planted.parquet: run `make demo` (or an audit with directions on)"
        print(f"{args.run}: {why}", file=sys.stderr)
        return 2
    min_gap = view.min_gap if args.min_gap is None else args.min_gap
    groups = planted_summary(acc, min_gap)
    if not groups:
        print(f"{args.run}: no planted groups in accuracy.parquet (not a world?)", file=sys.stderr)
        return 2
    print(
        f"planted modes ({ORACLE}; 'shows' = group >= {min_gap:.0%} below its class; "
        f"need >= {args.min_models}):"
    )
    ok = True
    for g in groups:
        good = g["shows"] >= args.min_models
        ok &= good
        print(
            f"  {g['group']:32s} group {g['group_acc']:6.1%}  class {g['class_acc']:6.1%}  "
            f"shows {g['shows']:2d}/{g['models']}  {'ok' if good else 'MISSED'}"
        )
    scoring = view.config.directions.caption_scoring
    if "caption_scoring" in planted.column_names:
        rows = [r for r in planted.to_pylist() if r["caption_scoring"] == scoring]
        planted = planted.from_pylist(rows, schema=planted.schema)
    s = summarize_planted(planted)
    good = s["named_share"] >= args.min_named
    print(
        f"top-1 hard caption ({scoring} scoring) names the planted value for {s['named_share']:.1%} of "
        f"{s['pairs']} failing pairs (need >= {args.min_named:.0%})  {'ok' if good else 'MISSED'}  "
        f"({ORACLE})"
    )
    print(
        f"direction precision at the number of errors {s['precision_svm']:.2f} vs confidence "
        f"{s['precision_confidence']:.2f} ({ORACLE})"
    )
    return 0 if ok and good else 1


if __name__ == "__main__":
    sys.exit(main())
