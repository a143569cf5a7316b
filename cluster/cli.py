"""The ``zoo-audit`` command line (the composition root's front door).

Each subcommand imports what it needs when it runs, so ``zoo-audit --help`` is instant.
Callers' mistakes exit 2 with one line naming the value and the fix; a failing stage
exits 1 with one line saying which stage, why, and that the next run resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _world_build(a):
    from audit.data.world import build_world

    t = build_world(a.spec, a.out, fmnist_dir=a.fashion_mnist, force=a.force)
    print(
        f"world: {len(t)} examples, classes {t.classes} -> {os.path.join(a.out, 'examples.parquet')}"
    )


def _world_render(a):
    from PIL import Image

    from audit.data.world import WorldRenderer

    imgs = WorldRenderer.from_world_dir(a.world).render(a.caption, seed=a.seed, n=a.n)
    grid = imgs.transpose(1, 0, 2, 3).reshape(imgs.shape[1], -1, 3)
    Image.fromarray(grid).save(a.out)
    print(f"{a.n} image(s) of {a.caption!r} -> {a.out}")


def _zoo_list(a):
    from audit.zoo.models import weights_status
    from audit.zoo.spec import ZooSpec

    zoo = ZooSpec.from_toml(a.zoo)
    print(f"zoo {zoo.name!r}: {len(zoo)} models ({zoo.path})")
    print(f"  {'name':28s} {'family':16s} {'builder':22s} available")
    n_ok = 0
    for m in zoo:
        ok, why = weights_status(m)
        n_ok += ok
        print(f"  {m.name:28s} {m.family:16s} {m.builder:22s} {'yes' if ok else 'NO '}  {why}")
    print(f"{n_ok}/{len(zoo)} models have weights available here")


def _zoo_train(a):
    from audit.data.readers import read_dataset
    from audit.zoo.spec import ZooSpec
    from audit.zoo.train import train_zoo

    data = read_dataset(a.data)
    zoo = ZooSpec.from_toml(a.zoo)
    for r in train_zoo(zoo, data, device=a.device, names=a.models.split(",") if a.models else None):
        print(
            f"  {r.name:24s} {'trained' if r.trained else 'cached':8s} {r.seconds:6.1f}s  {r.path}"
        )


def _run_cmd(config: str, a, overrides: dict | None = None, resume: bool = False) -> None:
    from audit.pipeline.interrupt import stop_on_signals
    from cluster.runner import run_audit

    with stop_on_signals():  # Ctrl-C and SIGTERM stop the run even if SIGINT came in ignored
        run_audit(
            config,
            a.out,
            address=getattr(a, "address", None),
            resume=resume or getattr(a, "resume", False),
            force=a.force or (),
            verbose=a.verbose,
            overrides=overrides,
        )


def _demo(a):
    zoo = {"manifest": a.zoo} if a.zoo else {}
    if a.models:
        zoo["models"] = a.models.split(",")
    if a.device:
        zoo["device"] = a.device
    # the demo's run directory follows the shipped demo config as it changes: only what changed runs
    _run_cmd("demo", a, {"zoo": zoo} if zoo else None, resume=True)


def _run(a):
    _run_cmd(a.config, a)


def _report(a):
    from audit.report import write_report
    from audit.view import RunView

    res = write_report(RunView.open(a.run), a.out)
    print(
        f"{res.n_models} model pages, {res.n_clusters} cluster pages, {res.n_bytes / 1e6:.1f} MB in {res.seconds:.1f}s"
    )
    print(f"report: {res.index}")


def _fix(a):
    from audit.pipeline.interrupt import stop_on_signals
    from cluster.runner import run_fix

    with stop_on_signals():
        run_fix(
            a.run,
            a.zoo,
            models=a.models.split(",") if a.models else (),
            reference=a.reference,
            address=a.address,
            verbose=a.verbose,
        )


def _embed_train(a):
    from audit.embed.world_encoder import train_cli

    train_cli(a)


def _serve(a):
    from serve.backends import list_backends, parse_backend
    from serve.main import serve_main

    if not 1 <= a.port <= 65535:
        raise ValueError(f"--port {a.port} is not a TCP port; give one in 1-65535 (e.g. 8000)")
    name, _ = parse_backend(a.backend)
    if name not in list_backends():
        raise ValueError(
            f"--backend {a.backend!r}: unknown backend {name!r}; known: {', '.join(list_backends())}"
        )

    if name == "diffusers":
        _check_diffusers(a.backend, _)
    serve_main(a)


def _check_diffusers(backend: str, model: str | None) -> None:
    """Weights that cannot be loaded are one line before Serve starts (it took ~50 s to end in
    'failed to update the deployments'); a hub id may still be downloaded when online."""
    from cluster.generate import diffusion_weights_present

    model = model or ""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    pathlike = model.startswith((".", "/", "~")) or model.count("/") > 1  # hub ids: ORG/NAME
    if not diffusion_weights_present(model) and (offline or pathlike or not model):
        where = "no such model directory" if pathlike else "not in the Hugging Face cache"
        where += " and HF_HUB_OFFLINE=1 allows no download" if offline and not pathlike else ""
        raise ValueError(
            f"--backend {backend!r}: diffusion weights {model!r} are not here ({where}); give a "
            "directory with model_index.json or download the model first"
        )


def _add_world(sub) -> None:
    w = sub.add_parser("world", help="the planted benchmark world")
    w = w.add_subparsers(dest="world_cmd", required=True)
    b = w.add_parser("build", help="build a world from a TOML spec")
    b.add_argument("--spec", required=True)
    b.add_argument("--out", required=True)
    b.add_argument(
        "--fashion-mnist", default=None, help="directory with the Fashion-MNIST IDX files"
    )
    b.add_argument(
        "--force", action="store_true", help="rebuild even if DIR holds this spec's world"
    )
    b.set_defaults(fn=_world_build)
    r = w.add_parser("render", help="render images for a caption (the offline generator)")
    r.add_argument("--world", required=True, help="a world directory (its spec.toml is used)")
    r.add_argument("--caption", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--n", type=int, default=4)
    r.add_argument("--out", default="render.png")
    r.set_defaults(fn=_world_render)


def _add_zoo(sub) -> None:
    z = sub.add_parser("zoo", help="model zoos").add_subparsers(dest="zoo_cmd", required=True)
    zl = z.add_parser("list", help="list a zoo's models and whether their weights are here")
    zl.add_argument("--zoo", default="demo")
    zl.set_defaults(fn=_zoo_list)
    zt = z.add_parser("train", help="train a zoo's from-scratch members on a dataset's train split")
    zt.add_argument("--zoo", default="demo")
    zt.add_argument(
        "--data", required=True, help="world directory, Parquet manifest or ImageFolder"
    )
    zt.add_argument("--models", default=None, help="comma-separated subset")
    zt.add_argument("--device", default="cpu")
    zt.set_defaults(fn=_zoo_train)


def _add_force(p) -> None:
    from audit.pipeline.stages import STAGE_NAMES

    stages = ", ".join(STAGE_NAMES)
    why = f"redo this stage, and the stages that read it, even if current ({stages})"
    p.add_argument("--force", action="append", metavar="STAGE", help=why)


def _add_audit(sub) -> None:
    demo = (
        "the audit on the embedded default: zoo-audit run configs/audit/demo.toml --out runs/demo"
    )
    d = sub.add_parser("demo", help=demo)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--zoo", default=None, help="another zoo manifest (default: the demo zoo)")
    d.add_argument("--models", default=None, help="comma-separated subset of the zoo")
    d.add_argument("--device", default=None, help="where zoo members are trained (default cpu)")
    _add_force(d)
    d.set_defaults(fn=_demo)
    rn = sub.add_parser(
        "run", help="run an audit from a TOML config (one line per stage, then the summary)"
    )
    rn.add_argument("config", help="an audit config TOML (or a shipped name such as 'demo')")
    rn.add_argument("--out", required=True, help="the run directory (a path or a pyarrow.fs URI)")
    where = "Ray cluster address (default: $RAY_ADDRESS or an embedded Ray)"
    rn.add_argument("--address", default=None, help=where)
    other = "reuse a run directory that holds a run of another config"
    rn.add_argument("--resume", action="store_true", help=other)
    _add_force(rn)
    rn.set_defaults(fn=_run)
    rp = sub.add_parser(
        "report", help="write the static HTML report of a run (opens from disk; no server)"
    )
    rp.add_argument("run", help="a run directory (the --out of `zoo-audit run` or `demo`)")
    rp.add_argument("--out", default=None, help="where to write it (default RUN/report)")
    rp.set_defaults(fn=_report)
    _add_fix(sub)


def _add_fix(sub) -> None:
    what = (
        "fix new members of a zoo with an audited run's cluster sets (no new audit): one sweep "
        "of each member, its cluster assigned by shared failures, its head retrained"
    )
    f = sub.add_parser("fix", help=what)
    f.add_argument("run", help="an audited run directory (the --out of `zoo-audit run`)")
    f.add_argument("--zoo", required=True, help="a zoo manifest of the new members (TOML or name)")
    f.add_argument("--models", default=None, help="comma-separated subset of that zoo")
    ref = (
        "a run directory for a full audit of the new members, to compare with their own "
        "per-model fix (audited there first if it holds no finished run)"
    )
    f.add_argument("--reference", default=None, help=ref)
    f.add_argument("--address", default=None, help="Ray cluster address (default: embedded Ray)")
    f.set_defaults(fn=_fix)


def _add_services(sub) -> None:
    e = sub.add_parser("embed", help="joint image/text embedders")
    e = e.add_subparsers(dest="embed_cmd", required=True)
    et = e.add_parser("train", help="train the world encoder on a captioned table")
    et.add_argument("--data", required=True)
    et.add_argument("--device", default="cpu")
    et.set_defaults(fn=_embed_train)
    s = sub.add_parser("serve", help="serve the generation app over HTTP (Ray Serve)")
    s.add_argument("--backend", default="world", help="world | diffusers:MODEL")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--store", default="runs/serve")
    s.add_argument("--token-file", default=None)
    s.add_argument("--config", default=None, help="serve config TOML/YAML")
    s.set_defaults(fn=_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo-audit", description="Audit a zoo of image classifiers.")
    verbose = "debug logging, Ray/Serve logs and tracebacks on the console"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose)
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_world, _add_zoo, _add_audit, _add_services):
        add(sub)
    return p


def _exit_now(code: int) -> None:
    """Exit with ``code`` without the interpreter's teardown. The run is recorded and Ray is
    shut down already, but Ray's C++ core worker, stopped mid-call by the signal, sometimes
    crashed in that teardown (SIGSEGV), turning an orderly 130/143 into -11."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from audit.pipeline.runner import StageFailed

    try:
        args.fn(args)
    except StageFailed as e:
        out = getattr(args, "out", "the run directory")
        print(
            f"zoo-audit: stage {e.stage!r} failed: {e.reason}\n  Every earlier stage's output is kept in {out}; "
            f"fix the cause and rerun the same command to resume (details: {out}/errors.parquet).",
            file=sys.stderr,
        )
        return 1
    except (ValueError, KeyError, FileNotFoundError, PermissionError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"zoo-audit: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C (130) or, in a run, SIGTERM (143)
        print("zoo-audit: interrupted; rerun the same command to resume", file=sys.stderr)
        code = getattr(e, "exit_code", 130)
        if argv is None:  # the program itself (tests pass argv): see _exit_now
            _exit_now(code)
        return code
    except Exception as e:  # noqa: BLE001 - one clear line, the traceback with --verbose
        if args.verbose:
            raise
        print(
            f"zoo-audit: error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
