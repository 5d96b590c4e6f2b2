"""The Kubernetes objects of one training run, rendered from commented YAML templates.

The templates (package data in tljob/templates/, laid out like the output folder) are the default
run's manifests: a purpose line on top of each file and a reason above each non-obvious field, in
the YAML itself. `tljob manifests` loads them with ruamel.yaml's round-trip loader, which keeps the
comments, applies each option as a small function that edits the loaded documents, and dumps them
again. The same arguments give the same bytes, which is how a test keeps ``manifests/`` equal to
the default output.

The worker count is stated once, as ``--workers``: it becomes the Job's ``completions``, which
Kubernetes also needs as ``parallelism`` and the program as ``TLJOB_NUM_WORKERS`` (no downward-API
field exposes a Job's completions to its pods). `set_workers` writes all three from the one argument.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import LiteralScalarString

from tljob.config import load_config
from tljob.errors import ConfigError

log = logging.getLogger(__name__)

# Package data lies beside this module in every install (pip unpacks wheels into folders).
PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES = PACKAGE_DIR / "templates"
# The recipe's path in the repository, and in the package, where tljob/job/ links to it.
DEFAULT_CONFIG = "job/cats_vs_dogs.yaml"
# Placeholder that README "Run on GKE" replaces by rendering with the user's own bucket.
DEFAULT_OUTPUT = "gs://my-project-tljob/runs/cats_vs_dogs"
# The ConfigMap's key, which the pods mount as /etc/tljob/job.yaml.
CONFIG_KEY = "job.yaml"
GPU_RESOURCE = "nvidia.com/gpu"
# checkov checks that the templates skip (checkov.io/skipN annotations) until an option makes them pass.
NAMESPACE_CHECK = "CKV_K8S_21"
IMAGE_DIGEST_CHECK = "CKV_K8S_43"

Node = CommentedMap | CommentedSeq
Documents = dict[str, CommentedMap]  # output path relative to the folder -> its one object

_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_REPO_RE = re.compile(
    r"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?"  # registry host[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# Google service accounts: user-made (NAME@PROJECT.iam...) and Google's defaults (...@developer..., @appspot...).
_GSA_RE = re.compile(r"[a-z0-9][a-z0-9._-]*@[a-z0-9][a-z0-9.-]*\.gserviceaccount\.com")
# Kueue reads these labels on the workload (Job, JobSet, TFJob): the LocalQueue that admits it and the
# WorkloadPriorityClass that orders it in the ClusterQueue (and may let it preempt lower ones).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
# Where --gcsfuse-bucket mounts a bucket: /gcs/BUCKET, the path Vertex AI mounts buckets at, so one data.train
# works on both.
GCSFUSE_ROOT = "/gcs"
GCSFUSE_VOLUME = "gcs-data"
# The Cloud Storage FUSE sidecar's share, requests = limits so that the pod keeps Guaranteed QoS; it fits beside
# the worker's own share on the GPU node the templates are sized for.
GCSFUSE_SIDECAR = {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "5Gi"}


# --- inputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Everything that varies between renderings; the rest is fixed policy in the templates."""

    workers: int
    gpus_per_worker: int
    image: str | None  # None: the templates' own
    output: str
    namespace: str | None
    config_text: str  # the job YAML as the ConfigMap holds it, `output:` set
    queue: str | None = None  # Kueue LocalQueue
    priority_class: str | None = None  # Kueue WorkloadPriorityClass
    gcp_service_account: str | None = None  # None: the Kubernetes ServiceAccount is the principal itself
    gcsfuse_bucket: str | None = None  # mounted read-only at GCSFUSE_ROOT/BUCKET


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


def check_kueue_name(flag: str, name: str) -> None:
    """A label value (at most 63 characters) that is also a Kubernetes object name, as Kueue's objects are."""
    if len(name) > 63 or not _LABEL_RE.fullmatch(name):
        kind = {"--queue": "localqueues", "--priority-class": "workloadpriorityclasses"}[flag]
        raise ConfigError(f"{flag} {name!r}: not the name of a Kueue object. Fix: use at most 63 lowercase letters, "
                          f"digits and '-', starting and ending with a letter or digit (kubectl get {kind} lists "
                          f"them).")


def check_gcp_service_account(email: str) -> None:
    if not _GSA_RE.fullmatch(email):
        raise ConfigError(f"--gcp-service-account {email!r}: not a Google service account's email. Fix: give e.g. "
                          f"tljob-trainer@PROJECT.iam.gserviceaccount.com, or leave the flag out to grant the roles "
                          f"to the Kubernetes ServiceAccount directly (README: Run on GKE).")


def check_gcsfuse_bucket(bucket: str) -> None:
    if not _BUCKET_RE.fullmatch(bucket):
        raise ConfigError(f"--gcsfuse-bucket {bucket!r}: not a bucket name. Fix: give the bare name (my-data, not "
                          f"gs://my-data/prefix); data.train then reads {GCSFUSE_ROOT}/my-data/prefix.")


def set_output(config_text: str, output: str) -> str:
    """The job YAML with its top-level `output:` line replaced (added when absent); comments are kept."""
    quoted = yaml.safe_dump(output, default_style='"').strip()
    line = f"output: {quoted}  # the run directory; set by tljob manifests --output"
    pattern = re.compile(r"^output:.*$", re.MULTILINE)
    if pattern.search(config_text):
        return pattern.sub(lambda _: line, config_text, count=1)
    return config_text.rstrip("\n") + "\n" + line + "\n"


def default_config_path() -> Path:
    """The recipe as package data: tljob/job/ links to the repository's job/ file, and a wheel carries a copy."""
    path = PACKAGE_DIR / DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"--config not given and this installation has no {DEFAULT_CONFIG} ({path}): its wheel was "
                          f"built without the repository's job/ folder (as the Dockerfile's wheel stage is). Fix: pass "
                          f"--config with the job YAML to put in the ConfigMap, or build the wheel from a checkout.")
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
    queue: str | None = None,
    priority_class: str | None = None,
    gcp_service_account: str | None = None,
    gcsfuse_bucket: str | None = None,
) -> RunSpec:
    """Validates the command-line values (ConfigError names the flag) and fills in the defaults."""
    output = DEFAULT_OUTPUT if output is None else output
    check_workers(workers)
    check_gpus(gpus_per_worker)
    if image is not None:
        check_image(image)
    check_output(output)
    if namespace is not None:
        check_namespace(namespace)
    if queue is not None:
        check_kueue_name("--queue", queue)
    if priority_class is not None:
        check_kueue_name("--priority-class", priority_class)
    if gcp_service_account is not None:
        check_gcp_service_account(gcp_service_account)
    if gcsfuse_bucket is not None:
        check_gcsfuse_bucket(gcsfuse_bucket)
    path = default_config_path() if config_path is None else Path(config_path)
    return RunSpec(workers=workers, gpus_per_worker=gpus_per_worker, image=image, output=output,
                   namespace=namespace, config_text=config_map_text(path, output), queue=queue,
                   priority_class=priority_class, gcp_service_account=gcp_service_account,
                   gcsfuse_bucket=gcsfuse_bucket)


# --- comments that move with the fields -------------------------------------------------------------
# ruamel.yaml keeps the comment lines above a field on the last scalar before them: the previous
# field's value, however deep. Removing or inserting a field therefore moves those lines by hand.


def _tail(node: Node, key: Any) -> tuple[list[Any], int]:
    """The comment slot after node[key]'s last scalar, as ruamel.yaml keeps it (created when empty)."""
    value = node[key]
    if isinstance(value, CommentedMap) and value:
        return _tail(value, next(reversed(value)))
    if isinstance(value, CommentedSeq) and value:
        return _tail(value, len(value) - 1)
    entry = node.ca.items.setdefault(key, [None, None, None, None])
    # A mapping keeps the comment after a value in slot 2, a sequence after an item in slot 0.
    return entry, 2 if isinstance(node, CommentedMap) else 0


def _take_comment(node: Node, key: Any) -> Any:
    entry, slot = _tail(node, key)
    token, entry[slot] = entry[slot], None
    return token


def _put_comment(node: Node, key: Any, token: Any) -> None:
    entry, slot = _tail(node, key)
    entry[slot] = token


def drop(mapping: CommentedMap, key: str) -> None:
    """Removes a field with the reason above it; the next field keeps its own."""
    keys = list(mapping)
    index = keys.index(key)
    following = _take_comment(mapping, key)
    if index == 0:
        if following is not None or mapping.ca.comment:
            # The first field's reason belongs to the mapping: it would stay, above the wrong field.
            raise ValueError(f"template: {key!r} is the first field of its mapping and has or is followed by a "
                             f"comment; move it below another field so that it can be dropped with its reason")
    else:
        _take_comment(mapping, keys[index - 1])
        _put_comment(mapping, keys[index - 1], following)
    del mapping[key]


def insert_after(mapping: CommentedMap, after: str, key: str, value: Any, reason: str | None = None) -> None:
    """Adds a field below `after`, with its reason above it; the reason of the field that followed `after`
    moves below the new one."""
    following = _take_comment(mapping, after)
    mapping.insert(list(mapping).index(after) + 1, key, value)
    _put_comment(mapping, key, following)
    if reason:
        mapping.yaml_set_comment_before_after_key(key, before=reason, indent=_indent_of(mapping))


def append(items: CommentedSeq, item: Any, reason: str) -> None:
    """Adds a list item at the end, with its reason above it; what followed the list stays below it."""
    following = _take_comment(items, len(items) - 1)
    items.append(item)
    _put_comment(items, len(items) - 1, following)
    items.yaml_set_comment_before_after_key(len(items) - 1, before=reason, indent=_indent_of(items))


def _indent_of(node: Node) -> int:
    """The column of node's first field or item, which comes from its template: a new sibling's reason starts there."""
    if isinstance(node, CommentedMap):
        return int(node.lc.key(next(iter(node)))[1])
    return int(node.lc.item(0)[1]) - 2  # the column after the first item's "- "


# --- the documents --------------------------------------------------------------------------------------


def _yaml() -> YAML:
    rt = YAML()  # round trip: comments, key order, flow style and quotes stay as the template has them
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a line: the checkov annotations are long scalars
    rt.indent(mapping=2, sequence=2, offset=0)
    return rt


def load_yaml(text: str) -> CommentedMap:
    return _yaml().load(text)


def load_templates() -> Documents:
    """Every template, by its path under the output folder, in sorted order (the output's)."""
    return {str(path.relative_to(TEMPLATES)): load_yaml(path.read_text()) for path in sorted(TEMPLATES.rglob("*.yaml"))}


def dump(doc: CommentedMap) -> str:
    text = io.StringIO()
    _yaml().dump(doc, text)
    return text.getvalue()


def _of_kind(docs: Documents, kind: str) -> list[CommentedMap]:
    return [doc for doc in docs.values() if doc["kind"] == kind]


def indexed_jobs(docs: Documents) -> list[CommentedMap]:
    """The specs of the Indexed Jobs: the Job's own and the JobSet's job template."""
    return [job["spec"] for job in _of_kind(docs, "Job")] + [
        replicated["template"]["spec"] for jobset in _of_kind(docs, "JobSet")
        for replicated in jobset["spec"]["replicatedJobs"]]


def pod_templates(docs: Documents) -> list[CommentedMap]:
    """Every worker pod template (metadata and spec): the Indexed Jobs' and the TFJob's."""
    return [job["template"] for job in indexed_jobs(docs)] + [
        replica["template"] for tfjob in _of_kind(docs, "TFJob") for replica in tfjob["spec"]["tfReplicaSpecs"].values()]


def pod_specs(docs: Documents) -> list[CommentedMap]:
    return [template["spec"] for template in pod_templates(docs)]


def containers(docs: Documents) -> list[CommentedMap]:
    return [container for pod in pod_specs(docs) for container in pod["containers"]]


def drop_checkov_skip(doc: CommentedMap, check: str) -> None:
    """Removes the skip of a check that the rendering now passes, and the annotations once none is left."""
    metadata = doc["metadata"]
    annotations = metadata.get("annotations", {})
    skips = [key for key, value in annotations.items()
             if key.startswith("checkov.io/skip") and value.startswith(f"{check}=")]
    if skips and len(skips) == len(annotations):
        drop(metadata, "annotations")  # as a whole: the comment below the last one stays with the next field
        return
    for key in skips:
        drop(annotations, key)


# --- the options, each an edit of the loaded documents ---------------------------------------------------


def set_workers(docs: Documents, workers: int) -> None:
    """Every place that states the worker count: completions, parallelism, replicas and TLJOB_NUM_WORKERS."""
    for job in indexed_jobs(docs):
        job["completions"] = job["parallelism"] = workers
        if "backoffLimitPerIndex" in job:  # the total cap, so that it never binds before the per-worker one
            job["backoffLimit"] = workers * job["backoffLimitPerIndex"]
    for tfjob in _of_kind(docs, "TFJob"):
        tfjob["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = workers
    for container in containers(docs):
        for var in container.get("env", []):
            if var["name"] == "TLJOB_NUM_WORKERS":
                var["value"] = str(workers)


def _times(quantity: str | int, factor: int) -> str:
    match = re.fullmatch(r"([0-9]+)([A-Za-z]*)", str(quantity))
    if not match:
        raise ValueError(f"template: resource amount {quantity!r} cannot be scaled by --gpus-per-worker; write it "
                         f"as a whole number with an optional unit, e.g. 6 or 20Gi")
    return f"{int(match[1]) * factor}{match[2]}"


def set_gpus(docs: Documents, gpus: int) -> None:
    """The templates' CPU and memory are per GPU: a worker with G GPUs gets G times as much (CPU only: once)."""
    for container in containers(docs):
        for amounts in container["resources"].values():
            for name in ("cpu", "memory"):
                amounts[name] = _times(amounts[name], max(gpus, 1))
            if gpus:
                amounts[GPU_RESOURCE] = str(gpus)
            else:
                drop(amounts, GPU_RESOURCE)
    if not gpus:  # no GPU node to find, no GPU taint to tolerate
        for pod in pod_specs(docs):
            drop(pod, "affinity")
            drop(pod, "tolerations")


def set_image(docs: Documents, image: str) -> None:
    for container in containers(docs):
        container["image"] = image
    if "@" in image:  # pinned by digest: the check that asks for a digest passes
        for doc in docs.values():
            drop_checkov_skip(doc, IMAGE_DIGEST_CHECK)


def set_namespace(docs: Documents, namespace: str) -> None:
    for doc in docs.values():
        insert_after(doc["metadata"], "name", "namespace", namespace)
        drop_checkov_skip(doc, NAMESPACE_CHECK)


def workloads(docs: Documents) -> list[CommentedMap]:
    """The objects that Kueue admits as one workload each: the Job, the JobSet, the TFJob."""
    return [doc for doc in docs.values() if doc["kind"] in ("Job", "JobSet", "TFJob")]


def set_kueue(docs: Documents, queue: str | None, priority_class: str | None) -> None:
    for workload in workloads(docs):
        labels = workload["metadata"]["labels"]
        if queue is not None:
            insert_after(labels, next(reversed(labels)), QUEUE_LABEL, queue,
                         "Kueue: the LocalQueue that admits the workload, all pods at once (tljob manifests --queue)")
        if priority_class is not None:
            insert_after(labels, next(reversed(labels)), PRIORITY_LABEL, priority_class,
                         "Kueue: the WorkloadPriorityClass that orders it in the ClusterQueue (--priority-class)")


def set_gcp_service_account(docs: Documents, email: str) -> None:
    """The impersonation path: the ServiceAccount acts as a Google service account that holds the roles."""
    for account in _of_kind(docs, "ServiceAccount"):
        annotations = account["metadata"]["annotations"]
        indent = _indent_of(annotations)
        annotations.insert(0, GSA_ANNOTATION, email)
        annotations.yaml_set_comment_before_after_key(
            GSA_ANNOTATION, before="Workload Identity: the pods act as this Google service account, which holds the "
                                   "bucket's roles (tljob manifests --gcp-service-account)", indent=indent)


def set_gcsfuse(docs: Documents, bucket: str) -> None:
    """The bucket, read-only at GCSFUSE_ROOT/BUCKET in every worker, through GKE's Cloud Storage FUSE CSI driver."""
    sidecar = {f"gke-gcsfuse/{name}-{kind}": amount for name, amount in GCSFUSE_SIDECAR.items()
               for kind in ("request", "limit")}
    for pod in pod_templates(docs):
        insert_after(pod["metadata"], "labels", "annotations", CommentedMap({"gke-gcsfuse/volumes": "true", **sidecar}),
                     "GKE injects the Cloud Storage FUSE sidecar for the gcs-data volume; its share, requests = limits")
        spec = pod["spec"]
        user = spec["securityContext"]
        attributes = CommentedMap({"bucketName": bucket,
                                   "mountOptions": f"implicit-dirs,uid={user['runAsUser']},gid={user['runAsGroup']}"})
        append(spec["volumes"], CommentedMap({"name": GCSFUSE_VOLUME, "csi": CommentedMap({
            "driver": "gcsfuse.csi.storage.gke.io", "readOnly": True, "volumeAttributes": attributes})}),
            f"gs://{bucket}, read-only, through the Cloud Storage FUSE CSI driver (tljob manifests --gcsfuse-bucket)")
        # Below "- name:": the list item's column, then csi's fields, then volumeAttributes' fields.
        attributes.yaml_set_comment_before_after_key(
            "mountOptions", before="files owned by the pod's user (the mount is root's otherwise); implicit-dirs: "
                                   "folders that exist only as object name prefixes", indent=_indent_of(spec["volumes"]) + 6)
        for container in spec["containers"]:
            append(container["volumeMounts"], CommentedMap(
                {"name": GCSFUSE_VOLUME, "mountPath": f"{GCSFUSE_ROOT}/{bucket}", "readOnly": True}),
                f"data.train and the other splits may be local paths under {GCSFUSE_ROOT}/{bucket}: read in place, "
                f"never staged")


def set_config(docs: Documents, config_text: str) -> None:
    for config_map in _of_kind(docs, "ConfigMap"):
        # A literal block keeps the job YAML readable, its comments included.
        config_map["data"][CONFIG_KEY] = LiteralScalarString(config_text)


def render(spec: RunSpec) -> dict[str, str]:
    """Output path -> YAML text of every file of one run."""
    docs = load_templates()
    set_workers(docs, spec.workers)
    set_gpus(docs, spec.gpus_per_worker)
    # Before the options that drop checkov skips: the ServiceAccount's annotations must still be there.
    if spec.gcp_service_account is not None:
        set_gcp_service_account(docs, spec.gcp_service_account)
    if spec.image is not None:
        set_image(docs, spec.image)
    if spec.namespace is not None:
        set_namespace(docs, spec.namespace)
    set_config(docs, spec.config_text)
    if spec.queue is not None or spec.priority_class is not None:
        set_kueue(docs, spec.queue, spec.priority_class)
    if spec.gcsfuse_bucket is not None:
        set_gcsfuse(docs, spec.gcsfuse_bucket)
    return {path: dump(doc) for path, doc in docs.items()}


def render_to_dir(
    out_dir: str,
    *,
    workers: int,
    gpus_per_worker: int,
    image: str | None,
    output: str | None,
    namespace: str | None,
    config_path: str | None,
    queue: str | None = None,
    priority_class: str | None = None,
    gcp_service_account: str | None = None,
    gcsfuse_bucket: str | None = None,
) -> list[str]:
    """Writes the manifests of one run under `out_dir`; returns the paths written. None -> the checked-in default."""
    spec = build_spec(workers=workers, gpus_per_worker=gpus_per_worker, image=image, output=output,
                      namespace=namespace, config_path=config_path, queue=queue, priority_class=priority_class,
                      gcp_service_account=gcp_service_account, gcsfuse_bucket=gcsfuse_bucket)
    written = []
    for name, text in render(spec).items():
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.debug("wrote %s", path)
        written.append(str(path))
    return written
