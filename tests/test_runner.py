"""The one runner: stages, key-based skipping, --force, failed stages, and the CLI's
``run`` and ``demo`` through the real entry point."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from audit.pipeline.executor import ThreadExecutor
from audit.pipeline.inputs import Services
from audit.pipeline.runner import StageFailed
from audit.pipeline.stages import STAGE_NAMES
from audit.store import RunStore
from audit.zoo.shard import LocalSweeper

STAGES = list(STAGE_NAMES)


def write_config(path, data: str, zoo: str, extra: str = "") -> str:
    path.write_text(f"""
[data]
{data}
[zoo]
manifest = "{zoo}"
[ray]
batch_size = 64
[stats]
n_boot = 50
[directions]
n_permutations = 5
grounding_k = 10
k = 10
{extra}
""")
    return str(path)


class RecordingGenerator:
    """Stands in for the Serve app: renders the world's captions into the run's store as the
    service would (png, prompt, seed per image), records what was asked, or fails like an
    unreachable service."""

    def __init__(
        self,
        fail: Exception | None = None,
        world_dir: str | None = None,
        store: RunStore | None = None,
    ):
        self.calls, self.fail, self.world_dir, self.store = [], fail, world_dir, store

    def request_sets(self, wanted, set_ids, k, seed):
        from audit.data.world import WorldRenderer, _png
        from audit.pipeline.generate import SETS_SCHEMA

        if self.fail is not None:
            raise self.fail
        self.calls.append(dict(wanted))
        if self.store is not None:
            renderer = WorldRenderer.from_world_dir(self.world_dir)
            for scope, caps in wanted.items():
                n = k if isinstance(k, int) else k[scope]
                rows = [
                    {"png": _png(img), "prompt": c, "seed": seed * 1000 + i}
                    for c in caps
                    for i, img in enumerate(renderer.render(c, seed=seed, n=n))
                ]
                self.store.write_table(
                    f"synthetic/{set_ids[scope]}/part-00000.parquet", pa.Table.from_pylist(rows)
                )
        rows = [
            {
                "scope": s,
                "set_id": set_ids[s],
                "captions": c,
                "n_images": (k if isinstance(k, int) else k[s]) * len(c),
                "generator": "world",
            }
            for s, c in wanted.items()
        ]
        return pa.Table.from_pylist(rows, schema=SETS_SCHEMA)


def cfg_with(path: str, section: str, line: str) -> str:
    """The config file at ``path`` with ``line`` added at the top of ``section``."""
    text = open(path).read()
    assert section in text, section
    open(path, "w").write(text.replace(section, f"{section}\n{line}", 1))
    return path


def threads(generator=None) -> Services:
    return Services(
        executor=ThreadExecutor(2),
        sweeper=LocalSweeper(threads=1),
        generator=generator or RecordingGenerator(),
    )


@pytest.fixture(scope="module")
def world_config(tmp_path_factory, tiny_world, tiny_zoo_path):
    return write_config(
        tmp_path_factory.mktemp("cfg") / "audit.toml", f'path = "{tiny_world}"', tiny_zoo_path
    )


def rendering(out: str, world: str) -> Services:
    """Thread services whose generator renders the world into the run, as the Serve app would."""
    return threads(RecordingGenerator(world_dir=world, store=RunStore(out)))


def test_stages_run_once_then_skip_and_force_redoes_one(world_config, tiny_world, tmp_path):
    from cluster.runner import run_audit

    lines: list[str] = []
    out = str(tmp_path / "run")
    store, first = run_audit(
        world_config, out, services=rendering(out, tiny_world), console=lines.append
    )
    assert first.ran == STAGES and first.failed is None
    for name in (
        "manifest.json",
        "accuracy.parquet",
        "overlap.parquet",
        "clusters.parquet",
        "directions.parquet",
        "captions.parquet",
        "subpopulations.parquet",
        "synthetic_sets.parquet",
        "summary.txt",
    ):
        assert store.exists(name), name
    m = store.manifest()
    assert m["status"] == "done" and all(m["stages"][s]["status"] == "done" for s in STAGES)
    assert (
        store.read_table("predictions/model=tiny-resnet").num_rows == 840
    )  # every split: mitigation needs train and pool features
    assert store.read_table("overlap.parquet").num_rows == 2  # failure statistics on debug only
    # one line per stage, then the summary, which is also summary.txt
    assert sum(line.startswith(f"  {s} ") for line in lines for s in STAGES) == len(STAGES)
    assert store.read_bytes("summary.txt").decode().strip() in "\n".join(lines)
    _check_planted_script(out)

    lines.clear()
    _, again = run_audit(
        world_config, out, services=rendering(out, tiny_world), console=lines.append
    )
    assert again.ran == [] and again.skipped == STAGES
    assert all(
        "(current)" in line for line in lines if line.startswith("  ") and line.split()[0] in STAGES
    )

    _, forced = run_audit(
        world_config,
        out,
        force=["stats"],
        services=rendering(out, tiny_world),
        console=lines.append,
    )
    assert forced.ran[0] == "stats" and "sweep" in forced.skipped and "train" in forced.skipped
    # what reads the forced stage's outputs is redone too; what does not stays
    assert {"directions", "mitigate", "report"} <= set(forced.ran) and "embed" in forced.skipped
    lines.clear()
    _, after = run_audit(
        world_config, out, services=rendering(out, tiny_world), console=lines.append
    )
    assert after.ran == []
    with pytest.raises(ValueError, match="unknown stage"):
        run_audit(
            world_config,
            out,
            force=["stat"],
            services=rendering(out, tiny_world),
            console=lines.append,
        )


def _check_planted_script(out: str) -> None:
    """benchmarks/check_default_world.py reads a finished world run: one line per planted
    group, and exit 1 when a group shows in fewer models than asked."""
    import contextlib
    import importlib.util
    import io

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "check_default_world.py")
    spec = importlib.util.spec_from_file_location("check_default_world", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = mod.main([out, "--min-models", "99"])
    assert rc == 1
    assert "t-shirt:color=blue" in text.getvalue() and "MISSED" in text.getvalue()
    assert "scoring) names the planted value for" in text.getvalue()


def test_changed_section_reruns_that_stage_and_what_reads_it(world_config, tiny_world, tmp_path):
    from cluster.runner import run_audit

    out = str(tmp_path / "run")
    run_audit(world_config, out, services=rendering(out, tiny_world), console=lambda s: None)
    changed = tmp_path / "changed.toml"
    changed.write_text(open(world_config).read().replace("n_boot = 50", "n_boot = 60"))
    with pytest.raises(ValueError, match="--resume"):  # another config in the same directory
        run_audit(str(changed), out, services=rendering(out, tiny_world), console=lambda s: None)
    _, res = run_audit(
        str(changed), out, resume=True, services=rendering(out, tiny_world), console=lambda s: None
    )
    assert res.skipped[:2] == ["train", "sweep"] and "stats" in res.ran and "embed" in res.skipped


def test_a_cleared_embedder_cache_reruns_embed_on_resume(world_config, tiny_world, tmp_path):
    """The world encoder lives in the cache, outside the run: a resume after the cache lost it
    trains it again instead of failing at the directions ("no trained world encoder"), and the
    stages after it rerun only when the encoder trained again embeds differently."""
    from audit.pipeline.directions import world_checkpoint
    from audit.pipeline.inputs import load_inputs
    from audit.view import RunView
    from cluster.runner import run_audit

    out = str(tmp_path / "run")
    run_audit(world_config, out, services=rendering(out, tiny_world), console=lambda s: None)
    before = RunStore(out).manifest()["stages"]["embed"]["out_key"]
    ckpt = world_checkpoint(load_inputs(RunView.open(out).config))
    assert ckpt and os.path.exists(ckpt)
    os.replace(ckpt, ckpt + ".aside")  # set aside (the session's other tests share the cache)
    try:
        _, res = run_audit(
            world_config,
            out,
            resume=True,
            services=rendering(out, tiny_world),
            console=lambda s: None,
        )
        assert res.failed is None and "embed" in res.ran and res.skipped[:2] == ["train", "sweep"]
        assert os.path.exists(ckpt)  # trained again
        same = RunStore(out).manifest()["stages"]["embed"]["out_key"] == before
        assert ("directions" in res.skipped) == same
    finally:
        os.replace(ckpt + ".aside", ckpt)


def test_failing_stage_is_recorded_and_the_next_run_resumes(testbed, tmp_path):
    """The test bed's real failure makes the generate stage ask for a set; the service is
    unreachable: the stage fails, is recorded, and the next run resumes there."""
    from testbed import testbed_config

    from cluster.runner import run_audit

    world_config = testbed_config(tmp_path / "audit.toml", *testbed)
    out = str(tmp_path / "run")
    lines: list[str] = []
    boom = RecordingGenerator(fail=ConnectionError("http://127.0.0.1:9 refused the connection"))
    with pytest.raises(StageFailed) as e:
        run_audit(world_config, out, services=threads(boom), console=lines.append)
    assert e.value.stage == "generate"
    store = RunStore(out)
    m = store.manifest()
    assert m["status"] == "failed" and m["stages"]["generate"]["status"] == "failed"
    assert "refused the connection" in m["stages"]["generate"]["reason"]
    assert any(
        r["stage"] == "generate" and "refused" in r["reason"] for r in store.errors().to_pylist()
    )
    assert [line for line in lines if "FAILED" in line] == [
        "  generate    FAILED: ConnectionError: http://127.0.0.1:9 refused the connection"
    ]
    for name in (
        "accuracy.parquet",
        "overlap.parquet",
        "directions.parquet",
        "captions.parquet",
        "summary.txt",
    ):
        assert store.exists(name), name
    # the next run starts at the failed stage
    ok = RecordingGenerator(world_dir=m["data"]["world_dir"], store=store)
    _, res = run_audit(world_config, out, services=threads(ok), console=lines.append)
    assert res.failed is None and res.ran[0] == "generate" and "directions" in res.skipped
    assert "a photo of a blue t-shirt" in ok.calls[0]["cluster:0"]
    sets = {r["scope"]: r for r in store.read_table("synthetic_sets.parquet").to_pylist()}
    assert sets["cluster:0"]["n_images"] == 8 * len(sets["cluster:0"]["captions"])


def test_cli_failing_stage_exits_1_with_one_line(tmp_path, testbed, monkeypatch, capsys):
    """A diffusion model whose weights are not here, asked of the Serve app: the generate stage
    cannot work; the CLI says so in one line, exits 1, and the manifest says why; every earlier
    output stays. (A backend that does not exist is refused before any work: test_hostile_input.)"""
    from testbed import testbed_config

    import cluster.runner
    from audit.data.readers import read_dataset
    from cluster.cli import main
    from cluster.generate import ServeSetGenerator

    world, zoo = testbed
    manifest = tmp_path / "data.parquet"  # the test bed as a user's manifest: not a world
    read_dataset(world).with_metadata().to_parquet(str(manifest))
    cfg = testbed_config(tmp_path / "audit.toml", str(manifest), zoo)
    cfg = cfg_with(cfg, "[generate]", 'backend = "diffusers:/no/such/model"')

    def thread_services(cfg_, store, world_dir, ray, progress, data=None):
        # the real generator, no Ray for the rest
        return threads(ServeSetGenerator(cfg_.generate.backend, store.uri, world_dir))

    monkeypatch.setattr(cluster.runner, "ray_services", thread_services)
    out = tmp_path / "run"
    assert main(["run", cfg, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(
        "zoo-audit: stage 'generate' failed: [generate] backend 'diffusers:/no/such/model': "
        "the data is not a world and no diffusion weights are here"
    )
    assert len(err) == 2 and "rerun the same command to resume" in err[1]
    store = RunStore(str(out))
    assert store.manifest()["stages"]["generate"]["status"] == "failed"
    assert store.exists("directions.parquet") and store.exists("overlap.parquet")


def test_cli_typo_in_config_exits_2_naming_the_key(tmp_path, capsys):
    from cluster.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\npath = 'x'\n[ray]\nnum_cpu_worker = 2\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert (
        "[ray] num_cpu_worker" in err
        and "did you mean 'num_cpu_workers'" in err
        and str(bad) in err
    )
    assert not os.path.exists(tmp_path / "run" / "manifest.json")


@pytest.mark.ray
def test_cli_run_end_to_end_on_ray(ray_session, world_config, tmp_path, capsys):
    """``zoo-audit run`` through the real entry point with the Ray services (the session's
    Ray is joined, not restarted), Serve generation in-process, readable output."""
    from cluster.cli import main

    out = tmp_path / "run"
    assert main(["run", world_config, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert len(lines) < 150 and not any(
        " INFO " in line or line.startswith("INFO") for line in lines + printed.err.splitlines()
    )
    store = RunStore(str(out))
    assert store.manifest()["status"] == "done"
    assert {s for s, v in store.manifest()["stages"].items() if v["status"] == "done"} == set(
        STAGES
    )
    assert ray_session.is_initialized()  # a run that joined Ray leaves it running
