"""The fault-injection matrix: real faults to real 2-worker `tljob train` runs of the dry-run config.

Each case ends either in a finished run with the epochs, phases and replicas of an uninterrupted run, or
in the documented exit code with nothing half-written in the output (no `_SUCCESS`, no partial final
objects). To stay fast on 2 cores the cases share runs: each test is one run that takes several faults
in a row, one per attempt, and is then resumed to the end. Cases covered elsewhere and not repeated:
SIGKILL in phase 2 with a resume from the bucket and SIGSTOP in phase 1 (test_multiworker.py), SIGTERM
with one and two steps per call (test_multiworker.py), storage outages and interrupted publishes at the
storage level (test_storage.py).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest

from gcs_fault_proxy import FaultProxy
from test_multiworker import (BOUND_S, DRY_RUN, SHORT, Workers, assert_chief_only_outputs, digests, history,
                              tf_config_envs, wait_until)
from tljob import rundir, storage
from tljob.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRYABLE

pytestmark = pytest.mark.multiworker

FE, FT = 3, 2  # epochs per phase
# Eight steps per epoch (the stream is endless) give each epoch time for a fault to land inside it.
MATRIX = (*SHORT, "--set", "train.steps_per_epoch=8", "--set", f"train.feature_extraction.epochs={FE}",
          "--set", f"train.fine_tuning.epochs={FT}")
UNINTERRUPTED = [(e, "feature_extraction") for e in range(1, FE + 1)] + [
    (e, "fine_tuning") for e in range(FE + 1, FE + FT + 1)]
DEADLINE_S = 10  # TLJOB_STORAGE_DEADLINE_S of the workers in the storage cases
OUTAGE_S = 2.5  # longer than the first retries (0.5 s, 1 s), well within the deadline
# Files only the final publish writes: present in the bucket only when complete, whatever stops the publish.
# (params.yaml is not among them: it is written when training starts.)
FINAL = ("model/", "metrics.json", "metadata.json", "curves.png", "evaluation.json", "confusion.png")


def phases(out: Path | str) -> list[tuple[int, str]]:
    return [(h["epoch"], h["phase"]) for h in history(out)]


def assert_finished_like_uninterrupted(out: Path | str, workers: Workers) -> list[dict]:
    hist = history(out)
    assert [(h["epoch"], h["phase"]) for h in hist] == UNINTERRUPTED
    assert all(h["replicas"] == 2 and h["global_batch_size"] == 32 for h in hist)
    assert len(set(digests(workers))) == 1, "final weights differ between workers"
    return hist


def test_sigkill_in_phase_1_and_sigstop_in_phase_2_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    workers = Workers(tmp_path, tf_config_envs(2), ("train", "--config", DRY_RUN, "--output", str(out), *MATRIX))

    # SIGKILL of a worker in phase 1: the survivor exits 75 at once (connection reset).
    workers.start()
    wait_until(lambda: len(history(out)) >= 1, workers)
    workers.procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = workers.procs[0].wait(timeout=BOUND_S + 30)
    assert time.monotonic() - killed < BOUND_S and code == EXIT_RETRYABLE, workers.log(0)[-3000:]
    state = json.loads((out / "state.json").read_text())
    assert not state.get("completed_phases"), "the kill must land in phase 1"

    # SIGSTOP of a worker in phase 2: the survivor exits 75 within the bound (coordination heartbeat).
    workers.start()
    try:
        wait_until(lambda: any(p == "fine_tuning" for _, p in phases(out)), workers)
        workers.procs[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        code = workers.procs[0].wait(timeout=BOUND_S + 30)
        assert time.monotonic() - frozen < BOUND_S and code == EXIT_RETRYABLE, workers.log(0)[-3000:]
    finally:
        workers.kill()
    assert phases(out)[-1] != UNINTERRUPTED[-1], "the freeze must land in phase 2, before its last epoch"

    # Restarted with the same command: the run finishes as an uninterrupted one would.
    assert workers.start().wait() == [EXIT_OK, EXIT_OK], workers.logs()
    hist = assert_finished_like_uninterrupted(out, workers)
    assert {h["attempt"] for h in hist if h["phase"] == "fine_tuning"} <= {2, 3}
    assert "phase feature_extraction already finished" in workers.log(0)
    assert_chief_only_outputs(out, workers)


def final_objects(listing: dict[str, int]) -> dict[str, int]:
    return {rel: size for rel, size in listing.items() if rel.startswith(FINAL)}


def wait_for_failed_request(proxy: FaultProxy, workers: Workers, timeout: float = 180) -> None:
    """Until the proxy answered a request with an injected error; fails if the chief ends first."""
    deadline = time.monotonic() + timeout
    while not proxy.requests("status"):
        if workers.procs[0].poll() is not None or time.monotonic() > deadline:
            workers.kill()
            raise AssertionError(f"the fault never hit a request: {workers.logs()}")
        time.sleep(0.02)


def test_storage_faults_sigterm_in_a_backup_and_sigkill_in_the_publish(
    tmp_path: Path, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    out = f"{gcs_bucket}/runs/matrix"
    # Two steps per call and a backup every three calls: the SIGTERM case with the settings that broke it.
    args = ("train", "--config", DRY_RUN, "--output", out, *MATRIX, "--set", "train.steps_per_execution=2",
            "--set", "runtime.backup_every_steps=3")
    envs = [{**env, storage.DEADLINE_ENV: str(DEADLINE_S)} for env in tf_config_envs(2)]
    workers = Workers(tmp_path, envs, args)

    # 403 on the bucket: both workers stop in the preflight with exit 2, before training, writing nothing.
    fault_proxy.forbid_bucket(gcs_bucket.removeprefix("gs://"))
    assert workers.start().wait(timeout=120) == [EXIT_CONFIG, EXIT_CONFIG], workers.logs()
    for i in range(2):
        assert "permission denied" in workers.log(i) and "roles/storage.objectAdmin" in workers.log(i)
    fault_proxy.heal()
    assert storage.list_files(out) == {}

    # The endpoint down for longer than a retry, shorter than the deadline: survived, training goes on.
    workers.start()
    wait_until(lambda: len(history(out)) >= 1, workers)
    fault_proxy.clear_log()
    fault_proxy.fail_next(math.inf, status=503)
    time.sleep(OUTAGE_S)
    fault_proxy.heal()
    assert len(fault_proxy.requests("status")) >= 2, "the outage hit no transfer"
    assert all(p.poll() is None for p in workers.procs), workers.logs()

    # SIGTERM to the chief while it uploads a backup: the save completes, then both stop together with 75.
    fault_proxy.clear_log()
    fault_proxy.fail_after_match(r"/backup/")
    wait_for_failed_request(fault_proxy, workers)
    workers.procs[0].send_signal(signal.SIGTERM)
    time.sleep(1.0)
    fault_proxy.heal()
    assert workers.wait(timeout=BOUND_S) == [EXIT_RETRYABLE, EXIT_RETRYABLE], workers.logs()
    chief = workers.log(0)
    sigterm = chief.index("SIGTERM: saving a backup")
    # The upload the SIGTERM interrupted finished (a stage of the watchdog, logged when it took >= 1 s), then
    # the workers agreed to stop and saved again.
    upload_done = chief.index("upload of backup: finished in", sigterm)
    assert upload_done < chief.index("termination requested") < chief.index("stopped at batch")
    assert "termination requested" in workers.log(1)
    assert not rundir.is_finished(out)

    # The endpoint down for longer than TLJOB_STORAGE_DEADLINE_S: the chief exits 75 at the deadline, the
    # other worker follows; nothing final is written.
    workers.start()
    wait_until(lambda: any(h["attempt"] == 2 for h in history(out)), workers)
    fault_proxy.fail_next(math.inf, status=503)
    down = time.monotonic()
    assert workers.wait(timeout=DEADLINE_S + BOUND_S) == [EXIT_RETRYABLE, EXIT_RETRYABLE], workers.logs()
    assert time.monotonic() - down < DEADLINE_S + BOUND_S
    assert storage.DEADLINE_ENV in workers.log(0)
    fault_proxy.heal()
    listing = storage.list_files(out)
    assert rundir.SUCCESS not in listing and not final_objects(listing)

    # SIGKILL of the chief in the middle of the final publish (stalled after its first model/ object).
    fault_proxy.clear_log()
    fault_proxy.fail_after_match(r"/model/")
    workers.start()
    wait_for_failed_request(fault_proxy, workers)
    workers.procs[0].send_signal(signal.SIGKILL)
    assert workers.procs[1].wait(timeout=60) == EXIT_OK, workers.log(1)[-3000:]
    assert "the chief publishes the run" in workers.log(1)
    fault_proxy.heal()
    listing = storage.list_files(out)
    assert rundir.SUCCESS not in listing
    staged = next((tmp_path / "tmp-0" / "tljob-staging").glob("*/worker-0"))
    assert final_objects(listing), "the kill must land inside the publish"
    for rel, size in final_objects(listing).items():
        assert size == (staged / rel).stat().st_size, f"{rel} is half-written in the bucket"

    # Restarted: the publish completes; _SUCCESS lists exactly the objects in the bucket.
    assert workers.start().wait() == [EXIT_OK, EXIT_OK], workers.logs()
    assert rundir.is_finished(out)
    success = json.loads(storage.read_text(f"{out}/{rundir.SUCCESS}"))["files"]
    objects = {k: v for k, v in storage.list_files(out).items() if k != rundir.SUCCESS}
    assert set(success) == set(objects) and all(success[k]["size"] == objects[k] for k in objects)
    assert not any(k.startswith("backup/") for k in objects)
    hist = assert_finished_like_uninterrupted(out, workers)
    assert {h["attempt"] for h in hist} >= {1, 2}
