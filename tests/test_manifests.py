"""The Kubernetes manifests: the checked-in set is the renderer's default output, and every rendering
validates against Kubernetes' own schemas (kubernetes-validate --strict), passes checkov, and keeps
the contracts the program relies on (worker count, addresses, exit codes, hardening)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tljob import manifests
from tljob.cluster import host_addresses
from tljob.config import load_config
from tljob.errors import EXIT_CONFIG, EXIT_DATA, EXIT_RETRYABLE, ConfigError

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "manifests"
TEMPLATES = ROOT / "src" / "tljob" / "templates"
TLJOB = Path(sys.executable).parent / "tljob"
# The oldest Kubernetes the manifests promise to work on, and the newest with schemas installed.
K8S_VERSIONS = ("1.31", "1.37")
WORKER_COUNTS = (1, 2, 4, 8)
CHECKOV = Path(os.environ.get("TLJOB_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
# The options that drop fields and annotations: no GPU, a namespace, an image pinned by digest.
PINNED_CPU = {"workers": 4, "gpus_per_worker": 0, "namespace": "ml", "image": "r.example/tljob:1@sha256:" + "0" * 64}
# The platform options, which add fields: Kueue, the impersonation path, a bucket mounted in place.
PLATFORM = {"queue": "team-a", "priority_class": "high", "gcp_service_account": "tljob-trainer@p.iam.gserviceaccount.com",
            "gcsfuse_bucket": "my-data"}
EVERY_OPTION = {**PINNED_CPU, **PLATFORM}
# The CRDs' OpenAPI v3 schemas (served versions), from the released YAML (tests/schemas/README.md).
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def render(tmp_path: Path, **overrides: Any) -> dict[str, dict[str, Any]]:
    """Renders into tmp_path (defaults unless overridden); relative path -> parsed object."""
    args = {"workers": 2, "gpus_per_worker": 1, "image": None, "output": None, "namespace": None,
            "config_path": None, "queue": None, "priority_class": None, "gcp_service_account": None,
            "gcsfuse_bucket": None, **overrides}
    written = manifests.render_to_dir(str(tmp_path), **args)
    return {str(Path(p).relative_to(tmp_path)): yaml.safe_load(Path(p).read_text()) for p in written}


def load_dir(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): yaml.safe_load(p.read_text()) for p in sorted(folder.rglob("*.yaml"))}


def pod_templates(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template, by file: the Job's, and those embedded in the JobSet and the TFJob."""
    return {
        "job.yaml": objs["job.yaml"]["spec"]["template"],
        "jobset/jobset.yaml": objs["jobset/jobset.yaml"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"],
        "tfjob/tfjob.yaml": objs["tfjob/tfjob.yaml"]["spec"]["tfReplicaSpecs"]["Worker"]["template"],
    }


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0].get("env", [])}


def crd_templates_as_core_objects(objs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The CRDs' embedded templates as core Jobs, metadata kept.

    kubernetes-validate has no schemas for JobSet or TFJob, and checkov skips them; their Job and pod
    templates are core Kubernetes types, so they are validated and scanned as such. The TFJob's pod
    template goes into a bare Job: its pods are batch pods (checkov would judge a PodTemplate as a
    long-running service and ask for probes).
    """
    jobset, tfjob = objs["jobset/jobset.yaml"], objs["tfjob/tfjob.yaml"]
    return [
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": copy.deepcopy(jobset["metadata"]),
         "spec": jobset["spec"]["replicatedJobs"][0]["template"]["spec"]},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": copy.deepcopy(tfjob["metadata"]),
         "spec": {"template": tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]}},
    ]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema as the API server applies it with fieldValidation=Strict (kubectl's default): an object
    schema that lists its properties rejects any other field, unless it preserves unknown fields."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(sub) for sub in schema[key]]
    return out


CRD_SCHEMAS = {  # (apiVersion, kind) -> the vendored schema file
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.json",
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "kueue.x-k8s.io_localqueues.json",
    ("kueue.x-k8s.io/v1beta2", "ClusterQueue"): "kueue.x-k8s.io_clusterqueues.json",
    ("kueue.x-k8s.io/v1beta2", "WorkloadPriorityClass"): "kueue.x-k8s.io_workloadpriorityclasses.json",
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): "kueue.x-k8s.io_resourceflavors.json",
}


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Where `obj` breaks its CRD's schema, strictly; an object of another API version or kind is an error too."""
    name = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    if name is None:
        return [f"no vendored CRD schema for {obj.get('apiVersion')} {obj.get('kind')}"]
    validator = jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / name).read_text())))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# --- the checked-in set --------------------------------------------------------------------------------


def test_checked_in_manifests_are_the_default_rendering(tmp_path: Path) -> None:
    """Byte for byte, through the real command line (its defaults are the checked-in set's)."""
    out = tmp_path / "out"
    result = subprocess.run([str(TLJOB), "manifests", "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    checked_in = {str(p.relative_to(CHECKED_IN)): p.read_bytes() for p in sorted(CHECKED_IN.rglob("*")) if p.is_file()}
    assert sorted(rendered) == sorted(checked_in), "file sets differ: run `tljob manifests -o manifests`"
    stale = [name for name in rendered if rendered[name] != checked_in[name]]
    assert not stale, f"{stale} differ from the renderer's output: run `tljob manifests -o manifests`"


def test_an_installed_wheel_renders_the_checked_in_set(tmp_path: Path) -> None:
    """Built as a wheel (not an editable install) and run from elsewhere, its package data is enough:
    the templates and the default job config, which src/tljob/job/ links to the repository's job/."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    # A checkout's links stay links, as pip sees them there; build outputs of this tree stay out of the copy.
    for folder in ("src", "job"):
        shutil.copytree(ROOT / folder, tree / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: the build uses the test extra's setuptools and wheel, offline.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(tree)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("tljob-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    which = subprocess.run([sys.executable, "-c", "import tljob; print(tljob.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True, timeout=60)
    assert Path(which.stdout.strip()).is_relative_to(site), "the test ran another tljob than the wheel's"
    # The recipe's faster and GPU variants ship beside it (an image's users can name them without a mount).
    for name in ("cats_vs_dogs.yaml", "cats_vs_dogs_fast.yaml", "cats_vs_dogs_gpu.yaml"):
        assert (site / "tljob" / "job" / name).read_bytes() == (ROOT / "job" / name).read_bytes(), name
    result = subprocess.run([sys.executable, "-m", "tljob.cli", "manifests", "-o", "out"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = elsewhere / "out"
    rendered = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert rendered == {str(p.relative_to(CHECKED_IN)): p.read_bytes() for p in sorted(CHECKED_IN.rglob("*"))
                        if p.is_file()}


def test_the_three_workloads_run_the_same_pod() -> None:
    """The templates state the pod three times; they differ only where the workload needs it."""
    pods = {name: copy.deepcopy(pod) for name, pod in pod_templates(load_dir(CHECKED_IN)).items()}
    job = pods["job.yaml"]
    assert job["spec"].pop("subdomain") == "tljob-workers"  # the Job's own headless Service
    jobset_env = pods["jobset/jobset.yaml"]["spec"]["containers"][0]["env"]
    pattern = next(var for var in jobset_env if var["name"] == "TLJOB_HOST_PATTERN")
    assert pattern.pop("value") != next(var for var in job["spec"]["containers"][0]["env"]
                                        if var["name"] == "TLJOB_HOST_PATTERN").pop("value")
    assert pods["jobset/jobset.yaml"] == job
    tfjob = pods["tfjob/tfjob.yaml"]["spec"]
    assert tfjob.pop("restartPolicy") == "OnFailure" and job["spec"].pop("restartPolicy") == "Never"
    (container,) = tfjob["containers"]
    assert (container.pop("name"), container["ports"][0].pop("name")) == ("tensorflow", "tfjob-port")
    job_container = job["spec"]["containers"][0]
    del job_container["name"], job_container["ports"][0]["name"]
    cluster = {"TLJOB_NUM_WORKERS", "TLJOB_PORT", "TLJOB_HOST_PATTERN"}  # TF_CONFIG says it in a TFJob
    job_container["env"] = [var for var in job_container["env"] if var["name"] not in cluster]
    assert pods["tfjob/tfjob.yaml"] == job


def test_flat_folder_has_no_kustomization_and_variants_sit_in_subfolders() -> None:
    flat = sorted(p.name for p in CHECKED_IN.glob("*.yaml"))
    assert flat == ["configmap.yaml", "job.yaml", "networkpolicy.yaml", "service.yaml", "serviceaccount.yaml"]
    assert not list(CHECKED_IN.rglob("kustomization.y*ml"))
    assert sorted(str(p.relative_to(CHECKED_IN)) for p in CHECKED_IN.glob("*/*.yaml")) == [
        "jobset/jobset.yaml", "tfjob/tfjob.yaml"]


def test_every_file_starts_with_a_purpose_line_and_holds_one_object() -> None:
    for path in sorted(CHECKED_IN.rglob("*.yaml")):
        text = path.read_text()
        first = text.splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{path}: first line is not a purpose line: {first!r}"
        assert len([d for d in yaml.safe_load_all(text) if d]) == 1, path


def field(line: str) -> str:
    """A mapping field up to its value (which options change), a list item by its whole first line."""
    return line.strip() if line.lstrip().startswith("- ") else line.split(":")[0]


def reasons(text: str) -> set[tuple[tuple[str, ...], str]]:
    """(comment lines, the field below them) for every comment block."""
    pairs, block = set(), []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            block.append(line.strip())
        elif block:
            pairs.add((tuple(block), field(line)))
            block = []
    return pairs


def test_every_template_states_its_purpose_and_its_own_path() -> None:
    for path in sorted(TEMPLATES.rglob("*.yaml")):
        name = str(path.relative_to(TEMPLATES))
        header = list(itertools.takewhile(lambda line: line.startswith("# "), path.read_text().splitlines()))
        assert len(header) >= 2 and len(header[0]) > 20, f"{name}: no purpose line on top"
        assert f"From the template src/tljob/templates/{name} via `tljob manifests`" in header[-1], name


def test_non_obvious_fields_carry_their_reason() -> None:
    """Spot checks that the reasons land above the fields they explain."""
    job = (CHECKED_IN / "job.yaml").read_text().splitlines()
    for name in ("completions:", "parallelism:", "backoffLimitPerIndex:", "podReplacementPolicy:",
                 "restartPolicy: Never", "subdomain:", "automountServiceAccountToken:", "readOnlyRootFilesystem:",
                 "affinity:", "ephemeral-storage:"):
        line = next(i for i, text in enumerate(job) if text.strip().startswith(name))
        assert job[line - 1].strip().startswith("# "), f"job.yaml: {name} has no reason above it"


# The fields that the platform options add, each with its own reason above it.
OPTION_FIELDS = {manifests.QUEUE_LABEL, manifests.PRIORITY_LABEL, manifests.GSA_ANNOTATION, "annotations",
                 f"- name: {manifests.GCSFUSE_VOLUME}", "mountOptions"}


@pytest.mark.parametrize("overrides", [
    {},
    PINNED_CPU,
    {"gpus_per_worker": 2, "namespace": "ml"},
    PLATFORM,
    EVERY_OPTION,
])
def test_options_keep_every_reason_above_its_own_field(tmp_path: Path, overrides: dict[str, Any]) -> None:
    """Options that drop or add fields (GPUs, namespace, digest, the platform options) move the comments with
    them: each reason in a rendering stands above the field it stands above in the template, and none is lost;
    a field an option adds has a reason of its own."""
    config = tmp_path / "job.yaml"
    config.write_text("name: x\n")  # no comments of its own in the ConfigMap
    out = tmp_path / "out"
    render(out, config_path=str(config), **overrides)
    options_added: set[str] = set()
    for path in sorted(TEMPLATES.rglob("*.yaml")):
        name = str(path.relative_to(TEMPLATES))
        text = (out / name).read_text()
        template, rendered = reasons(path.read_text()), reasons(text)
        added = rendered - template
        assert {line.strip() for _, line in added} <= OPTION_FIELDS, f"{name}: reasons above other fields: {added}"
        added_fields = {field(line).strip() for line in text.splitlines()} & (OPTION_FIELDS - {"annotations"})
        assert added_fields <= {line.strip() for _, line in added}, f"{name}: an added field has no reason"
        options_added |= added_fields
        fields = {field(line) for line in text.splitlines()}
        lost = {pair for pair in template - rendered if pair[1] in fields}
        assert not lost, f"{name}: reasons lost: {lost}"
        if not overrides:
            assert rendered == template, name
    assert bool(options_added) == any(key in overrides for key in PLATFORM)


def test_edits_move_the_reasons_and_template_mistakes_fail_loudly() -> None:
    doc = manifests.load_yaml("a: 1\n# why b\nb:\n  c: 2\n# why d\nd: 3\n")
    manifests.drop(doc, "b")
    manifests.insert_after(doc, "a", "n", "x")
    assert manifests.dump(doc) == "a: 1\nn: x\n# why d\nd: 3\n"
    first = manifests.load_yaml("m:\n  # why a\n  a: 1\n  b: 2\n")
    with pytest.raises(ValueError, match="'a' is the first field"):
        manifests.drop(first["m"], "a")
    with pytest.raises(ValueError, match="amount 0.5 cannot be scaled by --gpus-per-worker"):
        manifests.set_gpus({"job.yaml": manifests.load_yaml(
            "kind: Job\nspec:\n  template:\n    spec:\n      containers:\n"
            "      - resources: {limits: {cpu: 0.5, memory: 1Gi}}\n")}, 2)


# --- schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_checked_in_core_objects_validate_strictly(version: str) -> None:
    objs = load_dir(CHECKED_IN)
    core = [obj for name, obj in objs.items() if "/" not in name] + crd_templates_as_core_objects(objs)
    for obj in core:
        assert kubernetes_validate.validate(obj, version, strict=True) == version, obj["kind"]


@pytest.mark.parametrize("overrides", [*({"workers": n} for n in WORKER_COUNTS), PINNED_CPU, {"gpus_per_worker": 4},
                                       PLATFORM, EVERY_OPTION])
def test_rendered_sets_validate_strictly(tmp_path: Path, overrides: dict[str, Any]) -> None:
    objs = render(tmp_path, **overrides)
    core = [obj for name, obj in objs.items() if "/" not in name] + crd_templates_as_core_objects(objs)
    for version in K8S_VERSIONS:
        for obj in core:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The check above can fail: a field the API does not know is rejected."""
    job = copy.deepcopy(load_dir(CHECKED_IN)["job.yaml"])
    job["spec"]["backoffLimitPerIndx"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overrides", [{}, PINNED_CPU, PLATFORM, EVERY_OPTION, {"workers": 8, "gpus_per_worker": 4}])
def test_jobset_validates_strictly_against_its_crd(tmp_path: Path, overrides: dict[str, Any]) -> None:
    """The JobSet CRD's own schema (v0.12.0, v1alpha2), unknown fields rejected as kubectl apply does."""
    jobset = render(tmp_path, **overrides)["jobset/jobset.yaml"]
    assert crd_errors(jobset) == []
    # JobSet restarts everything when a child Job fails, so a failed pod must fail its Job at once.
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["template"]["spec"]["backoffLimit"] == 0


@pytest.mark.parametrize(("where", "field_name"), [
    ((), "replicatedJob"),  # for replicatedJobs
    (("failurePolicy",), "restartStrategie"),
    (("failurePolicy", "rules", 0), "onJobFailureReason"),
    (("replicatedJobs", 0, "template", "spec"), "backoffLimitPerIndx"),
    (("coordinator",), "podIdx"),
])
def test_strict_crd_validation_catches_a_misspelled_field(where: tuple[Any, ...], field_name: str) -> None:
    """The check above can fail: a field the CRD does not define is an error, at the top of the spec and below."""
    jobset = copy.deepcopy(load_dir(CHECKED_IN)["jobset/jobset.yaml"])
    node = jobset["spec"]
    for key in where:
        node = node[key]
    node[field_name] = 1
    errors = crd_errors(jobset)
    assert len(errors) == 1 and f"'{field_name}' was unexpected" in errors[0], errors


def test_crd_variants_have_the_fields_their_apis_define() -> None:
    """Shape checks from the TFJob (kubeflow.org/v1) type, which has no schema here."""
    objs = load_dir(CHECKED_IN)
    tfjob = objs["tfjob/tfjob.yaml"]
    assert (tfjob["apiVersion"], tfjob["kind"]) == ("kubeflow.org/v1", "TFJob")
    assert set(tfjob["spec"]) <= {"runPolicy", "tfReplicaSpecs", "successPolicy", "enableDynamicWorker"}
    assert set(tfjob["spec"]["runPolicy"]) <= {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                                               "backoffLimit", "schedulingPolicy", "suspend", "managedBy"}
    assert set(tfjob["spec"]["tfReplicaSpecs"]) == {"Worker"}
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    assert set(worker) <= {"replicas", "template", "restartPolicy"}
    assert worker["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "tensorflow" and container["ports"][0]["name"] == "tfjob-port"


# --- contracts with the program -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_worker_count_is_the_same_everywhere(tmp_path: Path, workers: int) -> None:
    objs = render(tmp_path, workers=workers)
    spec = objs["job.yaml"]["spec"]
    assert spec["completions"] == spec["parallelism"] == int(env_of(spec["template"])["TLJOB_NUM_WORKERS"]) == workers
    assert spec["backoffLimit"] == workers * spec["backoffLimitPerIndex"]
    rjob = objs["jobset/jobset.yaml"]["spec"]["replicatedJobs"][0]
    assert rjob["replicas"] == 1
    job_spec = rjob["template"]["spec"]
    assert job_spec["completions"] == job_spec["parallelism"] == int(env_of(job_spec["template"])["TLJOB_NUM_WORKERS"])
    assert job_spec["completions"] == workers
    assert objs["tfjob/tfjob.yaml"]["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == workers
    assert "TLJOB_NUM_WORKERS" not in env_of(pod_templates(objs)["tfjob/tfjob.yaml"])  # TF_CONFIG says it there


def test_worker_addresses_are_the_pods_dns_names() -> None:
    """tljob.cluster turns the manifest's pattern into <job>-<index>.<headless service>:<port>."""
    objs = load_dir(CHECKED_IN)
    job, service = objs["job.yaml"], objs["service.yaml"]
    env = env_of(job["spec"]["template"])
    port = int(env["TLJOB_PORT"])
    addresses = host_addresses(env["TLJOB_HOST_PATTERN"], int(env["TLJOB_NUM_WORKERS"]), port)
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    assert addresses == [f"{name}-{i}.{subdomain}:{port}" for i in range(job["spec"]["completions"])]
    assert subdomain == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == port
    assert job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == port
    # JobSet names its pods <jobset>-<replicated job>-<job index>-<pod index> in a Service named after it.
    jobset = objs["jobset/jobset.yaml"]
    pattern = env_of(pod_templates(objs)["jobset/jobset.yaml"])["TLJOB_HOST_PATTERN"]
    rjob = jobset["spec"]["replicatedJobs"][0]["name"]
    name = jobset["metadata"]["name"]
    assert host_addresses(pattern, 2, port)[1] == f"{name}-{rjob}-0-1.{name}:{port}"


def test_network_policy_admits_only_the_job_pods_on_the_worker_port() -> None:
    objs = load_dir(CHECKED_IN)
    policy, job = objs["networkpolicy.yaml"], objs["job.yaml"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    own = policy["spec"]["podSelector"]["matchLabels"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [own]
    assert rule["ports"] == [{"protocol": "TCP", "port": int(env_of(job["spec"]["template"])["TLJOB_PORT"])}]


def test_failure_policy_follows_the_exit_codes() -> None:
    spec = load_dir(CHECKED_IN)["job.yaml"]["spec"]
    container = spec["template"]["spec"]["containers"][0]["name"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In",
                                                              "values": [EXIT_CONFIG, EXIT_DATA]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[2]["action"] == "Count" and rules[2]["onExitCodes"]["values"] == [EXIT_RETRYABLE]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["completionMode"] == "Indexed" and spec["maxFailedIndexes"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    jobset = load_dir(CHECKED_IN)["jobset/jobset.yaml"]
    assert jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"][0] == rules[0]


def job_failure(job_spec: dict[str, Any], exit_code: int, disrupted: bool) -> tuple[str, str] | None:
    """(reason, message) of the Failed condition that one failed pod gives its Job, as Kubernetes' Job controller
    writes them (pkg/controller/job/pod_failure_policy.go) for backoffLimit 0; None: the pod is replaced."""
    container = job_spec["template"]["spec"]["containers"][0]["name"]
    pod = "ns/tljob-worker-0-1"
    for index, rule in enumerate(job_spec["podFailurePolicy"]["rules"]):
        codes = rule.get("onExitCodes")
        by_code = codes is not None and codes["containerName"] == container and exit_code != 0 and (
            (exit_code in codes["values"]) == (codes["operator"] == "In"))
        by_condition = disrupted and any(c["type"] == "DisruptionTarget" and c["status"] == "True"
                                         for c in rule.get("onPodConditions", []))
        if not (by_code or by_condition):
            continue
        if rule["action"] == "Ignore":
            return None
        if rule["action"] == "FailJob":
            return "PodFailurePolicy", (
                f"Container {container} for pod {pod} failed with exit code {exit_code} matching FailJob rule at index "
                f"{index}" if by_code else f"Pod {pod} has condition DisruptionTarget matching FailJob rule at index {index}")
        break  # Count: against backoffLimit 0
    assert job_spec["backoffLimit"] == 0
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


def jobset_action(jobset: dict[str, Any], reason: str, message: str) -> str:
    """The first JobSet failure-policy rule matching the failed Job (pkg/controllers/failure_policy.go: Go's
    regexp.MatchString finds a pattern anywhere); none matching: RestartJobSet."""
    for rule in jobset["spec"]["failurePolicy"]["rules"]:
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns", [])
        if patterns and not any(re.search(pattern, message) for pattern in patterns):
            continue
        return str(rule["action"])
    return "RestartJobSet"


@pytest.mark.parametrize(("exit_code", "disrupted", "action"), [
    (EXIT_CONFIG, False, "FailJobSet"),
    (EXIT_DATA, False, "FailJobSet"),
    (EXIT_RETRYABLE, False, "RestartJobSet"),
    (1, False, "RestartJobSet"),  # a bug: retried, counted
    (23, False, "RestartJobSet"),  # not 2 or 3 however the pattern reads it
    # evicted or preempted: tljob saves a backup on SIGTERM and exits 75, or is killed (137); neither counts
    (EXIT_RETRYABLE, True, "RestartJobSetAndIgnoreMaxRestarts"),
    (137, True, "RestartJobSetAndIgnoreMaxRestarts"),
])
def test_jobset_failure_policy_maps_each_exit_code(exit_code: int, disrupted: bool, action: str) -> None:
    jobset = load_dir(CHECKED_IN)["jobset/jobset.yaml"]
    job_spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    failure = job_failure(job_spec, exit_code, disrupted)
    assert failure is not None, "a failed pod must fail its Job: JobSet restarts all workers together"
    assert jobset_action(jobset, *failure) == action
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] > 0


def test_jobset_restarts_blocking_with_coordinator_on_worker_0() -> None:
    """Old and new pods never share a host name; the coordinator is tljob's chief (worker index 0)."""
    objs = load_dir(CHECKED_IN)
    spec = objs["jobset/jobset.yaml"]["spec"]
    assert spec["failurePolicy"]["restartStrategy"] == "BlockingRecreate"
    (replicated,) = spec["replicatedJobs"]
    assert spec["coordinator"] == {"replicatedJob": replicated["name"], "jobIndex": 0, "podIndex": 0}
    assert spec["network"]["enableDNSHostnames"] is True and spec["ttlSecondsAfterFinished"] > 0
    pattern = env_of(pod_templates(objs)["jobset/jobset.yaml"])["TLJOB_HOST_PATTERN"]
    name = objs["jobset/jobset.yaml"]["metadata"]["name"]
    assert host_addresses(pattern, 2, 2222)[0].split(".")[0] == f"{name}-{replicated['name']}-0-0"


WORKLOADS = ("job.yaml", "jobset/jobset.yaml", "tfjob/tfjob.yaml")


@pytest.mark.parametrize("overrides", [{"queue": "team-a"}, {"priority_class": "high"}, PLATFORM])
def test_kueue_labels_go_on_every_workload_kind(tmp_path: Path, overrides: dict[str, Any]) -> None:
    objs = render(tmp_path, **overrides)
    expected = {key: overrides[arg] for arg, key in (("queue", manifests.QUEUE_LABEL),
                                                     ("priority_class", manifests.PRIORITY_LABEL)) if arg in overrides}
    for name in WORKLOADS:
        labels = objs[name]["metadata"]["labels"]
        assert {k: v for k, v in labels.items() if k.startswith("kueue.x-k8s.io/")} == expected, name
    # Only the workloads: Kueue would try to manage a labelled Service or ConfigMap's owner otherwise.
    others = [obj for name, obj in objs.items() if name not in WORKLOADS]
    assert not any("kueue" in json.dumps(obj["metadata"]) for obj in others)
    assert not any("kueue" in json.dumps(obj["metadata"]) for obj in load_dir(CHECKED_IN).values())


def readme_yaml_objects(kind: str) -> list[dict[str, Any]]:
    """The objects of every YAML block in the README that holds one of this kind."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [doc for block in blocks if f"kind: {kind}" in block for doc in yaml.safe_load_all(block) if doc]


def test_readme_kueue_objects_validate_against_their_crds() -> None:
    objs = readme_yaml_objects("ClusterQueue")
    assert {obj["kind"] for obj in objs} >= {"ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
    for obj in objs:
        assert crd_errors(obj) == [], obj["kind"]
    (local,) = [obj for obj in objs if obj["kind"] == "LocalQueue"]
    (cluster,) = [obj for obj in objs if obj["kind"] == "ClusterQueue"]
    assert local["spec"]["clusterQueue"] == cluster["metadata"]["name"]
    covered = {r for group in cluster["spec"]["resourceGroups"] for r in group["coveredResources"]}
    # Every resource a worker requests is under quota: Kueue admits no workload that asks for another.
    requests = pod_templates(load_dir(CHECKED_IN))["job.yaml"]["spec"]["containers"][0]["resources"]["requests"]
    assert set(requests) <= covered


def test_service_account_has_no_google_account_by_default(tmp_path: Path) -> None:
    """The direct-principal path needs no annotation; --gcp-service-account impersonates a Google one."""
    assert manifests.GSA_ANNOTATION not in load_dir(CHECKED_IN)["serviceaccount.yaml"]["metadata"].get("annotations", {})
    for overrides in ({}, {"namespace": "ml"}):
        out = tmp_path / str(len(overrides))
        account = render(out, gcp_service_account="t@p.iam.gserviceaccount.com", **overrides)["serviceaccount.yaml"]
        assert account["metadata"]["annotations"][manifests.GSA_ANNOTATION] == "t@p.iam.gserviceaccount.com"


@pytest.mark.parametrize("name", WORKLOADS)
def test_gcsfuse_bucket_mounts_read_only_in_every_pod(tmp_path: Path, name: str) -> None:
    template = pod_templates(render(tmp_path, gcsfuse_bucket="my-data"))[name]
    annotations = template["metadata"]["annotations"]
    assert annotations["gke-gcsfuse/volumes"] == "true"
    for resource in ("cpu", "memory", "ephemeral-storage"):  # requests = limits: the pod stays Guaranteed
        assert annotations[f"gke-gcsfuse/{resource}-request"] == annotations[f"gke-gcsfuse/{resource}-limit"]
    spec = template["spec"]
    (volume,) = [v for v in spec["volumes"] if "csi" in v]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io" and volume["csi"]["readOnly"] is True
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "my-data"
    uid = f"uid={spec['securityContext']['runAsUser']}"
    assert uid in volume["csi"]["volumeAttributes"]["mountOptions"].split(",")
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": "/gcs/my-data", "readOnly": True}


@pytest.mark.parametrize("name", ["job.yaml", "jobset/jobset.yaml", "tfjob/tfjob.yaml"])
def test_pods_are_hardened(name: str) -> None:
    pod = pod_templates(load_dir(CHECKED_IN))[name]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    env = env_of({"spec": pod})
    assert env["PYTHONUNBUFFERED"] == "1"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts[env["TLJOB__RUNTIME__STAGING_DIR"]]]
    assert "emptyDir" in volumes[mounts["/tmp"]]  # the image's HOME and workdir
    assert container["args"] == ["train", "--config", "/etc/tljob/job.yaml"]
    assert volumes[mounts["/etc/tljob"]]["configMap"]["name"] == "tljob-config"
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == "1" and requests["cpu"] == limits["cpu"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "tljob"


def test_cpu_only_workers_ask_for_no_gpu_nodes(tmp_path: Path) -> None:
    pod = render(tmp_path, gpus_per_worker=0)["job.yaml"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod and "affinity" not in pod


def test_gpus_scale_the_worker_resources(tmp_path: Path) -> None:
    one = load_dir(CHECKED_IN)["job.yaml"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    pod = render(tmp_path, gpus_per_worker=4)["job.yaml"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    for amounts in ("limits", "requests"):
        assert resources[amounts]["nvidia.com/gpu"] == "4"
        assert int(resources[amounts]["cpu"]) == 4 * int(one[amounts]["cpu"])
        assert resources[amounts]["memory"] == f"{4 * int(one[amounts]['memory'].removesuffix('Gi'))}Gi"
    assert resources["requests"]["ephemeral-storage"] == one["requests"]["ephemeral-storage"]


def test_service_account_is_for_workload_identity() -> None:
    account = load_dir(CHECKED_IN)["serviceaccount.yaml"]
    assert account["metadata"]["name"] == pod_templates(load_dir(CHECKED_IN))["job.yaml"]["spec"]["serviceAccountName"]
    assert account["automountServiceAccountToken"] is False


def test_config_map_holds_the_recipe_with_the_output(tmp_path: Path) -> None:
    text = load_dir(CHECKED_IN)["configmap.yaml"]["data"]["job.yaml"]
    assert "# The TensorFlow transfer-learning tutorial's recipe" in text  # the recipe's comments are kept
    path = tmp_path / "job.yaml"
    path.write_text(text)
    cfg = load_config(path, environ={})
    recipe = load_config(ROOT / "job" / "cats_vs_dogs.yaml", [f"output={manifests.DEFAULT_OUTPUT}"], environ={})
    assert cfg == recipe and cfg.output.startswith("gs://")


def test_other_config_output_and_namespace(tmp_path: Path) -> None:
    objs = render(tmp_path, config_path=str(ROOT / "job" / "dry_run.yaml"), output="gs://bkt/runs/x", namespace="ml")
    (tmp_path / "c.yaml").write_text(objs["configmap.yaml"]["data"]["job.yaml"])
    cfg = load_config(tmp_path / "c.yaml", environ={})
    assert (cfg.name, cfg.output) == ("dry_run", "gs://bkt/runs/x")
    assert {obj["metadata"]["namespace"] for obj in objs.values()} == {"ml"}
    # With a namespace the default-namespace check needs no skip.
    assert "CKV_K8S_21" not in json.dumps([obj["metadata"].get("annotations", {}) for obj in objs.values()])


def test_set_output_replaces_or_adds_the_line() -> None:
    assert manifests.set_output("a: 1\noutput: null  # x\nb: 2\n", "gs://b/r").splitlines()[1].startswith(
        'output: "gs://b/r"')
    added = manifests.set_output("a: 1\n", "gs://b/r")
    assert yaml.safe_load(added) == {"a": 1, "output": "gs://b/r"}
    nested = manifests.set_output("data:\n  output: keep\n", "gs://b/r")
    assert yaml.safe_load(nested) == {"data": {"output": "keep"}, "output": "gs://b/r"}


def test_multi_line_output_in_the_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("name: x\noutput:\n  gs://a/b\n")
    with pytest.raises(ConfigError, match="--config .* spans several lines"):
        render(tmp_path / "out", config_path=str(config))


@pytest.mark.parametrize("text", ["name: x", "name: x\n\n\n", "  # indented\nname: x\n",
                                  "\n# lead\nname: x   \n# tab\there \u00e9\n"])
def test_config_map_holds_awkward_config_text_exactly(tmp_path: Path, text: str) -> None:
    """No trailing newline, blank lines at the end, indentation, trailing spaces, tabs, non-ASCII."""
    config = tmp_path / "job.yaml"
    config.write_text(text)
    objs = render(tmp_path / "out", config_path=str(config))
    assert objs["configmap.yaml"]["data"]["job.yaml"] == manifests.set_output(text, manifests.DEFAULT_OUTPUT)


# --- input validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "flag"), [
    ({"workers": 0}, "--workers"),
    ({"gpus_per_worker": -1}, "--gpus-per-worker"),
    ({"image": "us-docker.pkg.dev/p/r/tljob"}, "--image"),
    ({"image": "us-docker.pkg.dev/p/r/tljob:latest"}, "--image"),
    ({"image": "tljob@sha256:abc"}, "--image"),
    ({"image": "Bad Image:1"}, "--image"),
    ({"output": "/data/runs/x"}, "--output"),
    ({"output": "gs://"}, "--output"),
    ({"namespace": "Not_A_Namespace"}, "--namespace"),
    ({"config_path": "/no/such/job.yaml"}, "--config"),
    ({"queue": "Team_A"}, "--queue"),
    ({"priority_class": "x" * 64}, "--priority-class"),
    ({"gcp_service_account": "tljob-trainer"}, "--gcp-service-account"),
    ({"gcsfuse_bucket": "gs://my-data/images"}, "--gcsfuse-bucket"),
])
def test_bad_inputs_name_the_flag(tmp_path: Path, overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        render(tmp_path, **overrides)
    assert not list(tmp_path.iterdir()), "nothing is written when an input is bad"


@pytest.mark.parametrize("image", ["registry.example:5000/team/tljob:1.2.3",
                                   "tljob@sha256:" + "a" * 64, "us-docker.pkg.dev/p/r/tljob:0.1.0@sha256:" + "0" * 64])
def test_pinned_images_are_accepted(image: str) -> None:
    manifests.check_image(image)


def test_an_install_without_the_default_config_asks_for_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifests, "PACKAGE_DIR", tmp_path)
    with pytest.raises(ConfigError, match="--config not given .* Fix: pass --config"):
        render(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_config_key_fails_before_rendering(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sourse: tfds\n")
    with pytest.raises(ConfigError, match="sourse"):
        render(tmp_path / "out", config_path=str(bad))


def test_cli_bad_flag_exits_with_the_config_code(tmp_path: Path) -> None:
    result = subprocess.run([str(TLJOB), "manifests", "--workers", "0", "-o", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG and "--workers 0" in result.stderr


# --- checkov ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CHECKOV.is_file(), reason=f"checkov not installed at {CHECKOV} (set TLJOB_CHECKOV; "
                    "python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov)")
@pytest.mark.parametrize("overrides", [None, PINNED_CPU, EVERY_OPTION], ids=["checked-in", "pinned-cpu", "every-option"])
def test_checkov_passes_with_only_justified_skips(tmp_path: Path, overrides: dict[str, Any] | None) -> None:
    """The checked-in set, and a rendering whose namespace and digest pass the checks the other skips."""
    scan = tmp_path / "scan"
    if overrides is None:
        shutil.copytree(CHECKED_IN, scan)
    else:
        render(scan, **overrides)
    # checkov knows neither JobSet nor TFJob: their templates are scanned as the core objects they are.
    for i, obj in enumerate(crd_templates_as_core_objects(load_dir(scan))):
        (scan / f"crd-template-{i}.yaml").write_text(yaml.safe_dump(obj))
    result = subprocess.run([str(CHECKOV), "-d", str(scan), "--framework", "kubernetes", "--skip-download",
                             "--output", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert result.returncode == 0 and summary["failed"] == 0, failed
    assert summary["passed"] > 50 and summary["resource_count"] >= 7
    for check in report["results"]["skipped_checks"]:
        assert len(check["check_result"].get("suppress_comment", "")) > 20, f"{check['check_id']}: no reason"
    if overrides is not None:
        assert summary["skipped"] == 0, [c["check_id"] for c in report["results"]["skipped_checks"]]
