"""The one protocol between the benchmark and the processes it measures: timestamped event lines.

A measured process prints `BENCH_EVENT {"event": ..., "t": <time.time()>, ...}` lines on stdout; the
benchmark, on the same machine and clock, subtracts the time it started the process. Every event carries
the process's own CPU seconds and peak resident memory so far, so CPU use and memory are known at any
point of the run (the recipe's end, not the process's end, which for tljob includes exporting).
No TensorFlow here: both Keras 3 (the tutorial baseline) and tf-keras (tljob) processes import it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

PREFIX = "BENCH_EVENT "


def emit(event: str, **fields: Any) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {"event": event, "t": time.time(), "cpu_s": usage.ru_utime + usage.ru_stime,
              "max_rss_mb": usage.ru_maxrss / 1024, **fields}
    # A leading newline: Keras' progress bar may have left its line unfinished on stdout.
    sys.stdout.write("\n" + PREFIX + json.dumps(record) + "\n")
    sys.stdout.flush()


def parse(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line[len(PREFIX):]) for line in stdout.splitlines() if line.startswith(PREFIX)]


def make_callback(base: type, phase: str) -> Any:
    """A Keras callback (of the given Keras' Callback class) emitting phase, step and epoch events.

    Step events: the first step's end (time to first step) and each step end, kept as durations in one
    list per epoch, emitted with the epoch, so the hot loop does one perf_counter call per step.
    """

    class EventCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._first = True
            self._last = 0.0
            self._steps: list[float] = []

        def on_train_begin(self, logs: dict | None = None) -> None:
            emit("phase_begin", phase=phase)

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._steps = []
            self._last = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            now = time.perf_counter()
            self._steps.append(now - self._last)
            self._last = now
            if self._first:
                self._first = False
                emit("first_step", phase=phase)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            emit("epoch_end", phase=phase, epoch=epoch + 1, metrics=metrics, step_s=self._steps)

        def on_train_end(self, logs: dict | None = None) -> None:
            emit("phase_end", phase=phase)

    return EventCallback()
