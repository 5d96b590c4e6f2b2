"""What users and the image install: every dependency pinned in constraints.txt at the version this suite
runs with, and both installers (the Dockerfile, ./dev.sh) held to it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def pins() -> dict[str, str]:
    lines = [line.strip() for line in CONSTRAINTS.read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    bad = [line for line in entries if not PIN.match(line)]
    assert not bad, f"constraints.txt lines that are not NAME==VERSION: {bad}"
    return {canonicalize_name(PIN.match(line).group(1)): PIN.match(line).group(2) for line in entries}  # type: ignore[union-attr]


def installed_closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Every distribution `root[extras]` pulls in, as installed here: name -> version."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                continue
            key = canonicalize_name(req.name)
            if key not in found:
                found[key] = metadata.version(req.name)
                todo.append((req.name, tuple(req.extras)))
    return found


def test_every_dependency_is_pinned_at_the_version_tested() -> None:
    pinned = pins()
    closure = installed_closure("tljob", ("test",))
    unpinned = sorted(set(closure) - set(pinned))
    assert not unpinned, f"installed but not in constraints.txt: {unpinned}. Fix: ./dev.sh lock"
    drift = {name: (version, pinned[name]) for name, version in closure.items() if pinned[name] != version}
    assert not drift, f"installed version != constraints.txt: {drift}. Fix: ./dev.sh lock, or reinstall with it"


def test_the_gpu_extras_cuda_wheels_are_pinned_too() -> None:
    gpu = [Requirement(r) for r in metadata.requires("tensorflow") or [] if 'extra == "and-cuda"' in r]
    assert gpu and all(canonicalize_name(r.name) in pins() for r in gpu), [r.name for r in gpu]


def test_the_image_and_dev_sh_install_with_the_constraints() -> None:
    assert "--constraint /tmp/deps/constraints.txt" in (ROOT / "Dockerfile").read_text()
    assert "--constraint constraints.txt" in (ROOT / "dev.sh").read_text()
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
