"""Caption candidates (grammar and LLM) and their scoring against failure directions.

Candidates follow Jain et al., Appendix A.5: ``"a photo of a <adjective> <noun>
<prepositional phrase>"`` with optional adjective and phrase; for the world the grammar is
its own (colours x item x backgrounds, through :meth:`WorldSpec.caption`). Optionally an
LLM behind any OpenAI-compatible endpoint proposes uncommon backgrounds and attributes per
class, as arXiv 2312.05464 does with ChatGPT. Answers are validated against a pydantic
schema and cached on disk with their prompt (keyed by a hash of model and prompt), so a
rerun is reproducible and offline; an unreachable endpoint, a timeout or a malformed answer
falls back to the grammar with a warning.

Scoring (Section 2.2): a caption's score is the SVM decision value of ``caption embedding -
reference embedding`` (reference: ``"a photo of a NOUN"``) after the direction's
standardisation. The mean of the standardisation cancels in a difference of two
embeddings, so the difference is divided by the scale and L2-normalised. Most negative =
hard caption, most positive = easy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field, ValidationError, field_validator

from audit.cache import write_atomic_bytes
from audit.store import content_hash

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


# --------------------------------------------------------------------------------------
# LLM proposals
# --------------------------------------------------------------------------------------
class Proposal(BaseModel):
    """The JSON an LLM must answer with, per class."""

    backgrounds: list[str] = Field(min_length=1, max_length=30)
    attributes: list[str] = Field(min_length=1, max_length=30)

    @field_validator("backgrounds", "attributes")
    @classmethod
    def _short_phrases(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            if not isinstance(s, str) or not s.strip() or len(s) > 80 or "\n" in s:
                raise ValueError(f"each entry must be a short one-line phrase; got {s!r}")
            out.append(re.sub(r"\s+", " ", s.strip().rstrip(".")).lower())
        return list(dict.fromkeys(out))


@dataclass
class LLMConfig:
    """Where and how to ask. ``base_url``/``api_key`` default to OPENAI_BASE_URL/OPENAI_API_KEY."""

    model: str
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 30.0
    n_backgrounds: int = 8
    n_attributes: int = 8
    temperature: float = 0.0
    cache_dir: str | None = None


PROMPT = (
    'You help find where an image classifier fails. For the class "{noun}", list {nb} '
    "uncommon backgrounds or settings in which a photo of a {noun} could be taken, each as a "
    'short prepositional phrase (for example "on a beach"), and {na} uncommon visual '
    "attributes of a {noun} (colour, material, pattern, size or state), each as one or two "
    "adjectives. Answer with JSON only, in the form "
    '{{"backgrounds": ["..."], "attributes": ["..."]}}.'
)


def llm_prompt(noun: str, cfg: LLMConfig) -> str:
    return PROMPT.format(noun=noun, nb=cfg.n_backgrounds, na=cfg.n_attributes)


def parse_proposal(text: str) -> Proposal:
    """The answer's JSON object (code fences and text around it tolerated), validated."""
    if not isinstance(text, str):
        raise ValueError("the answer has no text content")
    m = re.search(r"\{.*\}", text, flags=re.S)
    if not m:
        raise ValueError(f"no JSON object in the answer: {text[:120]!r}")
    try:
        return Proposal.model_validate(json.loads(m.group(0)))
    except (json.JSONDecodeError, ValidationError) as e:
        raise ValueError(f"malformed answer: {e}") from e


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


def _cache_path(cfg: LLMConfig, prompt: str) -> str:
    from audit.paths import cache_dir

    root = cfg.cache_dir or cache_dir("llm")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, f"{content_hash(cfg.model, prompt)}.json")


def llm_proposal(noun: str, cfg: LLMConfig, client=None) -> Proposal | None:
    """Ask (or read the cache) for one class's uncommon backgrounds and attributes.

    Returns None, with a warning, when the endpoint is unreachable, times out or answers
    something that does not validate; valid answers are cached with their prompt.
    """
    prompt = llm_prompt(noun, cfg)
    path = _cache_path(cfg, prompt)
    if os.path.exists(path):
        try:
            with open(path) as f:
                cached = json.load(f)
            return Proposal.model_validate(cached["proposal"])
        except (OSError, ValueError, KeyError, ValidationError) as e:
            log.warning("ignoring unreadable LLM cache entry %s (%s)", path, e)
    base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL")
    if client is None and not base_url and not os.environ.get("OPENAI_API_KEY"):
        log.warning(
            "no LLM endpoint (set OPENAI_BASE_URL or the config's base_url); grammar captions only for %r",
            noun,
        )
        return None
    try:
        if client is None:
            from openai import OpenAI

            client = OpenAI(
                base_url=base_url,
                api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                timeout=cfg.timeout,
                max_retries=0,
            )
        resp = client.chat.completions.create(
            model=cfg.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=cfg.temperature,
        )
        text = resp.choices[0].message.content
        proposal = parse_proposal(text)
    except Exception as e:  # noqa: BLE001 - any failure of the optional LLM path falls back
        log.warning(
            "LLM proposals for %r failed (%s: %s); using the grammar only",
            noun,
            type(e).__name__,
            e,
        )
        return None
    record = {
        "model": cfg.model,
        "prompt": prompt,
        "answer": text,
        "proposal": proposal.model_dump(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_atomic_bytes(path, json.dumps(record, indent=2).encode())
    return proposal


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
        dec = decision_from_row(row, self.X)
        vals = np.where(ids >= 0, dec[np.maximum(ids, 0)], np.nan)
        return np.nanmean(vals, axis=1)


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
            texts = [c for c, _ in cands]
            ref = references.get(cls) or reference_caption(cls)
            E = np.asarray(encode_text(texts + [ref]), np.float64)
            if E.shape[0] != len(texts) + 1:
                raise ValueError(
                    f"encode_text returned {E.shape[0]} rows for {len(texts) + 1} texts"
                )
            emb_cache[cls] = (E[:-1], E[-1])
        T, ref_e = emb_cache[cls]
        scores = (
            grounding.scores(r, cls, T) if grounding is not None else score_captions(r, T, ref_e)
        )
        order = np.argsort(scores, kind="stable")
        k = len(order) // 2 if top_k is None or 2 * top_k > len(order) else top_k
        hard = order[: max(k, 1)]
        rest = order[max(k, 1) :]
        easy = rest[::-1][: (len(rest) if top_k is None else min(top_k, len(rest)))]
        for polarity, picks in (("hard", hard), ("easy", easy)):
            for rank, i in enumerate(picks, start=1):
                out.append(
                    {
                        "scope": r["scope"],
                        "class": cls,
                        "mode": r["mode"],
                        "caption": cands[i][0],
                        "source": cands[i][1],
                        "score": float(scores[i]),
                        "rank": rank,
                        "polarity": polarity,
                    }
                )
    return pa.Table.from_pylist(out, schema=CAPTIONS_SCHEMA)
