"""Optional dependencies: a missing one names its extra; `import audit` loads no heavy stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tomllib

from audit.extras import available, install_hint, require


def test_require_names_the_extra_of_a_missing_module():
    with pytest.raises(ImportError) as e:
        require("zoo_audit_no_such_module", "clip")
    assert str(e.value) == (
        "zoo_audit_no_such_module is not installed: pip install 'zoo-audit[clip]'"
    )
    with pytest.raises(ImportError, match=r"zoo-audit\[llm\]"):
        require("zoo_audit_no_such_module.sub", "llm")
    assert require("json", "x") is json
    assert available("json") and not available("zoo_audit_no_such_module.sub")


def test_a_module_whose_own_dependency_is_missing_says_what_it_lacks(tmp_path, monkeypatch):
    (tmp_path / "zoo_audit_broken_pkg.py").write_text("import zoo_audit_missing_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as e:
        require("zoo_audit_broken_pkg", "diffusion")
    msg = str(e.value)
    assert "zoo_audit_broken_pkg cannot be imported" in msg and "zoo_audit_missing_dep" in msg
    assert install_hint("diffusion") in msg


def test_every_extra_named_by_the_code_is_declared_and_all_covers_them():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set()
    for path in [*root.glob("audit/**/*.py"), *root.glob("serve/*.py")]:
        named |= set(re.findall(r"require\(\s*[^,()]+,\s*\"(\w+)\"\)", path.read_text()))
        named |= set(re.findall(r"install_hint\(\s*[\"'](\w+)[\"']\)", path.read_text()))
    assert {"clip", "diffusion", "llm", "imagenet"} <= named  # the sites really use the helper
    assert named <= set(extras), f"extras named in code but not declared: {named - set(extras)}"
    (all_,) = extras["all"]
    assert set(all_.split("[")[1].rstrip("]").split(",")) == set(extras) - {"all", "dev"}


def test_import_audit_loads_no_heavy_stack():
    code = (
        "import sys, json, audit, audit.zoo.models, audit.pipeline.runner, audit.captions; "
        "print(json.dumps(sorted(m for m in ('torch', 'open_clip', 'diffusers', 'openai', "
        "'timm', 'transformers', 'ray') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
