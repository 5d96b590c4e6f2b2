"""End to end: the real `tljob` command on the dry-run config, in a real process.

One uninterrupted run (every output, timing, predict, evaluate, no retraining) and one run killed in
phase 2 and resumed (from the history, not from logs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backups import backed_up_epoch
from tljob.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRYABLE

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = str(ROOT / "job" / "dry_run.yaml")


def tljob(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tljob.cli", *args], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), env=kw.pop("env", None), **kw)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tljob.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, float]:
    out = tmp_path_factory.mktemp("dry") / "run"
    t0 = time.monotonic()
    proc = tljob("train", "--config", DRY_RUN, "--output", str(out))
    return out, proc, time.monotonic() - t0


def test_dry_run_succeeds_within_90_seconds(finished_run) -> None:
    out, proc, seconds = finished_run
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert seconds < 90, f"dry run took {seconds:.0f} s"
    assert "role=worker task_index=0 workers=1 replicas=1" in proc.stderr
    assert "final config:" in proc.stderr
    # Validation runs on cached features of the frozen part (the default), once per phase.
    assert proc.stderr.count("cached validation: boundary features of 48 images") == 2


def test_dry_run_writes_every_output(finished_run) -> None:
    out, proc, _ = finished_run
    for rel in ("_SUCCESS", "history.json", "curves.png", "metrics.json", "metadata.json", "params.yaml",
                "status.json", "model/model.keras", "model/saved_model/saved_model.pb", "evaluation.json",
                "confusion.png", "model/metadata.json", "model/labels.txt", "model/README.md",
                "checkpoints/feature_extraction.weights.h5", "checkpoints/fine_tuning.weights.h5"):
        assert (out / rel).is_file(), rel
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    assert not (out / "backup").exists()
    success = json.loads((out / "_SUCCESS").read_text())
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "_SUCCESS"}
    assert set(success["files"]) == on_disk
    assert all(success["files"][rel]["size"] == (out / rel).stat().st_size for rel in on_disk)


def test_history_metrics_and_metadata(finished_run) -> None:
    out, _, _ = finished_run
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["phase"] for h in history] == ["feature_extraction"] * 3 + ["fine_tuning"] * 2
    assert all({"loss", "accuracy", "val_loss", "val_accuracy", "images_per_second"} <= h.keys() for h in history)
    assert all(h["global_batch_size"] == 16 for h in history)
    # The synthetic classes are learnable: accuracy rises well above chance.
    assert history[-1]["val_accuracy"] > history[0]["val_accuracy"], history
    assert history[-1]["val_accuracy"] >= 0.75, history
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["phases"]) == {"feature_extraction", "fine_tuning"}
    assert "val_accuracy" in metrics["phases"]["fine_tuning"] and "test_accuracy" in metrics["test"]
    assert metrics["bad_files"] == 0 and metrics["images_per_second"] > 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["class_names"] == ["class_0", "class_1"] and meta["image_size"] == 64
    assert meta["versions"]["tensorflow"].startswith("2.21")
    assert "output:" in (out / "params.yaml").read_text()
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["epoch"] == 5


def test_finished_run_is_not_retrained(finished_run) -> None:
    out, _, _ = finished_run
    before = (out / "_SUCCESS").stat().st_mtime_ns
    proc = tljob("train", "--config", DRY_RUN, "--output", str(out), timeout=60)
    assert proc.returncode == EXIT_OK
    assert "already finished" in proc.stderr
    assert (out / "_SUCCESS").stat().st_mtime_ns == before


def test_evaluation_report_and_model_package(finished_run) -> None:
    out, _, _ = finished_run
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["class_names"] == ["class_0", "class_1"] and evaluation["examples"] == 48
    assert sum(r["support"] for r in evaluation["per_class"].values()) == 48
    assert np.array(evaluation["confusion_matrix"]).sum() == 48
    # The chief's local evaluation of the serving copy gives model.evaluate's test figures.
    assert evaluation["accuracy"] == pytest.approx(metrics["test"]["test_accuracy"], abs=1e-6)
    assert evaluation["loss"] == pytest.approx(metrics["test"]["test_loss"], rel=1e-4)
    assert metrics["evaluation"]["macro_f1"] == evaluation["macro_avg"]["f1"]
    wrong = 48 - int(np.trace(evaluation["confusion_matrix"]))
    assert len(evaluation["worst_classified"]) == min(wrong, 25)
    assert all(w["path"].startswith("synthetic/test/") for w in evaluation["worst_classified"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    model = out / "model"
    assert json.loads((model / "metadata.json").read_text()) == json.loads((out / "metadata.json").read_text())
    assert (model / "labels.txt").read_text() == "class_0\nclass_1\n"
    card = (model / "README.md").read_text()
    # The card's numbers are this run's.
    for figure in (metrics["test"]["test_accuracy"], metrics["phases"]["fine_tuning"]["val_accuracy"],
                   metrics["phases"]["feature_extraction"]["val_loss"], evaluation["per_class"]["class_1"]["recall"]):
        assert f"{figure:.4f}" in card
    assert "64, 64, 3" in card and "model.serve(" in card and "x / 127.5 - 1" in card


def _labelled_folder(root: Path, n: int, seed: int = 123) -> tuple[list[Path], np.ndarray]:
    from tljob.data import synthetic_images

    images, labels = synthetic_images(n, 2, 64, seed=seed)
    paths = []
    for i, (img, y) in enumerate(zip(images, labels)):
        (root / f"class_{y}").mkdir(parents=True, exist_ok=True)
        path = root / f"class_{y}" / f"{i}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths, labels


def test_predict_and_evaluate_with_exported_model(finished_run, tmp_path: Path) -> None:
    out, _, _ = finished_run
    folder = tmp_path / "eval"
    paths, labels = _labelled_folder(folder, 6)
    (tmp_path / "broken.jpg").write_text("not an image")
    proc = tljob("predict", "--model", str(out / "model"), *map(str, paths), str(tmp_path / "broken.jpg"))
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [*map(str, paths), str(tmp_path / "broken.jpg")]
    good = rows[:-1]
    assert all(r["class"] in ("class_0", "class_1") and 0.5 <= r["probability"] <= 1 for r in good)
    assert np.mean([r["class"] == f"class_{y}" for r, y in zip(good, labels)]) >= 0.6
    assert "error" in rows[-1]
    proc = tljob("evaluate", "--model", str(out / "model"), "--data", str(folder), "--json")
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout)
    assert metrics["examples"] == 6 and metrics["accuracy"] >= 0.6
    assert sum(r["support"] for r in metrics["per_class"].values()) == 6
    assert {w["path"] for w in metrics["worst_classified"]} <= set(map(str, paths))


def test_batched_predict_gives_the_per_image_loop_results(finished_run, tmp_path: Path) -> None:
    """The batched pipeline against the per-image loop inference.predict had, across batch edges."""
    import tensorflow as tf

    from tljob import data, inference

    out, _, _ = finished_run
    paths, _ = _labelled_folder(tmp_path / "imgs", 7, seed=7)
    # Other sizes and formats than the model's 64x64 PNGs: the resize must match too.
    Image.open(paths[0]).resize((97, 51)).save(tmp_path / "wide.jpg", quality=90)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    files = [str(tmp_path / "wide.jpg"), *map(str, paths[:3]), str(tmp_path / "broken.png"), *map(str, paths[3:])]
    model = tf.keras.models.load_model(str(out / "model" / "model.keras"))
    reference = []
    for path in files:
        try:
            image = tf.io.decode_image(Path(path).read_bytes(), channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            reference.append(None)
            continue
        # The loop resized to float and rounded; resize_image rounds to the same whole values, as uint8.
        batch = tf.cast(data.resize_image(image, 64), tf.float32)[None]
        reference.append(float(model.predict(batch, verbose=0)[0][0]))
    rows = list(inference.predict(str(out / "model"), files, batch_size=3))
    assert [r["path"] for r in rows] == files
    for row, p in zip(rows, reference):
        if p is None:
            assert row == {"path": files[4], "error": "not a decodable image"}
        else:
            assert row["class"] == ("class_1" if p > 0.5 else "class_0")
            assert row["probability"] == pytest.approx(max(p, 1 - p), abs=2e-6)


def test_tflite_that_disagrees_is_not_kept(finished_run, tmp_path: Path) -> None:
    from tljob import export

    out, _, _ = finished_run
    model = tmp_path / "model"
    shutil.copytree(out / "model", model)
    images = np.random.default_rng(0).uniform(0, 255, (5, 64, 64, 3)).astype(np.float32)
    # No float32 conversion is exact to better than a negative tolerance: the file must go.
    check = export.export_tflite(model, [images], tolerance=-1.0)
    assert check["file"] is None and "not kept" in check["error"] and check["checked_images"] == 5
    assert not (model / "model.tflite").exists()


def test_a_copy_of_model_works_alone(finished_run, tmp_path: Path) -> None:
    """README's GKE step 6: copy model/ out of the run, then predict and evaluate with the copy."""
    out, _, _ = finished_run
    shutil.copytree(out / "model", tmp_path / "model")  # gcloud storage cp -r $RUN/model .
    paths, _ = _labelled_folder(tmp_path / "eval", 6)
    proc = tljob("predict", "--model", "model", str(paths[0]), cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["class"] in ("class_0", "class_1")
    proc = tljob("evaluate", "--model", "model", "--data", "eval", "--output", "report", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert "precision" in proc.stdout and "class_0" in proc.stdout and "confusion matrix" in proc.stdout
    saved = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert saved["examples"] == 6 and (tmp_path / "report" / "confusion.png").is_file()


def test_model_predicts_and_evaluates_from_a_bucket(finished_run, gcs_bucket: str, tmp_path: Path) -> None:
    from tljob import storage

    out, _, _ = finished_run
    model = f"{gcs_bucket}/elsewhere/model"
    storage.upload_tree(str(out / "model"), model)
    paths, _ = _labelled_folder(tmp_path / "eval", 4)
    storage.upload_tree(str(tmp_path / "eval"), f"{gcs_bucket}/photos")
    proc = tljob("predict", "--model", model, f"{gcs_bucket}/photos", "--top-k", "2")
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(
        f"{gcs_bucket}/photos/{p.parent.name}/{p.name}" for p in paths)
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["class"] == r["class"] for r in rows)
    proc = tljob("evaluate", "--model", model, "--data", str(tmp_path / "eval"), "--output", f"{gcs_bucket}/report")
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert json.loads(storage.read_text(f"{gcs_bucket}/report/evaluation.json"))["examples"] == 4
    assert storage.read_bytes(f"{gcs_bucket}/report/confusion.png")[:4] == b"\x89PNG"


def test_multiclass_run_reports_every_class(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = tljob("train", "--config", DRY_RUN, "--output", str(out), "--set", "data.synthetic.num_classes=3",
                 "--set", "data.synthetic.train_examples=48", "--set", "data.synthetic.validation_examples=0",
                 "--set", "data.synthetic.test_examples=30", "--set", "train.feature_extraction.epochs=1",
                 "--set", "train.fine_tuning.epochs=0", "--set", "export.tflite=true")
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    evaluation = json.loads((out / "evaluation.json").read_text())
    names = ["class_0", "class_1", "class_2"]
    assert list(evaluation["per_class"]) == names and np.array(evaluation["confusion_matrix"]).shape == (3, 3)
    assert sum(r["support"] for r in evaluation["per_class"].values()) == 30
    assert (out / "model" / "labels.txt").read_text().split() == names
    lite = json.loads((out / "model" / "metadata.json").read_text())["tflite"]
    assert lite["file"] == "model.tflite" and lite["checked_images"] == 30 and lite["max_abs_diff"] < 1e-4
    assert (out / "model" / "model.tflite").is_file() and "agrees with the SavedModel on 30" in (
        out / "model" / "README.md").read_text()
    image = tmp_path / "one.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    proc = tljob("predict", "--model", str(out / "model"), str(image), "--top-k", "3")
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    row = json.loads(proc.stdout)
    assert sorted(t["class"] for t in row["top_k"]) == names
    assert sum(t["probability"] for t in row["top_k"]) == pytest.approx(1.0, abs=1e-4)


def test_mixed_bfloat16_with_augmentation_in_the_model_trains_and_exports_float32(tmp_path: Path) -> None:
    """The GPU settings through the real Trainer, on CPU (which runs bfloat16): calibration, cached validation,
    both phases, test evaluation, the export and its TFLite check; the exported model is plain float32."""
    import tensorflow as tf

    out = tmp_path / "run"
    proc = tljob("train", "--config", DRY_RUN, "--output", str(out), "--set", "runtime.precision=mixed_bfloat16",
                 "--set", "augment.placement=model", "--set", "train.feature_extraction.epochs=1",
                 "--set", "train.fine_tuning.epochs=1", "--set", "export.tflite=true")
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    assert "precision: mixed_bfloat16 (layers compute in bfloat16, variables and the classifier head in float32)" \
        in proc.stderr
    assert "augmentation in the model" in proc.stderr
    assert proc.stderr.count("cached validation: boundary features of 48 images") == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["phases"]) == {"feature_extraction", "fine_tuning"} and "test_accuracy" in metrics["test"]
    saved = tf.saved_model.load(str(out / "model" / "saved_model"))
    probabilities = saved.serve(tf.zeros([2, 64, 64, 3], tf.float32))
    assert probabilities.dtype == tf.float32 and probabilities.shape == (2, 1)
    keras_model = tf.keras.models.load_model(str(out / "model" / "model.keras"))
    assert "augment" not in [layer.name for layer in keras_model.layers]
    assert {layer.dtype_policy.name for layer in keras_model.layers} == {"float32"}
    lite = json.loads((out / "model" / "metadata.json").read_text())["tflite"]
    assert lite["file"] == "model.tflite" and lite["max_abs_diff"] < 1e-4


def _wait_for(pred, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _history(out: Path) -> list[dict]:
    try:
        return json.loads((out / "history.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _kill_once_backed_up(args: tuple[str, ...], backup: Path, epoch: int) -> int:
    """Starts `tljob args`, SIGKILLs it once `backup` holds the end of `epoch` (1-based) or a later one; returns
    the epoch the last backup holds."""
    proc = start(*args)
    _wait_for(lambda: (backed_up_epoch(backup) or 0) >= epoch, proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = backed_up_epoch(backup)
    assert killed_at is not None
    return killed_at


def test_run_killed_in_phase_2_resumes_without_repeating(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train", "--config", DRY_RUN, "--output", str(out), "--set", "train.feature_extraction.epochs=2",
            "--set", "train.fine_tuning.epochs=4", "--set", "data.synthetic.validation_examples=16",
            "--set", "data.synthetic.test_examples=0")
    # Killed (SIGKILL: no chance to clean up) once the first fine-tuning epoch is backed up.
    killed_at = _kill_once_backed_up(args, out / "backup" / "fine_tuning", 3)
    assert 3 <= killed_at < 6, "the kill must land inside phase 2"
    assert not (out / "_SUCCESS").exists()
    resumed = tljob(*args)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    history = _history(out)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h["attempt"] for h in history if h["phase"] == "feature_extraction"] == [1, 1]
    # The resumed attempt starts with the epoch after the last backed-up one.
    second = [h["epoch"] for h in history if h["attempt"] == 2]
    assert second == list(range(killed_at + 1, 7))
    assert "phase feature_extraction already finished" in resumed.stderr
    assert (out / "_SUCCESS").exists()


def test_phase_on_cached_features_killed_resumes_from_its_backup(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("train", "--config", DRY_RUN, "--output", str(out), "--set", "train.feature_extraction.epochs=40",
            "--set", "train.feature_extraction.cache_features=true", "--set", "train.feature_extraction.augment=false",
            "--set", "train.fine_tuning.epochs=2", "--set", "train.fine_tuning.schedule=cosine",
            "--set", "train.fine_tuning.warmup_epochs=0.5", "--set", "data.synthetic.test_examples=0")
    killed_at = _kill_once_backed_up(args, out / "backup" / "feature_extraction", 3)
    assert 3 <= killed_at < 40, "the kill must land inside phase 1"
    resumed = tljob(*args)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    assert resumed.stderr.count("on cached features") == 1  # phase 1 only
    history = _history(out)
    assert [h["epoch"] for h in history] == list(range(1, 43))
    second = [h for h in history if h["attempt"] == 2 and h["phase"] == "feature_extraction"]
    assert [h["epoch"] for h in second] == list(range(killed_at + 1, 41))
    # The backup restored the head's training: the resumed attempt goes on from the killed one's loss.
    assert second[0]["loss"] < history[0]["loss"]
    # Each record has the rate of its epoch's last step: phase 1's constant one, then phase 2's cosine over
    # 10-step epochs after a 5-step warm-up (steps 9 and 19 are 4 and 14 of the 15 decaying steps).
    rates = [h["learning_rate"] for h in history]
    assert rates[0] == rates[39] == pytest.approx(1e-3)
    assert rates[40:] == pytest.approx([1e-4 * 0.5 * (1 + np.cos(np.pi * k / 15)) for k in (4, 14)], rel=1e-3)


def test_missing_bucket_fails_in_preflight_with_exit_2(gcs_emulator: str, tmp_path: Path) -> None:
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator}
    t0 = time.monotonic()
    proc = tljob("train", "--config", DRY_RUN, "--output", "gs://no-such-bucket-tljob/run", env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no-such-bucket-tljob" in proc.stderr
    assert "phase feature_extraction" not in proc.stderr and time.monotonic() - t0 < 60


def test_data_error_exits_3_and_names_the_files(tmp_path: Path) -> None:
    from imagegen import make_image_folder

    root = make_image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, size=40)
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    proc = tljob("train", "--config", DRY_RUN, "--output", str(tmp_path / "run"), "--set", "data.source=folder",
                 "--set", f"data.train={root}", "--set", "data.max_bad_fraction=0.1", timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "corrupt.jpg" in proc.stderr and "data.max_bad_fraction" in proc.stderr


def test_batch_larger_than_the_training_set_is_a_config_error(tmp_path: Path) -> None:
    proc = tljob("train", "--config", DRY_RUN, "--output", str(tmp_path / "run"), "--set", "data.batch_size=161",
                 "--set", "data.synthetic.validation_examples=0", "--set", "data.synthetic.test_examples=0",
                 timeout=120)
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    assert "data.batch_size=161: the global batch (161 x 1 replicas = 161) is larger than the 160 training " \
           "images. Fix: set data.batch_size to at most 160" in proc.stderr
    assert "Traceback" not in proc.stderr and "phase feature_extraction" not in proc.stderr


def test_resume_with_a_changed_config_is_refused(tmp_path: Path, gcs_bucket: str) -> None:
    from tljob import rundir, storage

    run = gcs_bucket + "/runs/resume"
    base = ("train", "--config", DRY_RUN, "--output", run, "--set", "train.feature_extraction.epochs=2",
            "--set", "train.fine_tuning.epochs=2", "--set", "data.synthetic.validation_examples=16",
            "--set", "data.synthetic.test_examples=0")
    stage = tmp_path / "stage1"
    backed_up_epoch(tmp_path)  # imports TensorFlow now, not while the run it polls goes on
    proc = start(*base, "--set", f"runtime.staging_dir={stage}")
    _wait_for(lambda: any((backed_up_epoch(d / "backup" / "feature_extraction") or 0) >= 1
                          for d in stage.glob("tljob-staging/*/worker-0")), proc, timeout=120)
    # SIGTERM (an eviction): the run saves and uploads a backup and exits 75. A SIGKILL could land inside the
    # backup's upload and leave the bucket a partial checkpoint (noticed, left to the faults work).
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_RETRYABLE
    assert not rundir.is_finished(run)
    # Written (and uploaded) when training started, not only at the end.
    assert "epochs: 2" in storage.read_text(run + "/params.yaml")
    # A fresh pod (another staging dir) with other epochs, data and learning rate: refused before any training.
    elsewhere = ("--set", f"runtime.staging_dir={tmp_path / 'stage2'}")
    changed = tljob(*base, *elsewhere, "--set", "train.fine_tuning.epochs=3", "--set", "data.synthetic.train_examples=100",
                    "--set", "train.feature_extraction.learning_rate=0.01", timeout=120)
    assert changed.returncode == EXIT_CONFIG, changed.stderr[-3000:]
    assert ("Changed: data.synthetic.train_examples: 160 -> 100; train.feature_extraction.learning_rate: 0.001 -> "
            "0.01; train.fine_tuning.epochs: 2 -> 3.") in changed.stderr
    assert "Traceback" not in changed.stderr and "phase feature_extraction" not in changed.stderr
    # Operational keys may change: the run continues where it stopped.
    resumed = tljob(*base, *elsewhere, "--set", "runtime.log_sync_s=5", "--set", "data.cache=memory", timeout=180)
    assert resumed.returncode == EXIT_OK, resumed.stderr[-3000:]
    history = json.loads(storage.read_text(run + "/history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert "resuming: finished phases none" in resumed.stderr and "epoch 1/4" not in resumed.stderr
    assert "log_sync_s: 5.0" in storage.read_text(run + "/params.yaml")
