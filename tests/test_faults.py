"""Bounded exits, checked on real subprocesses: the watchdog, SIGTERM handling, peer-failure classification."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tljob.errors import EXIT_RETRYABLE, ConfigError
from tljob.faults import GracefulTermination, StopCheck, Watchdog, calls_between_checks, is_peer_failure

PRELUDE = """
import ctypes, logging, os, signal, sys, time
logging.basicConfig(level=logging.INFO)
from tljob.faults import GracefulTermination, Watchdog
def say(line):
    print(line, flush=True)
"""


def start(code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for(proc: subprocess.Popen[str], line: str) -> float:
    """Reads stdout up to `line`; returns the time it was seen."""
    for got in proc.stdout:
        if got.strip() == line:
            return time.monotonic()
    proc.wait(timeout=10)
    raise AssertionError(f"child ended (rc {proc.returncode}) before printing {line!r}: {proc.stderr.read()[-2000:]}")


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, float, str]:
    """Waits for the child; returns its exit code, when it ended and its stderr."""
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, time.monotonic(), proc.stderr.read()


# --- watchdog -----------------------------------------------------------------------------------------


def test_watchdog_exits_75_when_beats_stop_even_if_main_thread_is_stuck_in_c() -> None:
    proc = start("""
dog = Watchdog(1.0)
dog.arm()
end = time.monotonic() + 1.5
while time.monotonic() < end:  # longer than the timeout: beats keep it alive
    dog.beat()
    time.sleep(0.05)
say("stopped")
ctypes.CDLL(None).sleep(30)  # like a collective waiting for a dead peer: no Python runs in this thread
say("not reached")
""")
    stopped = wait_for(proc, "stopped")
    code, ended, err = finish(proc, 15)
    assert code == EXIT_RETRYABLE, err
    assert 1.0 <= ended - stopped < 3.0
    assert ("no progress in the run for 1 s (limit 1 s): a peer is probably dead or frozen; exiting with retryable "
            "code 75") in err


def test_watchdog_quiet_while_beating_or_disarmed() -> None:
    proc = start("""
dog = Watchdog(0.5)
dog.arm()
end = time.monotonic() + 1.5
while time.monotonic() < end:
    dog.beat()
    time.sleep(0.05)
dog.disarm()
time.sleep(1.2)  # more than twice the timeout without beats, but disarmed
dog.close()
say("done")
""")
    code, _, err = finish(proc, 15)
    assert code == 0, err
    assert "no progress" not in err


def test_watchdog_stages_local_progress_and_no_limit_stay_quiet() -> None:
    # Long work that is not a training step: a local stage that reports progress outlives the timeout
    # many times over, one without collectives and without progress reports has no limit.
    proc = start("""
dog = Watchdog(0.5, allowance_s=30)
dog.arm()
with dog.working("feature pass", collectives=False, total=40) as progress:
    for i in range(40):  # 2 s in all, 0.05 s per batch
        time.sleep(0.05)
        progress(i + 1)
with dog.working("export", collectives=False):
    time.sleep(1.5)
with dog.working("model build", collectives=True):
    time.sleep(1.5)  # within the allowance
time.sleep(0.2)
dog.close()
say("done")
""")
    code, _, err = finish(proc, 20)
    assert code == 0, err
    assert "no progress" not in err
    assert "feature pass: finished in" in err and "export: finished in" in err


def test_watchdog_bounds_a_stage_with_collectives_and_a_local_stage_that_stops_reporting() -> None:
    # A dead peer inside a stage with collectives: the allowance bounds it even when progress is reported.
    proc = start("""
dog = Watchdog(0.5, allowance_s=1.5)
dog.arm()
with dog.working("BatchNorm calibration", collectives=True) as progress:
    say("started")
    for i in range(200):
        time.sleep(0.05)
        progress(i)  # not a beat: a stage with collectives must end within its allowance
say("not reached")
""")
    started = wait_for(proc, "started")
    code, ended, err = finish(proc, 15)
    assert code == EXIT_RETRYABLE, err
    assert 1.5 <= ended - started < 3.5
    assert "no progress in BatchNorm calibration for 2 s (limit 1.5 s)" in err
    proc = start("""
dog = Watchdog(0.5, allowance_s=30)
dog.arm()
with dog.working("feature pass", collectives=False, total=10) as progress:
    time.sleep(1.0)  # the first batch traces: it has the allowance
    progress(1)
    say("stalled")
    ctypes.CDLL(None).sleep(30)
say("not reached")
""")
    stalled = wait_for(proc, "stalled")
    code, ended, err = finish(proc, 15)
    assert code == EXIT_RETRYABLE, err
    assert 0.5 <= ended - stalled < 2.0
    assert "no progress in feature pass for 1 s (limit 0.5 s)" in err


def test_stop_check_counts_calls_not_batch_numbers() -> None:
    # With steps_per_execution=2 Keras reports batch 1, 3, 5, ...: a check of `batch % 10` never ran.
    term = GracefulTermination(grace_s=5)
    asked: list[bool] = []

    def agree(flag: bool) -> bool:
        asked.append(flag)
        return flag

    check = StopCheck(term, agree, every_calls=calls_between_checks(steps_per_execution=2, num_workers=2))
    assert check.every_calls == 5
    assert [check.should_stop() for _ in range(10)] == [False] * 10
    assert asked == [False, False]  # every 5th call asks the peers, on every worker alike
    term.requested = True  # what the SIGTERM reader thread does
    assert [check.should_stop() for _ in range(5)] == [False] * 4 + [True]
    assert calls_between_checks(1, 2) == 10 and calls_between_checks(16, 2) == 1 and calls_between_checks(3, 1) == 1
    with pytest.raises(ConfigError, match="every_calls"):
        StopCheck(term, every_calls=0)


def test_watchdog_rejects_non_positive_timeout() -> None:
    with pytest.raises(ConfigError, match="runtime.peer_timeout_s"):
        Watchdog(0)


TLJOB = [sys.executable, "-m", "tljob.cli"]
DRY_RUN = str(Path(__file__).resolve().parents[1] / "job" / "dry_run.yaml")


def test_feature_pass_longer_than_peer_timeout_does_not_trip_the_watchdog(tmp_path) -> None:
    # One worker, thousands of validation images: the once-per-phase feature pass takes several times
    # runtime.peer_timeout_s. It used to end in exit 75 ("a peer is probably dead"), on every restart.
    args = ["train", "--config", DRY_RUN, "--output", str(tmp_path / "run"),
            "--set", "runtime.peer_timeout_s=2", "--set", "data.synthetic.train_examples=64",
            "--set", "data.synthetic.validation_examples=6000", "--set", "data.synthetic.test_examples=0",
            "--set", "train.feature_extraction.epochs=1", "--set", "train.fine_tuning.epochs=0"]
    out = subprocess.run([*TLJOB, *args], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    took = float(re.search(r"cached validation: feature pass: finished in ([\d.]+) s", out.stderr).group(1))
    assert took > 2 * 2, f"the feature pass took {took} s: too short to prove anything; add validation images"
    assert "no progress" not in out.stderr
    assert (tmp_path / "run" / "_SUCCESS").is_file()


# --- SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_sets_flag_and_the_trainer_exits_75() -> None:
    proc = start("""
term = GracefulTermination(grace_s=20)
term.install()
say("ready")
while not term.requested:
    time.sleep(0.02)
say("requested")
sys.exit(75)  # what the trainer does once its backup is saved
""")
    wait_for(proc, "ready")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, ended, err = finish(proc, 10)
    assert code == EXIT_RETRYABLE, err
    assert ended - sent < 2.0
    assert "SIGTERM: saving a backup at the next batch end" in err


def test_second_sigterm_exits_75_at_once() -> None:
    proc = start("""
term = GracefulTermination(grace_s=30)
term.install()
say("ready")
while not term.requested:
    time.sleep(0.02)
say("requested")
time.sleep(30)  # a backup that takes too long
""")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    wait_for(proc, "requested")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, ended, err = finish(proc, 10)
    assert code == EXIT_RETRYABLE, err
    assert ended - sent < 2.0
    assert "second SIGTERM" in err


def test_grace_expiry_exits_75_while_main_thread_never_runs_python() -> None:
    # The main thread blocks SIGTERM and sleeps: its Python handler cannot run, as when it is stuck
    # in a collective. The wake-up fd reader must still see the signal and start the grace timer.
    proc = start("""
term = GracefulTermination(grace_s=1.0)
term.install()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
say("ready")
time.sleep(30)
say("not reached")
""")
    wait_for(proc, "ready")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, ended, err = finish(proc, 15)
    assert code == EXIT_RETRYABLE, err
    assert 1.0 <= ended - sent < 3.0
    assert "no exit 1 s after SIGTERM" in err


def test_uninstall_restores_the_previous_handler() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    term = GracefulTermination(grace_s=5)
    term.install()
    assert signal.getsignal(signal.SIGTERM) is not previous
    term.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.set_wakeup_fd(-1) == -1
    assert not term.requested


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_sigterm_in_keras_fit_saves_backup_and_exits_75(tmp_path, steps_per_execution: int) -> None:
    marker = tmp_path / "backup"
    proc = start(f"""
import tljob
import numpy as np
import tensorflow as tf
from tljob.errors import TljobError
from tljob.faults import StopCheck
from tljob.callbacks import FaultCallback
dog = Watchdog(30)
dog.arm()
term = GracefulTermination(grace_s=20)
term.install()
model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(4,))])
model.compile("sgd", "mse", steps_per_execution={steps_per_execution})
data = tf.data.Dataset.from_tensors((np.zeros(4, "float32"), np.zeros(2, "float32"))).repeat().batch(2)
class Started(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch >= 5 and not hasattr(self, "said"):
            self.said = say("training")
def save_backup():
    open({str(marker)!r}, "w").write("saved")
try:
    # Every 10th call: with 2 steps per call the batch numbers are odd, and `batch % 10` was never 0.
    model.fit(data, steps_per_epoch=10**6, verbose=0,
              callbacks=[Started(), FaultCallback(dog, StopCheck(term, every_calls=10), save_backup)])
except TljobError as exc:
    logging.error("%s", exc)
    sys.exit(exc.exit_code)  # as cli.main does
""")
    wait_for(proc, "training")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc, 60)
    assert code == EXIT_RETRYABLE, err[-3000:]
    assert marker.read_text() == "saved"
    assert "backup is saved" in err


# --- peer failures --------------------------------------------------------------------------------


def test_peer_failure_classification() -> None:
    import tljob  # noqa: F401 - selects tf-keras before TensorFlow loads
    import tensorflow as tf

    assert is_peer_failure(tf.errors.UnavailableError(None, None, "Connection reset by peer"))
    assert is_peer_failure(tf.errors.DeadlineExceededError(None, None, "Collective has timed out"))
    assert is_peer_failure(tf.errors.InternalError(None, None, "Collective ops is aborted by: ..."))
    assert not is_peer_failure(tf.errors.InternalError(None, None, "Blas GEMM launch failed"))
    assert not is_peer_failure(tf.errors.InvalidArgumentError(None, None, "Incompatible shapes"))
    assert not is_peer_failure(ValueError("bad"))
    try:
        try:
            raise tf.errors.AbortedError(None, None, "aborted")
        except tf.errors.AbortedError as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as outer:
        assert is_peer_failure(outer)


def test_peer_failure_check_does_not_import_tensorflow() -> None:
    code = ("import sys; from tljob.faults import is_peer_failure; "
            "print(is_peer_failure(ValueError()), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split() == ["False", "False"]


PEER = """
import json, logging, os, signal, sys, time
import tljob
from tljob import cluster
from tljob.faults import is_peer_failure
spec = cluster.resolve_cluster(os.environ)
strategy = cluster.create_strategy(spec, "auto")
import tensorflow as tf
@tf.function
def all_reduce():  # a vector, so that the ring has a receive from worker 1 in flight when it dies
    return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.ones([4096])), axis=None)
all_reduce()  # both workers are up and in step
if spec.task_index == 1:
    time.sleep(1.0)  # worker 0 is now waiting inside the next collective
    os.kill(os.getpid(), signal.SIGKILL)
start = time.monotonic()
try:
    all_reduce()
    print("RESULT " + json.dumps({"error": None}), flush=True)
except Exception as exc:  # the test reports whatever TensorFlow raised
    print("RESULT " + json.dumps({"error": type(exc).__name__, "peer": is_peer_failure(exc),
                                  "after_s": time.monotonic() - start}), flush=True)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.multiworker
@pytest.mark.timeout(90)
def test_killed_peer_is_a_peer_failure_for_real() -> None:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CONFIG", "JOB_COMPLETION_INDEX", "CLUSTER_SPEC") and not k.startswith("TLJOB_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PEER],
            env={**env, "TF_CONFIG": json.dumps({"cluster": {"worker": addresses},
                                                 "task": {"type": "worker", "index": i}})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        (out, err), _ = [p.communicate(timeout=75) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert "RESULT " in out, err[-3000:]
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["error"] == "UnavailableError"
    assert result["peer"] is True
    # Worker 1 dies 1 s into the collective: the reset connection is seen at once, long before
    # the 10 s heartbeat timeout.
    assert result["after_s"] < 8


TERM_ONE = """
import logging, os, sys
import tljob
from tljob import cluster
from tljob.errors import TljobError
from tljob.faults import GracefulTermination, StopCheck, Watchdog
from tljob.callbacks import FaultCallback
logging.basicConfig(level=logging.INFO)
spec = cluster.resolve_cluster(os.environ)
strategy = cluster.create_strategy(spec, "auto")
term = GracefulTermination(grace_s=20)
term.install()
import numpy as np
import tensorflow as tf
with strategy.scope():
    model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(4,))])
    model.compile("sgd", "mse")
data = tf.data.Dataset.from_tensors((np.zeros(4, "float32"), np.zeros(2, "float32"))).repeat().batch(2)
class Started(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 20:
            print("training", flush=True)
def save_backup():
    open(os.environ["MARKER"], "w").write("saved")
dog = Watchdog(30)
dog.arm()
callback = FaultCallback(dog, StopCheck(term, cluster.make_any_worker(strategy), every_calls=10), save_backup)
try:
    model.fit(data, steps_per_epoch=10**6, verbose=0, callbacks=[Started(), callback])
except TljobError as exc:
    logging.error("%s", exc)
    sys.exit(exc.exit_code)
"""


@pytest.mark.multiworker
@pytest.mark.timeout(90)
def test_sigterm_to_one_worker_stops_both_at_the_same_batch(tmp_path) -> None:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CONFIG", "JOB_COMPLETION_INDEX", "CLUSTER_SPEC") and not k.startswith("TLJOB_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TERM_ONE],
            env={**env, "MARKER": str(tmp_path / f"backup{i}"),
                 "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        wait_for(procs[1], "training")
        procs[1].send_signal(signal.SIGTERM)  # as when Kubernetes evicts one pod
        errors = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [EXIT_RETRYABLE, EXIT_RETRYABLE], errors[0][-2000:] + errors[1][-2000:]
    assert [(tmp_path / f"backup{i}").read_text() for i in range(2)] == ["saved", "saved"]
    stops = [err.split("termination requested", 1)[1].split(":", 1)[0] for err in errors]
    assert stops[0] == stops[1]  # " (SIGTERM here or on a peer) at batch N" on both
