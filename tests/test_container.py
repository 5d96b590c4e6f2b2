"""The image, built for real with podman, and the rendered Job's pods run as its containers.

The image is `container/build.sh`'s (what `./dev.sh image` builds, from this tree; podman's layer cache
makes a rebuild of unchanged code take seconds). A machine where containers cannot run fails these
tests with the reason: they are how the product is shipped, so they are never skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures_gcs import free_port
from imagegen import make_image_folder
from pods import IndexedJobPlayer, podman
from tljob import rundir, storage
from tljob.errors import EXIT_RETRYABLE

ROOT = Path(__file__).resolve().parents[1]
TLJOB = Path(sys.executable).parent / "tljob"
# container/build.sh builds the same tag (TLJOB_IMAGE): a branch can test its own image beside the shared one.
IMAGE = os.environ.get("TLJOB_IMAGE", "localhost/tljob:dev")
EMULATOR_IMAGE = "localhost/tljob-gcs-emulator:dev"
APT_HINT = "apt-get install -y podman buildah runc mmdebstrap"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# What the manifests promise of every pod, checked on the running containers (not read from the manifests).
POD_UID = 10001

pytestmark = pytest.mark.container


def _build(*args: str) -> None:
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        pytest.fail(f"podman or mmdebstrap is not installed, so the image cannot be built or run here. Fix: {APT_HINT}")
    result = subprocess.run([str(ROOT / "container" / "build.sh"), *args], capture_output=True, text=True,
                            timeout=1500)
    if result.returncode != 0:
        pytest.fail(f"container/build.sh {' '.join(args)} failed (exit {result.returncode}):\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def image() -> str:
    """localhost/tljob:dev from this tree (cached layers when nothing changed)."""
    _build()
    probe = podman("run", "--rm", IMAGE, "--version", check=False)
    if probe.returncode != 0:
        pytest.fail(f"podman cannot run containers on this machine: {probe.stderr.strip()}. Fix: {APT_HINT}, and "
                    f"check container/containers.conf (runtime, ulimits)")
    return IMAGE


def base_of(image: str) -> str:
    return podman("inspect", "--format", '{{index .Labels "org.opencontainers.image.base.name"}}', image).stdout.strip()


@pytest.fixture(scope="module")
def network() -> Iterator[str]:
    """A podman network of this module's own: its containers, and nothing else, are reachable."""
    name = f"tljob-test-{uuid.uuid4().hex[:8]}"
    podman("network", "create", name)
    yield name
    podman("network", "rm", "--force", name, check=False)


@dataclass
class Gcs:
    bucket: str  # gs://NAME
    host_url: str  # from this test process
    pod_url: str  # from containers on the network


@pytest.fixture(scope="module")
def gcs(image: str, network: str) -> Iterator[Gcs]:
    """The GCS emulator as a container on the network, published on 127.0.0.1 for the test's own reads."""
    _build("gcs-emulator")
    name, port, bucket = f"tljob-gcs-{uuid.uuid4().hex[:6]}", free_port(), f"tljob-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--network", network, "--network-alias", "gcs",
           "--publish", f"127.0.0.1:{port}:9023", EMULATOR_IMAGE,
           "start", "--host=0.0.0.0", "--port=9023", "--in-memory", f"--default-bucket={bucket}", "-q")
    host_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(host_url + "/", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"the emulator container did not answer: {podman('logs', name, check=False).stderr}")
            time.sleep(0.2)
    yield Gcs(f"gs://{bucket}", host_url, "http://gcs:9023")
    podman("rm", "--force", name, check=False)


@pytest.fixture
def host_gcs(gcs: Gcs, monkeypatch: pytest.MonkeyPatch) -> Gcs:
    """The test process reads the bucket through the published port."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.host_url)
    return gcs


def render(tmp: Path, output: str, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`tljob manifests` for the dev image on CPU, as a user renders it; relative path -> object."""
    (tmp / "job.yaml").write_text(yaml.safe_dump(config))
    out = tmp / "manifests"
    subprocess.run([str(TLJOB), "manifests", "--workers", "2", "--gpus-per-worker", "0", "--image", IMAGE,
                    "--output", output, "--config", str(tmp / "job.yaml"), "-o", str(out)],
                   check=True, capture_output=True, timeout=60)
    return {str(p.relative_to(out)): yaml.safe_load(p.read_text()) for p in out.rglob("*.yaml")}


FE_EPOCHS, FT_EPOCHS = 2, 3


def tiny_config() -> dict[str, Any]:
    """The dry run, smaller, with epochs long enough (a few seconds) for a fault to land inside one."""
    config = yaml.safe_load((ROOT / "job" / "dry_run.yaml").read_text())
    config["data"]["synthetic"].update(train_examples=256, validation_examples=32, test_examples=32)
    config["train"]["feature_extraction"]["epochs"] = FE_EPOCHS
    config["train"]["fine_tuning"]["epochs"] = FT_EPOCHS
    config["train"]["steps_per_epoch"] = 40
    return config


def inspect(name: str) -> dict[str, Any]:
    return json.loads(podman("inspect", name).stdout)[0]


# --- the Job, with a SIGTERM in phase 1 and a SIGKILL in phase 2 -------------------------------------------


@dataclass
class JobRun:
    player: IndexedJobPlayer
    output: str
    objs: dict[str, dict[str, Any]]
    sigterm_seconds: float
    backup_after_sigterm: dict[str, int]
    uid_seen: str
    events: list[str]
    backed_up_at_sigkill: int  # the last epoch in the backup when pod 1 was killed


@pytest.fixture(scope="module")
def job_run(image: str, network: str, gcs: Gcs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRun]:
    tmp = tmp_path_factory.mktemp("pods")
    output = f"{gcs.bucket}/runs/pods"
    objs = render(tmp, output, tiny_config())
    config_maps = {o["metadata"]["name"]: o["data"] for o in objs.values() if o["kind"] == "ConfigMap"}
    player = IndexedJobPlayer(objs["job.yaml"], config_maps, image, network, tmp / "volumes",
                              extra_env={"STORAGE_EMULATOR_HOST": gcs.pod_url})
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = gcs.host_url
    seen: dict[str, Any] = {"events": []}
    # BackupAndRestore's checkpoint index of the chief's phase-2 backup.
    phase2_backup = f"{output}/backup/fine_tuning/chief/checkpoint"

    def status() -> dict[str, Any] | None:
        path = f"{output}/status.json"
        return json.loads(storage.read_text(path)) if storage.exists(path) else None

    def inject(p: IndexedJobPlayer) -> None:
        now = status()
        if now is None or now.get("state") != "running":
            return
        if "uid" not in seen:
            seen["uid"] = podman("exec", p.current[0], "id", "-u", check=False).stdout.strip()
        if "sigterm" not in seen and p.attempts[0] == 1 and now["phase"] == "feature_extraction":
            # The chief, as the kubelet evicts a pod: SIGTERM, then SIGKILL after the grace period.
            seen["events"].append(f"SIGTERM to pod 0 at {now['phase']} epoch {now['epoch']}")
            seen["sigterm"] = p.stop(0)
            seen["backup"] = storage.list_files(f"{output}/backup")
        elif "sigkill" not in seen and "sigterm" in seen and storage.exists(phase2_backup):
            # Once phase 2 has a backup (its first epoch), so that the run must resume inside phase 2.
            p.kill(1)
            # ckpt-K: the K-th backup of phase 2 in this attempt, one per finished epoch.
            saved = int(storage.read_text(phase2_backup).split('"')[1].rsplit("-", 1)[1])
            seen["sigkill"] = FE_EPOCHS + saved
            seen["events"].append(f"SIGKILL to pod 1 at {now['phase']} epoch {now['epoch']}, "
                                  f"backup of epoch {FE_EPOCHS + saved}")

    try:
        player.run(deadline_s=900, on_tick=inject)
        yield JobRun(player, output, objs, seen.get("sigterm", -1.0), seen.get("backup", {}), seen.get("uid", ""),
                     seen["events"], seen.get("sigkill", -1))
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        player.remove()


def test_pods_run_hardened_as_the_manifests_say(job_run: JobRun) -> None:
    """Read off the containers themselves: a changed securityContext in the manifests fails here."""
    for name in job_run.player.containers:
        info = inspect(name)
        host = info["HostConfig"]
        assert host["ReadonlyRootfs"] is True, f"{name}: root filesystem writable"
        assert info["Config"]["User"] == f"{POD_UID}:{POD_UID}", name
        assert "CAP_SYS_ADMIN" not in (host.get("CapAdd") or []) and info["EffectiveCaps"] in (None, []), name
        assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or []), name
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert mounts["/etc/tljob"]["RW"] is False, "the ConfigMap is mounted read-only"
        assert host["NanoCpus"] > 0 and host["Memory"] > 0, "resource limits applied"
        # Nothing was written outside the mounted volumes: the read-only root leaves podman nothing to diff
        # but the mount points themselves.
        diff = json.loads(podman("diff", "--format", "json", name).stdout or "{}")
        written = [path for kind in ("changed", "added", "deleted") for path in diff.get(kind) or []
                   if not any(m == path or m.startswith(path.rstrip("/") + "/") for m in mounts)]
        assert not written, f"{name} wrote into its image: {written}"
    assert job_run.uid_seen == str(POD_UID), "the training process runs as the image's non-root user"


def test_sigterm_saves_a_backup_within_the_grace_period_and_exits_75(job_run: JobRun) -> None:
    grace = job_run.objs["job.yaml"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    first = job_run.player.exits[0]
    assert (first.index, first.attempt, first.code) == (0, 1, EXIT_RETRYABLE), job_run.player.exits
    assert 0 < job_run.sigterm_seconds < grace, f"SIGTERM took {job_run.sigterm_seconds:.1f} s (grace {grace} s)"
    assert job_run.backup_after_sigterm, "no backup in the bucket right after the SIGTERM'd pod exited"
    # Its peer cannot go on alone: it leaves with the retryable code too, and both restart.
    assert any(e.index == 1 and e.attempt == 1 and e.code == EXIT_RETRYABLE for e in job_run.player.exits)


def test_sigkill_restarts_both_and_the_run_resumes_where_it_was(job_run: JobRun, host_gcs: Gcs) -> None:
    exits = [(e.index, e.attempt, e.code, e.action) for e in job_run.player.exits]
    assert (1, 2, 137, "Count") in exits, exits
    assert (0, 2, EXIT_RETRYABLE, "Count") in exits, exits
    assert job_run.player.attempts == {0: 3, 1: 3}, job_run.events
    history = json.loads(storage.read_text(f"{job_run.output}/history.json"))
    phases = ["feature_extraction"] * FE_EPOCHS + ["fine_tuning"] * FT_EPOCHS
    assert [(r["phase"], r["epoch"]) for r in history] == [(phase, i + 1) for i, phase in enumerate(phases)]
    backed_up = job_run.backed_up_at_sigkill
    assert FE_EPOCHS < backed_up < FE_EPOCHS + FT_EPOCHS, f"the kill did not land inside phase 2: {job_run.events}"
    # Attempt 3 (after the SIGKILL) repeated no phase-1 epoch and no backed-up epoch: it began right after the backup.
    assert [r["epoch"] for r in history if r["attempt"] == 3] == list(range(backed_up + 1, FE_EPOCHS + FT_EPOCHS + 1))


def test_success_lists_every_object_in_the_bucket(job_run: JobRun, host_gcs: Gcs) -> None:
    assert rundir.is_finished(job_run.output)
    success = json.loads(storage.read_text(f"{job_run.output}/_SUCCESS"))
    listing = storage.list_files(job_run.output)
    assert set(success["files"]) == set(listing) - {"_SUCCESS"}
    assert {"model/model.keras", "metrics.json", "history.json", "params.yaml"} <= set(listing)
    assert not any(path.startswith("backup/") for path in listing), "the backup goes once the run is finished"
    status = json.loads(storage.read_text(f"{job_run.output}/status.json"))
    assert status["state"] == "succeeded" and status["num_workers"] == 2


# --- what the image shows on its own ----------------------------------------------------------------------


def hardened_run(job_run: JobRun, network: str, *args: str, mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """A one-off container with the pods' own securityContext and a tmpfs /tmp (their emptyDir)."""
    from pods import container_flags

    pod = job_run.objs["job.yaml"]["spec"]["template"]["spec"]
    return podman("run", "--rm", "--network", network, *container_flags(pod, pod["containers"][0]),
                  "--mount", "type=tmpfs,destination=/tmp,tmpfs-mode=1777", "--env", "STORAGE_EMULATOR_HOST=http://gcs:9023",
                  *(f for m in mounts for f in ("--mount", m)), IMAGE, *args, check=False, timeout=300)


def test_a_one_cpu_container_runs_one_call_per_stage(image: str, tmp_path: Path) -> None:
    """A pod limited to 1 CPU on a node with more cores: the CFS quota, not the cores, sets the input pipeline's
    parallelism and TensorFlow's thread pools. (Its throughput against a host pinned to one core is measured in
    bench/README.md, "CPU quota": too noisy on a shared machine to assert here.)"""
    config = yaml.safe_load((ROOT / "job" / "dry_run.yaml").read_text())
    config["train"]["feature_extraction"]["epochs"] = config["train"]["fine_tuning"]["epochs"] = 1  # short
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    job.chmod(0o644)
    result = podman("run", "--rm", "--cpus", "1", "--network", "none", "--read-only", "--read-only-tmpfs=false",
                    "--user", f"{POD_UID}:{POD_UID}", "--mount", "type=tmpfs,destination=/tmp,tmpfs-mode=1777",
                    "--mount", f"type=bind,source={job},destination=/etc/tljob/job.yaml,ro", image,
                    "train", "--config", "/etc/tljob/job.yaml", "--output", "/tmp/run", check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.search(r"input pipeline: 1 parallel call per stage \(CPU quota 1\.0 of (\d+) cores?\)(.*)",
                     result.stderr)
    assert line, result.stderr[-3000:]
    # On a 1-core machine the quota narrows nothing and TensorFlow keeps its own pool sizes.
    assert ("TensorFlow's thread pools sized 1" in line.group(2)) is (int(line.group(1)) > 1), line.group(0)
    assert re.search(r"published \d+ files to /tmp/run", result.stderr), result.stderr[-3000:]


def test_help_from_the_image(image: str) -> None:
    result = podman("run", "--rm", image, check=False)
    assert result.returncode == 0 and "usage: tljob" in result.stdout, result.stderr


def test_predict_on_the_exported_model_inside_the_image(job_run: JobRun, network: str, tmp_path: Path) -> None:
    photos = make_image_folder(tmp_path / "photos", {"a": 1}, size=64) / "a"
    (photos / "broken.jpg").write_bytes(b"not an image")
    photos.chmod(0o755)
    result = hardened_run(job_run, network, "predict", "--model", f"{job_run.output}/model", "/photos/a_0.jpg",
                          "/photos/broken.jpg", mounts=(f"type=bind,source={photos},destination=/photos,ro",))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["path"] == "/photos/a_0.jpg" and 0.0 <= rows[0]["probability"] <= 1.0
    assert rows[1]["path"] == "/photos/broken.jpg" and "error" in rows[1]


def test_status_against_the_bucket_inside_the_image(job_run: JobRun, network: str) -> None:
    result = hardened_run(job_run, network, "status", job_run.output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr


def test_manifests_from_the_installed_package_inside_the_image(job_run: JobRun, network: str) -> None:
    result = hardened_run(job_run, network, "manifests", "-o", "/tmp/out")
    assert result.returncode == 0, result.stderr[-3000:]


# --- the weights stage, built for real ---------------------------------------------------------------------


@pytest.fixture
def weights_context(tmp_path: Path) -> Path:
    """A build context with what the weights stage reads (the Dockerfile, its ignore file, container/)."""
    context = tmp_path / "context"
    (context / "container").mkdir(parents=True)
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, context / name)
    shutil.copy(ROOT / "container" / "bake_weights.py", context / "container" / "bake_weights.py")
    return context


@pytest.fixture
def weights_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local stand-in for the bucket Keras downloads from; tests put files in the returned folder."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def build_weights(image: str, context: Path, *build_args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    tag = f"localhost/tljob-weights-test:{uuid.uuid4().hex[:8]}"
    args = [f for a in build_args for f in ("--build-arg", a)]
    result = podman("build", "--network", "host", "--target", "weights", "--build-arg", f"BASE_IMAGE={base_of(image)}",
                    *args, "--tag", tag, str(context), check=False, timeout=300)
    return result, tag


def baked(tag: str) -> list[str]:
    listing = podman("run", "--rm", "--entrypoint", "ls", tag, "/opt/keras/models").stdout.split()
    podman("rmi", "--force", tag, check=False)
    return sorted(listing)


def keras_name(pair: str) -> str:
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{pair}_no_top.h5"


def test_weights_stage_downloads_and_checks_what_keras_asks_for(image: str, weights_context: Path,
                                                                weights_server: tuple[str, Path]) -> None:
    url, served = weights_server
    for pair in ("1.0_160", "1.0_224"):
        (served / keras_name(pair)).write_bytes(HDF5_MAGIC + b"\0" * 64)
    result, tag = build_weights(image, weights_context, f"MOBILENET_V2_WEIGHTS_URL={url}",
                                "MOBILENET_V2_WEIGHTS=1.0_160 1.0_224")
    assert result.returncode == 0, result.stderr[-3000:]
    assert baked(tag) == [keras_name("1.0_160"), keras_name("1.0_224")]


def test_weights_stage_fails_on_an_error_page_or_a_missing_file(image: str, weights_context: Path,
                                                                weights_server: tuple[str, Path]) -> None:
    url, served = weights_server
    (served / keras_name("1.0_160")).write_text("<html>quota exceeded</html>")
    result, _ = build_weights(image, weights_context, f"MOBILENET_V2_WEIGHTS_URL={url}", "MOBILENET_V2_WEIGHTS=1.0_160")
    assert result.returncode != 0 and "not an HDF5 file" in result.stderr + result.stdout
    result, _ = build_weights(image, weights_context, f"MOBILENET_V2_WEIGHTS_URL={url}", "MOBILENET_V2_WEIGHTS=1.0_96")
    assert result.returncode != 0 and "download failed" in result.stderr + result.stdout


def test_weights_stage_bakes_a_local_file_offline(image: str, weights_context: Path) -> None:
    (weights_context / "container" / "weights").mkdir()
    (weights_context / "container" / "weights" / keras_name("1.0_160")).write_bytes(HDF5_MAGIC + b"\0" * 64)
    result, tag = build_weights(image, weights_context, "WEIGHTS_SOURCE=local")
    assert result.returncode == 0, result.stderr[-3000:]
    assert baked(tag) == [keras_name("1.0_160")]
    (weights_context / "container" / "weights" / "weights.h5").write_bytes(HDF5_MAGIC)
    result, _ = build_weights(image, weights_context, "WEIGHTS_SOURCE=local")
    assert result.returncode != 0 and "weights.h5" in result.stderr + result.stdout


@pytest.mark.skipif(not os.environ.get("TLJOB_WEIGHTS"), reason="TLJOB_WEIGHTS (the real ImageNet .h5) not set")
def test_the_image_loads_the_baked_imagenet_weights_offline(image: str) -> None:
    """./dev.sh image baked TLJOB_WEIGHTS: model.weights=imagenet builds the recipe's model from it, offline."""
    code = ("from tljob.model import resolve_weights; import tf_keras; "
            "p = resolve_weights('imagenet', '/tmp', alpha=1.0, image_size=160); print(p); "
            "tf_keras.applications.MobileNetV2(input_shape=(160, 160, 3), include_top=False, weights=p)")
    result = podman("run", "--rm", "--network", "none", "--read-only", "--read-only-tmpfs=false", "--mount",
                    "type=tmpfs,destination=/tmp,tmpfs-mode=1777", "--entrypoint", "python", image, "-c", code,
                    check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    path = result.stdout.split()[0]
    assert path == f"/opt/keras/models/{keras_name('1.0_160')}"
    digest = podman("run", "--rm", "--entrypoint", "sha256sum", image, path).stdout.split()[0]
    assert digest == hashlib.sha256(Path(os.environ["TLJOB_WEIGHTS"]).read_bytes()).hexdigest()
