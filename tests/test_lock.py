"""The environment the suite runs in is the one `requirements.lock` describes (issue: reproducible
installs). `make install` installs with the lock as pip constraints; this test fails when a
package drifted from it (a hand install, a stale venv, a lock that was not refreshed with
`make lock` after pyproject changed)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    """name -> pinned version, for the pins whose environment markers hold here."""
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not Marker(str(req.marker)).evaluate():
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_lock_pins_every_direct_dependency_exactly():
    pins = read_lock()
    dist = metadata.distribution("fastgrpo")
    for raw in dist.requires or []:
        req = Requirement(raw)
        env = {"extra": "dev"}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        assert canonicalize_name(req.name) in pins, f"{req.name} is a dependency but not in {LOCK.name}"


def test_installed_versions_equal_the_lock():
    pins = read_lock()
    drifted = []
    for name, want in pins.items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # the lock is universal: e.g. CUDA wheels torch's CPU build does not need
        # a local build label (torch 2.13.0+cpu) is the same release as the pin
        if Version(re.sub(r"\+.*$", "", str(have))) != want:
            drifted.append(f"{name}: installed {have}, locked {want}")
    assert not drifted, "environment drifted from requirements.lock (run `make install`):\n" + "\n".join(drifted)
    for key in ("torch", "transformers", "deepspeed", "megatron-core", "hydra-core", "mlflow"):
        assert key in pins
