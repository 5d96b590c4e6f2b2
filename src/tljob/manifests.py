"""The Kubernetes objects of one training run, built as typed models and written as commented YAML.

`tljob manifests` renders the checked-in ``manifests/`` folder (its defaults) or the same set for
other sizes. The objects are the `kubernetes` client's typed models (V1Job, V1Service, ...); the
JobSet and TFJob variants are custom resources without typed models, so they are plain dicts that
embed typed Job and pod templates. Each object goes model -> dict
(``ApiClient().sanitize_for_serialization``) -> YAML through a small block-style writer that puts a
purpose line on top of each file and a one-line reason above each non-obvious field, taken from
tables of field path -> reason. Everything is deterministic: the same arguments give the same bytes,
which is how a test keeps ``manifests/`` equal to the default output.

The worker count is stated once, as ``--workers``: it becomes the Job's ``completions``, which
Kubernetes also needs as ``parallelism`` and the program as ``TLJOB_NUM_WORKERS`` (no downward-API
field exposes a Job's completions to its pods). This module writes all three from the one argument.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from kubernetes import client as k8s

from tljob.config import load_config
from tljob.errors import EXIT_CONFIG, EXIT_DATA, EXIT_RETRYABLE, ConfigError

log = logging.getLogger(__name__)

# --- names and defaults shared by every object ------------------------------------------------------

APP = "tljob"
JOB_NAME = "tljob"
SERVICE_NAME = "tljob-workers"
CONFIG_MAP_NAME = "tljob-config"
SERVICE_ACCOUNT_NAME = "tljob"
NETWORK_POLICY_NAME = "tljob-workers"
CONTAINER_NAME = "tljob"
# Kubeflow's operator finds the TensorFlow container and its port by these names.
TFJOB_CONTAINER_NAME = "tensorflow"
TFJOB_PORT_NAME = "tfjob-port"
JOBSET_REPLICATED_JOB = "worker"
POD_LABELS = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "worker"}
OBJECT_LABELS = {"app.kubernetes.io/name": APP}

# Placeholders that README "Run on GKE" replaces by rendering with the user's own values.
DEFAULT_IMAGE = "us-docker.pkg.dev/my-project/tljob/tljob:0.1.0"
DEFAULT_OUTPUT = "gs://my-project-tljob/runs/cats_vs_dogs"
GCP_SERVICE_ACCOUNT = "tljob-trainer@my-project.iam.gserviceaccount.com"
DEFAULT_CONFIG = "job/cats_vs_dogs.yaml"
# The repository root when tljob runs from a source checkout (an editable install).
REPO_ROOT = Path(__file__).resolve().parents[2]

WORKER_PORT = 2222
CONFIG_DIR = "/etc/tljob"
CONFIG_KEY = "job.yaml"
STAGING_DIR = "/var/lib/tljob/staging"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
# The image's non-root user (Dockerfile: USER 10001:10001); above 10000 so it matches no host user.
RUN_AS_USER = 10001

# Per GPU: sized to fit one GPU node such as GKE's g2-standard-8 (1 L4, 8 vCPU, 32 GB) beside the
# node's own daemons; a worker with G GPUs gets G times as much.
CPU_PER_GPU = 6
MEMORY_GI_PER_GPU = 20
SHM_SIZE = "2Gi"
STAGING_SIZE = "20Gi"
TMP_SIZE = "10Gi"

RESTARTS_PER_WORKER = 3
ACTIVE_DEADLINE_S = 6 * 3600
TTL_AFTER_FINISHED_S = 24 * 3600
# Above runtime.termination_grace_s (25 s), so a SIGTERM'd worker finishes its backup first.
TERMINATION_GRACE_S = 30

# checkov checks that these manifests skip (as checkov.io/skipN annotations), each with its reason.
IMAGE_DIGEST_SKIP = ("CKV_K8S_43", "the image is built per project; pin it by digest with "
                                   "tljob manifests --image REPO:TAG@sha256:...")
NAMESPACE_SKIP = ("CKV_K8S_21", "the namespace is chosen when applying: kubectl apply -n NS, or "
                                "tljob manifests --namespace NS")

_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REPO_RE = re.compile(
    r"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?"  # registry host[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


# --- inputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Everything that varies between renderings; the rest is fixed policy in this module."""

    workers: int
    gpus_per_worker: int
    image: str
    output: str
    namespace: str | None
    config_text: str  # the job YAML as the ConfigMap holds it, `output:` set


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers {workers}: a run needs at least one worker. Fix: pass --workers 1 or more.")


def check_gpus(gpus: int) -> None:
    if gpus < 0:
        raise ConfigError(f"--gpus-per-worker {gpus}: cannot be negative. Fix: pass 0 (CPU only) or more.")


def check_image(image: str) -> None:
    """A pinned image reference: REPO:TAG, REPO@sha256:DIGEST or both; never :latest."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    repo, _, tag = name.rpartition(":") if ":" in last else (name, "", "")
    if not _REPO_RE.fullmatch(repo):
        raise ConfigError(f"--image {image!r}: not an image reference. Fix: give e.g. "
                          f"us-docker.pkg.dev/PROJECT/tljob/tljob:0.1.0.")
    if digest and not _DIGEST_RE.fullmatch(digest):
        raise ConfigError(f"--image {image!r}: the digest must be sha256: and 64 hex digits. Fix: copy it from "
                          f"`docker buildx imagetools inspect IMAGE`.")
    if tag and not _TAG_RE.fullmatch(tag):
        raise ConfigError(f"--image {image!r}: {tag!r} is not a valid tag. Fix: use letters, digits, '.', '_', '-'.")
    if not tag and not digest:
        raise ConfigError(f"--image {image!r}: no tag or digest, so every node may run a different build. "
                          f"Fix: add :VERSION or @sha256:DIGEST.")
    if tag == "latest":
        raise ConfigError(f"--image {image!r}: :latest moves under a running Job. Fix: tag each build with its "
                          f"version (e.g. :0.1.0) or pin @sha256:DIGEST.")


def check_output(output: str) -> None:
    """Pods lose their local disk when they end, so the run directory must be in a bucket."""
    bucket = output.removeprefix("gs://").split("/", 1)[0]
    if not output.startswith("gs://") or not _BUCKET_RE.fullmatch(bucket):
        raise ConfigError(f"--output {output!r}: pods need a gs://BUCKET/PREFIX run directory (their disks go "
                          f"with them). Fix: pass e.g. --output gs://my-bucket/runs/cats_vs_dogs.")


def check_namespace(namespace: str) -> None:
    if len(namespace) > 63 or not _LABEL_RE.fullmatch(namespace):
        raise ConfigError(f"--namespace {namespace!r}: not a Kubernetes namespace name. Fix: use at most 63 "
                          f"lowercase letters, digits and '-', starting and ending with a letter or digit.")


def set_output(config_text: str, output: str) -> str:
    """The job YAML with its top-level `output:` line replaced (added when absent); comments are kept."""
    quoted = yaml.safe_dump(output, default_style='"').strip()
    line = f"output: {quoted}  # the run directory; set by tljob manifests --output"
    pattern = re.compile(r"^output:.*$", re.MULTILINE)
    if pattern.search(config_text):
        return pattern.sub(lambda _: line, config_text, count=1)
    return config_text.rstrip("\n") + "\n" + line + "\n"


def default_config_path() -> Path:
    """The recipe beside the package in a source checkout; an installed wheel has no job/ folder."""
    path = REPO_ROOT / DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"--config not given and {DEFAULT_CONFIG} is not beside this installation ({path}). "
                          f"Fix: pass --config with the job YAML to put in the ConfigMap.")
    return path


def config_map_text(config_path: Path, output: str) -> str:
    """The ConfigMap's job.yaml: the file's text (comments kept) with `output:` set, validated as a job config."""
    if not config_path.is_file():
        raise ConfigError(f"--config {config_path}: no such file. Fix: pass a job YAML such as {DEFAULT_CONFIG}.")
    # The same validation the pods run, so a bad key fails here rather than in every pod.
    load_config(config_path, [f"output={output}"], environ={})
    original = config_path.read_text()
    text = set_output(original, output)
    if not _only_output_differs(original, text, output):
        raise ConfigError(f"--config {config_path}: its top-level `output:` spans several lines, so it cannot be "
                          f"replaced. Fix: write it on one line, e.g. `output: null`.")
    return text


def _only_output_differs(original: str, text: str, output: str) -> bool:
    try:
        return bool(yaml.safe_load(text) == {**(yaml.safe_load(original) or {}), "output": output})
    except yaml.YAMLError:
        return False  # the line replaced was the first of a multi-line value


def build_spec(
    *,
    workers: int,
    gpus_per_worker: int,
    image: str | None,
    output: str | None,
    namespace: str | None,
    config_path: str | None,
) -> RunSpec:
    """Validates the command-line values (ConfigError names the flag) and fills in the defaults."""
    image = DEFAULT_IMAGE if image is None else image
    output = DEFAULT_OUTPUT if output is None else output
    check_workers(workers)
    check_gpus(gpus_per_worker)
    check_image(image)
    check_output(output)
    if namespace is not None:
        check_namespace(namespace)
    path = default_config_path() if config_path is None else Path(config_path)
    return RunSpec(workers=workers, gpus_per_worker=gpus_per_worker, image=image, output=output,
                   namespace=namespace, config_text=config_map_text(path, output))


# --- the objects --------------------------------------------------------------------------------------


def checkov_annotations(skips: list[tuple[str, str]]) -> dict[str, str]:
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(skips, start=1)}


def _meta(
    spec: RunSpec, name: str, annotations: Mapping[str, str] | None = None, *, runs_image: bool = False
) -> k8s.V1ObjectMeta:
    skips = ([IMAGE_DIGEST_SKIP] if runs_image and "@" not in spec.image else []) + (
        [NAMESPACE_SKIP] if spec.namespace is None else [])
    merged = {**(annotations or {}), **checkov_annotations(skips)}
    return k8s.V1ObjectMeta(name=name, namespace=spec.namespace, labels=dict(OBJECT_LABELS),
                            annotations=merged or None)


def config_map(spec: RunSpec) -> k8s.V1ConfigMap:
    return k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=_meta(spec, CONFIG_MAP_NAME),
                           data={CONFIG_KEY: spec.config_text})


def service_account(spec: RunSpec) -> k8s.V1ServiceAccount:
    return k8s.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount",
        metadata=_meta(spec, SERVICE_ACCOUNT_NAME, {"iam.gke.io/gcp-service-account": GCP_SERVICE_ACCOUNT}),
        automount_service_account_token=False,
    )


def service(spec: RunSpec) -> k8s.V1Service:
    return k8s.V1Service(
        api_version="v1", kind="Service", metadata=_meta(spec, SERVICE_NAME),
        spec=k8s.V1ServiceSpec(
            cluster_ip="None",
            publish_not_ready_addresses=True,
            selector=dict(POD_LABELS),
            ports=[k8s.V1ServicePort(name="grpc", port=WORKER_PORT, target_port=WORKER_PORT, protocol="TCP")],
        ),
    )


def network_policy(spec: RunSpec) -> k8s.V1NetworkPolicy:
    own_pods = k8s.V1LabelSelector(match_labels=dict(POD_LABELS))
    return k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1", kind="NetworkPolicy", metadata=_meta(spec, NETWORK_POLICY_NAME),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=own_pods,
            policy_types=["Ingress"],
            ingress=[k8s.V1NetworkPolicyIngressRule(
                _from=[k8s.V1NetworkPolicyPeer(pod_selector=own_pods)],
                ports=[k8s.V1NetworkPolicyPort(protocol="TCP", port=WORKER_PORT)],
            )],
        ),
    )


def host_pattern(pod_prefix: str, subdomain: str) -> str:
    """TLJOB_HOST_PATTERN for tljob.cluster: pod hostname <prefix><index> in the headless Service's subdomain."""
    return f"{pod_prefix}{{index}}.{subdomain}:{{port}}"


def _env(pairs: Mapping[str, str]) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name=name, value=value) for name, value in pairs.items()]


def worker_env(spec: RunSpec, pattern: str | None) -> dict[str, str]:
    """The program's environment; without a pattern the cluster comes from elsewhere (TFJob's TF_CONFIG)."""
    cluster = {"TLJOB_NUM_WORKERS": str(spec.workers), "TLJOB_PORT": str(WORKER_PORT),
               "TLJOB_HOST_PATTERN": pattern} if pattern else {}
    return {**cluster, "TLJOB__RUNTIME__STAGING_DIR": STAGING_DIR, "PYTHONUNBUFFERED": "1"}


def resources(gpus: int) -> k8s.V1ResourceRequirements:
    """requests = limits for CPU and memory: Guaranteed QoS, the last class evicted under node pressure."""
    units = max(gpus, 1)
    amounts = {"cpu": str(CPU_PER_GPU * units), "memory": f"{MEMORY_GI_PER_GPU * units}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    # emptyDirs live on the node's disk: ask for room for them without capping it (sizeLimits do that).
    requests = {**amounts, "ephemeral-storage": "30Gi"}
    return k8s.V1ResourceRequirements(requests=requests, limits=dict(amounts))


def gpu_affinity() -> k8s.V1Affinity:
    """GPU nodes on GKE (its accelerator label) or where NVIDIA's GPU feature discovery labels them."""
    terms = [
        k8s.V1NodeSelectorTerm(match_expressions=[
            k8s.V1NodeSelectorRequirement(key="cloud.google.com/gke-accelerator", operator="Exists")]),
        k8s.V1NodeSelectorTerm(match_expressions=[
            k8s.V1NodeSelectorRequirement(key="nvidia.com/gpu.present", operator="In", values=["true"])]),
    ]
    return k8s.V1Affinity(node_affinity=k8s.V1NodeAffinity(
        required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(node_selector_terms=terms)))


def container(spec: RunSpec, *, name: str, pattern: str | None, port_name: str) -> k8s.V1Container:
    return k8s.V1Container(
        name=name,
        image=spec.image,
        image_pull_policy="Always",
        command=["tljob"],
        args=["train", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        env=_env(worker_env(spec, pattern)),
        ports=[k8s.V1ContainerPort(name=port_name, container_port=WORKER_PORT, protocol="TCP")],
        resources=resources(spec.gpus_per_worker),
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            privileged=False,
            run_as_non_root=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        termination_message_policy="FallbackToLogsOnError",
        volume_mounts=[
            k8s.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True),
            k8s.V1VolumeMount(name="staging", mount_path=STAGING_DIR),
            k8s.V1VolumeMount(name="tmp", mount_path=TMP_DIR),
            k8s.V1VolumeMount(name="shm", mount_path=SHM_DIR),
        ],
    )


def volumes() -> list[k8s.V1Volume]:
    return [
        k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(
            name=CONFIG_MAP_NAME, items=[k8s.V1KeyToPath(key=CONFIG_KEY, path=CONFIG_KEY)])),
        k8s.V1Volume(name="staging", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=STAGING_SIZE)),
        k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=TMP_SIZE)),
        k8s.V1Volume(name="shm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=SHM_SIZE)),
    ]


def pod_template(
    spec: RunSpec,
    *,
    restart_policy: str,
    subdomain: str | None,
    pattern: str | None,
    container_name: str = CONTAINER_NAME,
    port_name: str = "grpc",
) -> k8s.V1PodTemplateSpec:
    gpus = spec.gpus_per_worker > 0
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=dict(POD_LABELS)),
        spec=k8s.V1PodSpec(
            restart_policy=restart_policy,
            subdomain=subdomain,
            service_account_name=SERVICE_ACCOUNT_NAME,
            automount_service_account_token=False,
            enable_service_links=False,
            termination_grace_period_seconds=TERMINATION_GRACE_S,
            affinity=gpu_affinity() if gpus else None,
            tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
            if gpus else None,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=RUN_AS_USER,
                run_as_group=RUN_AS_USER,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            containers=[container(spec, name=container_name, pattern=pattern, port_name=port_name)],
            volumes=volumes(),
        ),
    )


def pod_failure_policy(container_name: str, *, count_retryable: bool) -> k8s.V1PodFailurePolicy:
    """Rules from tljob.errors' exit codes; the first matching rule wins."""
    rules = [
        k8s.V1PodFailurePolicyRule(action="FailJob", on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
            container_name=container_name, operator="In", values=[EXIT_CONFIG, EXIT_DATA])),
        k8s.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
    ]
    if count_retryable:
        rules.append(k8s.V1PodFailurePolicyRule(
            action="Count", on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
                container_name=container_name, operator="In", values=[EXIT_RETRYABLE])))
    return k8s.V1PodFailurePolicy(rules=rules)


def job(spec: RunSpec) -> k8s.V1Job:
    return k8s.V1Job(
        api_version="batch/v1", kind="Job", metadata=_meta(spec, JOB_NAME, runs_image=True),
        spec=k8s.V1JobSpec(
            completion_mode="Indexed",
            completions=spec.workers,
            parallelism=spec.workers,
            backoff_limit_per_index=RESTARTS_PER_WORKER,
            max_failed_indexes=0,
            backoff_limit=RESTARTS_PER_WORKER * spec.workers,
            pod_replacement_policy="Failed",
            pod_failure_policy=pod_failure_policy(CONTAINER_NAME, count_retryable=True),
            active_deadline_seconds=ACTIVE_DEADLINE_S,
            ttl_seconds_after_finished=TTL_AFTER_FINISHED_S,
            template=pod_template(spec, restart_policy="Never", subdomain=SERVICE_NAME,
                                  pattern=host_pattern(f"{JOB_NAME}-", SERVICE_NAME)),
        ),
    )


def jobset(spec: RunSpec) -> dict[str, Any]:
    """A JobSet (jobset.x-k8s.io): any failed child Job restarts every worker together."""
    # JobSet's own headless Service is named after the JobSet; its pods are <jobset>-<rjob>-<job>-<index>.
    pattern = host_pattern(f"{JOB_NAME}-{JOBSET_REPLICATED_JOB}-0-", JOB_NAME)
    template = k8s.V1JobTemplateSpec(spec=k8s.V1JobSpec(
        completion_mode="Indexed",
        completions=spec.workers,
        parallelism=spec.workers,
        backoff_limit=0,
        pod_failure_policy=pod_failure_policy(CONTAINER_NAME, count_retryable=False),
        template=pod_template(spec, restart_policy="Never", subdomain=None, pattern=pattern),
    ))
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": _sanitize(_meta(spec, JOB_NAME, runs_image=True)),
        "spec": {
            "network": {"enableDNSHostnames": True},
            "failurePolicy": {
                "maxRestarts": RESTARTS_PER_WORKER,
                "rules": [{"name": "ConfigOrDataError", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "replicatedJobs": [{"name": JOBSET_REPLICATED_JOB, "replicas": 1, "template": _sanitize(template)}],
        },
    }


def tfjob(spec: RunSpec) -> dict[str, Any]:
    """A Kubeflow TFJob (kubeflow.org/v1): the operator sets TF_CONFIG, which tljob.cluster reads first."""
    template = pod_template(spec, restart_policy="OnFailure", subdomain=None, pattern=None,
                            container_name=TFJOB_CONTAINER_NAME, port_name=TFJOB_PORT_NAME)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": _sanitize(_meta(spec, JOB_NAME, runs_image=True)),
        "spec": {
            "runPolicy": {
                "backoffLimit": RESTARTS_PER_WORKER,
                "activeDeadlineSeconds": ACTIVE_DEADLINE_S,
                "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
                "cleanPodPolicy": "Running",
            },
            "tfReplicaSpecs": {
                "Worker": {"replicas": spec.workers, "restartPolicy": "OnFailure", "template": _sanitize(template)},
            },
        },
    }


def _sanitize(model: Any) -> Any:
    """Typed model -> plain dict with the API's camelCase keys and no unset fields."""
    return k8s.ApiClient().sanitize_for_serialization(model)


# --- reasons, by field path ---------------------------------------------------------------------------
# A path joins keys with "."; a list item is "[name]" when it has a name, else "[index]".

POD_REASONS = {
    "restartPolicy": "Never: the Job replaces a failed pod itself, so podFailurePolicy sees every exit code",
    "subdomain": "the headless Service: pod <job>-<index> resolves as <job>-<index>.tljob-workers",
    "serviceAccountName": "Workload Identity: GCS access as the bound Google service account, no key files",
    "automountServiceAccountToken": "the trainer never calls the Kubernetes API; GKE's metadata server needs no token",
    "enableServiceLinks": "keeps every Service of the namespace out of the environment as *_SERVICE_HOST variables",
    "terminationGracePeriodSeconds": ("above runtime.termination_grace_s (25 s): a SIGTERM'd worker saves its backup "
                                      "first"),
    "affinity": ("GPU nodes, by GKE's accelerator label or NVIDIA feature discovery's (either term); pin a model "
                 "with cloud.google.com/gke-accelerator In [nvidia-l4]"),
    "tolerations[0]": "GPU node pools carry the taint nvidia.com/gpu:NoSchedule to keep other pods off",
    "securityContext.runAsUser": "the image's own non-root user; above 10000, so it matches no user of the host",
    "securityContext.seccompProfile": "the container runtime's default system-call filter",
    "volumes[staging]": "local scratch for backups, the model and logs before upload (runtime.staging_dir)",
    "volumes[tmp]": "/tmp and $HOME of the image: the root filesystem is read-only (TFDS downloads, caches)",
    "volumes[shm]": "memory-backed /dev/shm for NCCL and tf.data; a container's default is 64 MiB",
    "volumes[shm].emptyDir.sizeLimit": "counts against the memory limit",
}

CONTAINER_REASONS = {
    "imagePullPolicy": "Always: a re-pushed tag is never served stale from a node's cache (layers stay cached)",
    "command": "the image's ENTRYPOINT, stated so that the manifest reads as the command it runs",
    "env[TLJOB_NUM_WORKERS]": "= completions = parallelism; tljob manifests --workers writes all three",
    "env[TLJOB_PORT]": "the port that the Service and the NetworkPolicy open",
    "env[TLJOB_HOST_PATTERN]": "every worker's address, for tljob.cluster: its pod hostname in the headless Service",
    "env[TLJOB__RUNTIME__STAGING_DIR]": "runtime.staging_dir on the staging emptyDir",
    "env[PYTHONUNBUFFERED]": "log lines reach kubectl logs as they are written",
    "ports[grpc]": "TensorFlow's gRPC server: the collectives between workers",
    "ports[tfjob-port]": "TensorFlow's gRPC server; the operator finds it by this name",
    "resources": "requests = limits (CPU, memory): Guaranteed QoS; sized for one GPU node, times the GPUs per worker",
    "resources.requests.ephemeral-storage": "room on the node's disk for the emptyDirs",
    "securityContext.readOnlyRootFilesystem": "the image writes only to the mounted volumes",
    "securityContext.capabilities.drop": "training needs no Linux capability",
    "terminationMessagePolicy": "a failed pod's status shows its last log lines (tljob status --k8s)",
    "volumeMounts[config]": "the ConfigMap's job.yaml as /etc/tljob/job.yaml",
}

JOB_SPEC_REASONS = {
    "completionMode": "each pod gets JOB_COMPLETION_INDEX (its worker index) and a hostname that ends in it",
    "completions": ("THE WORKER COUNT: parallelism and TLJOB_NUM_WORKERS equal it; tljob manifests --workers N "
                    "writes all three"),
    "parallelism": "every worker at once: MultiWorkerMirroredStrategy needs all its peers",
    "backoffLimitPerIndex": ("restarts per worker; one fault costs each worker one, since its peers exit 75 within "
                             "runtime.peer_timeout_s"),
    "maxFailedIndexes": "0: a worker out of restarts fails the Job, as its peers cannot train without it",
    "backoffLimit": "workers x backoffLimitPerIndex: a total cap that never binds before the per-worker one",
    "podReplacementPolicy": "a replacement pod starts only once the old one is gone: never two pods with one hostname",
    "podFailurePolicy.rules[0]": "exit 2 (config) or 3 (data): no restart can fix it, so the Job fails at once",
    "podFailurePolicy.rules[1]": "evicted, preempted or drained: not the run's fault; retried without using a restart",
    "podFailurePolicy.rules[2]": ("exit 75 (retryable: peer lost, SIGTERM, storage outage): resume from the last "
                                  "backup; counted, so a fault that keeps coming ends the Job"),
    "activeDeadlineSeconds": ("caps GPU time when retries never end; far above the recipe's duration, raise it for "
                              "larger data"),
    "ttlSecondsAfterFinished": "the finished Job and its pods (and their logs) stay one day",
}

JOBSET_JOB_REASONS = {
    "backoffLimit": "0: any failed pod fails this Job, and the JobSet then restarts every worker together",
    "podFailurePolicy.rules[0]": ("exit 2 (config) or 3 (data): fails the Job with reason PodFailurePolicy, which "
                                  "fails the JobSet"),
    "podFailurePolicy.rules[1]": ("evicted, preempted or drained: the pod is replaced; its peers then exit 75 and "
                                  "the JobSet restarts all"),
}


def _prefixed(prefix: str, reasons: Mapping[str, str]) -> dict[str, str]:
    return {f"{prefix}.{path}": reason for path, reason in reasons.items()}


def _pod_reasons(pod: str, container_name: str) -> dict[str, str]:
    return {**_prefixed(pod, POD_REASONS), **_prefixed(f"{pod}.containers[{container_name}]", CONTAINER_REASONS)}


META_REASONS = {"metadata.annotations": "checkov skips, each with its reason"}
ANNOTATED_META_REASONS = {
    "metadata.annotations": "iam.gke.io/...: the Google service account (roles on the bucket) that the pods act as "
                            "through Workload Identity, put in yours; checkov.io/skipN: skipped checks",
}

JOB_REASONS = {
    **META_REASONS, **_prefixed("spec", JOB_SPEC_REASONS), **_pod_reasons("spec.template.spec", CONTAINER_NAME),
}

_JOBSET_JOB = f"spec.replicatedJobs[{JOBSET_REPLICATED_JOB}].template.spec"
JOBSET_REASONS = {
    **META_REASONS,
    "spec.network.enableDNSHostnames": ("a headless Service named after the JobSet: pod <jobset>-worker-0-<index> "
                                        "resolves as <pod>.tljob"),
    "spec.failurePolicy.maxRestarts": "restarts of the whole set (every worker at once)",
    "spec.failurePolicy.rules[ConfigOrDataError]": ("a Job failed by its podFailurePolicy (exit 2 or 3) fails the "
                                                    "JobSet without restarts"),
    "spec.ttlSecondsAfterFinished": "the finished JobSet and its pods stay one day",
    f"spec.replicatedJobs[{JOBSET_REPLICATED_JOB}].replicas": "one Indexed Job holds all the workers",
    **_prefixed(_JOBSET_JOB, {k: JOB_SPEC_REASONS[k] for k in ("completionMode", "completions", "parallelism")}),
    **_prefixed(_JOBSET_JOB, JOBSET_JOB_REASONS),
    **_pod_reasons(f"{_JOBSET_JOB}.template.spec", CONTAINER_NAME),
}

_TF_POD = "spec.tfReplicaSpecs.Worker.template.spec"
TFJOB_REASONS = {
    **META_REASONS,
    "spec.runPolicy.backoffLimit": ("container restarts before the TFJob fails; exit 2 or 3 also repeat until this "
                                    "runs out"),
    "spec.runPolicy.activeDeadlineSeconds": JOB_SPEC_REASONS["activeDeadlineSeconds"],
    "spec.runPolicy.ttlSecondsAfterFinished": "the finished TFJob and its pods stay one day",
    "spec.runPolicy.cleanPodPolicy": "stops the workers still running once the TFJob has finished or failed",
    "spec.tfReplicaSpecs.Worker.replicas": "THE WORKER COUNT; the operator writes each pod's TF_CONFIG from it",
    "spec.tfReplicaSpecs.Worker.restartPolicy": ("OnFailure: ExitCode would treat 75 as permanent (the operator "
                                                 "retries only 128-255)"),
    **{k: v for k, v in _pod_reasons(_TF_POD, TFJOB_CONTAINER_NAME).items() if not k.endswith(".restartPolicy")},
    f"{_TF_POD}.restartPolicy": "restarts the container in place: the pod keeps its name, address and emptyDirs",
}

SERVICE_REASONS = {
    **META_REASONS,
    "spec.clusterIP": "None: a headless Service gives each worker pod a DNS name, with no virtual IP",
    "spec.publishNotReadyAddresses": "workers resolve each other as soon as their pods exist, without readiness probes",
    "spec.selector": "this job's worker pods",
}

NETWORK_POLICY_REASONS = {
    **META_REASONS,
    "spec.podSelector": "this job's worker pods",
    "spec.policyTypes": "ingress only: egress stays open for GCS, the metadata server (Workload Identity) and DNS",
    "spec.ingress[0]": "from this job's own pods, to the worker port only; every other ingress is denied",
}

SERVICE_ACCOUNT_REASONS = {
    **ANNOTATED_META_REASONS,
    "automountServiceAccountToken": "no Kubernetes API token in the pods: the trainer does not use the API",
}

CONFIG_MAP_REASONS = {
    **META_REASONS,
    "data.job.yaml": "the job config that every pod reads (tljob train --config /etc/tljob/job.yaml)",
}


# --- YAML with comments -------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    """One-line YAML for a scalar, quoted only where YAML needs it; newlines are escaped inside double quotes."""
    style = '"' if isinstance(value, str) and "\n" in value else None
    text = yaml.safe_dump(value, default_flow_style=True, default_style=style, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def _is_block(value: Any) -> bool:
    """Multi-line text that a literal block (|) reproduces exactly."""
    return (isinstance(value, str) and "\n" in value.rstrip("\n") and value.endswith("\n")
            and not value.endswith("\n\n") and not value.startswith((" ", "\n")) and "\r" not in value
            and "\t" not in value)


def _item_key(item: Any, index: int) -> str:
    return f"[{item['name']}]" if isinstance(item, dict) and isinstance(item.get("name"), str) else f"[{index}]"


def _comment(reasons: Mapping[str, str], path: str, indent: int) -> list[str]:
    reason = reasons.get(path)
    return [f"{' ' * indent}# {reason}"] if reason else []


def _emit_value(key_text: str, value: Any, path: str, indent: int, reasons: Mapping[str, str]) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict) and value:
        return [f"{pad}{key_text}:", *_emit_mapping(value, path, indent + 2, reasons)]
    if isinstance(value, list) and value:
        return [f"{pad}{key_text}:", *_emit_sequence(value, path, indent, reasons)]
    if _is_block(value):
        body = [f"{pad}  {line}" if line else "" for line in value.removesuffix("\n").split("\n")]
        return [f"{pad}{key_text}: |", *body]
    return [f"{pad}{key_text}: {_scalar(value)}"]


# Models list fields alphabetically; these keys move first or last so that a file reads top-down.
_FIRST_KEYS = ("apiVersion", "kind", "metadata", "name", "namespace", "image")
_LAST_KEYS = ("template", "containers", "volumes")


def _key_order(node: Mapping[str, Any]) -> list[str]:
    rank = {key: i for i, key in enumerate(_FIRST_KEYS)}
    rank.update({key: len(_FIRST_KEYS) + 1 + i for i, key in enumerate(_LAST_KEYS)})
    middle = len(_FIRST_KEYS)
    return sorted(node, key=lambda key: rank.get(key, middle))  # stable: the rest keep the model's order


def _emit_mapping(node: Mapping[str, Any], path: str, indent: int, reasons: Mapping[str, str]) -> list[str]:
    lines: list[str] = []
    for key in _key_order(node):
        value = node[key]
        child = f"{path}.{key}" if path else key
        lines += _comment(reasons, child, indent)
        lines += _emit_value(_scalar(key), value, child, indent, reasons)
    return lines


def _emit_sequence(items: list[Any], path: str, indent: int, reasons: Mapping[str, str]) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for index, item in enumerate(items):
        child = f"{path}{_item_key(item, index)}"
        lines += _comment(reasons, child, indent)
        if isinstance(item, dict) and item:
            body = _emit_mapping(item, child, indent + 2, reasons)
            first = next(i for i, line in enumerate(body) if not line.lstrip().startswith("#"))
            # Comments on the item's first key go above the dash, which shares that key's line.
            lines += [line[2:] for line in body[:first]]
            lines += [f"{pad}- {body[first][indent + 2:]}", *body[first + 1:]]
        elif isinstance(item, (dict, list)) and not item:
            lines.append(f"{pad}- {_scalar(item)}")
        elif isinstance(item, list):
            raise ValueError(f"{child}: lists of lists are not used in manifests")
        else:
            lines.append(f"{pad}- {_scalar(item)}")
    return lines


def to_yaml(obj: Mapping[str, Any], purpose: str, reasons: Mapping[str, str]) -> str:
    """One YAML document: the purpose line, a rendered-by line, then the object with its reasons."""
    header = [f"# {purpose}", "# Rendered by `tljob manifests` (src/tljob/manifests.py): change that, then re-render."]
    text = "\n".join([*header, *_emit_mapping(obj, "", 0, reasons)]) + "\n"
    if yaml.safe_load(text) != obj:
        raise RuntimeError(f"YAML writer bug: {purpose!r} does not load back to the object it was written from")
    return text


# --- the set of files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    path: str  # relative to the output folder
    purpose: str
    obj: dict[str, Any]
    reasons: Mapping[str, str]

    def text(self) -> str:
        return to_yaml(self.obj, self.purpose, self.reasons)


_WITH_SHARED = ("Apply with ../configmap.yaml, ../serviceaccount.yaml and ../networkpolicy.yaml instead of job.yaml "
                "and service.yaml.")


def manifests(spec: RunSpec) -> list[Manifest]:
    """The files of one run: the flat set for `kubectl apply -f DIR`, and the two CRD variants in sub-folders."""
    return [
        Manifest("configmap.yaml", "The job config that every worker pod mounts as /etc/tljob/job.yaml.",
                 _sanitize(config_map(spec)), CONFIG_MAP_REASONS),
        Manifest("serviceaccount.yaml",
                 "The pods' identity: Workload Identity lets it act as a Google service account.",
                 _sanitize(service_account(spec)), SERVICE_ACCOUNT_REASONS),
        Manifest("service.yaml", "Headless Service: a stable DNS name for each worker pod of the Indexed Job.",
                 _sanitize(service(spec)), SERVICE_REASONS),
        Manifest("networkpolicy.yaml", "Only this job's worker pods may reach the workers' gRPC port.",
                 _sanitize(network_policy(spec)), NETWORK_POLICY_REASONS),
        Manifest("job.yaml", "The training run: an Indexed Job with one worker pod per completion index.",
                 _sanitize(job(spec)), JOB_REASONS),
        Manifest("jobset/jobset.yaml",
                 "Variant for clusters with JobSet: the workers of an Indexed Job, all restarted together on any "
                 "failure. "
                 f"{_WITH_SHARED}",
                 jobset(spec), JOBSET_REASONS),
        Manifest("tfjob/tfjob.yaml",
                 f"Variant for clusters with Kubeflow's training operator: the workers as a TFJob. {_WITH_SHARED}",
                 tfjob(spec), TFJOB_REASONS),
    ]


def render_to_dir(
    out_dir: str,
    *,
    workers: int,
    gpus_per_worker: int,
    image: str | None,
    output: str | None,
    namespace: str | None,
    config_path: str | None,
) -> list[str]:
    """Writes the manifests of one run under `out_dir`; returns the paths written. None -> the checked-in default."""
    spec = build_spec(workers=workers, gpus_per_worker=gpus_per_worker, image=image, output=output,
                      namespace=namespace, config_path=config_path)
    written = []
    for manifest in manifests(spec):
        path = Path(out_dir) / manifest.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(manifest.text())
        log.debug("wrote %s", path)
        written.append(str(path))
    return written
