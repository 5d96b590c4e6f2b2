"""Who this process is in the training cluster, and the tf.distribute strategy that follows from it.

Every worker runs this same program. Its role comes from the environment, first match wins:

1. ``TF_CONFIG`` as given (Kubeflow TFJob, Vertex AI, by hand);
2. a Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX`` + ``TLJOB_NUM_WORKERS`` + ``TLJOB_HOST_PATTERN``;
3. Vertex AI's ``CLUSTER_SPEC``;
4. nothing: a single worker.

Resolution is pure (an env mapping in, a ``ClusterSpec`` out) and imports no TensorFlow, so a bad
cluster environment fails in milliseconds with exit code 2. TensorFlow is imported inside the
functions that need a strategy.
"""

from __future__ import annotations

import json
import logging
import os
import string
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, MutableMapping

from tljob.config import COMMUNICATIONS, STRATEGIES
from tljob.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

# Jobs of an all-reduce cluster; "ps" and "evaluator" belong to strategies tljob does not use.
TRAINING_JOBS = ("chief", "worker")

DEFAULT_PORT = 2222
# Pod hostname of an Indexed Job is <job name>-<index>; the subdomain is the headless Service's name.
DEFAULT_HOST_PATTERN = "tljob-{index}.tljob-workers:{port}"
HOST_PATTERN_FIELDS = ("index", "port", "index_port")
# Vertex AI's workerPoolSpecs[0] is the primary replica (TF's chief) and [1] the workers; [2] holds
# parameter servers or Reduction Server replicas and [3] evaluators, none of which run this program.
VERTEX_POOLS = {"workerpool0": "chief", "workerpool1": "worker"}
VERTEX_OTHER_POOLS = ("workerpool2", "workerpool3")

# How long the coordination service waits for a peer's heartbeat before it declares the peer dead
# and fails every worker's collectives with UnavailableError. A peer killed mid-collective is seen
# at once (connection reset); one that dies between collectives or freezes (SIGSTOP, a hung node)
# only through this timeout: measured 7-10 s on loopback (3 s with 4 s). 10 s is TF's own default,
# stated here so that the bound is documented and survives TF releases; shorter risks declaring a
# CPU-starved worker dead.
HEARTBEAT_TIMEOUT_S = 10


@dataclass(frozen=True)
class ClusterSpec:
    """This process's place in the training cluster."""

    source: str  # "tf_config" | "indexed_job" | "cluster_spec" | "single"
    tf_config: dict[str, Any] | None  # what TF_CONFIG must contain; None when there is nothing to set
    task_type: str  # "chief" | "worker"
    task_index: int
    num_workers: int  # all training processes (chief + workers)
    is_chief: bool  # writes the run's files (chief_task)

    def describe(self) -> str:
        role = "chief" if self.is_chief else "not chief"
        return (
            f"cluster from {self.source}: {self.task_type}:{self.task_index} ({role}) "
            f"of {self.num_workers} worker process(es)"
        )


# --- pure helpers ---------------------------------------------------------------------------------


def _bad(var: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{var}={value!r}: {problem}. Fix: {fix}")


def _parse_int(var: str, value: Any, fix: str) -> int:
    """An int from an int or a decimal string ("1"); bools and floats are refused."""
    if isinstance(value, bool):
        raise _bad(var, value, "not an integer", fix)
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise _bad(var, value, "not a non-negative integer", fix)


def _check_address(var: str, address: Any) -> None:
    """host:port with a non-empty host and a numeric port in 1..65535."""
    fix = "write every address as host:port, e.g. tljob-0.tljob-workers:2222."
    if not isinstance(address, str) or ":" not in address:
        raise _bad(var, address, "address has no port", fix)
    host, port = address.rsplit(":", 1)
    if not host:
        raise _bad(var, address, "address has no host", fix)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _bad(var, address, "port is not a number in 1..65535", fix)


def chief_task(cluster: Mapping[str, Any]) -> tuple[str, int]:
    """The task that writes final outputs: chief:0 when a chief job exists, else worker:0."""
    return ("chief", 0) if cluster.get("chief") else ("worker", 0)


def _validate_cluster(var: str, cluster: Any) -> dict[str, list[str]]:
    if not isinstance(cluster, dict) or not cluster:
        raise _bad(f"{var} cluster", cluster, "must be a non-empty object of job name -> address list",
                   'give e.g. {"worker": ["host0:2222", "host1:2222"]}.')
    seen: dict[str, str] = {}
    for job, addresses in cluster.items():
        if job not in TRAINING_JOBS:
            raise _bad(f"{var} cluster job", job, "not supported",
                       f"tljob trains with all-reduce; use only the jobs {', '.join(TRAINING_JOBS)}.")
        if not isinstance(addresses, list) or not addresses:
            raise _bad(f"{var} {job}", addresses, "must list at least one address",
                       f'give e.g. "{job}": ["host0:2222"].')
        for i, address in enumerate(addresses):
            _check_address(f"{var} {job}[{i}]", address)
            if address in seen:
                raise _bad(f"{var} {job}[{i}]", address, f"address already used by {seen[address]}",
                           "give every task its own host:port.")
            seen[address] = f"{job}:{i}"
    if len(cluster.get("chief", [])) > 1:
        raise _bad(f"{var} chief", cluster["chief"], "more than one chief", "list exactly one chief address.")
    return cluster


def _spec_from_tf_config(var: str, source: str, config: dict[str, Any]) -> ClusterSpec:
    """Validates a TF_CONFIG-shaped dict; the task index is normalized to an int."""
    cluster = _validate_cluster(var, config.get("cluster"))
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise _bad(f"{var} task", task, "must be an object with 'type' and 'index'",
                   'add e.g. "task": {"type": "worker", "index": 0}.')
    task_type = task["type"]
    if task_type not in cluster:
        raise _bad(f"{var} task.type", task_type, "not a job in 'cluster'",
                   f"use one of {', '.join(cluster)}.")
    index = _parse_int(f"{var} task.index", task.get("index", 0), "give the task's position, from 0.")
    size = len(cluster[task_type])
    if index >= size:
        raise _bad(f"{var} task.index", index, f"out of range: job {task_type!r} has {size} task(s)",
                   f"use 0..{size - 1}.")
    normalized = {**config, "task": {**task, "index": index}}
    chief = chief_task(cluster)
    return ClusterSpec(
        source=source,
        tf_config=normalized,
        task_type=task_type,
        task_index=index,
        num_workers=sum(len(addresses) for addresses in cluster.values()),
        is_chief=(task_type, index) == chief,
    )


def _load_json(var: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(var, text, f"not valid JSON ({exc})", "set it to a JSON object, or unset it.") from exc
    if not isinstance(value, dict):
        raise _bad(var, text, "not a JSON object", 'set it to an object with "cluster" and "task".')
    return value


def _single(source: str) -> ClusterSpec:
    return ClusterSpec(source=source, tf_config=None, task_type="worker", task_index=0, num_workers=1,
                       is_chief=True)


def host_addresses(pattern: str, num_workers: int, port: int) -> list[str]:
    """The address of every worker of an Indexed Job, from TLJOB_HOST_PATTERN."""
    var = "TLJOB_HOST_PATTERN"
    fields = set()
    for _, name, _, _ in string.Formatter().parse(pattern):
        if name is None:
            continue
        if name not in HOST_PATTERN_FIELDS:
            raise _bad(var, pattern, f"unknown placeholder {{{name}}}",
                       f"use only {', '.join('{' + f + '}' for f in HOST_PATTERN_FIELDS)}.")
        fields.add(name)
    if num_workers > 1 and not fields & {"index", "index_port"}:
        raise _bad(var, pattern, f"no {{index}} or {{index_port}} placeholder for {num_workers} workers",
                   "include {index} in the host (e.g. tljob-{index}.tljob-workers:{port}) or use "
                   "{index_port} for one host.")
    if port + num_workers - 1 > 65535:
        raise _bad("TLJOB_PORT", port, f"port + {num_workers - 1} workers passes 65535", "use a lower port.")
    addresses = [pattern.format(index=i, port=port, index_port=port + i) for i in range(num_workers)]
    for i, address in enumerate(addresses):
        _check_address(f"{var} (worker {i})", address)
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise _bad(var, pattern, f"gives the same address to several workers: {', '.join(duplicates)}",
                   "make the address depend on {index} or {index_port}.")
    return addresses


def _from_indexed_job(env: Mapping[str, str]) -> ClusterSpec:
    """A Kubernetes Indexed Job: Kubernetes sets JOB_COMPLETION_INDEX; the manifest sets the rest."""
    raw_index = env.get("JOB_COMPLETION_INDEX")
    raw_workers = env.get("TLJOB_NUM_WORKERS")
    workers_fix = "set TLJOB_NUM_WORKERS to the Job's completions (= parallelism), e.g. 2."
    if raw_workers is None:
        # A one-pod Indexed Job needs no peers; a later index means the count was forgotten.
        index = _parse_int("JOB_COMPLETION_INDEX", raw_index, "let Kubernetes set it (completionMode: Indexed).")
        if index != 0:
            raise _bad("JOB_COMPLETION_INDEX", raw_index, "set but TLJOB_NUM_WORKERS is not", workers_fix)
        return _single("indexed_job")
    num_workers = _parse_int("TLJOB_NUM_WORKERS", raw_workers, workers_fix)
    if num_workers < 1:
        raise _bad("TLJOB_NUM_WORKERS", raw_workers, "must be at least 1", workers_fix)
    if raw_index is None:
        if num_workers == 1:
            return _single("indexed_job")
        raise _bad("JOB_COMPLETION_INDEX", None, f"not set but TLJOB_NUM_WORKERS={num_workers}",
                   "run the pods as an Indexed Job (completionMode: Indexed), or set TLJOB_NUM_WORKERS=1.")
    index = _parse_int("JOB_COMPLETION_INDEX", raw_index, "let Kubernetes set it (completionMode: Indexed).")
    if index >= num_workers:
        raise _bad("JOB_COMPLETION_INDEX", raw_index, f"out of range for TLJOB_NUM_WORKERS={num_workers}",
                   "make TLJOB_NUM_WORKERS equal to the Job's completions.")
    if num_workers == 1:
        return _single("indexed_job")
    port = _parse_int("TLJOB_PORT", env.get("TLJOB_PORT", str(DEFAULT_PORT)), "use a port number, e.g. 2222.")
    if not 1 <= port <= 65535:
        raise _bad("TLJOB_PORT", port, "not a port number", "use 1..65535, e.g. 2222.")
    addresses = host_addresses(env.get("TLJOB_HOST_PATTERN", DEFAULT_HOST_PATTERN), num_workers, port)
    config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    return _spec_from_tf_config("TLJOB_HOST_PATTERN", "indexed_job", config)


def _from_vertex(text: str) -> ClusterSpec:
    """Vertex AI's CLUSTER_SPEC: pools workerpool0 (primary replica = chief) and workerpool1 (workers)."""
    var = "CLUSTER_SPEC"
    spec = _load_json(var, text)
    cluster, task = spec.get("cluster"), spec.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise _bad(var, text, "needs the objects 'cluster' and 'task'",
                   "let Vertex AI set it, or unset it and set TF_CONFIG instead.")
    pool = task.get("type")
    if pool in VERTEX_OTHER_POOLS:
        raise _bad(f"{var} task.type", pool, "tljob runs only in the primary and worker pools",
                   "put the training container in workerPoolSpecs[0] and [1] only.")
    if pool not in VERTEX_POOLS:
        raise _bad(f"{var} task.type", pool, "unknown worker pool", f"expected one of {', '.join(VERTEX_POOLS)}.")
    ignored = [p for p in cluster if p not in VERTEX_POOLS]
    if ignored:
        log.info("CLUSTER_SPEC: pools %s are not training processes; left out of the cluster", ignored)
    tf_cluster = {VERTEX_POOLS[p]: addresses for p, addresses in cluster.items() if p in VERTEX_POOLS}
    config = {"cluster": tf_cluster, "task": {"type": VERTEX_POOLS[pool], "index": task.get("index", 0)}}
    resolved = _spec_from_tf_config(var, "cluster_spec", config)
    if resolved.num_workers == 1:
        return _single("cluster_spec")
    return resolved


def resolve_cluster(env: Mapping[str, str]) -> ClusterSpec:
    """This process's role from the environment (see the module docstring for the order); logs the source."""
    if env.get("TF_CONFIG"):
        spec = _spec_from_tf_config("TF_CONFIG", "tf_config", _load_json("TF_CONFIG", env["TF_CONFIG"]))
    elif "JOB_COMPLETION_INDEX" in env or "TLJOB_NUM_WORKERS" in env:
        spec = _from_indexed_job(env)
    elif env.get("CLUSTER_SPEC"):
        spec = _from_vertex(env["CLUSTER_SPEC"])
    else:
        spec = _single("single")
    log.info("%s", spec.describe())
    return spec


def apply_cluster_env(spec: ClusterSpec, environ: MutableMapping[str, str]) -> None:
    """Sets TF_CONFIG to the resolved cluster, for the TF and Keras code that reads it from the environment."""
    if spec.tf_config is not None:
        environ["TF_CONFIG"] = json.dumps(spec.tf_config)


def choose_strategy(strategy: str, communication: str, num_workers: int, num_gpus: int) -> str:
    """Which strategy class to build: "multi_worker", "mirrored" or "default" (pure policy)."""
    if communication not in COMMUNICATIONS:
        raise _bad("runtime.communication", communication, "unknown implementation",
                   f"use one of {', '.join(COMMUNICATIONS)}.")
    if communication == "nccl" and num_gpus == 0:
        raise _bad("runtime.communication", communication, "NCCL needs GPUs and this worker has none",
                   "use auto or ring.")
    if strategy not in STRATEGIES:
        raise _bad("runtime.strategy", strategy, "unknown strategy", f"use one of {', '.join(STRATEGIES)}.")
    if strategy in ("mirrored", "default") and num_workers > 1:
        raise _bad("runtime.strategy", strategy, f"the cluster has {num_workers} workers, which would each "
                   "train alone", "use auto or multi_worker.")
    if strategy != "auto":
        return strategy
    if num_workers > 1:
        return "multi_worker"
    return "mirrored" if num_gpus > 1 else "default"


# --- TensorFlow -----------------------------------------------------------------------------------


def _configure_coordination_service(cluster: Mapping[str, Any]) -> None:
    """Starts TF's coordination service with an explicit heartbeat timeout.

    MultiWorkerMirroredStrategy does the same with TF's defaults when nothing is configured; there
    is no public API for the heartbeat, hence the private `context` module (TF is pinned to 2.21).
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    leader_type, leader_index = chief_task(cluster)
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
            for job in TRAINING_JOBS if job in cluster]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=f"/job:{leader_type}/replica:0/task:{leader_index}",
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_S * 1000,
        coordinated_jobs=jobs,
    )


def create_strategy(
    spec: ClusterSpec,
    strategy: str = "auto",
    communication: str = "auto",
    collective_timeout_s: float | None = None,
) -> tf.distribute.Strategy:
    """Builds the strategy for this process.

    Call it once, first thing after resolving the cluster and before any other TensorFlow work
    (creating tensors, listing logical devices, building a model): a multi-worker strategy must
    configure collectives and the coordination service before TF's runtime starts, and TF refuses
    or silently ignores those settings afterwards.

    auto: MultiWorkerMirroredStrategy when there are several workers (each with all its local GPUs),
    MirroredStrategy for one worker with several GPUs, the default strategy otherwise.
    communication "nccl" also gives MirroredStrategy NCCL all-reduce; "ring" and
    collective_timeout_s apply to multi-worker all-reduce only.
    """
    import tensorflow as tf

    num_gpus = len(tf.config.list_physical_devices("GPU"))  # lists devices without starting the runtime
    kind = choose_strategy(strategy, communication, spec.num_workers, num_gpus)
    log.info("strategy %s (asked: %s), %d local GPU(s), communication %s", kind, strategy, num_gpus,
             communication)
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        if communication == "nccl":
            return tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.NcclAllReduce())
        return tf.distribute.MirroredStrategy()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation[communication.upper()],
        timeout_seconds=collective_timeout_s,
    )
    if spec.tf_config is None:
        # multi_worker asked for a single process: a one-worker strategy, no cluster, no server.
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    cluster = spec.tf_config["cluster"]
    _configure_coordination_service(cluster)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster),
        task_type=spec.task_type,
        task_id=spec.task_index,
        num_accelerators={"GPU": num_gpus},
        rpc_layer=spec.tf_config.get("rpc_layer", "grpc"),
    )
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)


def worker_share(spec: ClusterSpec) -> tuple[int, int]:
    """(number of workers, this worker's position): the share of the training set this worker reads, numbered
    as MultiWorkerMirroredStrategy numbers its input pipelines (the chief first, then the workers)."""
    chiefs = len((spec.tf_config or {}).get("cluster", {}).get("chief", ()))
    return spec.num_workers, spec.task_index + (chiefs if spec.task_type == "worker" else 0)


def worker_write_dir(path: str, spec: ClusterSpec) -> str:
    """Where this process writes `path`'s content: `path` on the chief, a scratch folder elsewhere.

    Non-chief workers must still run the same save ops (saving reads ON_READ variables through
    collectives), but two writers to one path would corrupt it. The scratch folder is outside the run
    directory (in the temp dir): workers that share a filesystem with the chief must not leave files in
    the run while the chief lists it for _SUCCESS. The caller deletes it.
    """
    if spec.is_chief:
        return path
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return os.path.join(tempfile.gettempdir(), f"tljob-worker-{spec.task_index}-{os.getpid()}", name)


def make_any_worker(strategy: tf.distribute.Strategy) -> Callable[[bool], bool]:
    """A function that is True on every worker when its flag is True on at least one.

    It runs an all-reduce, so every worker must call it at the same point of the program (at the
    same batch end, for example). Built once: the tf.function is traced on the first call only.
    """
    import tensorflow as tf

    if strategy.num_replicas_in_sync == 1:
        return bool

    @tf.function
    def count(flag: tf.Tensor) -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: flag), axis=None)

    def any_worker(flag: bool) -> bool:
        return bool(count(tf.constant(1.0 if flag else 0.0)) > 0)

    return any_worker
