"""The Dockerfile as text, for what the real build (tests/test_container.py) cannot show here: the linters
hadolint and checkov, and the defaults a registry build uses but this machine's build overrides (the
pinned base image, the bucket the weights come from)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
CHECKOV = Path(os.environ.get("TLJOB_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2"


def arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(.*)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"no ARG {name}= in the Dockerfile"
    return match.group(1).strip('"')


def test_hadolint_passes() -> None:
    result = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned base image and an unpinned pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.skipif(not CHECKOV.is_file(), reason=f"checkov not installed at {CHECKOV} (set TLJOB_CHECKOV; "
                    "python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov)")
def test_checkov_passes_with_only_justified_skips() -> None:
    result = subprocess.run([str(CHECKOV), "-f", str(DOCKERFILE), "--framework", "dockerfile", "--skip-download",
                             "--output", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    failed = [c["check_id"] for c in report["results"]["failed_checks"]]
    assert result.returncode == 0 and not failed, failed
    assert report["summary"]["passed"] > 20
    for check in report["results"]["skipped_checks"]:
        assert len(check["check_result"].get("suppress_comment", "")) > 20, f"{check['check_id']}: no reason"


def test_registry_base_is_pinned_by_tag_and_digest() -> None:
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", arg_default("BASE_IMAGE"))


def test_weights_default_to_where_keras_fetches_them() -> None:
    spec = importlib.util.find_spec("tf_keras.src.applications.mobilenet_v2")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()  # read, not imported: importing would load TensorFlow
    assert WEIGHTS_URL + "/" in source and '"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"' in source
    assert "_no_top" in source and 'cache_subdir="models"' in source
    assert arg_default("MOBILENET_V2_WEIGHTS_URL") == WEIGHTS_URL
    # The recipe's input size (160) and Keras' default (224) are among the sizes a registry build bakes.
    assert {"1.0_160", "1.0_224"} <= set(arg_default("MOBILENET_V2_WEIGHTS").split())
