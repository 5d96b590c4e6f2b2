"""The Dockerfile, which cannot be built here: hadolint and checkov on it, its contracts with the
manifests and with Keras, and its weights-baking step run for real against a local HTTP server."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tljob.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
CHECKOV = Path(os.environ.get("TLJOB_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker reads them."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name (the word after AS)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            current = found.setdefault(args.split()[-1], [])
        current.append((keyword, args))
    return found


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


def test_base_image_is_pinned_by_tag_and_digest() -> None:
    froms = [args for keyword, args in instructions(DOCKERFILE.read_text()) if keyword == "FROM"]
    external = [f.split()[0] for f in froms if f.split()[0] not in stages(DOCKERFILE.read_text())]
    assert external and all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", f) for f in external)
    assert len(froms) >= 3, "multi-stage: wheel, weights and runtime"


def test_runtime_stage_runs_tljob_as_the_pods_user() -> None:
    runtime = list(stages(DOCKERFILE.read_text()).values())[-1]
    pod = yaml.safe_load((ROOT / "manifests" / "job.yaml").read_text())["spec"]["template"]["spec"]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert ("ENTRYPOINT", '["tljob"]') in runtime
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "KERAS_HOME=/opt/keras" in env and "PYTHONUNBUFFERED=1" in env and "HOME=/tmp" in env
    # HOME and the workdir are the pods' /tmp emptyDir: the one writable place besides staging.
    mounts = {mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
    assert "/tmp" in mounts and ("WORKDIR", "/tmp") in runtime


def test_installs_the_wheel_with_the_gpu_extra() -> None:
    runtime = list(stages(DOCKERFILE.read_text()).values())[-1]
    assert any(keyword == "RUN" and "pip install" in args and "[gpu]" in args for keyword, args in runtime)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorflow[and-cuda]") for req in extras["gpu"])


def test_build_context_has_what_the_wheel_stage_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[0].startswith("# ") and "*" in ignore
    wheel_stage = stages(DOCKERFILE.read_text())["wheel"]
    for keyword, args in wheel_stage:
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert f"!{source}" in ignore and (ROOT / source).exists(), source


def _keras_weight_name(alpha: float, image_size: int) -> str:
    """The file tf-keras' MobileNetV2(include_top=False, weights="imagenet") asks for."""
    rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def test_weights_are_fetched_from_where_keras_fetches_them() -> None:
    spec = importlib.util.find_spec("tf_keras.src.applications.mobilenet_v2")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()  # read, not imported: importing would load TensorFlow
    assert WEIGHTS_URL in source and '"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"' in source
    assert "_no_top" in source and 'cache_subdir="models"' in source
    assert WEIGHTS_URL in DOCKERFILE.read_text()


# --- the weights stage, run for real ------------------------------------------------------------------


@pytest.fixture
def weights_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local stand-in for Google's bucket; tests put files under the returned folder."""
    root = tmp_path / "bucket"
    (root / "tensorflow/keras-applications/mobilenet_v2").mkdir(parents=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root / "tensorflow/keras-applications/mobilenet_v2"
    server.shutdown()
    server.server_close()


def run_weights_stage(url: str, keras_dir: Path, build_args: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The weights stage's RUN as /bin/sh -c runs it in the build, with its ARG as an environment variable."""
    stage = stages(DOCKERFILE.read_text())["weights"]
    (run,) = [args for keyword, args in stage if keyword == "RUN"]
    arg_defaults = dict(a.split("=", 1) for keyword, a in stage if keyword == "ARG")
    env = {**os.environ, **{k: v.strip('"') for k, v in arg_defaults.items()}, **build_args}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the build's `python`
    script = run.replace("https://storage.googleapis.com/", url).replace("/opt/keras", str(keras_dir))
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)


def _serve(folder: Path, names: list[str], body: bytes) -> None:
    for name in names:
        (folder / name).write_bytes(body)


def _default_weight_names() -> list[str]:
    stage = stages(DOCKERFILE.read_text())["weights"]
    default = next(a.split("=", 1)[1].strip('"') for keyword, a in stage if keyword == "ARG")
    return [f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{pair}_no_top.h5" for pair in default.split()]


def test_weights_stage_bakes_the_files_keras_asks_for(tmp_path: Path, weights_server: tuple[str, Path]) -> None:
    url, folder = weights_server
    names = _default_weight_names()
    _serve(folder, names, HDF5_MAGIC + b"\0" * 64)
    result = run_weights_stage(url, tmp_path / "keras", {})
    assert result.returncode == 0, result.stderr
    baked = sorted(p.name for p in (tmp_path / "keras" / "models").iterdir())
    assert baked == sorted(names)
    # The recipe's own model (and Keras' default size) is among them.
    cfg = load_config(ROOT / "job" / "cats_vs_dogs.yaml", environ={})
    assert _keras_weight_name(cfg.model.alpha, cfg.data.image_size) in baked
    assert _keras_weight_name(1.0, 224) in baked
    keras_json: dict[str, Any] = json.loads((tmp_path / "keras" / "keras.json").read_text())
    assert keras_json["backend"] == "tensorflow" and keras_json["image_data_format"] == "channels_last"


def test_weights_stage_fails_on_a_file_that_is_not_hdf5(tmp_path: Path, weights_server: tuple[str, Path]) -> None:
    url, folder = weights_server
    _serve(folder, _default_weight_names(), b"<html>quota exceeded</html>")
    result = run_weights_stage(url, tmp_path / "keras", {})
    assert result.returncode != 0 and "not an HDF5 file" in result.stderr


def test_weights_stage_fails_on_a_missing_file(tmp_path: Path, weights_server: tuple[str, Path]) -> None:
    url, _ = weights_server
    result = run_weights_stage(url, tmp_path / "keras", {"MOBILENET_V2_WEIGHTS": "1.0_160"})
    assert result.returncode != 0 and "404" in result.stderr


def test_empty_build_arg_bakes_no_weights(tmp_path: Path, weights_server: tuple[str, Path]) -> None:
    url, _ = weights_server
    result = run_weights_stage(url, tmp_path / "keras", {"MOBILENET_V2_WEIGHTS": ""})
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "keras" / "models").iterdir()) == []
