"""ZooShard: a subset of the zoo run on every batch, and the plan that assigns models to shards.

A plain Python class: ``cluster`` wraps it with ``ray.remote`` as a shard actor, and
:class:`LocalSweeper` runs it in-process (tests, single-process runs, benchmark baseline). It loads its models in ``__init__`` (a model that fails to
load is remembered, not raised), then ``run_batch`` takes one decoded uint8 batch, shared
through the object store, preprocesses it once per distinct input config and runs every
model of the shard on it in ``torch.inference_mode`` (fp16 autocast on CUDA).
"""

from __future__ import annotations

import logging
import os
import traceback
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from audit.zoo.spec import ModelSpec

log = logging.getLogger(__name__)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


class ZooShard:
    """Runs all of its models on each batch it is sent.

    specs: the shard's models; weights: ``{name: checkpoint path}`` for trained members;
    device: ``cpu``, ``cuda`` or ``auto``; threads: torch intra-op threads (CPU shards get
    their Ray ``num_cpus`` so that shards together do not oversubscribe the cores).
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        classes: Sequence[str],
        weights: Mapping[str, str | None],
        device: str = "auto",
        threads: int | None = None,
        batch_size: int = 256,
        with_features: bool = False,
    ):
        import torch

        from audit.zoo.models import build_model

        if threads:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.with_features = with_features
        self.classes = list(classes)
        self.models = {}
        self.failed: dict[str, str] = {}
        self.batch_size: dict[str, int] = {}
        for spec in specs:
            try:
                self.models[spec.name] = build_model(
                    spec, self.classes, weights.get(spec.name), device
                )
                self.batch_size[spec.name] = int(batch_size)
            except Exception as e:  # noqa: BLE001 - a model that cannot load costs that model only
                log.warning("model %s failed to load: %s", spec.name, e)
                self.failed[spec.name] = _reason(e)
        self.groups: dict[object, list[str]] = {}
        for name, m in self.models.items():
            self.groups.setdefault(m.input_config, []).append(name)

    def info(self) -> dict:
        import torch

        return {
            "loaded": sorted(self.models),
            "failed": dict(self.failed),
            "device": self.device,
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }

    def run_batch(self, images: np.ndarray, start: int) -> dict:
        """Run every model of the shard on uint8 ``images [B, H, W, 3]``.

        Returns ``{"start", "n", "outputs": {model: {"logits" [B, C], "features"?}},
        "failed": {model: reason}}``; a model that raises here is dropped from later batches.
        """
        import torch

        from audit.zoo.inference import forward, predict_with_retry, preprocess

        outputs = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # object-store arrays are read-only
            for cfg, names in self.groups.items():
                live = [n for n in names if n not in self.failed]
                if not live:
                    continue
                with torch.inference_mode():
                    x = preprocess(images, cfg, self.device)
                for name in live:
                    model = self.models[name]
                    try:
                        out, bs = predict_with_retry(
                            lambda b, m=model, xb=x: forward(
                                m.module, xb, b, self.device, self.with_features
                            ),
                            self.batch_size[name],
                        )
                        self.batch_size[name] = bs
                        if out["logits"].shape[1] != len(self.classes):
                            raise ValueError(
                                f"model outputs {out['logits'].shape[1]} classes but the dataset has "
                                f"{len(self.classes)}; give the spec a label map or use a dataset in its label space"
                            )
                        outputs[name] = out
                    except Exception as e:  # noqa: BLE001
                        log.warning("model %s failed on batch at %d: %s", name, start, e)
                        self.failed[name] = _reason(e)
        return {
            "start": int(start),
            "n": len(images),
            "outputs": outputs,
            "failed": dict(self.failed),
        }


# -- planning ------------------------------------------------------------------------------
def model_profile(spec: ModelSpec, num_classes: int) -> tuple[float | None, float | None]:
    """``(forward FLOPs of one image at the spec's input size, parameter count)``, counted on
    the ``meta`` device (no memory, no weights). timm models (and builders whose arch is a
    timm name) whole; open_clip models by their image tower (the text tower runs once, for
    the zero-shot head). ``(None, None)`` for
    builders that cannot be built without their weights (the caller substitutes the median);
    FLOPs fall back to the parameter count when some op has no meta/flop rule."""
    from audit.zoo.models import TIMM_ARCH_BUILDERS, create_timm

    if spec.builder not in (*TIMM_ARCH_BUILDERS, "open_clip"):
        return None, None
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            if spec.builder in TIMM_ARCH_BUILDERS:
                import timm.data

                model = create_timm(spec, num_classes)
                size = (
                    spec.input.get("input_size")
                    or timm.data.resolve_model_data_config(model)["input_size"][-1]
                )
            else:
                from audit.extras import require

                open_clip = require("open_clip", "clip")
                model = open_clip.create_model(spec.arch, pretrained=None, device="meta").visual
                size = model.image_size
        model.eval()
        size = int(size[-1] if isinstance(size, list | tuple) else size)
        params = float(sum(p.numel() for p in model.parameters()))
        try:
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                model(torch.empty(1, 3, size, size, device="meta"))
            return (float(fc.get_total_flops()) or params), params
        except Exception:  # noqa: BLE001 - some ops have no meta/flop rule
            return params, params
    except Exception as e:  # noqa: BLE001
        log.debug("cannot profile %s: %s", spec.name, e)
        return None, None


def estimate_cost(spec: ModelSpec, num_classes: int) -> float | None:
    """Forward FLOPs of one image (see :func:`model_profile`); None when unknown."""
    return model_profile(spec, num_classes)[0]


def _fill_median(raw: Mapping[str, float | None]) -> dict[str, float]:
    known = [c for c in raw.values() if c]
    fill = float(np.median(known)) if known else 1.0
    return {k: (float(v) if v else fill) for k, v in raw.items()}


def model_profiles(
    specs: Sequence[ModelSpec], num_classes: int
) -> tuple[dict[str, float], dict[str, float]]:
    """``({name: FLOPs}, {name: parameters})``, unknowns replaced by the medians."""
    prof = {s.name: model_profile(s, num_classes) for s in specs}
    return _fill_median({k: v[0] for k, v in prof.items()}), _fill_median(
        {k: v[1] for k, v in prof.items()}
    )


def plan_shards(
    costs: Mapping[str, float],
    n_shards: int,
    sizes: Mapping[str, float] | None = None,
    capacity: float | None = None,
) -> list[list[str]]:
    """Assign each model to exactly one of ``n_shards`` shards, balancing total cost.

    Longest-processing-time first: models by decreasing cost (ties by name), each to the
    currently lightest shard that still has room for it (``sizes[name]`` summed per shard
    must stay <= ``capacity``: a shard keeps all its models loaded, so this is the GPU
    memory the weights may take). Then pairwise moves and swaps that lower the heaviest
    shard's load, while memory allows. Deterministic. Empty shards are dropped. Raises
    ValueError when the models cannot be packed into ``n_shards`` x ``capacity``.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    bad = {k: v for k, v in costs.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"model costs must be finite and >= 0: {bad}")
    if capacity is not None and sizes is None:
        raise ValueError("capacity needs sizes (per-model memory, same unit)")
    size = {k: float((sizes or {}).get(k, 0.0)) for k in costs}
    cap = float("inf") if capacity is None else float(capacity)
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    load, mem = [0.0] * n_shards, [0.0] * n_shards
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        fits = [j for j in range(n_shards) if mem[j] + size[name] <= cap]
        if not fits:
            raise ValueError(
                f"model {name!r} ({size[name]:.3g}) does not fit in any of {n_shards} shards of "
                f"capacity {cap:.3g} (used {[round(m, 3) for m in mem]}); add shards or memory"
            )
        i = min(fits, key=lambda j: (load[j], len(shards[j]), j))
        shards[i].append(name)
        load[i] += float(costs[name])
        mem[i] += size[name]
    _improve(shards, load, mem, costs, size, cap)
    return [sorted(s, key=lambda k: (-costs[k], k)) for s in shards if s]


def _improve(shards, load, mem, costs, size, cap, rounds: int = 200) -> None:
    """Local search after LPT: move one model off the heaviest shard, or swap one of its
    models with a lighter one from another shard, whenever that lowers the pair's maximum."""
    for _ in range(rounds):
        h = max(range(len(shards)), key=lambda j: (load[j], -j))
        best = None  # (new max of the pair, other shard, model out of h, model into h or None)
        for o in range(len(shards)):
            if o == h:
                continue
            for a in shards[h]:
                ca, sa = float(costs[a]), size[a]
                if mem[o] + sa <= cap and max(load[h] - ca, load[o] + ca) < load[h] - 1e-12:
                    cand = (max(load[h] - ca, load[o] + ca), o, a, None)
                    best = cand if best is None or cand[:1] < best[:1] else best
                for b in shards[o]:
                    cb, sb = float(costs[b]), size[b]
                    if cb >= ca or mem[o] - sb + sa > cap or mem[h] - sa + sb > cap:
                        continue
                    new = max(load[h] - ca + cb, load[o] + ca - cb)
                    if new < load[h] - 1e-12 and (best is None or new < best[0]):
                        best = (new, o, a, b)
        if best is None:
            return
        _, o, a, b = best

        def move(m, src, dst):
            shards[src].remove(m)
            shards[dst].append(m)
            load[src] -= float(costs[m])
            load[dst] += float(costs[m])
            mem[src] -= size[m]
            mem[dst] += size[m]

        move(a, h, o)
        if b is not None:
            move(b, o, h)


class LocalSweeper:
    """The plain in-process sweeper: one :class:`ZooShard` with every model, batch by batch
    (tests, single-process runs, and the baseline of ``benchmarks/bench_sweep.py``)."""

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.device, self.threads = device, threads

    def run(self, job, sink) -> dict:
        shard = ZooShard(
            job.specs,
            job.classes,
            job.weights,
            self.device,
            self.threads,
            job.batch_size,
            job.with_features,
        )
        outs: dict[str, dict[str, list]] = {}
        for s in range(0, len(job.images), job.batch_size):
            res = shard.run_batch(job.images[s : s + job.batch_size], s)
            for name, o in res["outputs"].items():
                for k, v in o.items():
                    outs.setdefault(name, {}).setdefault(k, []).append(v)
        for name in [s.name for s in job.specs]:
            if name in shard.failed:
                sink.model_failed(name, shard.failed[name])
            elif name in outs:
                o = {k: np.concatenate(v) for k, v in outs[name].items()}
                sink.model_done(name, o["logits"], o.get("features"), 0)
        return {"shards": [[s.name for s in job.specs]], "device": shard.device}
