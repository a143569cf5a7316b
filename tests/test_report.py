"""The HTML report: written as the run's last stage and by ``zoo-audit report``; offline (no
external URL, every image a file in the report); optional tables rendered only when present;
and, with a Chromium on the machine, opened headless: every image loads, the heatmap and a
model card render, no console errors, screenshots saved."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from html import unescape

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.pipeline.executor import ThreadExecutor
from audit.pipeline.inputs import Services
from audit.zoo.shard import LocalSweeper

IMG_SRC = re.compile(r'<img[^>]*\bsrc="([^"]+)"')
EXTERNAL = re.compile(r'(?:src|href)="(?:https?:)?//', re.I)


class WorldSetGenerator:
    """Stands in for the Serve app: renders each hard caption with the world renderer and
    stores the set as the app does (``synthetic/SET_ID/part-00000.parquet``)."""

    def __init__(self, store_uri: str, world_dir: str, fmnist_dir: str):
        self.store_uri, self.world_dir, self.fmnist_dir = store_uri, world_dir, fmnist_dir

    def request_sets(self, wanted, set_ids, k, seed):
        from PIL import Image

        from audit.data.readers import load_fashion_mnist_arrays
        from audit.data.world import WorldRenderer, WorldSpec
        from audit.pipeline.generate import SETS_SCHEMA
        from audit.store import RunStore

        store = RunStore(self.store_uri)
        renderer = WorldRenderer(
            WorldSpec.from_toml(os.path.join(self.world_dir, "spec.toml")),
            load_fashion_mnist_arrays(self.fmnist_dir),
        )
        out = []
        for scope, captions in wanted.items():
            rows = []
            for p, cap in enumerate(captions):
                n = k[scope] if isinstance(k, dict) else k  # one k, or one per scope
                for i, img in enumerate(renderer.render(cap, seed=seed + p, n=n)):
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")
                    rows.append(
                        {
                            "image_id": f"{set_ids[scope]}-{len(rows):05d}",
                            "png": buf.getvalue(),
                            "prompt": cap,
                            "seed": seed + p * 1000 + i,
                            "generator": "world",
                            "params": "{}",
                            "prompt_index": p,
                            "image_index": i,
                        }
                    )
            store.write_table(
                f"synthetic/{set_ids[scope]}/part-00000.parquet", pa.Table.from_pylist(rows)
            )
            out.append(
                {
                    "scope": scope,
                    "set_id": set_ids[scope],
                    "captions": captions,
                    "n_images": len(rows),
                    "generator": "world",
                }
            )
        return pa.Table.from_pylist(out, schema=SETS_SCHEMA)


@pytest.fixture(scope="module")
def trained_zoo_path(tmp_path_factory) -> str:
    """The tiny zoo, trained long enough to learn the tiny world (and its planted shortcut)."""
    from conftest import TINY_ZOO

    p = tmp_path_factory.mktemp("zoo") / "tiny-trained.toml"
    p.write_text(
        TINY_ZOO.replace(
            "epochs = 1, batch_size = 64, lr = 0.003", "epochs = 12, batch_size = 32, lr = 0.01"
        )
    )
    return str(p)


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_world, trained_zoo_path, fake_fmnist):
    """A finished tiny run (threads, no Ray), its console lines and its report."""
    from audit.pipeline.config import SECTIONS
    from cluster.runner import run_audit

    cfg = tmp_path_factory.mktemp("cfg") / "audit.toml"
    # head retraining is another stage's work (and its own tests'): off here when it exists
    off = "[mitigate]\nenabled = false" if "mitigate" in SECTIONS else ""
    cfg.write_text(f"""
[data]
path = "{tiny_world}"
[zoo]
manifest = "{trained_zoo_path}"
[ray]
batch_size = 64
[stats]
n_boot = 50
[directions]
n_permutations = 30
grounding_k = 10
k = 10
[generate]
k = 2
{off}
[report]
images = 6
""")
    out = str(tmp_path_factory.mktemp("run") / "run")
    services = Services(
        executor=ThreadExecutor(2),
        sweeper=LocalSweeper(threads=1),
        generator=WorldSetGenerator(out, tiny_world, fake_fmnist),
    )
    lines: list[str] = []
    store, outcome = run_audit(str(cfg), out, services=services, console=lines.append)
    return store, outcome, lines


def _pages(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".html"):
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = open(p, encoding="utf-8").read()
    return out


def test_report_is_the_last_stage_and_its_path_is_printed_last(audited):
    store, outcome, lines = audited
    assert outcome.failed is None and outcome.ran[-1] == "report"
    index = store.path("report/index.html")
    assert os.path.isfile(index)
    assert lines[-1].splitlines()[-1] == f"report: {index}"
    assert any(line.startswith("  report ") and "model pages" in line for line in lines)
    assert store.manifest()["stages"]["report"]["status"] == "done"


def test_every_page_is_offline_and_every_image_is_a_file(audited):
    store, _, _ = audited
    root = store.path("report")
    pages = _pages(root)
    models = [r["model"] for r in store.read_table("clusters.parquet").to_pylist()]
    clusters = sorted({r["cluster"] for r in store.read_table("clusters.parquet").to_pylist()})
    assert {"index.html", "shared.html", "cards.html", "sets.html"} <= set(pages)
    assert {f"models/{m}.html" for m in models} <= set(pages)
    assert {f"clusters/cluster-{c}.html" for c in clusters} <= set(pages)
    n_images = 0
    for rel, html in pages.items():
        assert not EXTERNAL.search(html), f"{rel} links outside the report"
        assert "static/report.css" in html and "static/report.js" in html
        for src in IMG_SRC.findall(html):
            assert not src.startswith("data:"), f"{rel}: images are files, never inlined"
            assert os.path.isfile(
                os.path.normpath(os.path.join(root, os.path.dirname(rel), src))
            ), f"{rel}: {src}"
            n_images += 1
    assert n_images > 20
    # the figures of the shared-failures page and the run's stages on the overview
    for fig in ("heatmap", "dendrogram", "families", "consistency"):
        assert f'id="{fig}"' in pages["shared.html"]
    for stage in ("sweep", "stats", "directions", "generate", "report"):
        assert f"<td>{stage}</td>" in pages["index.html"]


def test_cards_show_failure_modes_with_real_and_generated_images(audited):
    store, _, _ = audited
    pages = _pages(store.path("report"))
    dirs = store.read_table("directions.parquet").to_pylist()
    ok = [d for d in dirs if d["status"] == "ok" and not d["scope"].startswith("cluster:")]
    assert ok, "the tiny world plants failures: some model must have a significant mode"
    best = max(ok, key=lambda d: d["cv_score"])
    card = pages[f"models/{best['scope']}.html"]
    assert f'id="{best["class"]}-mode-{best["mode"]}"' in card
    assert (
        "Real images nearest the failure direction" in card
        and "Typical images of the class" in card
    )
    assert "img/syn/" in card, "generated images of the mode's hard captions"
    top_hard = [
        c
        for c in store.read_table("captions.parquet").to_pylist()
        if (c["scope"], c["class"], c["mode"], c["polarity"], c["rank"])
        == (best["scope"], best["class"], best["mode"], "hard", 1)
    ]
    assert top_hard and top_hard[0]["caption"] in card
    # the sets page shows every stored image with its seed, up to [report] max_set_images a set
    sets = pages["sets.html"]
    cap = 240  # the default
    n_set_images = sum(
        min(r["n_images"], cap) for r in store.read_table("synthetic_sets.parquet").to_pylist()
    )
    assert (
        sets.count("img/syn/") == n_set_images and sets.count('title="a photo of') == n_set_images
    )


def test_modes_past_the_cards_are_listed_with_their_names(audited, tmp_path):
    """Modes beyond ``[report] max_modes`` are a table row each with the mode's name (its
    caption, or "unnamed"), not only its top hard caption, which for an unnamed mode names
    a failure it does not have."""
    from audit.pipeline.config import ReportSection
    from audit.report import write_report

    store, _, _ = audited
    modes = store.read_table("modes.parquet").to_pylist()
    scope = max({m["scope"] for m in modes}, key=lambda s: sum(m["scope"] == s for m in modes))
    mine = [m for m in modes if m["scope"] == scope]
    write_report(store, str(tmp_path / "html"), opts=ReportSection(max_modes=0))
    page = "clusters" if scope.startswith("cluster:") else "models"
    name = scope.replace(":", "-") if page == "clusters" else scope
    html = open(tmp_path / "html" / page / f"{name}.html").read()
    table = html[html.index("more significant modes") :]
    table = table[: table.index("</table>")]
    assert "name (the most general caption that fails as much)" in table
    assert table.count("<tr><td>") == len(mine)
    for m in mine:
        label = "too few images to tell" if m["undecided"] else "unnamed"
        assert (
            m["caption"]
            if m["named"]
            else f'<span class="muted">unnamed{"" if label == "unnamed" else f" ({label})"}</span>'
        ) in table


def test_an_undecided_mode_reads_as_too_few_images_not_as_no_failure():
    from audit.report.modes import UNDECIDED, name_label

    row = {"named": False, "caption": None, "undecided": True}
    assert name_label(row) == UNDECIDED and "too few images" in UNDECIDED
    assert name_label(row | {"undecided": False}) == "unnamed"
    assert name_label({"named": False, "caption": None}) == "unnamed"  # a run before the column
    assert name_label({"named": True, "caption": "a red coat", "undecided": False}) == "a red coat"
    assert name_label(None) == ""


def test_every_name_is_checked_on_every_model_and_shown(audited):
    """shared_names.parquet: each name of a mode (any scope) x each model, ``own`` where the
    model's mode holds it (and then it fails: the same images, the same interval); the shared
    page lists the names, a model card the ones it fails that its own modes miss."""
    store, _, lines = audited
    modes = [r for r in store.read_table("modes.parquet").to_pylist() if r["named"]]
    assert modes, "the tiny world plants failures: some mode must be named"
    models = [r["model"] for r in store.read_table("clusters.parquet").to_pylist()]
    rows = store.read_table("shared_names.parquet").to_pylist()
    names = {(r["class"], r["caption"]) for r in modes}
    assert {(r["class"], r["caption"]) for r in rows} == names
    assert len(rows) == len(names) * len(models)
    own = {(r["scope"], r["class"], r["caption"]) for r in modes}
    for r in rows:
        assert r["own"] == ((r["model"], r["class"], r["caption"]) in own)
        assert r["fails"] == (r["ci_high"] < r["class_accuracy"])
        assert r["fails"] or not r["own"]
    pages = _pages(store.path("report"))
    assert 'id="names"' in pages["shared.html"]
    for cls, name in names:
        assert f"<td>{cls}</td><td>{name}</td>" in pages["shared.html"]
    for r in rows:
        card = pages[f"models/{r['model']}.html"]
        if r["fails"] and not r["own"]:
            assert 'id="shared-missed"' in card and f"<td>{r['caption']}</td>" in card
    if any(r["fails"] for r in rows):
        assert any("\nNamed failures across the zoo (" in line for line in lines)


def test_hard_images_are_the_models_errors_more_often_than_easy_ones(audited):
    """A planted answer: the real images at the hard end of a direction are misclassified far
    more often than those at the easy end (the direction separates errors from correct)."""
    store, _, _ = audited
    wrong = {"hard": 0, "easy": 0}
    shown = {"hard": 0, "easy": 0}
    for rel, html in _pages(store.path("report")).items():
        if not rel.startswith("models/"):
            continue
        for block in re.findall(
            r'<div class="gridlabel">(.*?)</div>\s*<div class="grid">(.*?)</div>', html, re.S
        ):
            side = (
                "hard"
                if "nearest the failure" in block[0]
                else "easy"
                if "Typical" in block[0]
                else None
            )
            if side:
                wrong[side] += block[1].count('class="wrong"')
                shown[side] += block[1].count("<img")
    assert shown["hard"] and shown["easy"]
    assert wrong["hard"] / shown["hard"] > wrong["easy"] / shown["easy"] + 0.2, (wrong, shown)


def test_report_command_and_optional_tables(audited, tmp_path, capsys):
    """``zoo-audit report RUN --out DIR`` on a copy of the run; mitigation appears only when its table exists."""
    from cluster.cli import main

    store, _, _ = audited
    run = str(tmp_path / "run")
    shutil.copytree(store.root, run, ignore=shutil.ignore_patterns("report"))
    out = str(tmp_path / "html")
    assert main(["report", run, "--out", out]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out}/index.html"
    assert "Mitigation" not in open(f"{out}/index.html").read()
    model = store.read_table("clusters.parquet")["model"][0].as_py()
    assert "Mitigation" not in open(f"{out}/models/{model}.html").read()

    cls = store.read_table("accuracy.parquet").to_pylist()[1]["class"]
    row = {
        "scope": model,
        "model": model,
        "class": cls,
        "method": "synthetic",
        "lambda": 0.25,
        "n_added": 12,
        "overall_before": 0.70,
        "overall_after": 0.72,
        "hard_before": 0.40,
        "hard_after": 0.55,
        "gain": 0.15,
        "gain_ci_low": 0.05,
        "gain_ci_high": 0.25,
        "eval": "test",
    }
    pq.write_table(pa.Table.from_pylist([row]), f"{run}/mitigation.parquet")
    for rel in (
        "directions.parquet",
        "captions.parquet",
        "subpopulations.parquet",
        "synthetic_sets.parquet",
    ):
        os.remove(f"{run}/{rel}")  # a run whose directions stage never ran: the report still builds
    assert main(["report", run, "--out", out]) == 0
    card = open(f"{out}/models/{model}.html").read()
    assert "Mitigation" in card and "+15.0 pts" in card and "synthetic" in card
    assert "mean mitigation gain" in open(f"{out}/index.html").read()
    assert "no synthetic sets" in open(f"{out}/sets.html").read()

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def _transfer_tables(clusters: list[dict]) -> tuple[pa.Table, pa.Table]:
    """``zoo-audit fix`` tables for three new members of the audited run: ``new-a`` (a family of
    cluster 0, one planted target a method, an own fix), ``new-b`` (a family no cluster holds, two
    targets), ``new-c`` (failed); generators ``retrieval`` and ``world`` (the oracle)."""
    from audit.transfer.tables import ASSIGN_SCHEMA, TRANSFER_SCHEMA

    scopes = [f"cluster:{c}" for c in sorted({r["cluster"] for r in clusters})]
    fam = {
        s: sorted({r["family"] for r in clusters if f"cluster:{r['cluster']}" == s}) for s in scopes
    }
    a_family, home = fam[scopes[0]][0], scopes[0]
    assign = [
        {"model": m, "family": f, "cluster": s, "cluster_families": ", ".join(fam[s])}
        | {"similarity": 0.5 - 0.1 * i, "assigned": i == 0, "n_fail": 40, "n_examples": 200}
        for m, f in (("new-a", a_family), ("new-b", "vit"))
        for i, s in enumerate(scopes)
    ]
    gains = {"family_set": 0.30, "other_set": 0.10, "own": 0.40, "control": 0.02}
    rows = []
    for gen in ("retrieval", "world"):
        for method, g in gains.items():
            base = {"cluster": home, "cluster_families": ", ".join(fam[home]), "eval": "planted"}
            base |= {"method": method, "generator": "" if method == "control" else gen}
            base |= {"oracle": gen == "world", "overall_before": 0.70, "overall_after": 0.72}
            if method == "control" and gen == "world":
                continue  # the control has no generator: one row serves both tables
            rows.append(
                base
                | {"model": "new-a", "family": a_family, "family_in_cluster": True}
                | {
                    "gain": g,
                    "gain_ci_low": g - 0.2,
                    "gain_ci_high": g + 0.2,
                    "target": "t:color=red",
                }
            )
            if method != "own":  # no reference audit of new-b
                for target, gb in (("t:color=red", 0.05), ("t:size=big", 0.15)):
                    rows.append(
                        base
                        | {"model": "new-b", "family": "vit", "family_in_cluster": False}
                        | {"gain": gb, "target": target}
                    )
    rows.append(
        {"model": "new-c", "family": "mlp", "error": "another class list: 3 classes, not 10"}
    )
    return (
        pa.Table.from_pylist(rows, schema=TRANSFER_SCHEMA),
        pa.Table.from_pylist(assign, schema=ASSIGN_SCHEMA),
    )


def test_transfer_page_only_when_the_run_has_transfer_tables(audited, tmp_path):
    """``zoo-audit fix``'s page: each new member with its assigned cluster and gains per generator
    (the oracle's labelled), the failed member's reason, and a nav entry; none without the table."""
    from audit.report import build_report
    from audit.synthetic import ORACLE_NOTE

    store, _, _ = audited
    assert not os.path.exists(store.path("report/transfer.html"))
    assert 'href="transfer.html"' not in open(store.path("report/index.html")).read()
    run = str(tmp_path / "run")
    shutil.copytree(store.root, run, ignore=shutil.ignore_patterns("report"))
    clusters = store.read_table("clusters.parquet").to_pylist()
    transfer, assign = _transfer_tables(clusters)
    pq.write_table(transfer, f"{run}/transfer.parquet")
    pq.write_table(assign, f"{run}/transfer_assign.parquet")
    out = str(tmp_path / "html")
    build_report(run, out)
    page = open(f"{out}/transfer.html").read()
    for member in ("new-a", "new-b", "new-c"):
        assert f"<td>{member}</td>" in page
    home = min(r["cluster"] for r in clusters)
    assert f'href="clusters/cluster-{home}.html"' in page
    assert "<b>1 of 2</b> members were assigned to a cluster that holds their family" in page
    assert "retrieval" in page and ORACLE_NOTE in unescape(page)
    assert page.index("Gains with retrieval") < page.index("Gains with world")
    # new-a: one target, so its interval; family set 0.30 of own 0.40; new-b: mean of two targets
    assert "+30.0 pts" in page and "[+10.0, +50.0]" in page and ">75%</td>" in page
    assert '+10.0 pts</span><br><span class="muted small">mean of 2 targets' in page
    assert "another class list: 3 classes, not 10" in page
    model = clusters[0]["model"]
    assert 'href="transfer.html"' in open(f"{out}/index.html").read()
    assert 'href="../transfer.html"' in open(f"{out}/models/{model}.html").read()

    os.remove(f"{run}/transfer.parquet")  # the same folder, rebuilt: no stale page or link
    build_report(run, out)
    assert not os.path.exists(f"{out}/transfer.html")
    assert "transfer.html" not in open(f"{out}/index.html").read()


# -- a real browser ------------------------------------------------------------------------------
CHECK = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t !== window && (t.src || t.href) ? "failed to load " + (t.src || t.href) : String(e.message));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + e.reason); });
  var ce = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, " ")); ce.apply(console, arguments); };
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    Promise.all(imgs.map(function (im) {
      im.loading = "eager";
      if (im.complete) return Promise.resolve();
      return new Promise(function (r) { im.addEventListener("load", r); im.addEventListener("error", r); });
    })).then(function () {
      var pre = document.createElement("pre");
      pre.id = "zoo-audit-check";
      pre.textContent = JSON.stringify({
        images: imgs.length,
        broken: imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); }).map(function (im) { return im.getAttribute("src"); }),
        errors: errors,
        heatmap: (document.getElementById("heatmap") || {}).naturalWidth || 0,
        title: (document.getElementById("card-title") || {}).textContent || "",
        sortable: document.querySelectorAll("table.sortable th").length,
        css: getComputedStyle(document.body).backgroundColor
      });
      document.body.appendChild(pre);
    });
  });
})();
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium(exe: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.browser
def test_report_in_headless_chromium(audited, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "no Chromium found (chromium, chromium-browser, google-chrome); `make test` installs Debian's "
            "`chromium` when apt-get is available"
        )
    store, _, _ = audited
    src = store.path("report")
    model = max(
        (
            d
            for d in store.read_table("directions.parquet").to_pylist()
            if d["status"] == "ok" and not d["scope"].startswith("cluster:")
        ),
        key=lambda d: d["cv_score"],
    )["scope"]
    pages = {
        "overview": "index.html",
        "shared": "shared.html",
        "model": f"models/{model}.html",
        "sets": "sets.html",
    }
    # screenshots of the report as it is
    for name, rel in pages.items():
        shot = tmp_path / f"{name}.png"
        r = _chromium(
            exe,
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            "--virtual-time-budget=5000",
            f"file://{os.path.join(src, rel)}",
        )
        assert shot.is_file() and shot.stat().st_size > 10_000, (
            f"no screenshot of {rel}: {r.stderr[-2000:]}"
        )
    # the same pages, with a probe that loads every (lazy) image and records errors
    checked = tmp_path / "checked"
    shutil.copytree(src, checked)
    for name, rel in pages.items():
        p = checked / rel
        p.write_text(p.read_text().replace("<head>", "<head>\n" + CHECK, 1))
        r = _chromium(
            exe,
            "--dump-dom",
            "--virtual-time-budget=10000",
            "--allow-file-access-from-files",
            f"file://{p}",
        )
        m = re.search(r'<pre id="zoo-audit-check">(.*?)</pre>', r.stdout, re.S)
        assert m, f"{rel}: the page did not finish loading in Chromium: {r.stderr[-2000:]}"
        res = json.loads(
            m.group(1)
            .replace("&quot;", '"')
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
        )
        assert res["broken"] == [], f"{rel}: broken images {res['broken'][:5]}"
        assert res["errors"] == [], f"{rel}: console errors {res['errors'][:5]}"
        assert res["css"] != "rgba(0, 0, 0, 0)", f"{rel}: the stylesheet did not load"
        assert res["sortable"] > 0 or name in ("shared", "sets"), f"{rel}: no sortable table"
        console = [
            line for line in r.stderr.splitlines() if "CONSOLE" in line and "error" in line.lower()
        ]
        assert not console, f"{rel}: {console[:3]}"
        if name == "shared":
            assert res["heatmap"] > 200, "the heatmap did not render"
        if name == "model":
            assert res["title"] == model and res["images"] >= 6
        assert res["images"] > 0 or name == "overview", f"{rel}: no image"
    print(f"screenshots: {sorted(str(p) for p in tmp_path.glob('*.png'))}")
    assert np.all([(tmp_path / f"{n}.png").is_file() for n in pages])
