"""The generation service's parts without Ray: the backend registry and config, the diffusers
backend called directly (a tiny random pipeline, the real loading and sampling path, and on
CUDA in fp16: ``pytest -m gpu``), request limits, seeds, auth-off warnings and the set store.
The service over HTTP and through its handle: test_serve_http.py and test_serve_hostile.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from serve_helpers import (
    BLUE_BAG,
    RED_SANDAL,
    TOKEN,
)

from audit.synthetic.sets import check_set_id, image_seed, request_seeds
from serve.backends import create_backend, list_backends
from serve.config import GenerateRequest, Limits, ServeAppConfig, load_config

pytest_plugins = ["serve_fixtures"]  # service, http, tiny_sd, one_thread


def test_registry_and_config_errors():
    assert {"world", "null", "diffusers"} <= set(list_backends())
    assert "retrieval" not in list_backends()  # the audit's own generator, not a Serve backend
    with pytest.raises(ValueError, match="did you mean"):
        create_backend("wrld")
    for bad in ["../x", "/abs", "a/b", ".hidden", "", "a..b", "x" * 200]:
        with pytest.raises(ValueError, match="set_id"):
            check_set_id(bad)
    assert check_set_id("family-resnet_v1.2") == "family-resnet_v1.2"
    cfg = load_config({"backend": "null", "generator.num_gpus": "1", "limits.max_steps": "7"})
    assert cfg.generator.num_gpus == 1.0 and cfg.limits.max_steps == 7
    assert cfg.generator.deployment_options(1.0)["num_replicas"] == 1
    auto = load_config(
        {"generator": {"min_replicas": 1, "max_replicas": 4}}
    ).generator.deployment_options(1.0)
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto
    with pytest.raises(ValueError, match="limits.max_images_per_prompt=2"):
        GenerateRequest(prompts=["a"], images_per_prompt=3).check_limits(
            Limits(max_images_per_prompt=2)
        )


def test_diffusers_backend_direct(tiny_sd, one_thread):
    b = create_backend(f"diffusers:{tiny_sd}", steps=2, num_threads=one_thread)
    assert b.defaults()["size"] == [32, 32] and b.dtype.__repr__() == "torch.float32"
    pair = b.generate(["a red sandal", "a blue bag"], [11, 12], 2, 5.0, (32, 32))
    alone = b.generate(["a red sandal"], [11], 2, 5.0, (32, 32))
    other = b.generate(["a red sandal"], [13], 2, 5.0, (32, 32))
    assert pair.shape == (2, 32, 32, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[0], alone[0])  # independent of what else is in the batch
    assert not np.array_equal(alone[0], other[0])
    with pytest.raises(ValueError, match="unknown diffusers scheduler"):
        create_backend(f"diffusers:{tiny_sd}", scheduler="NoSuchScheduler")
    ddim = create_backend(f"diffusers:{tiny_sd}", scheduler="DDIMScheduler")
    assert ddim.scheduler == "DDIMScheduler"
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        create_backend("diffusers:nobody/no-such-model-here")


@pytest.mark.gpu
def test_diffusers_fp16_on_cuda(tiny_sd):
    """On a CUDA device: fp16 with attention slicing; a batched call gives the images of one
    call per prompt (within fp16 noise); the timings of both are printed (run with -s)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    b = create_backend(f"diffusers:{tiny_sd}", steps=10)
    assert b.device == "cuda" and b.dtype == torch.float16
    prompts = [f"a photo of a red sandal on grass {i}" for i in range(8)]
    seeds, size = list(range(8)), tuple(b.defaults()["size"])
    b.generate(prompts[:2], seeds[:2], 10, 7.5, size)  # warm-up
    direct, batched = [], []
    for _ in range(3):
        t = time.perf_counter()
        one = [b.generate([p], [s], 10, 7.5, size)[0] for p, s in zip(prompts, seeds, strict=True)]
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        many = b.generate(prompts, seeds, 10, 7.5, size)
        batched.append(time.perf_counter() - t)
    diff = max(
        int(np.abs(m.astype(int) - o.astype(int)).max()) for m, o in zip(many, one, strict=True)
    )
    print(
        f"\ndiffusers fp16 on {torch.cuda.get_device_name(0)}: {len(prompts)} prompts at {size[0]}px, "
        f"10 steps: one call per prompt {min(direct):.3f}s, batched {min(batched):.3f}s "
        f"(ratio {min(direct) / min(batched):.2f}x); max abs diff {diff}"
    )
    assert many.shape == (8, *size, 3) and diff <= 8


def test_default_limits_are_lower_and_count_pixels():
    """Issue 11 #6: 16 x 16 images at 1024 px were allowed by default (28 s CPU, ~3 GB RSS)."""
    from serve.config import check_pixels

    lim = Limits()
    with pytest.raises(ValueError, match="limits.max_images=64"):
        GenerateRequest(prompts=["a"] * 16, images_per_prompt=16, size=1024).check_limits(lim)
    req = GenerateRequest(prompts=["a"] * 8, images_per_prompt=8, size=1024)
    req.check_limits(lim)
    with pytest.raises(ValueError, match="limits.max_pixels"):
        check_pixels(req.resolved({"steps": 1, "guidance": 0.0, "size": [32, 32]}), lim)
    check_pixels(
        GenerateRequest(prompts=["a"] * 16, size=1024).resolved(
            {"steps": 1, "guidance": 0, "size": 8}
        ),
        lim,
    )
    assert lim.max_body_bytes <= 64 * 1024 and lim.client_pixels_per_minute > 0


def test_duplicate_prompts_get_distinct_seeds():
    """Issue 11 #10: a prompt given twice in one request reused its seeds (2 distinct images of 4)."""
    prompts = [RED_SANDAL, BLUE_BAG, RED_SANDAL]
    seeds = request_seeds(prompts, 2, 5)
    pairs = list(zip([p for p in prompts for _ in range(2)], seeds, strict=True))
    assert len(set(pairs)) == 6  # an image is (prompt, seed): all distinct
    # a prompt's first images keep the seeds they always had (stored sets stay reproducible)
    assert seeds[:4] == [image_seed(5, 0), image_seed(5, 1), image_seed(5, 0), image_seed(5, 1)]


def test_token_file_readable_by_others_warns_and_auth_off_is_loud(tmp_path, caplog):
    """Issue 11 #6 and #10: auth off was quiet; a world-readable token file went unnoticed."""
    from serve.main import startup_lines

    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    tok.chmod(0o644)
    with caplog.at_level("WARNING", logger="zoo_audit.serve"):
        ServeAppConfig(token_file=str(tok)).resolve_token_hash()
    assert "chmod 600" in caplog.text and "644" in caplog.text
    caplog.clear()
    tok.chmod(0o600)
    with caplog.at_level("WARNING", logger="zoo_audit.serve"):
        ServeAppConfig(token_file=str(tok)).resolve_token_hash()
    assert caplog.text == ""
    off = startup_lines(
        ServeAppConfig(token_env="ZOO_AUDIT_NO_SUCH_TOKEN_VAR", store=str(tmp_path / "s")), 8000
    )
    assert off[0].startswith("WARNING: auth is OFF") and "auth OFF" in off[1]
    on = startup_lines(ServeAppConfig(token_file=str(tok), store=str(tmp_path / "s")), 8000)
    assert not any("WARNING" in line for line in on)


def test_store_failure_in_write_set_leaves_nothing_and_the_claim_is_released(tmp_path):
    """Issue 11 #3 and #5 without Ray: the claim is exclusive, released after a failure (the
    id is free again), and a write that dies leaves no temporary and no set."""
    from audit.store import RunStore
    from audit.synthetic.claims import claim_set, release_claim
    from audit.synthetic.sets import SetUnreadable, read_set_meta, write_set

    store = RunStore(tmp_path / "run")
    assert claim_set(store, "s", "hash-a", 60) is None
    held = claim_set(store, "s", "hash-b", 60)
    assert held is not None and held["request_hash"] == "hash-a"
    req = {
        "prompts": ["p"],
        "images_per_prompt": 1,
        "seed": 0,
        "steps": 1,
        "guidance": 0.0,
        "size": [8, 8],
    }

    class Full:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_output_stream(self, path):
            raise OSError(28, "No space left on device")

    real = store.fs
    store.fs = Full(real)
    with pytest.raises(OSError, match="No space"):
        write_set(store, "s", req, "hash-a", "null", [1], [b"png"])
    store.fs = real
    release_claim(store, "s")
    assert not store.exists("synthetic/s")  # no temporary, no claim, no set: the id is free
    assert claim_set(store, "s", "hash-b", 60) is None  # and can be claimed again
    assert claim_set(store, "s", "hash-c", 0) is None  # a stale claim (holder dead) is taken over
    assert write_set(store, "s", req, "hash-c", "null", [1], [b"png"])["counts"] == [
        {"prompt": "p", "n": 1}
    ]
    assert write_set(store, "s", req, "hash-c", "null", [1], [b"png"]) is None  # never overwritten
    store.write_bytes("synthetic/s/part-00000.parquet", b"garbage")
    with pytest.raises(SetUnreadable, match="cannot be read"):
        read_set_meta(store, "s")
