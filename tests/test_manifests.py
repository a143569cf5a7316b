"""The cluster manifests, validated against schemas, not only parsed.

- ``cluster/ray-cluster.yaml`` against the cluster launcher's own schema, which the
  installed ``ray`` package ships (``ray/autoscaler/ray-schema.json``, what ``ray up``
  validates with).
- ``cluster/rayjob.yaml`` against ``RAYJOB_SCHEMA`` below. No installed package ships
  KubeRay's RayJob CRD (it lives in the KubeRay operator's Helm chart), so this is a JSON
  Schema written for this project from KubeRay's documented ``ray.io/v1`` RayJob API
  (RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec): only the fields our
  manifest uses, with their types, and no unknown keys where the CRD has none (so a typo
  fails here instead of being pruned silently by the API server). Pod templates are
  checked only for what we set in them.

Both manifests' commands are the same ``zoo-audit run CONFIG --out RUN`` that the
end-to-end tests submit: parsed by the CLI's own parser, with a config that loads.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_CLUSTER = os.path.join(ROOT, "cluster", "ray-cluster.yaml")
RAYJOB = os.path.join(ROOT, "cluster", "rayjob.yaml")

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "value": {"type": "string"},
                    "valueFrom": {
                        "type": "object",
                        "properties": {
                            "secretKeyRef": {
                                "type": "object",
                                "required": ["name", "key"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "key": {"type": "string"},
                                },
                            }
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "requests": {"type": "object", "additionalProperties": _QUANTITY},
                "limits": {"type": "object", "additionalProperties": _QUANTITY},
            },
        },
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"containerPort": {"type": "integer"}, "name": {"type": "string"}},
            },
        },
    },
}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
RAYJOB_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "KubeRay RayJob (ray.io/v1), the fields zoo-audit uses; written from KubeRay's API docs",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                    "maxLength": 63,
                }
            },
        },
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "suspend": {"type": "boolean"},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": _STR_MAP,
                                "template": _TEMPLATE,
                                "serviceType": {"type": "string"},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "numOfHosts": {"type": "integer", "minimum": 1},
                                    "rayStartParams": _STR_MAP,
                                    "template": _TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _validator(schema):
    jsonschema = pytest.importorskip("jsonschema")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def load(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_ray_cluster_yaml_is_valid_for_the_cluster_launcher():
    v = _validator(ray_schema())
    cfg = load(RAY_CLUSTER)
    assert errors(v, cfg) == []
    # the schema has teeth: a misspelt key or a wrong type is refused
    bad = copy.deepcopy(cfg)
    bad["available_node_type"] = bad.pop("available_node_types")
    assert errors(v, bad)
    bad = copy.deepcopy(cfg)
    bad["max_workers"] = "four"
    assert errors(v, bad)
    # the node types the head names exist, and the workers' bounds fit the cluster's
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert (
        sum(t.get("max_workers", 0) for t in cfg["available_node_types"].values())
        <= cfg["max_workers"]
    )


def test_rayjob_yaml_is_valid_against_the_rayjob_api():
    v = _validator(RAYJOB_SCHEMA)
    job = load(RAYJOB)
    assert errors(v, job) == []
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # typo for replicas
    assert errors(v, bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = (
        0  # must be a string
    )
    assert errors(v, bad)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict) and set(env) <= {"working_dir", "env_vars", "pip", "py_modules"}
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def _commands(path: str) -> list[str]:
    """Every ``zoo-audit run ...`` command of a manifest: its fields and its usage comments."""
    with open(path) as f:
        text = f.read()
    doc = yaml.safe_load(text)
    found = [doc["spec"]["entrypoint"]] if doc.get("kind") == "RayJob" else []
    lines, cmd = [], ""
    for line in text.splitlines():  # comment lines, with their backslash continuations joined
        if line.lstrip().startswith("#"):
            body = line.lstrip()[1:].strip()
            more = body.endswith("\\")
            cmd = f"{cmd} {body[:-1] if more else body}".strip()
            if not more:
                lines.append(cmd)
                cmd = ""
    found += [m.group(0) for ln in lines for m in re.finditer(r"zoo-audit run \S+.*", ln)]
    return found


@pytest.mark.parametrize("path", [RAY_CLUSTER, RAYJOB], ids=["ray-cluster", "rayjob"])
def test_manifests_run_the_same_zoo_audit_run_as_the_tests(path, monkeypatch):
    from audit.pipeline.config import find_config, load_config
    from cluster.cli import build_parser

    cmds = _commands(path)
    assert cmds, f"{os.path.basename(path)} names no `zoo-audit run` command"
    monkeypatch.chdir(ROOT)
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "zoo-audit"
        a = build_parser().parse_args(argv[1:])
        assert a.fn.__name__ == "_run" and a.out
        load_config(find_config(a.config))  # the config it names ships and loads
