"""Caption candidates (grammar and LLM) and their scoring against failure directions.

Candidates follow Jain et al., Appendix A.5: ``"a photo of a <adjective> <noun>
<prepositional phrase>"`` with optional adjective and phrase; for the world the grammar is
its own (colours x item x backgrounds, through :meth:`WorldSpec.caption`). Optionally an
LLM behind any OpenAI-compatible endpoint proposes uncommon backgrounds and attributes per
class, as arXiv 2312.05464 does with ChatGPT (:mod:`audit.llm`: validated, cached, and
falling back to the grammar with a warning when the endpoint cannot answer).

Scoring (Section 2.2): a caption's score is the SVM decision value of ``caption embedding -
reference embedding`` (reference: ``"a photo of a NOUN"``) after the direction's
standardisation. The mean of the standardisation cancels in a difference of two
embeddings, so the difference is divided by the scale and L2-normalised. Most negative =
hard caption, most positive = easy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from audit.llm import LLMConfig, Proposal, llm_proposal, parse_proposal  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

#: a generic vocabulary for datasets without their own grammar (Appendix A.5 style)
DEFAULT_ADJECTIVES = (
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "small",
    "large",
    "dark",
    "bright",
    "blurry",
    "close-up",
)
DEFAULT_PREPOSITIONS = (
    "on grass",
    "in water",
    "on sand",
    "in the snow",
    "on a road",
    "indoors",
    "outdoors",
    "at night",
    "on a white background",
    "in a forest",
    "on a table",
    "in the sky",
)
PREPOSITION_WORDS = (
    "on",
    "in",
    "at",
    "under",
    "near",
    "with",
    "by",
    "against",
    "beside",
    "inside",
    "over",
    "behind",
)

CAPTIONS_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("class", pa.string()),
        ("mode", pa.int32()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("score", pa.float64()),
        ("rank", pa.int32()),
        ("polarity", pa.string()),
    ]
)

EncodeText = Callable[[list[str]], np.ndarray]


# --------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def reference_caption(noun: str) -> str:
    """The class's generic caption, ``"a photo of a NOUN"``."""
    return f"a photo of {_article(noun)} {noun}"


def grammar_captions(
    noun: str,
    adjectives: Sequence[str] = DEFAULT_ADJECTIVES,
    prepositions: Sequence[str] = DEFAULT_PREPOSITIONS,
) -> list[str]:
    """``"a photo of a [ADJ] NOUN [PREP]"`` for every optional adjective and phrase.

    The reference caption (neither) is left out; order is deterministic.
    """
    if not noun or not isinstance(noun, str):
        raise ValueError(f"noun must be a non-empty string; got {noun!r}")
    out = []
    for adj in (None, *adjectives):
        for prep in (None, *prepositions):
            if adj is None and prep is None:
                continue
            words = f"{adj} {noun}" if adj else noun
            text = f"a photo of {_article(words)} {words}"
            out.append(f"{text} {prep}" if prep else text)
    return out


def world_captions(spec, item: str) -> list[str]:
    """The world's grammar for one item: [colour] x item x [on background], reference excluded."""
    if item not in spec.items:
        raise ValueError(f"item {item!r} is not in the world's items {spec.items}")
    out = []
    for color in (None, *spec.colors):
        for bg in (None, *spec.backgrounds):
            if color is None and bg is None:
                continue
            out.append(spec.caption(item, color, bg))
    return out


def world_reference(spec, item: str) -> str:
    return spec.caption(item)


# LLM proposals (asked in audit/llm.py) as captions
def proposal_captions(noun: str, p: Proposal) -> list[str]:
    """Captions from a proposal: ``a photo of a ATTR NOUN`` and ``a photo of a NOUN PHRASE``."""
    out = []
    for a in p.attributes:
        words = f"{a} {noun}"
        out.append(f"a photo of {_article(words)} {words}")
    for b in p.backgrounds:
        phrase = b if b.split(" ")[0] in PREPOSITION_WORDS else f"on {b}"
        out.append(f"{reference_caption(noun)} {phrase}")
    return list(dict.fromkeys(out))


def data_captions(
    noun: str, values: Mapping[str, Sequence[str]], slots: Mapping[str, str], max_slots: int = 2
) -> list[str]:
    """The data's own grammar for one class: every caption that fills 1..``max_slots`` of the
    attribute slots (``values[attribute]`` its values, ``slots[attribute]`` its template, see
    :func:`audit.data.attributes.compose_caption`); deterministic order, reference excluded."""
    from itertools import combinations, product

    from audit.data.attributes import compose_caption

    attrs = [a for a in slots if values.get(a)]
    out = []
    for r in range(1, min(max_slots, len(attrs)) + 1):
        for subset in combinations(attrs, r):
            for combo in product(*(values[a] for a in subset)):
                out.append(compose_caption(noun, dict(zip(subset, combo, strict=True)), slots))
    return list(dict.fromkeys(out))


def candidate_captions(
    classes: Sequence[str],
    *,
    world_spec=None,
    adjectives: Sequence[str] = DEFAULT_ADJECTIVES,
    prepositions: Sequence[str] = DEFAULT_PREPOSITIONS,
    llm: LLMConfig | None = None,
    client=None,
    attributes: Mapping[str, Sequence[str]] | None = None,
    slots: Mapping[str, str] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Per class name: ``[(caption, source)]``, deduplicated, with source ``data`` (the data's
    attribute grammar), ``grammar`` (the world's grammar, or the generic one) or ``llm``.

    With ``world_spec`` the world's grammar is used for its items; otherwise the data's
    grammar (``attributes``: values per attribute column, ``slots``: its template) comes
    first, then the generic adjective x noun x phrase grammar, then LLM proposals.
    """
    out = {}
    for noun in classes:
        if world_spec is not None and noun in world_spec.items:
            caps = [(c, "grammar") for c in world_captions(world_spec, noun)]
        else:
            caps = (
                [(c, "data") for c in data_captions(noun, attributes or {}, slots or {})]
                if slots
                else []
            )
            seen = {c for c, _ in caps}
            caps += [
                (c, "grammar")
                for c in grammar_captions(noun, adjectives, prepositions)
                if c not in seen
            ]
        if llm is not None:
            p = llm_proposal(noun, llm, client=client)
            if p is not None:
                seen = {c for c, _ in caps}
                caps += [(c, "llm") for c in proposal_captions(noun, p) if c not in seen]
        out[noun] = caps
    return out


def drop_unknown_words(
    candidates: Mapping[str, Sequence[tuple[str, str]]], unknown_words: Callable[[str], list[str]]
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """Candidates without a word the embedder does not know, and ``{word: captions dropped}``.

    An embedder with a closed vocabulary (the world encoder) would embed an unknown word as
    whatever its text model makes of it, and the caption would be ranked on nonsense.
    """
    kept: dict[str, list[tuple[str, str]]] = {}
    dropped: dict[str, int] = {}
    for cls, caps in candidates.items():
        kept[cls] = []
        for c, src in caps:
            unknown = unknown_words(c)
            if unknown:
                for w in dict.fromkeys(unknown):
                    dropped[w] = dropped.get(w, 0) + 1
            else:
                kept[cls].append((c, src))
    return kept, dropped


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------
def score_captions(row: Mapping, caption_emb: np.ndarray, reference_emb: np.ndarray) -> np.ndarray:
    """Decision values ``[M]`` of captions under one ``directions.parquet`` row.

    ``caption_emb [M, D]`` and ``reference_emb [D]`` are text embeddings from the embedder
    that made the image embeddings. Negative = hard, positive = easy.
    """
    if row.get("direction") is None:
        raise ValueError(
            f"row {row.get('scope')}/{row.get('class')}/mode {row.get('mode')} has no direction ({row.get('status')})"
        )
    T = np.asarray(caption_emb, np.float64)
    r = np.asarray(reference_emb, np.float64).reshape(-1)
    w = np.asarray(row["direction"], np.float64)
    if T.ndim != 2 or T.shape[1] != len(w) or len(r) != len(w):
        raise ValueError(
            f"caption embeddings {T.shape} and reference {r.shape} must have the direction's dimension {len(w)}"
        )
    diff = (T - r) / np.asarray(row["scale"], np.float64)
    diff /= np.maximum(np.linalg.norm(diff, axis=1, keepdims=True), 1e-12)
    return float(row["weight_norm"]) * (diff @ w) + float(row["intercept"])


class CaptionGrounding:
    """Image-grounded caption scores: a caption's score is the mean decision value of its
    ``k`` nearest images of the class (``X [N, D]`` image embeddings with ``labels``).

    The paper scores the caption's *text* embedding with an SVM fitted on *image*
    embeddings, which leans on the two modalities being aligned (the reference caption
    subtracts the modality gap). Grounding reads the same direction where it was fitted:
    on images, retrieved by the caption. Neighbours are found once per class and shared by
    every scope; decision values once per direction row.
    """

    def __init__(self, X: np.ndarray, labels: np.ndarray, classes: Sequence[str], k: int = 25):
        from audit.index import ClassIndex

        self.X = np.asarray(X, np.float32)
        self.classes = list(classes)
        self.index = ClassIndex(self.X, np.asarray(labels))
        self.k = int(k)
        self._neighbours: dict[tuple[str, int], np.ndarray] = {}

    def scores(self, row: Mapping, cls: str, caption_emb: np.ndarray) -> np.ndarray:
        from audit.directions import decision_from_row

        key = (cls, len(caption_emb))
        if key not in self._neighbours:
            _, ids = self.index.search(
                np.asarray(caption_emb, np.float32), self.k, self.classes.index(cls)
            )
            self._neighbours[key] = ids
        ids = self._neighbours[key]
        # decision values of the neighbours only (every row's made the grounding N x directions:
        # hours at 50,000 images and 1,000 classes)
        need = np.unique(ids[ids >= 0])
        if not len(need):
            return np.full(len(ids), np.nan)
        dec = decision_from_row(row, self.X[need])
        pos = np.minimum(np.searchsorted(need, np.maximum(ids, 0)), len(need) - 1)
        vals = np.where(ids >= 0, dec[pos], np.nan)
        return np.nanmean(vals, axis=1)


def _embed_with_reference(
    texts: list[str], reference: str, encode_text: EncodeText
) -> tuple[np.ndarray, np.ndarray]:
    """``(caption embeddings [M, D], reference embedding [D])``, embedded in one call."""
    E = np.asarray(encode_text(texts + [reference]), np.float64)
    if E.shape[0] != len(texts) + 1:
        raise ValueError(f"encode_text returned {E.shape[0]} rows for {len(texts) + 1} texts")
    return E[:-1], E[-1]


def _ranked_rows(
    r: Mapping, cands: Sequence[tuple[str, str]], scores: np.ndarray, top_k: int | None
) -> list[dict]:
    """One direction's hard (lowest score first) and easy (highest first) caption rows."""
    order = np.argsort(scores, kind="stable")
    k = len(order) // 2 if top_k is None or 2 * top_k > len(order) else top_k
    hard = order[: max(k, 1)]
    rest = order[max(k, 1) :]
    easy = rest[::-1][: (len(rest) if top_k is None else min(top_k, len(rest)))]
    return [
        {
            "scope": r["scope"],
            "class": r["class"],
            "mode": r["mode"],
            "caption": cands[i][0],
            "source": cands[i][1],
            "score": float(scores[i]),
            "rank": rank,
            "polarity": polarity,
        }
        for polarity, picks in (("hard", hard), ("easy", easy))
        for rank, i in enumerate(picks, start=1)
    ]


def captions_table(
    directions: pa.Table,
    candidates: Mapping[str, Sequence[tuple[str, str]]],
    encode_text: EncodeText,
    references: Mapping[str, str] | None = None,
    top_k: int | None = 5,
    grounding: CaptionGrounding | None = None,
) -> pa.Table:
    """``captions.parquet``: the hardest and easiest captions per scope x class x mode.

    Rows with a direction are scored when their status is ``ok`` (or for mode 0 whatever it
    is, as the paper captions every class). ``candidates`` maps a class name to
    ``[(caption, source)]``; ``references`` maps it to its reference caption (default
    :func:`reference_caption`). Each class's texts are embedded once for all scopes.
    ``top_k`` hard and ``top_k`` easy captions per direction (None: all, split at the middle);
    ``rank`` 1 is the hardest (hard) or easiest (easy).

    With ``grounding`` a caption is scored on the image side instead (see
    :class:`CaptionGrounding`); the text-side score of the paper is the default.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None; got {top_k}")
    references = dict(references or {})
    rows = [
        r
        for r in directions.to_pylist()
        if r["direction"] is not None and (r["mode"] == 0 or r["status"] == "ok")
    ]
    out = []
    emb_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in rows:
        cls = r["class"]
        cands = list(candidates.get(cls, ()))
        if not cands:
            log.warning("no caption candidates for class %r; skipped", cls)
            continue
        if cls not in emb_cache:
            ref = references.get(cls) or reference_caption(cls)
            emb_cache[cls] = _embed_with_reference([c for c, _ in cands], ref, encode_text)
        T, ref_e = emb_cache[cls]
        scores = (
            grounding.scores(r, cls, T) if grounding is not None else score_captions(r, T, ref_e)
        )
        out += _ranked_rows(r, cands, scores, top_k)
    return pa.Table.from_pylist(out, schema=CAPTIONS_SCHEMA)
