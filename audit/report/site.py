"""The report's output folder and everything a page needs to be written: the Jinja2
environment, the run's header, static files, and what a page build has written so far."""

from __future__ import annotations

import os
from importlib.resources import files

from audit.report.common import MARKER, NAV, TRANSFER_NAV, _env
from audit.store import RunStore
from audit.transfer.tables import TRANSFER
from audit.view import RunView

#: a previous build's pages and thumbnails (removed before a new build)
BUILT = ("img", "models", "clusters", "figures", "transfer.html")


def out_dir_for(store: RunStore, out_dir: str | None) -> str:
    """``out_dir``, or the run's ``report/`` folder."""
    if out_dir is not None:
        return out_dir
    return store.path("report") if store.local else f"{store.uri.rstrip('/')}/report"


def run_status(view: RunView) -> str:
    """The run's status; a report written by the run's last stage sees every stage before it done."""
    status = view.manifest.get("status", "unknown")
    others = [v for k, v in (view.manifest.get("stages") or {}).items() if k != "report"]
    if status == "running" and all(v.get("status") == "done" for v in others):
        return "done"
    return status


#: the file that marks a folder as a report's (written first, before any page)
OWN = ".zoo-audit-report"


def take_out_dir(out: RunStore) -> None:
    """Make ``out`` the report's folder: empty, new, or an earlier report's (its marker file, or
    an ``index.html`` this tool wrote). A folder holding a user's own files is refused (a
    report would overwrite their ``index.html``), with one line naming a file and the fix."""
    names = [n for n in out.listdir() if not n.startswith(".tmp-")]
    ours = OWN in names or (
        "index.html" in names and MARKER.encode() in out.read_bytes("index.html")
    )
    if names and not ours:
        shown = "index.html" if "index.html" in names else names[0]
        raise ValueError(
            f"report --out {out.uri} holds {shown} ({len(names)} entries) that zoo-audit did not "
            "write; choose an empty or new folder, or the folder of an earlier report"
        )
    out.write_bytes(OWN, b"written by zoo-audit report: its files are replaced by the next one\n")


class Site:
    """Writes pages into the report folder ``out``; refuses nothing, overwrites only what a
    previous report build wrote (recognised by its marker)."""

    def __init__(self, out: RunStore, view: RunView):
        self.out, self.view = out, view
        self.env = _env()
        self.nav = NAV + ([TRANSFER_NAV] if view.has(TRANSFER) else [])
        self.n_bytes = 0
        if out.exists("index.html") and MARKER.encode() in out.read_bytes("index.html"):
            for sub in BUILT:
                out.delete(sub)
        stages = view.manifest.get("stages") or {}
        self.header = {
            "name": os.path.basename(view.store.uri.rstrip("/")),
            "path": view.store.uri,
            "updated": view.manifest.get("updated", ""),
            "status": run_status(view),
            "seconds": sum(float(v.get("seconds") or 0) for v in stages.values()),
        }

    def write(self, rel: str, data: bytes) -> None:
        self.out.write_bytes(rel, data)
        self.n_bytes += len(data)

    def static(self) -> None:
        for name in ("report.css", "report.js"):
            self.write(
                f"static/{name}", files("audit.report").joinpath("static", name).read_bytes()
            )

    def render(self, rel: str, template: str, page: str, **ctx) -> None:
        """Render ``template`` to ``rel`` with the context every page shares."""
        cfg = self.view.config
        html = self.env.get_template(template).render(
            root="../" * rel.count("/"),
            nav=self.nav,
            page=page,
            fit_split=cfg.data.split,
            eval_split=cfg.data.eval_split,
            k=cfg.directions.k,
            min_gap=cfg.stats.min_gap,
            run=self.header,
            **ctx,
        )
        self.write(rel, (html + "\n" + MARKER + "\n").encode())
