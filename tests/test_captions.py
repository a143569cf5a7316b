"""Caption candidates (grammar, world, LLM via a loopback stub) and caption scoring."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from audit.captions import (
    CAPTIONS_SCHEMA,
    LLMConfig,
    candidate_captions,
    captions_table,
    grammar_captions,
    parse_proposal,
    reference_caption,
    world_captions,
)
from audit.data.world import WorldSpec
from audit.directions import FailureDirections, directions_table

WORLD = dict(
    items=["t-shirt", "sandal", "bag"],
    colors=["red", "green", "blue"],
    backgrounds=["brick", "grass", "gravel"],
)


def test_grammar_captions():
    caps = grammar_captions("apple", ["red"], ["on grass"])
    assert caps == [
        "a photo of an apple on grass",
        "a photo of a red apple",
        "a photo of a red apple on grass",
    ]
    assert reference_caption("owl") == "a photo of an owl"
    with pytest.raises(ValueError, match="noun"):
        grammar_captions("")


def test_world_captions_follow_the_world_grammar():
    spec = WorldSpec.from_dict(WORLD)
    caps = world_captions(spec, "sandal")
    assert len(caps) == 4 * 4 - 1 and len(set(caps)) == len(caps)
    assert "a photo of a blue sandal on grass" in caps and "a photo of a sandal" not in caps
    for c in caps:
        assert spec.parse_caption(c)["item"] == "sandal"
    with pytest.raises(ValueError, match="not in the world"):
        world_captions(spec, "owl")
    cands = candidate_captions(["sandal"], world_spec=spec)
    assert {s for _, s in cands["sandal"]} == {"grammar"}


# -- the LLM path against a loopback OpenAI-compatible stub ------------------------------
GOOD = {"backgrounds": ["on a beach", "snow", "In a Library."], "attributes": ["plaid", "metallic"]}


class _Stub:
    def __init__(self):
        self.mode = "good"
        self.hits = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.hits += 1
                if stub.mode == "slow":
                    time.sleep(1.5)
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                content = {
                    "good": "```json\n" + json.dumps(GOOD) + "\n```",
                    "malformed": '{"backgrounds": "not a list"}',
                    "slow": json.dumps(GOOD),
                }[stub.mode]
                answer = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content},
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(answer).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.close()


def test_llm_proposals_are_validated_cached_and_reused(stub, tmp_path):
    cfg = LLMConfig(
        model="stub-model", base_url=stub.url, api_key="x", timeout=5, cache_dir=str(tmp_path)
    )
    cands = candidate_captions(["owl"], adjectives=["small"], prepositions=["on grass"], llm=cfg)[
        "owl"
    ]
    llm = [c for c, s in cands if s == "llm"]
    assert "a photo of a plaid owl" in llm and "a photo of an owl on a beach" in llm
    assert "a photo of an owl on snow" in llm and "a photo of an owl in a library" in llm
    assert stub.hits == 1
    cached = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert cached["model"] == "stub-model" and "owl" in cached["prompt"]
    stub.mode = "malformed"  # a second run is served from the cache, not the endpoint
    again = candidate_captions(["owl"], adjectives=["small"], prepositions=["on grass"], llm=cfg)[
        "owl"
    ]
    assert again == cands and stub.hits == 1


def test_malformed_answer_falls_back_to_grammar(stub, tmp_path, caplog):
    stub.mode = "malformed"
    cfg = LLMConfig(model="m", base_url=stub.url, api_key="x", timeout=5, cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="audit.captions"):
        cands = candidate_captions(["owl"], llm=cfg)["owl"]
    assert stub.hits == 1 and {s for _, s in cands} == {"grammar"}
    assert "failed" in caplog.text and not list(tmp_path.glob("*.json"))


def test_timeout_and_unreachable_fall_back_to_grammar(stub, tmp_path, caplog):
    stub.mode = "slow"
    cfg = LLMConfig(model="m", base_url=stub.url, api_key="x", timeout=0.3, cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="audit.captions"):
        cands = candidate_captions(["owl"], llm=cfg)["owl"]
        dead = LLMConfig(
            model="m",
            base_url="http://127.0.0.1:9/v1",
            api_key="x",
            timeout=1,
            cache_dir=str(tmp_path),
        )
        cands_dead = candidate_captions(["owl"], llm=dead)["owl"]
    assert time.perf_counter() - t0 < 5
    assert {s for _, s in cands} == {"grammar"} and {s for _, s in cands_dead} == {"grammar"}
    assert "Timeout" in caplog.text


def test_parse_proposal_rejects_bad_json():
    assert parse_proposal("text before " + json.dumps(GOOD)).attributes == ["plaid", "metallic"]
    for bad in (
        "no json here",
        '{"backgrounds": [], "attributes": ["x"]}',
        '{"backgrounds": ["a\\nb"], "attributes": ["x"]}',
    ):
        with pytest.raises(ValueError):
            parse_proposal(bad)


# -- scoring in a shared image/text space ------------------------------------------------
def test_planted_caption_ranks_hardest():
    spec = WorldSpec.from_dict(WORLD)
    rng = np.random.default_rng(0)
    d = 48
    vocab = {w: rng.normal(size=d) for w in spec.items + spec.colors + spec.backgrounds}

    def embed(item, color, background, noise=0.0):
        v = (
            vocab[item]
            + (vocab[color] if color else 0)
            + (vocab[background] if background else 0)
            + noise * rng.normal(size=d)
        )
        return v / np.linalg.norm(v)

    def encode_text(texts):
        return np.stack([embed(**spec.parse_caption(t)) for t in texts]).astype(np.float32)

    n = 600
    color = rng.choice(spec.colors, n)
    bg = rng.choice(spec.backgrounds, n)
    X = np.stack([embed("bag", c, b, noise=0.3) for c, b in zip(color, bg, strict=True)])
    correct = ~((color == "blue") & (rng.random(n) < 0.9)) & (
        rng.random(n) > 0.03
    )  # blue bags fail
    est = FailureDirections(n_permutations=10, max_modes=1).fit(X, correct, labels=np.full(n, 2))
    table = directions_table({"m": est}, spec.items)
    cands = candidate_captions(spec.items, world_spec=spec)
    caps = captions_table(
        table, cands, encode_text, references={"bag": spec.caption("bag")}, top_k=3
    )
    assert caps.schema == CAPTIONS_SCHEMA
    hard = [r for r in caps.to_pylist() if r["polarity"] == "hard"]
    easy = [r for r in caps.to_pylist() if r["polarity"] == "easy"]
    assert [r["rank"] for r in hard] == [1, 2, 3] and len(easy) == 3
    assert "blue" in hard[0]["caption"]
    assert all("blue" not in r["caption"] for r in easy)
    assert hard[0]["score"] < 0 < easy[0]["score"] and hard[0]["score"] <= hard[1]["score"]


def test_image_grounded_scoring_ranks_the_caption_of_the_failing_cluster_hardest():
    from audit.captions import CaptionGrounding, captions_table
    from audit.directions import FailureDirections, directions_table

    rng = np.random.default_rng(0)
    d = 16
    centres = {
        name: v / np.linalg.norm(v) for name, v in zip("abc", rng.normal(size=(3, d)), strict=True)
    }
    X, labels, correct = [], [], []
    for name, fails in (("a", True), ("b", False), ("c", False)):
        X.append(centres[name] + 0.15 * rng.normal(size=(60, d)))
        labels += [0] * 60
        correct += [not fails] * 60
    X = np.concatenate(X).astype(np.float32)
    labels, correct = np.asarray(labels), np.asarray(correct)
    est = FailureDirections(n_permutations=5, max_modes=1).fit(X, correct, labels)
    dirs = directions_table({"m": est}, ["thing"])
    texts = {"caption a": centres["a"], "caption b": centres["b"], "caption c": centres["c"]}

    def encode(ts):
        return np.stack([texts.get(t, np.zeros(d)) for t in ts])

    caps = captions_table(
        dirs,
        {"thing": [(t, "grammar") for t in texts]},
        encode,
        {"thing": "ref"},
        top_k=1,
        grounding=CaptionGrounding(X, labels, ["thing"], k=20),
    )
    rows = {r["polarity"]: r for r in caps.to_pylist()}
    assert rows["hard"]["caption"] == "caption a"
    assert (
        rows["easy"]["caption"] in ("caption b", "caption c")
        and rows["hard"]["score"] < rows["easy"]["score"]
    )
