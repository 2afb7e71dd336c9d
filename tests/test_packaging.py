"""requirements.txt as ComfyUI-Manager reads it, and its agreement with pyproject.toml.

The Manager (`cm-cli install/update/fix`, the legacy UI, `comfy node install`) strips each
line of requirements.txt, skips blank lines and lines starting with `#`, and hands every
other line to pip or uv as one argument, exactly as written. A trailing comment then fails
the whole install ("Invalid requirement ... Trailing '#' is not allowed").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli", reason="tomli is needed to read pyproject.toml on 3.10")


def manager_lines() -> list[str]:
    """The lines ComfyUI-Manager passes to pip, as it selects them."""
    lines = []
    for raw in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_every_requirement_line_is_a_valid_requirement_as_written():
    lines = manager_lines()
    assert lines, "requirements.txt lists no requirement"
    for line in lines:
        requirement = Requirement(line)  # raises InvalidRequirement on a trailing comment
        assert requirement.name.lower() != "torch", "ComfyUI-Manager never installs torch"


def test_requirements_match_pyproject_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = sorted(str(Requirement(d)) for d in pyproject["project"]["dependencies"])
    listed = sorted(str(Requirement(line)) for line in manager_lines())
    assert listed == declared
