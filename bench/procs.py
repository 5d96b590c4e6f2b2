"""Starting measured processes and reading their events: the benchmark's process tree.

Every measured program runs as a child of the benchmark, one at a time unless a figure needs several
(multi-worker), so each figure and its baseline see the same machine in the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench import events

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# Variables that would change which Keras or which cluster a child sees.
_CHILD_DROP = ("TF_CONFIG", "JOB_COMPLETION_INDEX", "CLUSTER_SPEC", "TF_USE_LEGACY_KERAS")


class MeasuredProcessError(RuntimeError):
    """A measured process failed: the benchmark has no figure for it."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished process: its wall time, its events (times relative to its start) and its output."""

    wall_s: float
    events: list[dict[str, Any]]
    stderr_tail: str


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CHILD_DROP and not k.startswith("TLJOB__")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return {**env, **(extra or {})}


def _pin(cores: Sequence[int] | None) -> Any:
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, set(cores))


@dataclasses.dataclass
class Started:
    """A running measured process; its output goes to files, so that two of them that wait on each other
    (multi-worker collectives) never block on a full pipe."""

    proc: subprocess.Popen[bytes]
    t0: float  # time.time() just before it started
    stdout: Any
    stderr: Any


def start(args: Sequence[str], *, env: Mapping[str, str] | None = None,
          cores: Sequence[int] | None = None) -> Started:
    """Starts `python args...` (pinned to `cores` if given)."""
    stdout, stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(env), stdout=stdout, stderr=stderr,
                            preexec_fn=_pin(cores))
    return Started(proc, t0, stdout, stderr)


def _read(file: Any) -> str:
    file.seek(0)
    text = file.read().decode(errors="replace")
    file.close()
    return text


def finish(started: Started, timeout_s: float, what: str) -> Run:
    proc = started.proc
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.wait()
        raise MeasuredProcessError(f"{what}: no result within {timeout_s:.0f} s; its stderr ends with:\n"
                                   f"{_read(started.stderr)[-3000:]}\nFix: see why it hangs, or give it more "
                                   f"time") from exc
    wall = time.time() - started.t0
    out, err = _read(started.stdout), _read(started.stderr)
    if proc.returncode != 0:
        raise MeasuredProcessError(f"{what}: exit code {proc.returncode}; its stderr ends with:\n{err[-3000:]}")
    found = [{**e, "t": e["t"] - started.t0} for e in events.parse(out)]
    return Run(wall, found, err[-2000:])


def run(args: Sequence[str], *, timeout_s: float, what: str, env: Mapping[str, str] | None = None,
        cores: Sequence[int] | None = None) -> Run:
    started = start(args, env=env, cores=cores)
    log.info("%s: started %s", what, " ".join(args[:3]))
    result = finish(started, timeout_s, what)
    log.info("%s: finished in %.1f s", what, result.wall_s)
    return result


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages: how busy the machine was around a measurement."""
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- reading events (pure)


def first(evts: list[dict], event: str, phase: str | None = None) -> dict:
    for e in evts:
        if e["event"] == event and (phase is None or e.get("phase") == phase):
            return e
    raise MeasuredProcessError(f"no {event!r} event{f' for phase {phase}' if phase else ''} in the run's output")


def last(evts: list[dict], event: str, phase: str | None = None) -> dict:
    return first(list(reversed(evts)), event, phase)


def phase_summary(evts: list[dict], phase: str, images_per_epoch: int) -> dict[str, Any]:
    """Wall time, per-step median, images/s (training steps only) and final metrics of one phase."""
    begin, end = first(evts, "phase_begin", phase), last(evts, "phase_end", phase)
    epochs = [e for e in evts if e["event"] == "epoch_end" and e["phase"] == phase]
    # Every epoch's first step waits for a new iterator and the phase's first traces the step: left out.
    steps = [s for e in epochs for s in e["step_s"][1:]]
    metrics = epochs[-1]["metrics"] if epochs else {}
    return {
        "seconds": round(end["t"] - begin["t"], 2),
        "cpu_cores_used": round((end["cpu_s"] - begin["cpu_s"]) / max(end["t"] - begin["t"], 1e-9), 2),
        "epochs": len(epochs),
        "epoch_seconds": [round(b["t"] - a["t"], 2) for a, b in zip([begin, *epochs], epochs)],
        "step_ms_median": round(statistics.median(steps) * 1000, 1) if steps else None,
        "images_per_second": round(images_per_epoch * len(epochs) / (end["t"] - begin["t"]), 1),
        "val_accuracy": metrics.get("val_accuracy"),
        "val_loss": metrics.get("val_loss"),
        "accuracy": metrics.get("accuracy"),
    }


def recipe_summary(result: Run, images_per_epoch: int, phases: Sequence[str]) -> dict[str, Any]:
    """Recipe wall time: from the process's start to the end of the last phase (imports, data loading,
    model building, every epoch and every validation included; exporting, which only tljob does, not)."""
    end = last(result.events, "phase_end", phases[-1])
    return {
        "recipe_seconds": round(end["t"], 2),
        "process_seconds": round(result.wall_s, 2),
        "first_step_seconds": round(first(result.events, "first_step")["t"], 2),
        "cpu_cores_used": round(end["cpu_s"] / end["t"], 2),
        "peak_memory_mb": round(end["max_rss_mb"], 0),
        "phases": {p: phase_summary(result.events, p, images_per_epoch) for p in phases},
    }
