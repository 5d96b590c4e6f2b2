"""`tljob status RUN [--k8s JOB]`: where a run stands, for a person at a terminal: the run directory's
status.json and _SUCCESS (read access is enough, local or gs://) and, with --k8s, the Job's and its pods'
state from the Kubernetes API.

Exit codes: 0 the state was shown; 2 (config) the run directory has neither status.json nor
_SUCCESS (a wrong path, or a run before its first epoch), or --k8s found no Kubernetes configuration,
no such Job, or was refused; 75 (retryable) the Kubernetes API did not answer.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tljob import rundir
from tljob.errors import EXIT_OK, ConfigError, RetryableError

if TYPE_CHECKING:  # the client is imported only for --k8s: plain `tljob status` answers faster without it
    from kubernetes import client as k8s

# Set by the Job controller on every pod of an Indexed Job (Kubernetes >= 1.27 for the label).
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INDEX_FAILURES_ANNOTATION = "batch.kubernetes.io/job-index-failure-count"
API_TIMEOUT_S = 15


# --- the run directory --------------------------------------------------------------------------------


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO-8601 timestamp as an aware datetime (naive ones are taken as UTC); None if absent or bad."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def format_duration(seconds: float) -> str:
    """h:mm:ss, rounded to the second."""
    return str(dt.timedelta(seconds=max(round(seconds), 0)))


def format_metrics(metrics: Mapping[str, Any]) -> str:
    known = [k for k in rundir.METRIC_KEYS if k in metrics] + sorted(k for k in metrics if k not in rundir.METRIC_KEYS)
    parts = [f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], (int, float)) else f"{k} {metrics[k]}" for k in known]
    return "  ".join(parts) or "-"


def _row(label: str, value: str) -> str:
    return f"{label:<11}{value}"


def format_run(run: str, status: rundir.Status | None, finished: bool, now: dt.datetime) -> list[str]:
    """The run part of the report (pure: `now` is passed in)."""
    lines = [_row("run", run)]
    if status is None:
        lines.append(_row("status", f"no {rundir.STATUS} yet (the chief writes it after each epoch)"))
    else:
        workers = status.num_workers
        lines.append(_row("name", f"{status.name or '-'}" + (f" ({workers} worker(s))" if workers else "")))
        lines.append(_row("state", f"{status.state}, phase {status.phase or '-'}, "
                                   f"epoch {status.epoch or '-'}/{status.total_epochs or '-'}"))
        lines.append(_row("metrics", format_metrics(status.metrics)))
        speed = status.images_per_second
        lines.append(_row("throughput", f"{speed:.1f} images/s" if isinstance(speed, (int, float)) else "-"))
        lines.append(_row("ETA", _eta(status)))
        lines.append(_row("updated", _when(status.updated_at, now)))
        lines.append(_row("started", _when(status.started_at, now)))
    lines.append(_row(rundir.SUCCESS, "yes: the run is finished and published" if finished else "no: not finished"))
    return lines


def _eta(status: rundir.Status) -> str:
    eta = status.eta_s
    if status.state == "succeeded":
        return "done"
    if not isinstance(eta, (int, float)):
        return "-"
    updated = parse_time(status.updated_at)
    # The estimate was made at the last update; the finish time it implies does not move with `now`.
    finish = f" (about {(updated + dt.timedelta(seconds=eta)).strftime('%Y-%m-%d %H:%M UTC')})" if updated else ""
    return f"{format_duration(eta)} after the last update{finish}"


def _when(value: Any, now: dt.datetime) -> str:
    moment = parse_time(value)
    if moment is None:
        return "-"
    age = format_duration((now - moment).total_seconds())
    return f"{moment.astimezone(dt.timezone.utc).isoformat(timespec='seconds')} ({age} ago)"


# --- Kubernetes ---------------------------------------------------------------------------------------


def kube_configuration(environ: Mapping[str, str]) -> k8s.Configuration:
    """A client Configuration from the kubeconfig or the in-cluster account; ConfigError when there is neither."""
    from kubernetes import client, config

    configuration = client.Configuration()
    kubeconfig = environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    files = [p for p in kubeconfig.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    try:
        if files:
            config.load_kube_config(config_file=os.pathsep.join(files), client_configuration=configuration)
            return configuration
        if environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
            return configuration
    except config.ConfigException as exc:
        raise ConfigError(f"--k8s: the Kubernetes configuration cannot be used ({exc}). Fix: select a context "
                          f"with `kubectl config use-context NAME`.") from exc
    raise ConfigError(
        f"--k8s: no Kubernetes configuration: no kubeconfig at {kubeconfig} and not running inside a cluster. "
        "Fix: fetch credentials (e.g. `gcloud container clusters get-credentials CLUSTER --location LOCATION`), "
        "set KUBECONFIG, or leave out --k8s to see the run directory's status alone."
    )


def fetch_job(configuration: k8s.Configuration, job_name: str, namespace: str) -> tuple[k8s.V1Job, list[k8s.V1Pod]]:
    """The Job and its pods (oldest first), with API failures mapped to the job's exit-code classes."""
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with client.ApiClient(configuration) as api:
        try:
            job = client.BatchV1Api(api).read_namespaced_job(job_name, namespace, _request_timeout=API_TIMEOUT_S)
            pods = client.CoreV1Api(api).list_namespaced_pod(
                namespace, label_selector=f"{JOB_NAME_LABEL}={job_name}", _request_timeout=API_TIMEOUT_S).items
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigError(f"--k8s {job_name}: no such Job in namespace {namespace!r}. Fix: check "
                                  f"`kubectl get jobs -n {namespace}`, or pass --namespace.") from exc
            if exc.status in (401, 403):
                raise ConfigError(f"--k8s {job_name}: the Kubernetes API refused access (HTTP {exc.status} "
                                  f"{exc.reason}). Fix: use credentials that may get jobs and list pods in "
                                  f"namespace {namespace!r}.") from exc
            raise RetryableError(f"--k8s {job_name}: the Kubernetes API answered HTTP {exc.status} "
                                 f"{exc.reason}; try again later.") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise RetryableError(f"--k8s {job_name}: the Kubernetes API at {configuration.host} did not answer "
                                 f"({exc}); try again later.") from exc
    return job, sorted(pods, key=lambda p: (_pod_index(p), str(p.metadata.creation_timestamp or ""), p.metadata.name))


def job_state(job: k8s.V1Job) -> str:
    """Complete / Failed (with reason) / Suspended, else Running or Pending from the active pod count."""
    for condition in (job.status.conditions or []) if job.status else []:
        if condition.status == "True" and condition.type in ("Complete", "Failed", "Suspended"):
            detail = ": ".join(part for part in (condition.reason, condition.message) if part)
            return f"{condition.type}" + (f" ({detail})" if detail else "")
    return "Running" if job.status and job.status.active else "Pending"


def _pod_index(pod: k8s.V1Pod) -> int:
    value = (pod.metadata.annotations or {}).get(INDEX_ANNOTATION, "")
    return int(value) if value.isdigit() else -1


def container_state(pod: k8s.V1Pod) -> str:
    """The first container's state: running, waiting (reason) or terminated (exit code, reason)."""
    statuses = pod.status.container_statuses if pod.status else None
    if not statuses or statuses[0].state is None:
        return "-"
    state = statuses[0].state
    if state.terminated:
        reason = f" ({state.terminated.reason})" if state.terminated.reason else ""
        return f"exited {state.terminated.exit_code}{reason}"
    if state.waiting:
        return f"waiting ({state.waiting.reason or '-'})"
    return "running" if state.running else "-"


def format_job(job: k8s.V1Job, pods: list[k8s.V1Pod]) -> list[str]:
    """The Kubernetes part of the report (pure: from the API's typed objects)."""
    status, spec = job.status, job.spec
    lines = [
        _row("job", f"{job.metadata.name} in namespace {job.metadata.namespace}: {job_state(job)}"),
        _row("workers", f"{spec.completions} wanted; {status.active or 0} active, {status.succeeded or 0} "
                        f"succeeded, {status.failed or 0} failed pod(s)"
                        + (f"; failed indexes {status.failed_indexes}" if status.failed_indexes else "")),
    ]
    for pod in pods:
        annotations = pod.metadata.annotations or {}
        index = annotations.get(INDEX_ANNOTATION, "?")
        failures = annotations.get(INDEX_FAILURES_ANNOTATION)
        node = pod.spec.node_name if pod.spec and pod.spec.node_name else "unscheduled"
        lines.append(_row("pod", f"{pod.metadata.name}  index {index}  {pod.status.phase}  "
                                 f"{container_state(pod)}  node {node}"
                                 + (f"  earlier failures of this index {failures}" if failures else "")))
    if not pods:
        lines.append(_row("pod", "none (not created yet, or removed with the Job)"))
    return lines


# --- the command ----------------------------------------------------------------------------------------


def _write(lines: list[str]) -> None:
    sys.stdout.write("\n".join(lines) + "\n")  # the command's output, for a person or a script's grep
    sys.stdout.flush()


def show_status(run: str, *, k8s_job: str | None, namespace: str) -> int:
    """Prints the run's status (and the Kubernetes Job's with k8s_job); returns the exit code."""
    status = rundir.read_status(run)
    finished = rundir.is_finished(run)
    _write(format_run(run, status, finished, dt.datetime.now(dt.timezone.utc)))
    if k8s_job is not None:
        configuration = kube_configuration(os.environ)
        _write(format_job(*fetch_job(configuration, k8s_job, namespace)))
    if status is None and not finished:
        raise ConfigError(f"{run}: no {rundir.STATUS} and no {rundir.SUCCESS}. Fix: check the path; a run "
                          f"that has not finished its first epoch has no status yet.")
    return EXIT_OK
