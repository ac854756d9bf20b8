"""The dependency policy (docs/dependencies.md): tested ranges in pyproject.toml, exact pins of the documented
demo run in constraints.txt, and the transformers floor tested here as CI tests the newest versions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in reqs}


def _pins(file: str = "constraints.txt") -> dict[str, Version]:
    pins = {}
    for line in (REPO / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version.split("+")[0])
    return pins


def _floor(req: Requirement) -> str:
    return next(s.version for s in req.specifier if s.operator in (">=", "=="))


def test_every_range_has_a_tested_floor_and_a_ceiling():
    for name, req in _requirements().items():
        ops = {s.operator for s in req.specifier}
        assert ops == {"=="} or {">=", "<"} <= ops or {">=", "<="} <= ops, (
            f"{name}: {req.specifier} is not a tested range"
        )


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _pins()
    for name, req in _requirements().items():
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"


def test_the_floor_constraints_pin_exactly_the_declared_floors():
    floors = _pins("constraints-floor.txt")
    for name, req in _requirements().items():
        assert floors.get(name) == Version(_floor(req)), (
            f"constraints-floor.txt: {name} is not pinned at {req.specifier}"
        )


def test_the_transformers_floor_passes_the_tests_that_touch_its_api(tmp_path):
    """Installs the declared lowest transformers beside the newest and runs the tests of what changed between
    releases (cache argument names, generation, the classifier's prompt decision, deprecations)."""
    floor = _floor(_requirements()["transformers"])
    target = tmp_path / "floor"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            f"transformers=={floor}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    check = (
        "import sys, transformers; from packaging.version import Version; "
        "assert Version(transformers.__version__) == Version(sys.argv[1]), transformers.__version__"
    )
    assert subprocess.run([sys.executable, "-c", check, floor], env=env).returncode == 0
    tests = [
        "tests/model/test_classifier.py",
        "tests/model/test_transformers_api.py",
        "tests/upcycling/test_upcycle.py",
        "tests/export/test_export_decode.py",
        "tests/test_checkpoint.py",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:]
