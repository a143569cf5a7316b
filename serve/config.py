"""Typed configuration of the generation app and the request/response schemas.

The app is built from one :class:`ServeAppConfig` (from ``serve run`` args, a YAML/TOML
file, or Python). Nothing here imports Ray, so the client and tests can use the schemas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import tomllib
from pydantic import BaseModel, ConfigDict, Field, field_validator

from audit.synthetic.sets import check_set_id
from serve.guard import check_host_name

log = logging.getLogger("zoo_audit.serve")

AUTH_OFF = (
    "auth is OFF: anyone who can reach this port can generate and store sets. Set a token: "
    "ZOO_AUDIT_SERVE_TOKEN=... or token_file (--token-file) with a 0600 file"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Bounds on one request; a request beyond any of them is answered 422 naming the bound."""

    max_prompt_chars: int = Field(300, ge=1)
    max_prompts: int = Field(64, ge=1)
    max_images_per_prompt: int = Field(16, ge=1)
    max_images: int = Field(64, ge=1, description="prompts x images_per_prompt")
    max_pixels: int = Field(
        16 * 1024 * 1024,
        ge=64,
        description="images x height x width of one request (16 at 1024 px, 64 at 512 px)",
    )
    max_steps: int = Field(100, ge=1)
    max_size: int = Field(1024, ge=8)
    min_size: int = Field(8, ge=1)
    size_multiple: int = Field(8, ge=1)
    max_guidance: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="checked while the body streams in")
    client_pixels_per_minute: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="new image pixels one client (address; all loopback addresses are one) may ask for per minute, per ingress replica (4 full requests); 0 = no quota",
    )


class GeneratorOptions(_Strict):
    """The generator deployment: resources, replicas and batching."""

    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: int = Field(
        16,
        ge=1,
        description="per replica: the batch in flight plus the next one (>= 2 x max_batch_size keeps the backend busy)",
    )
    max_queued_requests: int = Field(
        16, ge=0, description="per caller (ingress replica); beyond it 503"
    )
    max_batch_size: int = Field(8, ge=1, description="requests merged by @serve.batch")
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        description="wait for more requests once one arrives (queued requests batch anyway)",
    )
    max_batch_images: int | None = Field(
        None, ge=1, description="images per backend call (default: the backend's)"
    )

    def deployment_options(self, retry_after_s: float) -> dict:
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "max_ongoing_requests": max(self.max_ongoing_requests, self.max_batch_size),
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
        }
        if self.max_replicas > max(self.min_replicas, 1) or self.min_replicas == 0:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            opts["num_replicas"] = self.max_replicas
        return opts


class IngressOptions(_Strict):
    """The FastAPI ingress deployment (cheap: parses, validates, stores)."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(64, ge=0)

    def deployment_options(self, retry_after_s: float) -> dict:
        return {
            "num_replicas": self.num_replicas,
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
        }


class ServeAppConfig(_Strict):
    """Everything ``build_app`` needs. ``backend``: ``world`` | ``null`` | ``diffusers:MODEL``."""

    backend: str = "world"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    store: str = "runs/serve"
    token_env: str = "ZOO_AUDIT_SERVE_TOKEN"
    token_file: str | None = None
    retry_after_s: float = Field(1.0, ge=0)
    claim_timeout_s: float = Field(
        900.0,
        gt=0,
        description="a set id claimed this long without a set is taken over (its holder died)",
    )
    # Host names (or addresses) a request may name in its Host header besides localhost,
    # 127.0.0.1, [::1] and the address it reached the service at. With auth off any other
    # Host gets 403: a DNS-rebinding web page (its own name re-pointed at 127.0.0.1) cannot
    # post to the service. Add the name you reach the service by (a machine's, a reverse
    # proxy's). With a token the check is off unless this list is set (see Ingress._guard).
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names besides localhost that requests may name (no scheme, port or path)",
    )
    limits: Limits = Field(default_factory=Limits)
    generator: GeneratorOptions = Field(default_factory=GeneratorOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, v: list[str]) -> list[str]:
        return [check_host_name(h) for h in v]

    def resolve_token_hash(self) -> str | None:
        """sha256 of the bearer token (file first, then ``$token_env``), or None for no auth."""
        token = None
        if self.token_file:
            if not os.path.exists(self.token_file):
                raise FileNotFoundError(
                    f"token_file {self.token_file!r} does not exist; create it or drop token_file"
                )
            mode = os.stat(self.token_file).st_mode
            if mode & 0o077:
                log.warning(
                    "token_file %r is readable by group or others (mode %o): run `chmod 600 %s`",
                    self.token_file,
                    mode & 0o777,
                    self.token_file,
                )
            with open(self.token_file) as f:
                token = f.read().strip()
            if not token:
                raise ValueError(
                    f"token_file {self.token_file!r} is empty; write the bearer token into it"
                )
        elif os.environ.get(self.token_env):
            token = os.environ[self.token_env].strip()
        return hashlib.sha256(token.encode()).hexdigest() if token else None


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"generator.num_gpus": "1"} -> {"generator": {"num_gpus": "1"}} (``serve run`` args)."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(v, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **v}
        else:
            node[leaf] = v
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def read_config_file(path: str) -> dict[str, Any]:
    """An app config from YAML or TOML. A Serve config file (``applications:``) gives its first app's args."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"serve config {path!r} not found")
    if path.endswith(".toml"):
        with open(path, "rb") as f:
            d = tomllib.load(f)
    else:
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
    if "applications" in d:
        apps = d["applications"] or [{}]
        d = apps[0].get("args") or {}
    return d


def load_config(args: ServeAppConfig | dict[str, Any] | None = None) -> ServeAppConfig:
    """``ServeAppConfig`` from an instance, a dict (``config=FILE`` plus dotted overrides) or None."""
    if isinstance(args, ServeAppConfig):
        return args
    args = dict(args or {})
    base = read_config_file(args.pop("config")) if args.get("config") else {}
    for key in ("backend_options",):  # `serve run ... backend_options='{"steps": 2}'`
        if isinstance(args.get(key), str):
            args[key] = json.loads(args[key])
    if isinstance(args.get("allowed_hosts"), str):  # `serve run ... allowed_hosts=a.lan,b.lan`
        args["allowed_hosts"] = [h for h in args["allowed_hosts"].split(",") if h.strip()]
    return ServeAppConfig.model_validate(_deep_merge(_nest(base), _nest(args)))


class GenerateRequest(_Strict):
    """Body of ``POST /v1/generate``. Unset steps/guidance/size take the backend's defaults."""

    prompts: list[str] = Field(..., min_length=1)
    images_per_prompt: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, lt=2**48)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    size: int | list[int] | None = None
    set_id: str | None = None
    return_images: bool = False

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if isinstance(v, list) and len(v) != 2:
            raise ValueError("size is an int (square) or [height, width]")
        return v

    @field_validator("set_id")
    @classmethod
    def _set_id(cls, v):
        return None if v is None else check_set_id(v)

    def check_limits(self, limits: Limits) -> None:
        """Raise ValueError naming the first bound of ``limits`` that this request exceeds."""
        if len(self.prompts) > limits.max_prompts:
            raise ValueError(
                f"limits.max_prompts={limits.max_prompts}: got {len(self.prompts)} prompts"
            )
        for i, p in enumerate(self.prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}] is empty")
            if len(p) > limits.max_prompt_chars:
                raise ValueError(
                    f"limits.max_prompt_chars={limits.max_prompt_chars}: prompts[{i}] has {len(p)} characters"
                )
        if self.images_per_prompt > limits.max_images_per_prompt:
            raise ValueError(
                f"limits.max_images_per_prompt={limits.max_images_per_prompt}: got images_per_prompt={self.images_per_prompt}"
            )
        n = len(self.prompts) * self.images_per_prompt
        if n > limits.max_images:
            raise ValueError(
                f"limits.max_images={limits.max_images}: {len(self.prompts)} prompts x {self.images_per_prompt} images = {n}"
            )
        if self.steps is not None and self.steps > limits.max_steps:
            raise ValueError(f"limits.max_steps={limits.max_steps}: got steps={self.steps}")
        if self.guidance is not None and self.guidance > limits.max_guidance:
            raise ValueError(
                f"limits.max_guidance={limits.max_guidance}: got guidance={self.guidance}"
            )
        if self.size is not None:
            for s in [self.size] * 2 if isinstance(self.size, int) else self.size:
                if s > limits.max_size:
                    raise ValueError(f"limits.max_size={limits.max_size}: got size={self.size}")
                if s < limits.min_size:
                    raise ValueError(f"limits.min_size={limits.min_size}: got size={self.size}")
                if s % limits.size_multiple:
                    raise ValueError(
                        f"limits.size_multiple={limits.size_multiple}: size={self.size} is not a multiple"
                    )

    def resolved(self, defaults: dict) -> dict:
        """The parameters that determine the images (defaults filled in, size as [H, W])."""
        size = self.size if self.size is not None else defaults["size"]
        size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
        return {
            "prompts": list(self.prompts),
            "images_per_prompt": int(self.images_per_prompt),
            "seed": int(self.seed),
            "steps": int(self.steps if self.steps is not None else defaults["steps"]),
            "guidance": float(self.guidance if self.guidance is not None else defaults["guidance"]),
            "size": size,
        }


def check_pixels(resolved: dict, limits: Limits) -> None:
    """Raise ValueError when a resolved request (defaults filled in) asks for more than ``limits.max_pixels``."""
    n = len(resolved["prompts"]) * resolved["images_per_prompt"]
    h, w = resolved["size"]
    if n * h * w > limits.max_pixels:
        raise ValueError(
            f"limits.max_pixels={limits.max_pixels}: {n} images of {h}x{w} = {n * h * w} pixels; "
            "ask for fewer or smaller images"
        )
