"""Bounded exits, checked on real subprocesses: the watchdog, SIGTERM handling, peer-failure classification."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tljob.errors import EXIT_RETRYABLE, ConfigError
from tljob.faults import GracefulTermination, Watchdog, is_peer_failure

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
    assert "no training progress for 1 s: a peer is probably dead or frozen; exiting with retryable code 75" in err


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
    assert "no training progress" not in err


def test_watchdog_rejects_non_positive_timeout() -> None:
    with pytest.raises(ConfigError, match="runtime.peer_timeout_s"):
        Watchdog(0)


# --- SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_sets_flag_and_the_trainer_exits_75() -> None:
    proc = start("""
term = GracefulTermination(grace_s=20)
term.install()
say("ready")
while not term.requested:
    time.sleep(0.02)
say("requested %.3f" % (time.monotonic() - term.requested_at))
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


def test_sigterm_in_keras_fit_saves_backup_and_exits_75(tmp_path) -> None:
    marker = tmp_path / "backup"
    proc = start(f"""
import tljob
import numpy as np
import tensorflow as tf
from tljob.errors import TljobError
from tljob.faults import fault_callback
dog = Watchdog(30)
term = GracefulTermination(grace_s=20)
term.install()
model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(4,))])
model.compile("sgd", "mse")
data = tf.data.Dataset.from_tensors((np.zeros(4, "float32"), np.zeros(2, "float32"))).repeat().batch(2)
class Started(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 5:
            say("training")
def save_backup():
    open({str(marker)!r}, "w").write("saved")
try:
    model.fit(data, steps_per_epoch=10**6, verbose=0,
              callbacks=[Started(), fault_callback(dog, term, save_backup, check_every_batches=2)])
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
from tljob.faults import GracefulTermination, Watchdog, fault_callback
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
callback = fault_callback(Watchdog(30), term, save_backup, cluster.make_any_worker(strategy), check_every_batches=10)
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
