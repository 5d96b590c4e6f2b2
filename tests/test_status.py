"""`tljob status`: a run's status.json (local and gs://), and --k8s against a real HTTP server that
answers like the Kubernetes API, or with no Kubernetes configuration at all."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s

from tljob import rundir, status, storage
from tljob.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRYABLE

TLJOB = Path(sys.executable).parent / "tljob"
NOW = dt.datetime(2025, 1, 2, 12, 0, 0, tzinfo=dt.timezone.utc)
RUNNING = {
    "state": "running", "phase": "fine_tuning", "epoch": 13, "total_epochs": 20,
    "metrics": {"loss": 0.1234, "accuracy": 0.9512, "val_loss": 0.11, "val_accuracy": 0.96},
    "images_per_second": 1234.56, "eta_s": 312.4, "updated_at": "2025-01-02T11:58:00+00:00",
    "started_at": "2025-01-02T11:00:00+00:00", "name": "cats_vs_dogs", "num_workers": 2,
}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TLJOB), "status", *args], capture_output=True, text=True, timeout=120,
                          env=env if env is not None else os.environ.copy())


def no_kube_env(home: Path) -> dict[str, str]:
    """An environment with no kubeconfig anywhere and no in-cluster service account."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["HOME"] = str(home)
    return env


def write_run(run: Path, state: dict[str, Any] | None, success: bool = False) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    if state is not None:
        (run / "status.json").write_text(json.dumps(state))
    if success:
        (run / "_SUCCESS").write_text("{}")
    return run


# --- the run directory ----------------------------------------------------------------------------------


def test_format_run_shows_phase_epoch_metrics_throughput_and_eta() -> None:
    text = "\n".join(status.format_run("gs://b/run", rundir.Status.from_json(RUNNING), finished=False, now=NOW))
    assert "cats_vs_dogs (2 worker(s))" in text
    assert "running, phase fine_tuning, epoch 13/20" in text
    assert "loss 0.1234  accuracy 0.9512  val_loss 0.1100  val_accuracy 0.9600" in text
    assert "1234.6 images/s" in text
    assert "0:05:12 after the last update (about 2025-01-02 12:03 UTC)" in text
    assert "2025-01-02T11:58:00+00:00 (0:02:00 ago)" in text
    assert "_SUCCESS   no" in text


def test_format_run_of_a_finished_run() -> None:
    done = {**RUNNING, "state": "succeeded", "epoch": 20, "eta_s": 0.0}
    text = "\n".join(status.format_run("/r", rundir.Status.from_json(done), finished=True, now=NOW))
    assert "succeeded, phase fine_tuning, epoch 20/20" in text and "ETA        done" in text
    assert "_SUCCESS   yes" in text


def test_format_run_tolerates_missing_fields() -> None:
    """A run that succeeded before any epoch was recorded has nulls in its status."""
    sparse = {"state": "succeeded", "phase": None, "epoch": None, "metrics": {}, "images_per_second": None}
    text = "\n".join(status.format_run("/r", rundir.Status.from_json(sparse), finished=True, now=NOW))
    assert "phase -, epoch -/-" in text and "throughput -" in text


def test_cli_on_a_local_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", RUNNING)
    result = run_cli(str(run))
    assert result.returncode == EXIT_OK, result.stderr
    assert "phase fine_tuning, epoch 13/20" in result.stdout and "val_accuracy 0.9600" in result.stdout
    assert "ETA        0:05:12" in result.stdout and "_SUCCESS   no" in result.stdout


def test_cli_on_a_run_with_success_but_no_status(tmp_path: Path) -> None:
    result = run_cli(str(write_run(tmp_path / "run", None, success=True)))
    assert result.returncode == EXIT_OK and "_SUCCESS   yes" in result.stdout


def test_cli_on_an_empty_directory_says_so_and_fails(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path))
    assert result.returncode == EXIT_CONFIG
    assert "no status.json yet" in result.stdout and "no status.json and no _SUCCESS" in result.stderr


def test_cli_on_a_corrupt_status_file(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text("{not json")
    result = run_cli(str(tmp_path))
    assert result.returncode == EXIT_CONFIG and "not valid JSON" in result.stderr


def test_gs_run_through_the_emulator(gcs_bucket: str) -> None:
    run = f"{gcs_bucket}/runs/a"
    storage.write_text(f"{run}/status.json", json.dumps(RUNNING))
    result = run_cli(run)  # a real process: STORAGE_EMULATOR_HOST comes from the fixture's environment
    assert result.returncode == EXIT_OK, result.stderr
    assert f"run        {run}" in result.stdout and "epoch 13/20" in result.stdout and "_SUCCESS   no" in result.stdout
    storage.write_text(f"{run}/_SUCCESS", "{}")
    assert "_SUCCESS   yes" in run_cli(run).stdout


# --- Kubernetes -----------------------------------------------------------------------------------------


def test_k8s_without_any_configuration_says_so(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", RUNNING)
    result = run_cli(str(run), "--k8s", "tljob", env=no_kube_env(tmp_path / "home"))
    assert result.returncode == EXIT_CONFIG
    assert "no Kubernetes configuration" in result.stderr and "get-credentials" in result.stderr
    assert "epoch 13/20" in result.stdout, "the run's own status is still shown"


def _job() -> k8s.V1Job:
    return k8s.V1Job(
        api_version="batch/v1", kind="Job",
        metadata=k8s.V1ObjectMeta(name="tljob", namespace="ml"),
        spec=k8s.V1JobSpec(completions=2, template=k8s.V1PodTemplateSpec()),
        status=k8s.V1JobStatus(active=2, failed=1),
    )


def _pod(name: str, index: int, minute: int, phase: str, state: k8s.V1ContainerState,
         failures: int | None = None) -> k8s.V1Pod:
    annotations = {status.INDEX_ANNOTATION: str(index)}
    if failures is not None:
        annotations[status.INDEX_FAILURES_ANNOTATION] = str(failures)
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=name, annotations=annotations,
                                  creation_timestamp=dt.datetime(2025, 1, 2, 11, minute, tzinfo=dt.timezone.utc)),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="tljob")], node_name="gpu-node-a"),
        status=k8s.V1PodStatus(phase=phase, container_statuses=[k8s.V1ContainerStatus(
            name="tljob", image="i", image_id="", ready=phase == "Running", restart_count=0, state=state)]),
    )


PODS = [
    _pod("tljob-1-new", 1, 30, "Running", k8s.V1ContainerState(running=k8s.V1ContainerStateRunning()), failures=1),
    _pod("tljob-1-old", 1, 0, "Failed", k8s.V1ContainerState(
        terminated=k8s.V1ContainerStateTerminated(exit_code=75, reason="Error"))),
    _pod("tljob-0-abc", 0, 0, "Running", k8s.V1ContainerState(running=k8s.V1ContainerStateRunning())),
]


class FakeApi(BaseHTTPRequestHandler):
    """Answers the two requests `tljob status --k8s` makes, as the API server would."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        url = urlparse(self.path)
        sanitize = k8s.ApiClient().sanitize_for_serialization
        if url.path == "/apis/batch/v1/namespaces/ml/jobs/tljob":
            self._send(200, sanitize(_job()))
        elif url.path == "/api/v1/namespaces/ml/pods" and parse_qs(url.query).get("labelSelector") == [
                f"{status.JOB_NAME_LABEL}=tljob"]:
            self._send(200, sanitize(k8s.V1PodList(items=PODS)))
        elif url.path.startswith("/apis/batch/v1/namespaces/ml/jobs/"):
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound"})
        else:
            self._send(403, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden"})

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Quiet: the test asserts on the client's output."""


@pytest.fixture
def fake_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def kubeconfig_env(tmp_path: Path, server: str) -> dict[str, str]:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
    }))
    return {**no_kube_env(tmp_path / "home"), "KUBECONFIG": str(path)}


def test_k8s_shows_the_job_and_its_pods(tmp_path: Path, fake_api: str) -> None:
    run = write_run(tmp_path / "run", RUNNING)
    result = run_cli(str(run), "--k8s", "tljob", "--namespace", "ml", env=kubeconfig_env(tmp_path, fake_api))
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert "job        tljob in namespace ml: Running" in lines
    assert "2 wanted; 2 active, 0 succeeded, 1 failed pod(s)" in result.stdout
    pods = [line for line in lines if line.startswith("pod ")]
    # By index, then oldest first: the replaced pod of index 1 comes before its replacement.
    assert [p.split()[1] for p in pods] == ["tljob-0-abc", "tljob-1-old", "tljob-1-new"]
    assert "exited 75 (Error)" in pods[1] and "earlier failures of this index 1" in pods[2]


def test_k8s_unknown_job_is_a_config_error(tmp_path: Path, fake_api: str) -> None:
    run = write_run(tmp_path / "run", RUNNING)
    result = run_cli(str(run), "--k8s", "other", "--namespace", "ml", env=kubeconfig_env(tmp_path, fake_api))
    assert result.returncode == EXIT_CONFIG and "no such Job in namespace 'ml'" in result.stderr


def test_k8s_refused_is_a_config_error(tmp_path: Path, fake_api: str) -> None:
    run = write_run(tmp_path / "run", RUNNING)
    result = run_cli(str(run), "--k8s", "tljob", "--namespace", "prod", env=kubeconfig_env(tmp_path, fake_api))
    assert result.returncode == EXIT_CONFIG and "refused access (HTTP 403" in result.stderr


def test_k8s_api_down_is_retryable(tmp_path: Path) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), FakeApi) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there any more
    run = write_run(tmp_path / "run", RUNNING)
    result = run_cli(str(run), "--k8s", "tljob", env=kubeconfig_env(tmp_path, f"http://127.0.0.1:{port}"))
    assert result.returncode == EXIT_RETRYABLE and "did not answer" in result.stderr


def test_job_state_reads_the_conditions() -> None:
    job = _job()
    job.status.conditions = [k8s.V1JobCondition(type="Failed", status="True", reason="PodFailurePolicy",
                                                message="Container tljob exited with 2")]
    assert status.job_state(job) == "Failed (PodFailurePolicy: Container tljob exited with 2)"
    job.status = k8s.V1JobStatus()
    assert status.job_state(job) == "Pending"
