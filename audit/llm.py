"""LLM proposals of uncommon backgrounds and attributes per class (arXiv 2312.05464 asks
ChatGPT), through the ``openai`` client against any OpenAI-compatible endpoint (the ``llm``
extra: ``pip install 'zoo-audit[llm]'``).

Answers are validated against a pydantic schema and cached on disk with their prompt (keyed
by a hash of model and prompt), so a rerun is reproducible and offline; an unreachable
endpoint, a timeout, a malformed answer or a missing ``openai`` package gives None with a
warning, and the caller falls back to the grammar. :mod:`audit.captions` turns a proposal
into captions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field, ValidationError, field_validator

from audit.cache import write_atomic_bytes
from audit.extras import require
from audit.store import content_hash

log = logging.getLogger(__name__)


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
            client = require("openai", "llm").OpenAI(
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
