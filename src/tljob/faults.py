"""Bounded exits when a multi-worker run cannot go on: a dead or frozen peer, or SIGTERM.

A collective whose peer died or froze blocks inside TensorFlow's C++ runtime, where no Python
exception can reach it; the only way out in bounded time is ``os._exit`` from another thread. Every
such exit uses the retryable code 75, so Kubernetes restarts the pods and they resume from the
last backup (see errors.py).

Runs in every worker process; TensorFlow and Keras are imported only inside the functions that
need them.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from tljob.errors import EXIT_RETRYABLE, ConfigError, RetryableError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 25.0  # under Kubernetes' default terminationGracePeriodSeconds (30 s)
# InternalError and UnknownError mean a peer failure only when they come from the cluster's plumbing.
_PEER_TEXT = re.compile(r"collective|coordination|heartbeat|grpc|connection reset|socket closed", re.IGNORECASE)


def _hard_exit(code: int, message: str, *args: object) -> NoReturn:
    """Logs CRITICAL and ends the process now, without unwinding a main thread that may be stuck."""
    log.critical(message, *args)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: invalid value {value!r}. Fix: use a positive number of seconds.")


class Watchdog:
    """Exits the process with `exit_code` when no progress was reported for `timeout_s` while armed.

    The thread starts at construction, disarmed; `arm()` before training, `beat()` on every batch
    end (train and validation), `disarm()` around slow phases that are not steps (model building,
    export). A beat is one float store, cheap enough for every batch.
    """

    def __init__(self, timeout_s: float, exit_code: int = EXIT_RETRYABLE) -> None:
        _positive("runtime.peer_timeout_s", timeout_s)
        self.timeout_s = timeout_s
        self.exit_code = exit_code
        # Plain attributes: single stores and loads are atomic under the GIL; no lock on the step path.
        self._last_beat = time.monotonic()
        self._armed = False
        self._closed = threading.Event()
        # Checking ten times per timeout bounds the exit at 1.1 x timeout_s.
        self._poll_s = min(1.0, timeout_s / 10)
        self._thread = threading.Thread(target=self._watch, name="tljob-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def arm(self) -> None:
        self._last_beat = time.monotonic()
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    def close(self) -> None:
        """Stops the thread (end of the run, or tests)."""
        self._closed.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._closed.wait(self._poll_s):
            idle = time.monotonic() - self._last_beat
            if self._armed and idle > self.timeout_s:
                _hard_exit(
                    self.exit_code,
                    "no training progress for %.0f s: a peer is probably dead or frozen; "
                    "exiting with retryable code %d",
                    idle,
                    self.exit_code,
                )


class GracefulTermination:
    """SIGTERM handling: ask the trainer to save a backup and exit, and force the exit if it cannot.

    The first SIGTERM sets `requested`; the trainer's batch-end callback sees it, saves a backup and
    exits with 75. A second SIGTERM, or `grace_s` passing, exits with 75 at once.

    The signal is noticed by a helper thread reading Python's signal wake-up fd, not by the Python
    handler: that handler only runs when the main thread executes bytecode, and a main thread blocked
    in a collective whose peer is gone never does. As PID 1 of a container the process would ignore
    SIGTERM without a handler; this one is always installed.
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, exit_code: int = EXIT_RETRYABLE) -> None:
        _positive("runtime.termination_grace_s", grace_s)
        self.grace_s = grace_s
        self.exit_code = exit_code
        self._requested = threading.Event()
        self._requested_at: float | None = None
        self._count = 0
        self._timer: threading.Timer | None = None
        self._pipe: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None
        self._previous_handler: Callable[[int, FrameType | None], Any] | int = signal.SIG_DFL

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def requested_at(self) -> float | None:
        """time.monotonic() of the first SIGTERM, or None."""
        return self._requested_at

    def install(self) -> None:
        """Installs the handler; call from the main thread (Python's rule for signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulTermination.install() must run in the main thread (Python signal rule)")
        if self._pipe is not None:
            raise RuntimeError("GracefulTermination.install() called twice; call uninstall() first")
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # required by set_wakeup_fd: a full pipe must not block the handler
        previous_wakeup = signal.set_wakeup_fd(write_fd)
        if previous_wakeup != -1:
            signal.set_wakeup_fd(previous_wakeup)
            os.close(read_fd)
            os.close(write_fd)
            raise RuntimeError(
                f"signal wake-up fd already set to {previous_wakeup} (an asyncio loop?): "
                "GracefulTermination needs it; install it before any event loop starts"
            )
        previous = signal.signal(signal.SIGTERM, _leave_to_reader)
        # None means a handler installed outside Python; SIG_DFL is the closest thing to restore.
        self._previous_handler = signal.SIG_DFL if previous is None else previous
        self._pipe = (read_fd, write_fd)
        self._reader = threading.Thread(target=self._read_signals, args=(read_fd,), name="tljob-sigterm",
                                        daemon=True)
        self._reader.start()

    def uninstall(self) -> None:
        """Restores the previous SIGTERM handler and stops the helper threads."""
        if self._pipe is None:
            return
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, self._previous_handler)
        read_fd, write_fd = self._pipe
        os.close(write_fd)  # the reader sees end-of-file and returns
        if self._reader is not None:
            self._reader.join()
        os.close(read_fd)
        if self._timer is not None:
            self._timer.cancel()
        self._pipe = self._reader = self._timer = None

    def _read_signals(self, read_fd: int) -> None:
        while data := os.read(read_fd, 64):
            for signum in data:
                if signum == signal.SIGTERM:
                    self._on_sigterm()

    def _on_sigterm(self) -> None:
        self._count += 1
        if self._count > 1:
            _hard_exit(self.exit_code, "second SIGTERM: exiting now with retryable code %d", self.exit_code)
        self._requested_at = time.monotonic()
        self._requested.set()
        log.warning("SIGTERM: saving a backup at the next batch end, then exiting with code %d "
                    "(forced after %.0f s)", self.exit_code, self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        _hard_exit(self.exit_code, "no exit %.0f s after SIGTERM (backup not finished?): exiting now with "
                   "retryable code %d", self.grace_s, self.exit_code)


def _leave_to_reader(signum: int, frame: FrameType | None) -> None:
    """Python-level SIGTERM handler: nothing to do, the wake-up fd reader acts on the signal.

    A Python handler must still be installed: with the default action SIGTERM kills the process
    at once, and with SIG_IGN nothing is written to the wake-up fd.
    """


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) means a peer died, froze or left the cluster.

    Seen on TF 2.21 with MultiWorkerMirroredStrategy on loopback: a SIGKILLed peer gives
    UnavailableError ("Connection reset by peer") within a second mid-step, a frozen (SIGSTOPped)
    or dead idle peer UnavailableError ("stopped sending heartbeats") after the coordination
    heartbeat timeout, an expired collective timeout DeadlineExceededError. Aborted and Cancelled
    are how the other ops of an aborted step end. Transient gs:// outages raise Unavailable and
    DeadlineExceeded too, and are retryable for the same reason.
    """
    if "tensorflow" not in sys.modules:
        return False  # TensorFlow's errors exist only once it is imported; do not pay 3 s to learn that
    import tensorflow as tf

    always = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
              tf.errors.CancelledError)
    by_text = (tf.errors.InternalError, tf.errors.UnknownError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, always):
            return True
        if isinstance(current, by_text) and _PEER_TEXT.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def fault_callback(
    watchdog: Watchdog | None,
    termination: GracefulTermination | None,
    on_terminate: Callable[[], None],
    agree: Callable[[bool], bool] = bool,
    check_every_batches: int = 1,
) -> tf.keras.callbacks.Callback:
    """A Keras callback that feeds the watchdog and turns a termination request into a backup + exit 75.

    agree: by default this worker decides alone (right for one worker). In a multi-worker run pass
    `cluster.make_any_worker(strategy)`, so that all workers stop at the same batch when any of them
    got SIGTERM (one worker saving alone would deadlock the others' collectives). That is an
    all-reduce (about 3.5 ms on loopback), hence `check_every_batches`, e.g. 10: the batch numbers
    are the same on every worker, so all of them call it together.
    """
    import tensorflow as tf

    if check_every_batches < 1:
        raise ConfigError(f"check_every_batches: invalid value {check_every_batches!r}. Fix: use 1 or more.")

    class FaultCallback(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            if watchdog is not None:
                watchdog.arm()

        def on_train_end(self, logs: dict | None = None) -> None:
            if watchdog is not None:
                watchdog.disarm()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._beat()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self._beat()

        def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self._beat()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self._beat()
            if termination is None or batch % check_every_batches:
                return
            if agree(termination.requested):
                log.warning("termination requested (SIGTERM here or on a peer) at batch %d: saving a backup",
                            batch)
                on_terminate()
                raise RetryableError(
                    f"stopped at batch {batch} after SIGTERM (here or on a peer); the backup is saved and a "
                    "restarted job resumes from it"
                )

        def _beat(self) -> None:
            if watchdog is not None:
                watchdog.beat()

    return FaultCallback()
