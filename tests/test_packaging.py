"""The package: a wheel builds, and it asks for compatible ranges, not the exact tested versions."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

from conftest import REPO

SOURCES = ("setup.cfg", "pyproject.toml", "requirements.txt", "MANIFEST.in", "README.md")


def requirements(lines: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {requirement.name.lower(): requirement for requirement in parsed}


@pytest.mark.slow
def test_wheel_lists_compatible_ranges_that_hold_the_tested_versions(tmp_path):
    """Built offline from a copy of the sources (nothing is written into the repository)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        shutil.copy(REPO / name, source / name)
    for package in ("extract", "head", "live"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheels"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("fc7cache-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith("/METADATA")]
        text = archive.read(metadata).decode()
        assert "head/imagenet_wnids.txt" in archive.namelist()
    needed = requirements(
        [line.split(":", 1)[1] for line in text.splitlines() if line.startswith("Requires-Dist:")]
    )
    runtime = {name: r for name, r in needed.items() if r.marker is None}
    assert runtime["torch"].specifier == Requirement("torch>=2.4,<3").specifier
    tested = requirements((REPO / "constraints.txt").read_text().splitlines())
    for name, requirement in runtime.items():
        assert requirement.specifier, f"{name}: no range"
        assert all(spec.operator not in ("==", "===") for spec in requirement.specifier), name
        version = next(iter(tested[name].specifier)).version
        assert requirement.specifier.contains(version), f"{name} {version} outside {requirement}"
    # Negative controls: torch 3 and torch 2.3 fall outside; an exact pin is one the test refuses.
    assert not runtime["torch"].specifier.contains("3.0.0")
    assert not runtime["torch"].specifier.contains("2.3.1")
    assert next(iter(tested["torch"].specifier)).operator == "=="
    assert set(runtime) == set(requirements((REPO / "requirements.txt").read_text().splitlines()))
