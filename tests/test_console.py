"""What a person sees: a short, clean log by default (a pod's, no TTY), a progress bar in a terminal, and
TensorFlow's own lines back with -v. The runs are the real `tljob` command on a shrunk dry-run config."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tljob import console
from tljob.errors import EXIT_OK

ROOT = Path(__file__).resolve().parents[1]
TLJOB = str(Path(sys.executable).parent / "tljob")
# One epoch per phase on few images: the console's lines, not the training, are under test.
SMALL = ["--config", str(ROOT / "job" / "dry_run.yaml"),
         "--set", "train.feature_extraction.epochs=1", "--set", "train.fine_tuning.epochs=1",
         "--set", "data.synthetic.train_examples=64", "--set", "data.synthetic.validation_examples=16",
         "--set", "data.synthetic.test_examples=16"]
NOISE = ("TensorSpec", "absl::InitializeLog", "Sharding callback", "oneDNN", "cuda_platform.cc", "Saved artifact")


@pytest.fixture(scope="module")
def pod_log(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    out = tmp_path_factory.mktemp("console") / "run"
    return subprocess.run([TLJOB, "train", *SMALL, "--output", str(out)], capture_output=True, text=True, timeout=300)


def run_in_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Runs the command with stdin, stdout and stderr on a pseudo-terminal; returns (exit code, what it wrote)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the process closed its end of the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_pod_log_is_short_and_clean(pod_log) -> None:
    assert pod_log.returncode == EXIT_OK, pod_log.stderr[-3000:]
    assert pod_log.stdout == "", "train writes nothing to stdout (the export's listing went there)"
    lines = pod_log.stderr.splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    for noise in NOISE:
        assert noise not in pod_log.stderr, noise
    assert not [ln for ln in lines if re.match(r"[IWE]\d{4} ", ln)], "TensorFlow C++ lines in the log"
    assert not re.search(r"INFO (absl|tensorflow):", pod_log.stderr)
    epochs = [ln for ln in lines if re.search(r"phase=\w+ epoch \d+/2 ", ln)]
    assert [re.search(r"epoch (\d)/2", ln)[1] for ln in epochs] == ["1", "2"], epochs
    assert "\r" not in pod_log.stderr, "no progress bar without a terminal"
    assert re.search(r"summary of run .*run \(", pod_log.stderr)
    assert re.search(r"feature_extraction: epochs 1-1 in [\d.]+ s, train loss=[\d.]+ accuracy=[\d.]+, validation "
                     r"loss=[\d.]+", pod_log.stderr)
    assert re.search(r"fine_tuning: epochs 2-2 in", pod_log.stderr)
    assert re.search(r"test: loss=[\d.]+ accuracy=[\d.]+", pod_log.stderr)
    assert "bad files: 0 of 96" in pod_log.stderr


def test_terminal_shows_a_progress_bar_and_verbose_brings_tensorflow_back(tmp_path: Path) -> None:
    # One run for both (each costs half a minute of CPU): the bar does not depend on the verbosity.
    code, text = run_in_terminal([TLJOB, "-v", "train", *SMALL, "--output", str(tmp_path / "run")])
    assert code == EXIT_OK, text[-3000:]
    bars = re.findall(r"\r(feature_extraction|fine_tuning) epoch (\d)/2 +\d+%\|[^|]*\| (\d+)/4 steps, "
                      r"(\d+) img/s, loss [\d.]+, run ETA \d:\d\d:\d\d", text)
    assert {(phase, epoch) for phase, epoch, _, _ in bars} == {("feature_extraction", "1"), ("fine_tuning", "2")}
    # The bar is cleared at the epoch's end; the epoch's log line is what stays.
    assert len(re.findall(r"phase=\w+ epoch \d/2 loss=", text)) == 2
    # -v: TensorFlow's C++ INFO lines, its Python logger's INFO lines, and the export's listing.
    assert re.search(r"^I\d{4} ", text, re.MULTILINE)
    assert "INFO tensorflow:" in text and "TensorSpec(" in text
    assert "final config:\r\nname: dry_run" in text


@pytest.mark.parametrize("line, driver, dropped", [
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n", False, True),
    (b"I0000 00:00:1796178270.213319   12195 port.cc:153] oneDNN custom operations are on.\n", False, True),
    (b"I1202 02:24:29.710000   12195 cudart_stub.cc:31] Could not find cuda drivers\n", True, True),
    (b"E0000 00:00:1796178275.548052   12195 cuda_platform.cc:52] failed call to cuInit: (303)\n", False, True),
    (b"E0000 00:00:1796178275.548052   12195 cuda_platform.cc:52] failed call to cuInit: (303)\n", True, False),
    (b"W0000 00:00:1796178275.548052   12195 gpu_device.cc:2344] Cannot dlopen some GPU libraries.\n", False, False),
    (b"F0000 00:00:1796178275.548052   12195 check.cc:1] Check failed: x\n", False, False),
    (b"Traceback (most recent call last):\n", False, False),
])
def test_native_notices_filter(line: bytes, driver: bool, dropped: bool) -> None:
    assert console.is_native_notice(line, driver=driver) is dropped


def test_summary_lines_name_the_run_phases_test_and_bad_files() -> None:
    history = [
        {"epoch": 1, "phase": "feature_extraction", "loss": 0.7, "accuracy": 0.5, "val_loss": 0.6,
         "val_accuracy": 0.6, "seconds": 2.0},
        {"epoch": 2, "phase": "feature_extraction", "loss": 0.5, "accuracy": 0.75, "val_loss": 0.4,
         "val_accuracy": 0.8, "seconds": 1.5},
        {"epoch": 3, "phase": "fine_tuning", "loss": 0.25, "accuracy": 0.9, "seconds": 4.0},
    ]
    metrics = {"test": {"test_loss": 0.3, "test_accuracy": 0.85}, "total_files": 100,
               "bad_file_names": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]}
    assert console.summary_lines("gs://b/run", metrics, history) == [
        "summary of run gs://b/run (model/, metrics.json, history.json, curves.png there):",
        "  feature_extraction: epochs 1-2 in 3.5 s, train loss=0.5000 accuracy=0.7500, validation loss=0.4000 "
        "accuracy=0.8000",
        "  fine_tuning: epochs 3-3 in 4.0 s, train loss=0.2500 accuracy=0.9000, validation -",
        "  test: loss=0.3000 accuracy=0.8500",
        "  bad files: 4 of 100: a.jpg, b.jpg, c.jpg and 1 more (metrics.json)",
    ]
    assert console.summary_lines("/r", {"test": {}, "total_files": 10, "bad_file_names": []}, [])[1:] == [
        "  test: no test split", "  bad files: 0 of 10"]


def test_a_long_stage_without_steps_logs_a_heartbeat(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # What a `kubectl logs -f` reader sees during the export (or the decode and feature passes).
    from tljob import faults

    monkeypatch.setattr(faults, "PROGRESS_LOG_S", 0.2)
    watchdog = faults.Watchdog(1.0)
    watchdog.arm()
    try:
        with caplog.at_level(logging.INFO, logger="tljob.faults"), watchdog.working("export", collectives=False):
            time.sleep(1.0)
    finally:
        watchdog.close()
    beats = [r.getMessage() for r in caplog.records if "export: still working" in r.getMessage()]
    assert len(beats) >= 2, caplog.text
