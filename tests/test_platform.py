"""Platform fit: Vertex AI's output folders, data read in place from a mounted bucket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from backups import backed_up_epoch
from tljob import data, storage
from tljob.config import DataConfig
from tljob.errors import EXIT_OK, ConfigError
from tljob.layout import RunLayout, vertex_run

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
    listing = json.loads((base / storage.SUCCESS_NAME).read_text())["files"]
    assert "model/model.keras" in listing and "history.json" in listing
    assert f"Vertex AI outputs: run directory {base}" in text


def test_an_output_flag_wins_over_the_vertex_variables(tmp_path: Path) -> None:
    """--output decides; the AIP_* folders are not touched (nothing is trained: the run is already finished)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / storage.SUCCESS_NAME).write_text('{"files": {}}')
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
