"""``retrieval``: generation for any dataset by retrieving real images (AdaVision-style).

For a caption, the backend returns real images of a *pool* split that lie nearest to the
caption in the run's joint image/text space (the embedder of the audit's ``[directions]``
section), found through the FAISS index (:class:`audit.index.ClassIndex`). When the
caption names one of the dataset's classes, only that class's images are searched. It is
the alternative to diffusion when the data is not a world and no diffusion weights exist.

- **Deterministic**: image ``(prompt, seed)`` is the neighbour at rank ``seed mod top_n``
  among the prompt's ``top_n`` nearest; a prompt's images in one call are distinct (a
  taken rank moves to the next free one).
- **Never the evaluation split**: the pool is the ``pool`` split (else ``train``), and the
  audit's evaluation split is refused as a pool.

``create_backend("retrieval:RUN_DIR")`` reads the run's ``manifest.json`` for the audit
config (the dataset and the embedder); the pool's embeddings are cached in the run.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from serve.backends import Backend, _resize

log = logging.getLogger(__name__)


class RetrievalBackend(Backend):
    """Nearest real pool images of a caption, in a finished (or embedded) audit run's space."""

    max_batch = 1024

    def __init__(self, run: str, pool_split: str | None = None, top_n: int = 32):
        from audit.data.table import SPLITS
        from audit.embed import embed_table
        from audit.index import ClassIndex
        from audit.pipeline.config import AuditConfig
        from audit.pipeline.directions import run_embedder
        from audit.pipeline.inputs import load_data
        from audit.store import RunStore

        if not run:
            raise ValueError(
                "the retrieval backend needs an audit run directory: 'retrieval:RUN_DIR'"
            )
        store = RunStore(run)
        manifest = store.manifest()
        if "config" not in manifest:
            raise FileNotFoundError(
                f"{run!r} holds no audit run (no config in manifest.json); run `zoo-audit run` first"
            )
        cfg = AuditConfig(**manifest["config"])
        data, _ = load_data(cfg)
        have = set(data.column("split").tolist())
        eval_split = cfg.data.eval_split
        if pool_split is None:
            pool_split = next((s for s in ("pool", "train") if s in have and s != eval_split), "")
        if not pool_split or pool_split == eval_split or pool_split not in SPLITS:
            raise ValueError(
                f"the retrieval backend needs a pool split other than the evaluation split {eval_split!r}; "
                f"the dataset has {sorted(have)}"
            )
        self.emb, _ = run_embedder(cfg, data, train=False)
        pool = data.split(pool_split)
        if not len(pool):
            raise ValueError(f"the pool split {pool_split!r} of the dataset is empty")
        E = embed_table(store, self.emb, pool, progress=False)
        images, ok, _ = pool.decode()
        ids = pool.example_ids.astype(str)[ok]
        self.images = images
        self.example_ids = ids
        X = E.align(ids)
        labels = pool.labels[ok]
        self.classes = list(data.classes)
        self.by_class = ClassIndex(X, labels)
        self.anywhere = ClassIndex(X, np.zeros(len(X), np.int64))
        self.top_n = int(top_n)
        self.pool_split = pool_split
        self.name = "retrieval"
        # longest class names first, so "ankle boot" wins over "boot"
        self._class_res = sorted(
            (
                (re.compile(rf"(?<![\w-]){re.escape(c.lower())}(?![\w-])"), i)
                for i, c in enumerate(self.classes)
            ),
            key=lambda t: -len(t[0].pattern),
        )
        log.info(
            "retrieval backend: %d %s images of %s (embedder %s)",
            len(ids),
            pool_split,
            run,
            self.emb.name,
        )

    def class_of(self, prompt: str) -> int | None:
        """The class a caption names (the longest class name in it), or None."""
        p = prompt.lower()
        for rx, i in self._class_res:
            if rx.search(p) and i in self.by_class.indexes:
                return i
        return None

    def defaults(self) -> dict:
        h, w = self.images.shape[1:3]
        return {"steps": 1, "guidance": 0.0, "size": [int(h), int(w)]}

    def info(self) -> dict:
        return {
            **super().info(),
            "pool_split": self.pool_split,
            "pool_images": int(len(self.images)),
            "embedder": self.emb.name,
        }

    def neighbours(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """``{prompt: pool row ids of its top_n nearest images}`` (within its class when it names one)."""
        uniq = list(dict.fromkeys(prompts))
        Q = self.emb.encode_text(uniq)
        out = {}
        for p, q in zip(uniq, Q, strict=True):
            c = self.class_of(p)
            index, label = (self.by_class, c) if c is not None else (self.anywhere, 0)
            _, ids = index.search(q[None, :], self.top_n, label)
            out[p] = ids[0][ids[0] >= 0]
        return out

    def pick(self, prompts: list[str], seeds: list[int]) -> list[int]:
        """Pool row of each (prompt, seed): rank ``seed mod n`` among the prompt's neighbours,
        moved to the next free rank when another image of the prompt in this call took it."""
        near = self.neighbours(prompts)
        taken: dict[str, set] = {}
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            ids = near[p]
            n = len(ids)
            r = int(s) % n
            used = taken.setdefault(p, set())
            if len(used) < n:
                while r in used:
                    r = (r + 1) % n
            used.add(r)
            out.append(int(ids[r]))
        return out

    def generate(self, prompts, seeds, steps, guidance, size):
        rows = self.pick(list(prompts), list(seeds))
        return _resize(self.images[rows], tuple(size))
