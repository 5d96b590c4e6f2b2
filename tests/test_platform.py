"""Platform fit: Vertex AI's output folders, data read in place from a mounted bucket, TFDS prepared once."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from backups import backed_up_epoch
from tljob import data, rundir, storage
from tljob.config import DataConfig
from tljob.errors import EXIT_OK, ConfigError, RetryableError
from tljob.rundir import RunLayout, vertex_run
from tljob.train import tfds_data_dir

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = str(ROOT / "job" / "dry_run.yaml")
# The dry run at its smallest that still backs up in phase 1 (three epochs) and has both phases.
SMALL = ("--set", "data.image_size=32", "--set", "data.synthetic.train_examples=64",
         "--set", "data.synthetic.validation_examples=16", "--set", "data.synthetic.test_examples=16",
         "--set", "train.fine_tuning.epochs=1")


def vertex_env(base: str) -> dict[str, str]:
    """What Vertex AI sets for a custom job whose baseOutputDirectory is `base` (trailing slashes included)."""
    return {"AIP_MODEL_DIR": f"{base}/model/", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
            "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/"}


# --- Vertex AI -------------------------------------------------------------------------------------------


def test_vertex_variables_give_the_run_directory_and_its_folders() -> None:
    run = vertex_run(vertex_env("gs://b/jobs/123"))
    assert run is not None and run.output == "gs://b/jobs/123"
    assert run.layout == RunLayout(model="model", backup="checkpoints/backup", logs="logs")
    assert vertex_run({}) is None and vertex_run({"AIP_MODEL_DIR": ""}) is None


@pytest.mark.parametrize(("env", "message"), [
    ({"AIP_CHECKPOINT_DIR": "gs://b/x/checkpoints/"}, "AIP_CHECKPOINT_DIR set without AIP_MODEL_DIR"),
    ({"AIP_MODEL_DIR": "gs://b/x/model", "AIP_TENSORBOARD_LOG_DIR": "gs://other/logs"},
     "AIP_TENSORBOARD_LOG_DIR='gs://other/logs' is not inside 'gs://b/x'"),
    ({"AIP_MODEL_DIR": "gs://model/"}, "top of its bucket"),
])
def test_vertex_variables_that_cannot_make_one_run_directory_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        vertex_run(env)
    assert "Fix: pass --output" in str(err.value)


def test_vertex_dry_run_writes_model_backups_and_logs_under_the_aip_folders(tmp_path: Path) -> None:
    """The real command with no --output: every AIP_* folder gets its part, the rest of the run lies beside."""
    base = tmp_path / "vertex" / "job-1"
    env = {**os.environ, **vertex_env(str(base))}
    log_path = tmp_path / "train.log"
    backup = base / "checkpoints" / "backup" / "feature_extraction"
    seen_backup = None
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "tljob.cli", "train", "--config", DRY_RUN, *SMALL], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            seen_backup = seen_backup or backed_up_epoch(backup)
            time.sleep(0.05)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    text = log_path.read_text()
    assert proc.returncode == EXIT_OK, text[-3000:]
    assert seen_backup is not None, "no backup appeared under AIP_CHECKPOINT_DIR during phase 1"
    assert (base / "model" / "model.keras").is_file() and (base / "model" / "saved_model" / "saved_model.pb").is_file()
    assert list((base / "logs" / "feature_extraction").rglob("events.out.tfevents.*"))
    assert (base / "checkpoints" / "fine_tuning.weights.h5").is_file()  # kept when the backups were removed
    assert not (base / "checkpoints" / "backup").exists() and not (base / "backup").exists()
    listing = json.loads((base / rundir.SUCCESS).read_text())["files"]
    assert "model/model.keras" in listing and "history.json" in listing
    assert f"Vertex AI outputs: run directory {base}" in text


def test_an_output_flag_wins_over_the_vertex_variables(tmp_path: Path) -> None:
    """--output decides; the AIP_* folders are not touched (nothing is trained: the run is already finished)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.SUCCESS).write_text('{"files": {}}')
    env = {**os.environ, **vertex_env(str(tmp_path / "vertex"))}
    proc = subprocess.run([sys.executable, "-m", "tljob.cli", "train", "--config", DRY_RUN, "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert "already finished" in proc.stderr and not (tmp_path / "vertex").exists()


# --- data in place ------------------------------------------------------------------------------------------


def test_a_mounted_folder_is_read_in_place_without_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.train under /gcs/BUCKET (--gcsfuse-bucket) is a local path: read where it is, nothing copied."""
    mounted = tmp_path / "gcs" / "my-data" / "pets"
    for label in ("cat", "dog"):
        (mounted / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), (40 * i, 100, 200 if label == "cat" else 0)).save(mounted / label / f"{i}.jpg")

    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mounted folder was copied")

    monkeypatch.setattr(storage, "_download_objects", no_copy)
    cache_dir = tmp_path / "cache"
    cfg = DataConfig(source="folder", train=str(mounted), validation=None, test=None, image_size=16, batch_size=2,
                     validation_fraction=0.25, test_fraction=0.0)
    ds = data.load_dataset(cfg, seed=0, cache_dir=str(cache_dir))
    assert ds.class_names == ["cat", "dog"] and ds.train.num_examples + ds.validation.num_examples == 8
    assert not cache_dir.exists()


# --- TFDS prepared once ------------------------------------------------------------------------------------


def test_tfds_data_dir_is_shared_by_a_bucket_and_stays_per_machine_locally() -> None:
    assert tfds_data_dir("gs://bkt/runs/cats", None) == "gs://bkt/tfds"
    assert tfds_data_dir("gs://bkt/runs/cats", "gs://other/datasets") == "gs://other/datasets"
    assert tfds_data_dir("/tmp/run", None) is None


TFDS_CFG = DataConfig(source="tfds", name="cats_vs_dogs", train="train[:80%]", validation="train[80%:]", test=None,
                      image_size=16, batch_size=2)


def test_the_chief_prepares_a_shared_tfds_dir_once_while_the_others_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import tensorflow_datasets as tfds

    cfg = dataclasses.replace(TFDS_CFG, data_dir=str(tmp_path / "tfds"))
    calls: list[str] = []
    with tfds.testing.mock_data(num_examples=8):
        mocked = tfds.core.DatasetBuilder.download_and_prepare

        def slow_prepare(self: tfds.core.DatasetBuilder, *args: object, **kwargs: object) -> None:
            calls.append(threading.current_thread().name)
            time.sleep(1.0)  # the other worker must wait, not prepare its own copy
            mocked(self, *args, **kwargs)

        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", slow_prepare)
        caplog.set_level("INFO", logger="tljob.data")
        loaded: dict[str, data.Dataset] = {}
        threads = [threading.Thread(name=f"worker-{i}", target=lambda i=i: loaded.update(
            {i: data.load_dataset(cfg, seed=0, cache_dir=str(tmp_path / "cache"), chief=i == 0)})) for i in (1, 0)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert calls == ["worker-0"] and sorted(loaded) == [0, 1]
        assert "waiting for the chief to prepare it" in caplog.text and "prepared by the chief" in caplog.text
        # Restarted, chief or not: the dataset is there and nothing is prepared again.
        for chief in (True, False):
            data.load_dataset(cfg, seed=0, cache_dir=str(tmp_path / "cache"), chief=chief)
        assert calls == ["worker-0"] and caplog.text.count("reused") == 2


def test_a_worker_waits_for_the_chief_a_bounded_time(tmp_path: Path) -> None:
    import tensorflow_datasets as tfds

    cfg = dataclasses.replace(TFDS_CFG, data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=8), pytest.raises(RetryableError, match="not prepared .* within 0 s"):
        data.prepare_tfds(cfg, chief=False, wait_s=0.2, poll_s=0.05)


def _free_base_port(n: int) -> int:
    """A base port with base..base+n-1 free (the {index_port} host pattern)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no consecutive free ports")


def _start_workers(tmp: Path, attempt: int, args: list[str], env: dict[str, str]) -> list[subprocess.Popen]:
    base = _free_base_port(2)
    procs = []
    for i in range(2):
        log = (tmp / f"worker-{i}-attempt-{attempt}.log").open("w")
        procs.append(subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "mock_tfds_cli.py"), *args],
            env={**env, "JOB_COMPLETION_INDEX": str(i), "TLJOB_NUM_WORKERS": "2", "TMPDIR": str(tmp),
                 "TLJOB_HOST_PATTERN": "127.0.0.1:{index_port}", "TLJOB_PORT": str(base)},
            stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.mark.multiworker
def test_two_workers_prepare_tfds_once_and_a_restart_prepares_nothing(tmp_path: Path) -> None:
    """Two real worker processes on the suite's mock TFDS data: the chief prepares, worker 1 waits; both killed
    after a backup and restarted: they resume, and neither prepares again."""
    out, prepared = tmp_path / "run", tmp_path / "prepare.log"
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(TLJOB_TEST_PREPARE_LOG=str(prepared), TLJOB_TEST_PREPARE_S="2", TLJOB_TEST_TFDS_EXAMPLES="32")
    args = ["train", "--config", DRY_RUN, "--output", str(out),
            "--set", "data.source=tfds", "--set", "data.name=cats_vs_dogs", "--set", f"data.data_dir={tmp_path}/tfds",
            "--set", "data.train=train[:80%]", "--set", "data.validation=train[80%:]", "--set", "data.test=null",
            "--set", "data.image_size=32", "--set", "data.batch_size=4",
            "--set", "train.feature_extraction.epochs=3", "--set", "train.fine_tuning.epochs=1"]
    procs = _start_workers(tmp_path, 1, args, env)
    try:
        deadline = time.monotonic() + 240
        while (backed_up_epoch(out / "backup" / "feature_extraction") or 0) < 1:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "worker-1-attempt-1.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        for p in procs:  # as a node failure would: no grace
            p.send_signal(signal.SIGKILL)
            p.wait()
    procs = _start_workers(tmp_path, 2, args, env)
    codes = [p.wait(timeout=240) for p in procs]
    logs = {(i, a): (tmp_path / f"worker-{i}-attempt-{a}.log").read_text() for i in (0, 1) for a in (1, 2)}
    assert codes == [EXIT_OK, EXIT_OK], logs[(0, 2)][-3000:] + logs[(1, 2)][-3000:]
    assert len(prepared.read_text().splitlines()) == 1, prepared.read_text()
    assert "preparing in" in logs[(0, 1)] and "waiting for the chief to prepare it" in logs[(1, 1)]
    assert all("prepared in" in logs[(i, 2)] and "reused" in logs[(i, 2)] for i in (0, 1))
    assert "resuming" in logs[(0, 2)] and (out / rundir.SUCCESS).is_file()
