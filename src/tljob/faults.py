"""Bounded exits when a multi-worker run cannot go on: a dead or frozen peer, or SIGTERM.

A collective whose peer died or froze blocks inside TensorFlow's C++ runtime, where no Python
exception can reach it; the only way out in bounded time is ``os._exit`` from another thread. Every
such exit uses the retryable code 75, so Kubernetes restarts the pods and they resume from the
last backup (see errors.py).

Runs in every worker process; TensorFlow and Keras are imported only inside the functions that
need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator, NoReturn

from tljob.errors import EXIT_RETRYABLE, ConfigError

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 25.0  # under Kubernetes' default terminationGracePeriodSeconds (30 s)
# A stage with collectives and no progress reports (model build, a backup, the first step's tracing) may take
# this many peer timeouts, at least the minimum: long enough for the real MobileNetV2 on two CPU workers (tens
# of seconds), and still a bound, so a collective blocked on a dead peer ends in exit 75 when TensorFlow never
# raises.
STAGE_ALLOWANCE_FACTOR = 4
MIN_STAGE_ALLOWANCE_S = 120.0
PROGRESS_LOG_S = 10.0  # how often a long stage logs how far it got
# InternalError and UnknownError mean a peer failure only when they come from the cluster's plumbing.
_PEER_TEXT = re.compile(r"collective|coordination|heartbeat|grpc|connection reset|socket closed", re.IGNORECASE)


def _hard_exit(message: str, *args: object) -> NoReturn:
    """Logs CRITICAL and ends the process now with code 75, without unwinding a main thread that may be stuck."""
    log.critical(message, *args)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_RETRYABLE)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: invalid value {value!r}. Fix: use a positive number of seconds.")


class Watchdog:
    """Exits the process with code 75 when the job made no progress for too long while armed.

    The thread starts at construction, disarmed; the trainer arms it for the whole run. What counts as
    too long depends on the stage the job is in (`working` says which limit each kind of stage gets):
    `timeout_s` between beats while training, where every batch end beats (train and validation). A beat
    is one float store, cheap enough for every batch.
    """

    def __init__(self, timeout_s: float, allowance_s: float | None = None) -> None:
        _positive("runtime.peer_timeout_s", timeout_s)
        self.timeout_s = timeout_s
        self.allowance_s = (max(STAGE_ALLOWANCE_FACTOR * timeout_s, MIN_STAGE_ALLOWANCE_S) if allowance_s is None
                            else allowance_s)
        _positive("allowance_s", self.allowance_s)
        # Plain attributes: single stores and loads are atomic under the GIL; no lock on the step path.
        # _stages is an immutable tuple of (name, limit in s or None), replaced whole, innermost last.
        self._last_beat = time.monotonic()
        self._stages: tuple[tuple[str, float | None], ...] = (("the run", timeout_s),)
        self._armed = False
        self._closed = threading.Event()
        # Checking ten times per timeout bounds the exit at 1.1 x the limit.
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

    def enter(self, stage: str, limit_s: float | None) -> int:
        """Starts a stage with its own limit between beats (None: none); returns the depth to `leave`."""
        depth = len(self._stages)
        self._stages = (*self._stages, (stage, limit_s))
        self.beat()
        return depth

    def leave(self, depth: int) -> None:
        """Ends the stage `enter` returned `depth` for, and any stage entered inside it."""
        self._stages = self._stages[:depth]
        self.beat()

    @contextlib.contextmanager
    def working(self, stage: str, *, collectives: bool, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A long stage that is not a training step; yields `progress(done)`, which beats and logs.

        collectives=True: the stage may wait on peers (model build, a backup, a weights file, a test
        evaluation), so it gets `allowance_s` in all, progress or not. collectives=False: a local stage
        (the feature pass, export, a storage transfer with its own deadline); with `total` it gets
        `allowance_s` up to its first `progress` call (the first batch traces the stage's tf.functions)
        and `timeout_s` between calls after that; without `total` there is no limit. Runs on every worker.
        """
        limit = self.allowance_s if collectives or total is not None else None
        started = last_log = time.monotonic()
        log.debug("%s: started", stage)
        first = True

        def progress(done: int) -> None:
            nonlocal last_log, first
            if not collectives:
                if first:
                    first = False
                    self._stages = (*self._stages[:depth], (stage, self.timeout_s), *self._stages[depth + 1:])
                self.beat()  # a stage with collectives must end within its allowance, progress or not
            now = time.monotonic()
            if now - last_log >= PROGRESS_LOG_S:
                last_log = now
                log.info("%s: %d of %s done after %.0f s", stage, done, total if total is not None else "?",
                         now - started)

        depth = self.enter(stage, limit)
        try:
            yield progress
        finally:
            self.leave(depth)
        took = time.monotonic() - started
        log.log(logging.INFO if took >= 1.0 else logging.DEBUG, "%s: finished in %.1f s", stage, took)

    def close(self) -> None:
        """Stops the thread (end of the run, or tests)."""
        self._closed.set()
        self._thread.join()

    def _watch(self) -> None:
        reported = 0.0  # the idle time last reported, so a long quiet stage is logged every PROGRESS_LOG_S
        while not self._closed.wait(self._poll_s):
            stage, limit = self._stages[-1]
            idle = time.monotonic() - self._last_beat
            if idle < reported:
                reported = 0.0
            if self._armed and idle - reported >= PROGRESS_LOG_S:
                reported = idle
                log.info("%s: still working, %.0f s since the last progress (limit %s)", stage, idle,
                         "none" if limit is None else f"{limit:.0f} s")
            if self._armed and limit is not None and idle > limit:
                _hard_exit("no progress in %s for %.0f s (limit %g s): a peer is probably dead or frozen; exiting with "
                           "retryable code %d", stage, idle, limit, EXIT_RETRYABLE)


class GracefulTermination:
    """SIGTERM handling: ask the trainer to save a backup and exit, and force the exit if it cannot.

    The first SIGTERM sets `requested`; the trainer's batch-end callback sees it, saves a backup and
    exits with 75. A second SIGTERM, or `grace_s` passing, exits with 75 at once.

    The signal is noticed by a helper thread reading Python's signal wake-up fd, not by the Python
    handler: that handler only runs when the main thread executes bytecode, and a main thread blocked
    in a collective whose peer is gone never does. As PID 1 of a container the process would ignore
    SIGTERM without a handler; this one is always installed.
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        _positive("runtime.termination_grace_s", grace_s)
        self.grace_s = grace_s
        # Set by the reader thread, read at batch ends: a single store, atomic under the GIL.
        self.requested = False
        self._timer: threading.Timer | None = None
        self._pipe: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None
        self._previous_handler: Callable[[int, FrameType | None], Any] | int = signal.SIG_DFL

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
        if self.requested:  # the second SIGTERM
            _hard_exit("second SIGTERM: exiting now with retryable code %d", EXIT_RETRYABLE)
        self.requested = True
        log.warning("SIGTERM: saving a backup at the next batch end, then exiting with code %d "
                    "(forced after %.0f s)", EXIT_RETRYABLE, self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        _hard_exit("no exit %.0f s after SIGTERM (backup not finished?): exiting now with "
                   "retryable code %d", self.grace_s, EXIT_RETRYABLE)


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


class StopCheck:
    """Decides at a batch end whether to stop for SIGTERM: True on every worker when any got one.

    Runs on every worker, once per `on_train_batch_end` call. With `train.steps_per_execution` N,
    Keras calls that hook once per N steps with the execution's last step index, so batch numbers
    are not a usable clock (with N=2 a test of `batch % 10` never passes): this counts calls, which
    are the same on every worker, and asks every `every_calls`-th one.

    agree: by default this worker decides alone (right for one worker). In a multi-worker run pass
    `cluster.make_any_worker(strategy)`, so that all workers stop at the same batch when any of them
    got SIGTERM (one worker saving alone would deadlock the others' collectives). That is an
    all-reduce, hence `every_calls`.
    """

    def __init__(self, termination: GracefulTermination, agree: Callable[[bool], bool] = bool,
                 every_calls: int = 1) -> None:
        if every_calls < 1:
            raise ConfigError(f"every_calls: invalid value {every_calls!r}. Fix: use 1 or more.")
        self.termination = termination
        self.agree = agree
        self.every_calls = every_calls
        self._calls = 0

    def should_stop(self) -> bool:
        self._calls += 1
        if self._calls % self.every_calls:
            return False
        return self.agree(self.termination.requested)


def calls_between_checks(steps_per_execution: int, num_workers: int, steps: int = 10) -> int:
    """Batch-end calls between SIGTERM checks: about every `steps` steps with several workers (the
    agreement is an all-reduce), every call with one."""
    if num_workers == 1:
        return 1
    return max(1, -(-steps // steps_per_execution))
