"""GCS fixtures backed by a real gcp-storage-emulator process (a pytest plugin, see conftest.py).

- `gcs_emulator` (session): base URL of an in-memory emulator shared by the session.
- `gcs_bucket`: a fresh bucket on it as "gs://NAME", with STORAGE_EMULATOR_HOST set.
- `fault_proxy`: a FaultProxy (tests/gcs_fault_proxy.py) in front of the emulator for this test;
  STORAGE_EMULATOR_HOST points at the proxy, and `gcs_bucket` names a bucket behind it.
- `restartable_gcs`: an emulator of this test's own that keeps its data on disk, so
  `stop()` then `start()` on the same port interrupts a transfer and brings the data back.
Other test files use them by name; `GcsEmulator` and `create_bucket` serve custom set-ups.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gcs_fault_proxy import FaultProxy

_EMULATOR_BIN = Path(sys.executable).parent / "gcp-storage-emulator"
_START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GcsEmulator:
    """One gcp-storage-emulator process on 127.0.0.1:`port`; in memory unless `data_dir` is set."""

    def __init__(
        self, port: int | None = None, data_dir: Path | None = None, log_path: Path | None = None
    ) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GcsEmulator:
        if not _EMULATOR_BIN.exists():
            raise RuntimeError(
                f"{_EMULATOR_BIN} missing: pip install gcp-storage-emulator into this venv"
            )
        storage = ["--data-dir", str(self.data_dir)] if self.data_dir else []
        # Without -q the emulator logs every request at DEBUG level.
        command = [
            str(_EMULATOR_BIN),
            *storage,
            "start",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "-q",
        ]
        if not self.data_dir:
            command.append("--in-memory")
        if self.log_path:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        else:
            self._proc = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        self._wait_until_answering()
        return self

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"emulator exited with {self._proc.returncode}; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(self.url + "/", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"emulator on {self.url} did not answer within {_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def create_bucket(emulator_url: str, name: str | None = None) -> str:
    """Create a bucket directly on the emulator (no client, no env); returns "gs://NAME"."""
    name = name or f"tljob-test-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{emulator_url}/storage/v1/b?project=tljob-test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        if answer.status != 200:
            raise RuntimeError(f"creating bucket {name} on {emulator_url}: HTTP {answer.status}")
    return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    emulator = GcsEmulator(log_path=tmp_path_factory.mktemp("gcs") / "emulator.log").start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def gcs_emulator(gcs_emulator_process: GcsEmulator) -> str:
    """Base URL of the session's in-memory emulator."""
    return gcs_emulator_process.url


@pytest.fixture
def gcs_bucket(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket "gs://NAME"; STORAGE_EMULATOR_HOST points at the emulator."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return create_bucket(gcs_emulator)


@pytest.fixture
def fault_proxy(
    gcs_emulator: str, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the emulator; STORAGE_EMULATOR_HOST now points at it."""
    proxy = FaultProxy(gcs_emulator).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    yield proxy
    proxy.stop()


@dataclass
class RestartableGcs:
    emulator: GcsEmulator
    bucket: str  # "gs://NAME"


@pytest.fixture
def restartable_gcs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RestartableGcs]:
    """An emulator of this test's own, on disk, so stop()/start() keeps buckets and objects."""
    data_dir = tmp_path / "gcs-data"
    data_dir.mkdir()
    emulator = GcsEmulator(data_dir=data_dir, log_path=tmp_path / "emulator.log").start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    try:
        yield RestartableGcs(emulator, create_bucket(emulator.url))
    finally:
        emulator.stop()
