"""What a person watching a run sees: log set-up, TensorFlow's chatter, the progress bar (whether; the bar
itself is drawn by callbacks.Progress, a Keras callback), the summary.

By default the console carries tljob's own lines and warnings and errors from anywhere; `-v` adds
tljob's debug lines and brings back everything TensorFlow and absl say (C++ INFO notices, the
Python loggers' INFO lines, tf-keras messages such as the SavedModel export's signature listing).
In a terminal the chief shows a progress bar per epoch; in a pod's log (no TTY) each epoch is one
line, and long stages without steps log a heartbeat (faults.Watchdog.working).

Imported by cli.py before TensorFlow (TF_CPP_MIN_LOG_LEVEL is read when TensorFlow loads), so
nothing here imports TensorFlow at module level (nor anything that does).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of libraries whose INFO lines are about their own plumbing (absl: "Sharding callback
# duration" every epoch; tensorflow: "Collective all_reduce tensors", "Assets written to").
_LIBRARY_LOGGERS = ("absl", "tensorflow")
# C++ lines TensorFlow writes before absl::InitializeLog(), which TF_CPP_MIN_LOG_LEVEL does not filter:
# absl's notice itself and INFO lines (oneDNN, "Could not find cuda drivers").
_NATIVE_NOTICE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] )")
_CUINIT_FAILED = re.compile(rb"^E\d{4} .*failed call to cuInit")
_NVIDIA_DRIVER = (Path("/proc/driver/nvidia"), Path("/dev/nvidiactl"))

log = logging.getLogger(__name__)
_verbose = False


class _QuietLibraries(logging.Filter):
    """Passes library loggers' records only from WARNING up (a handler filter: the loggers themselves are
    left alone, since absl creates its own logger class when it is first imported), less tf-keras' callback
    timing warning: it compares the callbacks' first batches (the first backup-step write, the end of the
    tracing stage: one-off costs) with the steps, and on the millisecond steps of a phase trained on cached
    features (train.<phase>.cache_features) it always fires, whatever the callbacks cost afterwards."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "tensorflow" and record.getMessage().startswith("Callback method `on_train_batch_end` is slow"):
            return False
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in _LIBRARY_LOGGERS


class _BarAwareHandler(logging.StreamHandler):
    """In a terminal: writes each line above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        # As logging.StreamHandler.emit: a failing log line must not stop training; handleError prints the
        # record and the traceback to stderr, so the failure is reported, not swallowed.
        except Exception:  # noqa: BLE001
            self.handleError(record)


def setup(verbose: bool) -> None:
    """Logging to stderr (stdout is the result of predict, evaluate and convert) and TensorFlow's verbosity.

    Runs before TensorFlow is imported. `verbose` restores TensorFlow's own C++ log level (0: everything)
    over tljob's default of 1 (tljob/__init__.py: no INFO notices).
    """
    global _verbose
    _verbose = verbose
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        # absl's logger falls to WARNING (its verbosity flag's default) when TensorFlow first reads absl's
        # flags, in the SavedModel export; the flag set here is what that applies instead.
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.DEBUG)
    handler = _BarAwareHandler(sys.stderr) if sys.stderr.isatty() else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if not verbose:
        handler.addFilter(_QuietLibraries())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _nvidia_driver_present() -> bool:
    return any(p.exists() for p in _NVIDIA_DRIVER)


def is_native_notice(line: bytes, *, driver: bool) -> bool:
    """A C++ start-up line that says nothing to a user. A failed cuInit is noise on a machine without an
    NVIDIA driver (TensorFlow probes CUDA everywhere) and kept where a driver is there: then it is real."""
    return bool(_NATIVE_NOTICE.match(line)) or (not driver and bool(_CUINIT_FAILED.match(line)))


@contextlib.contextmanager
def _filtered_stderr(drop: Callable[[bytes], bool]) -> Iterator[None]:
    """File descriptor 2 through a pipe whose lines are forwarded at once unless `drop` says so.

    The C++ runtime writes to the descriptor, not to sys.stderr. Scoped to TensorFlow's start-up: a
    line still in the pipe when the process dies (a C++ CHECK failure aborts) would be lost.
    """
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as src, os.fdopen(os.dup(original), "wb", buffering=0) as dst:
            for line in src:
                if not drop(line):
                    dst.write(line)

    pump = threading.Thread(target=forward, name="tljob-stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump reads to its end and stops
        os.close(original)
        pump.join()


def import_tensorflow() -> None:
    """Imports TensorFlow and lets it probe its devices (where cuInit fails on a CPU machine), with the
    C++ start-up notices left out of stderr unless verbose. Listing physical devices does not initialise
    the runtime: a distribution strategy can still configure it afterwards."""
    if _verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401 - the import is the point
        return
    driver = _nvidia_driver_present()
    with _filtered_stderr(functools.partial(is_native_notice, driver=driver)):
        import tensorflow as tf

        tf.config.list_physical_devices()


@contextlib.contextmanager
def keras_messages_to_log() -> Iterator[None]:
    """tf-keras's messages (the SavedModel export's listing of every endpoint's TensorSpecs, hundreds of
    lines) go to absl's logger at INFO instead of stdout: shown with -v only. The switch is per thread."""
    import tf_keras

    was = tf_keras.utils.is_interactive_logging_enabled()
    tf_keras.utils.disable_interactive_logging()
    try:
        yield
    finally:
        if was:
            tf_keras.utils.enable_interactive_logging()


# ----------------------------------------------------------------------------- progress bar


def wants_progress_bar(chief: bool) -> bool:
    """Whether this worker shows the per-epoch bar (callbacks.Progress): the chief when stderr is a terminal;
    a pod's log gets the one line per epoch of the trainer instead. Only the chief: workers sharing a terminal
    (a local multi-worker run) would draw over each other's bars, and every worker's bar would show the same
    steps."""
    return chief and sys.stderr.isatty()


# ----------------------------------------------------------------------------- summary


def _figures(record: dict, prefix: str = "") -> str:
    return " ".join(f"{k}={record[prefix + k]:.4f}" for k in ("loss", "accuracy") if prefix + k in record)


def summary_lines(output: str, metrics: dict, history: list[dict]) -> list[str]:
    """The end of a run in a few lines (pure): where it is, each phase's last-epoch metrics and epoch time,
    the test metrics, bad files. metrics is what metrics.json holds; history what history.json holds."""
    from tljob.rundir import CURVES, HISTORY, METRICS  # here: cli.py imports this module first, for --help too

    lines = [f"summary of run {output} (model/, {METRICS}, {HISTORY}, {CURVES} there):"]
    for phase in dict.fromkeys(h["phase"] for h in history):
        recs = [h for h in history if h["phase"] == phase]
        last = recs[-1]
        seconds = sum(h.get("seconds", 0.0) for h in recs)
        lines.append(f"  {phase}: epochs {recs[0]['epoch']}-{last['epoch']} in {seconds:.1f} s, "
                     f"train {_figures(last)}, validation {_figures(last, 'val_') or '-'}")
    test = metrics.get("test") or {}
    lines.append(f"  test: {_figures(test, 'test_') or 'no test split'}")
    bad = metrics.get("bad_file_names") or []
    named = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more ({METRICS})" if len(bad) > 3 else "")
    lines.append(f"  bad files: {len(bad)} of {metrics.get('total_files')}" + (f": {named}" if bad else ""))
    return lines


def log_summary(output: str, metrics: dict, history: list[dict]) -> None:
    for line in summary_lines(output, metrics, history):
        log.info("%s", line)
