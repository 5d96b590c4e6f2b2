"""Cluster resolution (pure, no TensorFlow) and one real two-process all-reduce on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tljob.cluster import (
    ClusterSpec,
    apply_cluster_env,
    choose_strategy,
    resolve_cluster,
    worker_share,
    worker_write_dir,
)
from tljob.errors import ConfigError


def tf_config(cluster: dict, task_type: str, index: object) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


WORKERS = {"worker": ["w0:2222", "w1:2222", "w2:2222"]}
WITH_CHIEF = {"chief": ["c0:2222"], "worker": ["w0:2222", "w1:2222"]}


def test_worker_share_numbers_workers_as_the_strategys_input_pipelines() -> None:
    # MultiWorkerMirroredStrategy numbers its input pipelines chief first, then the workers.
    assert worker_share(resolve_cluster({"TF_CONFIG": tf_config(WITH_CHIEF, "chief", 0)})) == (3, 0)
    assert [worker_share(resolve_cluster({"TF_CONFIG": tf_config(WITH_CHIEF, "worker", i)})) for i in (0, 1)] == [
        (3, 1), (3, 2)]
    assert worker_share(resolve_cluster({"TF_CONFIG": tf_config(WORKERS, "worker", 2)})) == (3, 2)
    assert worker_share(resolve_cluster({})) == (1, 0)


# --- TF_CONFIG ------------------------------------------------------------------------------------


def test_tf_config_workers_only_worker0_is_chief() -> None:
    spec = resolve_cluster({"TF_CONFIG": tf_config(WORKERS, "worker", 0)})
    assert (spec.source, spec.task_type, spec.task_index, spec.num_workers, spec.is_chief) == (
        "tf_config", "worker", 0, 3, True)
    assert not resolve_cluster({"TF_CONFIG": tf_config(WORKERS, "worker", 2)}).is_chief


def test_tf_config_with_chief_only_chief_is_chief() -> None:
    chief = resolve_cluster({"TF_CONFIG": tf_config(WITH_CHIEF, "chief", 0)})
    worker0 = resolve_cluster({"TF_CONFIG": tf_config(WITH_CHIEF, "worker", 0)})
    assert chief.is_chief and not worker0.is_chief
    assert chief.num_workers == worker0.num_workers == 3


def test_tf_config_string_index_is_normalized_and_extra_keys_kept() -> None:
    raw = {"cluster": WORKERS, "task": {"type": "worker", "index": "1"}, "environment": "cloud"}
    spec = resolve_cluster({"TF_CONFIG": json.dumps(raw)})
    assert spec.task_index == 1
    assert spec.tf_config == {"cluster": WORKERS, "task": {"type": "worker", "index": 1}, "environment": "cloud"}


def test_tf_config_wins_over_other_sources() -> None:
    env = {
        "TF_CONFIG": tf_config(WORKERS, "worker", 1),
        "JOB_COMPLETION_INDEX": "0",
        "TLJOB_NUM_WORKERS": "2",
        "CLUSTER_SPEC": "not even json",
    }
    assert resolve_cluster(env).source == "tf_config"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{not json", ["TF_CONFIG", "not valid JSON"]),
        ("[1, 2]", ["TF_CONFIG", "not a JSON object"]),
        (json.dumps({"cluster": WORKERS}), ["TF_CONFIG task=None", "'type' and 'index'"]),
        (json.dumps({"task": {"type": "worker", "index": 0}}), ["TF_CONFIG cluster=None", "non-empty"]),
        (tf_config(WORKERS, "chief", 0), ["TF_CONFIG task.type='chief'", "not a job", "use one of worker"]),
        (tf_config(WORKERS, "worker", 3), ["TF_CONFIG task.index", "3", "0..2"]),
        (tf_config(WORKERS, "worker", -1), ["TF_CONFIG task.index", "-1"]),
        (tf_config(WORKERS, "worker", "one"), ["TF_CONFIG task.index", "'one'"]),
        (tf_config(WORKERS, "worker", 1.0), ["TF_CONFIG task.index", "1.0"]),
        (tf_config({"worker": ["w0:2222", "w1"]}, "worker", 0), ["worker[1]", "'w1'", "no port"]),
        (tf_config({"worker": ["w0:2222", "w1:http"]}, "worker", 0), ["worker[1]", "'w1:http'", "port"]),
        (tf_config({"worker": ["w0:2222", "w1:70000"]}, "worker", 0), ["worker[1]", "70000"]),
        (tf_config({"worker": [":2222"]}, "worker", 0), ["worker[0]", "no host"]),
        (tf_config({"worker": ["w0:2222", "w0:2222"]}, "worker", 0),
         ["TF_CONFIG worker[1]='w0:2222'", "already used by worker:0"]),
        (tf_config({"chief": ["c:1"], "worker": ["c:1"]}, "worker", 0),
         ["TF_CONFIG worker[0]='c:1'", "already used by chief:0"]),
        (tf_config({"worker": ["w0:1"], "ps": ["p:1"]}, "worker", 0), ["TF_CONFIG cluster job='ps'", "not supported"]),
        (tf_config({"chief": ["c0:1", "c1:1"]}, "chief", 0),
         ["TF_CONFIG chief=['c0:1', 'c1:1']", "more than one chief"]),
        (tf_config({"worker": []}, "worker", 0), ["TF_CONFIG worker=[]", "at least one address"]),
    ],
)
def test_tf_config_malformed(text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cluster({"TF_CONFIG": text})
    message = str(info.value)
    for name in names:
        assert name in message
    assert "Fix:" in message


# --- Kubernetes Indexed Job ---------------------------------------------------------------------


def test_indexed_job_default_pattern() -> None:
    spec = resolve_cluster({"JOB_COMPLETION_INDEX": "1", "TLJOB_NUM_WORKERS": "3"})
    assert spec.source == "indexed_job"
    assert spec.tf_config == {
        "cluster": {"worker": [f"tljob-{i}.tljob-workers:2222" for i in range(3)]},
        "task": {"type": "worker", "index": 1},
    }
    assert (spec.task_type, spec.task_index, spec.num_workers, spec.is_chief) == ("worker", 1, 3, False)
    assert resolve_cluster({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "3"}).is_chief


def test_indexed_job_local_pattern_and_port() -> None:
    env = {"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_PORT": "5000",
           "TLJOB_HOST_PATTERN": "127.0.0.1:{index_port}"}
    assert resolve_cluster(env).tf_config["cluster"] == {"worker": ["127.0.0.1:5000", "127.0.0.1:5001"]}
    env["TLJOB_HOST_PATTERN"] = "job-{index:02d}.svc:{port}"
    assert resolve_cluster(env).tf_config["cluster"] == {"worker": ["job-00.svc:5000", "job-01.svc:5000"]}


@pytest.mark.parametrize(
    "env",
    [
        {"TLJOB_NUM_WORKERS": "1"},
        {"TLJOB_NUM_WORKERS": "1", "JOB_COMPLETION_INDEX": "0"},
        {"JOB_COMPLETION_INDEX": "0"},
    ],
)
def test_indexed_job_single_worker(env: dict[str, str]) -> None:
    spec = resolve_cluster(env)
    assert (spec.source, spec.tf_config, spec.num_workers, spec.is_chief) == ("indexed_job", None, 1, True)


def test_indexed_job_wins_over_cluster_spec() -> None:
    env = {"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "CLUSTER_SPEC": "{"}
    assert resolve_cluster(env).source == "indexed_job"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"JOB_COMPLETION_INDEX": "2", "TLJOB_NUM_WORKERS": "2"}, ["JOB_COMPLETION_INDEX='2'", "out of range"]),
        ({"JOB_COMPLETION_INDEX": "x", "TLJOB_NUM_WORKERS": "2"}, ["JOB_COMPLETION_INDEX='x'"]),
        ({"JOB_COMPLETION_INDEX": "1"}, ["JOB_COMPLETION_INDEX='1'", "TLJOB_NUM_WORKERS"]),
        ({"TLJOB_NUM_WORKERS": "2"}, ["JOB_COMPLETION_INDEX", "not set", "Indexed"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "0"}, ["TLJOB_NUM_WORKERS='0'", "at least 1"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "-2"}, ["TLJOB_NUM_WORKERS='-2'"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "two"}, ["TLJOB_NUM_WORKERS='two'"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_HOST_PATTERN": "host:{port}"},
         ["TLJOB_HOST_PATTERN='host:{port}'", "{index}"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_HOST_PATTERN": "{host}-{index}:1"},
         ["TLJOB_HOST_PATTERN", "unknown placeholder {host}"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_HOST_PATTERN": "w{}-{index}:1"},
         ["TLJOB_HOST_PATTERN", "unknown placeholder {}"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_HOST_PATTERN": "tljob-{index}"},
         ["TLJOB_HOST_PATTERN (worker 0)", "'tljob-0'", "no port"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_PORT": "http"}, ["TLJOB_PORT='http'"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "2", "TLJOB_PORT": "0"}, ["TLJOB_PORT=0"]),
        ({"JOB_COMPLETION_INDEX": "0", "TLJOB_NUM_WORKERS": "3", "TLJOB_PORT": "65534",
          "TLJOB_HOST_PATTERN": "h:{index_port}"}, ["TLJOB_PORT=65534", "65535"]),
    ],
)
def test_indexed_job_malformed(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cluster(env)
    for name in names:
        assert name in str(info.value)
    assert "Fix:" in str(info.value)


# --- Vertex AI CLUSTER_SPEC -------------------------------------------------------------------------


def vertex(cluster: dict, pool: str, index: object) -> str:
    return json.dumps({"cluster": cluster, "environment": "cloud",
                       "task": {"type": pool, "index": index, "trial": "1"}, "job": "{}"})


VERTEX = {
    "workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
    "workerpool1": ["cmle-training-workerpool1-ab-0:2222", "cmle-training-workerpool1-ab-1:2222"],
    "workerpool2": ["cmle-training-workerpool2-ab-0:2222"],  # e.g. Reduction Server replicas
}


def test_cluster_spec_pools_become_chief_and_workers() -> None:
    spec = resolve_cluster({"CLUSTER_SPEC": vertex(VERTEX, "workerpool1", 1)})
    assert spec.source == "cluster_spec"
    assert spec.tf_config == {
        "cluster": {"chief": VERTEX["workerpool0"], "worker": VERTEX["workerpool1"]},
        "task": {"type": "worker", "index": 1},
    }
    assert (spec.num_workers, spec.is_chief) == (3, False)
    primary = resolve_cluster({"CLUSTER_SPEC": vertex(VERTEX, "workerpool0", 0)})
    assert (primary.task_type, primary.is_chief) == ("chief", True)


def test_cluster_spec_single_replica_is_single_worker() -> None:
    spec = resolve_cluster({"CLUSTER_SPEC": vertex({"workerpool0": ["h:2222"]}, "workerpool0", 0)})
    assert (spec.source, spec.tf_config, spec.num_workers, spec.is_chief) == ("cluster_spec", None, 1, True)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{", ["CLUSTER_SPEC", "not valid JSON"]),
        (json.dumps({"cluster": VERTEX}), ["CLUSTER_SPEC", "'task'"]),
        (vertex(VERTEX, "workerpool2", 0), ["CLUSTER_SPEC task.type='workerpool2'", "primary and worker pools"]),
        (vertex(VERTEX, "workerpool9", 0), ["CLUSTER_SPEC task.type='workerpool9'", "unknown worker pool"]),
        (vertex(VERTEX, "workerpool1", 2), ["CLUSTER_SPEC task.index=2", "out of range"]),
        (vertex({"workerpool0": ["h:1"], "workerpool1": ["h:1"]}, "workerpool1", 0),
         ["CLUSTER_SPEC worker[0]='h:1'", "already used by chief:0"]),
    ],
)
def test_cluster_spec_malformed(text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_cluster({"CLUSTER_SPEC": text})
    for name in names:
        assert name in str(info.value)


# --- nothing, applying, policy ----------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, {"TF_CONFIG": ""}, {"PATH": "/bin"}])
def test_nothing_is_single_worker(env: dict[str, str]) -> None:
    assert resolve_cluster(env) == ClusterSpec("single", None, "worker", 0, 1, True)


def test_describe_names_source_role_index_and_size() -> None:
    line = resolve_cluster({"JOB_COMPLETION_INDEX": "1", "TLJOB_NUM_WORKERS": "3"}).describe()
    for part in ("indexed_job", "worker:1", "not chief", "3 worker"):
        assert part in line


def test_apply_cluster_env_sets_tf_config_only_when_built() -> None:
    environ: dict[str, str] = {"JOB_COMPLETION_INDEX": "1", "TLJOB_NUM_WORKERS": "2"}
    spec = resolve_cluster(environ)
    apply_cluster_env(spec, environ)
    assert json.loads(environ["TF_CONFIG"]) == spec.tf_config
    assert resolve_cluster(environ) == ClusterSpec("tf_config", spec.tf_config, "worker", 1, 2, False)
    single: dict[str, str] = {}
    apply_cluster_env(resolve_cluster(single), single)
    assert single == {}


@pytest.mark.parametrize(
    ("strategy", "communication", "workers", "gpus", "expected"),
    [
        ("auto", "auto", 2, 0, "multi_worker"),
        ("auto", "ring", 3, 4, "multi_worker"),
        ("auto", "auto", 1, 2, "mirrored"),
        ("auto", "nccl", 1, 1, "default"),
        ("auto", "auto", 1, 0, "default"),
        ("multi_worker", "auto", 1, 0, "multi_worker"),
        ("mirrored", "auto", 1, 0, "mirrored"),
        ("default", "auto", 1, 8, "default"),
    ],
)
def test_choose_strategy(strategy: str, communication: str, workers: int, gpus: int, expected: str) -> None:
    assert choose_strategy(strategy, communication, workers, gpus) == expected


@pytest.mark.parametrize(
    ("strategy", "communication", "workers", "gpus", "names"),
    [
        ("mirrored", "auto", 2, 1, ["runtime.strategy='mirrored'", "2 workers"]),
        ("default", "auto", 3, 0, ["runtime.strategy='default'"]),
        ("fast", "auto", 1, 0, ["runtime.strategy='fast'"]),
        ("auto", "nccl", 2, 0, ["runtime.communication='nccl'", "GPUs"]),
        ("auto", "mpi", 1, 0, ["runtime.communication='mpi'"]),
    ],
)
def test_choose_strategy_inconsistent(strategy: str, communication: str, workers: int, gpus: int,
                                      names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        choose_strategy(strategy, communication, workers, gpus)
    for name in names:
        assert name in str(info.value)


def test_only_the_chief_writes_in_place() -> None:
    chief = resolve_cluster({"TF_CONFIG": tf_config(WITH_CHIEF, "chief", 0)})
    worker0 = resolve_cluster({"TF_CONFIG": tf_config(WITH_CHIEF, "worker", 0)})
    assert worker_write_dir("/out/run/checkpoints", chief) == "/out/run/checkpoints"
    scratch = worker_write_dir("/out/run/checkpoints/", worker0)
    assert f"tljob-worker-0-{os.getpid()}" in scratch and scratch.endswith("/checkpoints")
    assert not scratch.startswith("/out/")


def test_resolution_does_not_import_tensorflow() -> None:
    code = ("import sys, tljob.cluster as c; c.resolve_cluster({'TLJOB_NUM_WORKERS': '1'}); "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == "False"


# --- real: two processes, one all-reduce ------------------------------------------------------------

WORKER = """
import json, logging, os, sys
import tljob
from tljob import cluster
logging.basicConfig(level=logging.INFO)
spec = cluster.resolve_cluster(os.environ)
cluster.apply_cluster_env(spec, os.environ)
strategy = cluster.create_strategy(spec, "auto")
import tensorflow as tf
value = strategy.run(lambda: tf.constant(float(spec.task_index + 1)))
total = strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
agreed = cluster.make_any_worker(strategy)(spec.task_index == 1)
print("RESULT " + json.dumps({
    "sum": float(total), "is_chief": spec.is_chief,
    "replicas": strategy.num_replicas_in_sync, "dir": cluster.worker_write_dir("/out/run", spec),
    "multi_worker": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), "agreed": agreed}), flush=True)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def clean_env() -> dict[str, str]:
    drop = ("TF_CONFIG", "JOB_COMPLETION_INDEX", "CLUSTER_SPEC")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TLJOB_")}


@pytest.mark.multiworker
@pytest.mark.timeout(90)
def test_two_workers_all_reduce_for_real() -> None:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env={**clean_env(), "TF_CONFIG": tf_config({"worker": addresses}, "worker", str(i))},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    start = time.monotonic()
    try:
        outputs = [p.communicate(timeout=75) for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "cluster from tf_config" in err
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert [r["is_chief"] for r in results] == [True, False]
    assert results[0]["dir"] == "/out/run"
    assert "tljob-worker-1-" in results[1]["dir"] and results[1]["dir"].endswith("/run")
    assert not results[1]["dir"].startswith("/out/run")
    assert [r["multi_worker"] for r in results] == [True, True]
    assert [r["replicas"] for r in results] == [2, 2]
    assert [r["agreed"] for r in results] == [True, True]
    assert time.monotonic() - start < 60
