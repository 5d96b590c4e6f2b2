"""Multi-worker runs: real `tljob train` processes on 127.0.0.1, each with its own cluster environment.

The same command on every worker, as pods would run it; faults are real signals to real processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from backups import backed_up_epoch, backed_up_step
from tljob import rundir, storage
from tljob.errors import EXIT_OK, EXIT_RETRYABLE

pytestmark = pytest.mark.multiworker

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = str(ROOT / "job" / "dry_run.yaml")
# Small enough that 2-3 workers on 2 cores finish quickly; still two phases, validation and test.
SHORT = ("--set", "data.image_size=32", "--set", "data.synthetic.train_examples=128", "--set", "data.synthetic.validation_examples=32",
         "--set", "data.synthetic.test_examples=32")
BOUND_S = 60  # the bound for survivors to exit after a peer dies or freezes


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def consecutive_free_ports(n: int) -> int:
    """A base port with base..base+n-1 free (for the {index_port} host pattern)."""
    for _ in range(50):
        base = free_ports(1)[0]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no consecutive free ports")


def tf_config_envs(n: int) -> list[dict[str, str]]:
    hosts = [f"127.0.0.1:{p}" for p in free_ports(n)]
    return [{"TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})}
            for i in range(n)]


def indexed_job_envs(n: int) -> list[dict[str, str]]:
    base = consecutive_free_ports(n)
    return [{"JOB_COMPLETION_INDEX": str(i), "TLJOB_NUM_WORKERS": str(n),
             "TLJOB_HOST_PATTERN": "127.0.0.1:{index_port}", "TLJOB_PORT": str(base)} for i in range(n)]


class Workers:
    """N worker processes of one run; logs go to files so a full pipe never blocks a worker."""

    def __init__(self, tmp: Path, envs: list[dict[str, str]], args: tuple[str, ...]):
        self.tmp, self.envs, self.args = tmp, envs, args
        self.procs: list[subprocess.Popen] = []
        self.attempt = 0

    def start(self) -> "Workers":
        self.attempt += 1
        self.procs = []
        for i, extra in enumerate(self.envs):
            scratch = self.tmp / f"tmp-{i}"
            scratch.mkdir(exist_ok=True)
            env = {**os.environ, **extra, "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1"}
            env.pop("TF_CONFIG", None) if "TF_CONFIG" not in extra else None
            log = open(self.tmp / f"worker-{i}-attempt-{self.attempt}.log", "w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "tljob.cli", *self.args], env=env,
                                               stdout=log, stderr=subprocess.STDOUT))
        return self

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"workers did not finish: {self.logs()[-4000:]}")
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()

    def log(self, i: int, attempt: int | None = None) -> str:
        return (self.tmp / f"worker-{i}-attempt-{attempt or self.attempt}.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- worker {i}\n{self.log(i)[-3000:]}" for i in range(len(self.procs)))


def history(out: Path | str) -> list[dict]:
    """The run's history.json, local or in the bucket ([] until the chief wrote one)."""
    try:
        return json.loads(storage.read_text(storage.join(str(out), "history.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def wait_until(pred, workers: Workers, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if any(p.poll() is not None for p in workers.procs):
            raise AssertionError(f"a worker ended early: {workers.logs()}")
        time.sleep(0.05)
    workers.kill()
    raise AssertionError(f"timed out: {workers.logs()}")


def bucket_backed_up_epoch(uri: str, scratch: Path) -> int | None:
    """The 1-based epoch whose end the latest backup in the bucket holds (read from the checkpoint)."""
    storage.download_tree(uri, str(scratch))
    return backed_up_epoch(scratch)


def digests(workers: Workers) -> list[str]:
    return [re.search(r"final weights digest: (\w+)", workers.log(i)).group(1) for i in range(len(workers.procs))]


def assert_chief_only_outputs(out: Path, workers: Workers) -> None:
    assert (out / "_SUCCESS").is_file()
    listed = set(json.loads((out / "_SUCCESS").read_text())["files"])
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "_SUCCESS"}
    assert listed == on_disk, "files in the run that the chief did not publish"
    for i in range(1, len(workers.procs)):
        assert "the chief publishes the run" in workers.log(i)
        leftovers = list((workers.tmp / f"tmp-{i}").glob("tljob-worker-*/*"))
        assert not leftovers, f"worker {i} left temporary writes: {leftovers}"


def test_two_workers_tf_config_gcs_output(tmp_path: Path, gcs_bucket: str) -> None:
    out = f"{gcs_bucket}/runs/two"
    args = ("train", "--config", DRY_RUN, "--output", out, *SHORT,
            "--set", "train.feature_extraction.epochs=1", "--set", "train.fine_tuning.epochs=1")
    workers = Workers(tmp_path, tf_config_envs(2), args).start()
    assert workers.wait() == [EXIT_OK, EXIT_OK], workers.logs()
    d = digests(workers)
    assert d[0] == d[1], "final weights differ between workers"
    # Every output is in the bucket, and _SUCCESS lists exactly the objects there, with sizes.
    success = json.loads(storage.read_text(f"{out}/_SUCCESS"))["files"]
    objects = {k: v for k, v in storage.list_files(out).items() if k != "_SUCCESS"}
    assert set(success) == set(objects) and all(success[k]["size"] == objects[k] for k in objects)
    for rel in ("history.json", "metrics.json", "metadata.json", "params.yaml", "curves.png", "status.json",
                "model/model.keras", "model/saved_model/saved_model.pb", "checkpoints/fine_tuning.weights.h5"):
        assert rel in objects, rel
    assert any(k.startswith("logs/") for k in objects) and not any(k.startswith("backup/") for k in objects)
    assert "the chief publishes the run" in workers.log(1)
    hist = history(out)
    assert [(h["epoch"], h["phase"]) for h in hist] == [(1, "feature_extraction"), (2, "fine_tuning")]
    assert all(h["global_batch_size"] == 32 and h["replicas"] == 2 and h["num_workers"] == 2 for h in hist)
    assert "workers=2 replicas=2 chief=True global_batch=32" in workers.log(0)
    assert "cluster from tf_config" in workers.log(1)
    metadata = json.loads(storage.read_text(f"{out}/metadata.json"))
    assert metadata["num_workers"] == 2 and metadata["global_batch_size"] == 32


def test_three_workers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train", "--config", DRY_RUN, "--output", str(out), *SHORT,
            "--set", "train.feature_extraction.epochs=1", "--set", "train.fine_tuning.epochs=1",
            "--set", "data.batch_size=8")
    workers = Workers(tmp_path, tf_config_envs(3), args).start()
    assert workers.wait() == [EXIT_OK] * 3, workers.logs()
    assert len(set(digests(workers))) == 1
    assert_chief_only_outputs(out, workers)
    assert all(h["global_batch_size"] == 24 for h in history(out))
    # The chief evaluates the whole test split alone for the report, after the others have finished.
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["examples"] == 32 and np.array(evaluation["confusion_matrix"]).sum() == 32
    assert (out / "confusion.png").is_file() and (out / "model" / "labels.txt").is_file()


def test_two_workers_train_both_phases_on_cached_features(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train", "--config", DRY_RUN, "--output", str(out), *SHORT, "--set", "train.feature_extraction.epochs=2",
            "--set", "train.fine_tuning.epochs=1", "--set", "train.fine_tuning.schedule=cosine",
            *(a for phase in ("feature_extraction", "fine_tuning") for a in (
                "--set", f"train.{phase}.cache_features=true", "--set", f"train.{phase}.augment=false")))
    workers = Workers(tmp_path, tf_config_envs(2), args).start()
    assert workers.wait() == [EXIT_OK, EXIT_OK], workers.logs()
    assert len(set(digests(workers))) == 1, "the workers' models differ"
    # Each worker ran the constant layers on its own half of the training images, and on every validation image.
    for i in range(2):
        assert f"training images (share {i + 1} of 2), 64 images" in workers.log(i)
        assert "validation images, 32 images" in workers.log(i)
    hist = history(out)
    assert [(h["epoch"], h["phase"]) for h in hist] == [(1, "feature_extraction"), (2, "feature_extraction"),
                                                        (3, "fine_tuning")]
    assert all(0 <= h["val_accuracy"] <= 1 and h["global_batch_size"] == 32 for h in hist)
    assert_chief_only_outputs(out, workers)
    assert json.loads((out / "metrics.json").read_text())["test"]["test_accuracy"] >= 0


def test_indexed_job_sigkill_in_phase_2_then_resume_from_bucket(tmp_path: Path, gcs_bucket: str) -> None:
    out = f"{gcs_bucket}/runs/killed"
    args = ("train", "--config", DRY_RUN, "--output", out, *SHORT, "--set", "runtime.log_sync_s=0.01",
            "--set", "train.feature_extraction.epochs=1", "--set", "train.fine_tuning.epochs=3")
    workers = Workers(tmp_path, indexed_job_envs(2), args).start()
    wait_until(lambda: any(k.startswith("backup/fine_tuning/") for k in storage.list_files(out)), workers)
    assert "cluster from indexed_job" in workers.log(0)
    workers.procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = workers.procs[0].wait(timeout=BOUND_S + 30)
    assert time.monotonic() - killed < BOUND_S, "the survivor took too long to exit"
    assert code == EXIT_RETRYABLE, workers.log(0)[-3000:]
    last_backed_up = bucket_backed_up_epoch(f"{out}/backup/fine_tuning", tmp_path / "inspect")
    assert last_backed_up is not None and 2 <= last_backed_up < 4, "the kill must land in phase 2"
    assert not rundir.is_finished(out)
    assert any(k.startswith("logs/fine_tuning/") for k in storage.list_files(out)), "TensorBoard logs sync during training"
    # The pods come back on fresh nodes: nothing local survives, everything comes from the bucket.
    for i in range(2):
        shutil.rmtree(tmp_path / f"tmp-{i}")
    assert workers.start().wait() == [EXIT_OK, EXIT_OK], workers.logs()
    hist = history(out)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert [h["attempt"] for h in hist if h["phase"] == "feature_extraction"] == [1], "phase 1 was repeated"
    resumed = [h["epoch"] for h in hist if h["attempt"] == 2]
    assert resumed[0] == last_backed_up + 1
    assert "phase feature_extraction already finished" in workers.log(0)
    assert len(set(digests(workers))) == 1


def test_frozen_peer_makes_survivor_exit_in_bound(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train", "--config", DRY_RUN, "--output", str(out), *SHORT, "--set", "train.feature_extraction.epochs=30")
    workers = Workers(tmp_path, tf_config_envs(2), args).start()
    try:
        wait_until(lambda: len(history(out)) >= 1, workers)
        workers.procs[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        code = workers.procs[0].wait(timeout=BOUND_S + 30)
        assert time.monotonic() - frozen < BOUND_S
        assert code == EXIT_RETRYABLE, workers.log(0)[-3000:]
    finally:
        workers.kill()


@pytest.mark.parametrize("execution", [(), ("--set", "train.steps_per_execution=2",
                                              "--set", "runtime.backup_every_steps=3")],
                         ids=["one-step-per-call", "two-steps-per-call"])
def test_sigterm_to_chief_saves_backup_and_exits_retryable(tmp_path: Path, execution: tuple[str, ...]) -> None:
    # With two steps per call Keras reports batches 1, 3, ...: the SIGTERM check used to wait for a batch
    # number divisible by 10, never came, and the run went on until the grace timer killed it.
    out = tmp_path / "run"
    args = ("train", "--config", DRY_RUN, "--output", str(out), *SHORT, "--set", "train.feature_extraction.epochs=30",
            *execution)
    workers = Workers(tmp_path, tf_config_envs(2), args).start()
    try:
        wait_until(lambda: len(history(out)) >= 1, workers)
        before = {p: p.stat().st_mtime_ns for p in (out / "backup").rglob("*") if p.is_file()}
        workers.procs[0].send_signal(signal.SIGTERM)
        codes = workers.wait(timeout=BOUND_S)
    finally:
        workers.kill()
    assert codes == [EXIT_RETRYABLE, EXIT_RETRYABLE], workers.logs()
    assert "termination requested" in workers.log(0) and "termination requested" in workers.log(1)
    assert "no exit 25 s after SIGTERM" not in workers.log(0), "the grace timer, not the trainer, ended the run"
    after = {p: p.stat().st_mtime_ns for p in (out / "backup").rglob("*") if p.is_file()}
    assert any(after.get(p) != before.get(p) for p in after), "no new backup was written"
    # The backup records the last step that ran (the end of a two-step call: an odd step), so a restart
    # repeats none.
    stopped_at = int(re.search(r"stopped at batch (\d+)", workers.log(0)).group(1))
    assert backed_up_step(out / "backup" / "feature_extraction")[1] == stopped_at
    if execution:
        assert stopped_at % 2 == 1
    assert not (out / "_SUCCESS").exists()
