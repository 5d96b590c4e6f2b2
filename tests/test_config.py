"""Config loading, overrides and every validation message (no TensorFlow imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tljob.config import (
    JobConfig,
    changes_on_resume,
    digest,
    load_config,
    parse_override,
    to_dict,
    to_yaml,
)
from tljob.errors import EXIT_CONFIG, ConfigError

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((ROOT / "job").glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_yaml_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path, environ={})
    assert isinstance(cfg, JobConfig)
    # params.yaml, as saved beside the outputs, loads back to the same config.
    saved = tmp_path / "params.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved, environ={}) == cfg


def test_job_files_present() -> None:
    assert {p.name for p in JOB_FILES} >= {"cats_vs_dogs.yaml", "cats_vs_dogs_fast.yaml", "dry_run.yaml"}


def test_cats_vs_dogs_is_the_tutorial_recipe() -> None:
    cfg = load_config(ROOT / "job" / "cats_vs_dogs.yaml", environ={})
    assert (cfg.data.source, cfg.data.name, cfg.data.image_size, cfg.data.batch_size) == ("tfds", "cats_vs_dogs", 160, 32)
    assert (cfg.augment.flip, cfg.augment.rotation) == ("horizontal", 0.2)
    assert (cfg.model.weights, cfg.model.alpha, cfg.model.dropout) == ("imagenet", 1.0, 0.2)
    fe, ft = cfg.train.feature_extraction, cfg.train.fine_tuning
    assert (fe.epochs, fe.optimizer, fe.learning_rate) == (10, "adam", 1e-4)
    assert (ft.epochs, ft.optimizer, ft.learning_rate, ft.fine_tune_at) == (10, "rmsprop", 1e-5, 100)


def test_fast_config_is_the_same_model_and_data_trained_another_way() -> None:
    fast, recipe = (to_dict(load_config(ROOT / "job" / name, environ={})) for name in ("cats_vs_dogs_fast.yaml",
                                                                                      "cats_vs_dogs.yaml"))
    assert fast["name"] == "cats_vs_dogs_fast"
    for key in ("data", "augment", "model", "runtime", "export", "seed"):
        assert fast[key] == recipe[key], key
    fe, ft = fast["train"]["feature_extraction"], fast["train"]["fine_tuning"]
    assert (fe["cache_features"], fe["augment"]) == (True, False)
    assert (ft["augment"], ft["cache_features"], ft["fine_tune_at"], ft["optimizer"]) == (True, False, 100, "rmsprop")
    assert ft["schedule"] == "cosine" and ft["epochs"] < recipe["train"]["fine_tuning"]["epochs"]


def test_set_overrides_and_types() -> None:
    cfg = load_config(ROOT / "job" / "dry_run.yaml",
                      ["train.feature_extraction.epochs=7", "data.validation=null", "model.weights=none",
                       "train.fine_tuning.learning_rate=1e-6"], environ={})
    assert cfg.train.feature_extraction.epochs == 7
    assert cfg.data.validation is None
    assert cfg.train.fine_tuning.learning_rate == 1e-6


def test_environment_overrides_below_command_line() -> None:
    env = {"TLJOB__TRAIN__FEATURE_EXTRACTION__EPOCHS": "4", "TLJOB__DATA__BATCH_SIZE": "8"}
    cfg = load_config(ROOT / "job" / "dry_run.yaml", ["data.batch_size=12"], environ=env)
    assert cfg.train.feature_extraction.epochs == 4
    assert cfg.data.batch_size == 12


def test_parse_override_needs_equals() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.epochs")


BAD = [
    (["train.feature_extraction.epochs=-1"], "train.feature_extraction.epochs", "-1"),
    (["train.fine_tuning.epochs=-3"], "train.fine_tuning.epochs", "-3"),
    (["train.fine_tuning.fine_tune_at=154"], "train.fine_tuning.fine_tune_at", "154 layers"),
    (["data.image_size=16"], "data.image_size", "at least 32"),
    (["data.sourc=folder"], "unknown key 'data.sourc'", "Did you mean 'data.source'"),
    (["bogus.key=1"], "unknown key 'bogus'", "Valid keys"),
    (["data.source=folder", "data.train=/no/such/dir"], "data.train", "/no/such/dir"),
    (["data.source=folder", "data.train=null"], "data.train", "training folder path"),
    (["data.source=tfrecord", "data.train=/no/such/records"], "data.train", "tljob convert"),
    # An absolute glob is checked like a relative one (Path.glob raised NotImplementedError: exit 1).
    (["data.source=tfrecord", "data.train=/no/such/records/*.tfrecord"], "data.train", "/no/such/records/*.tfrecord"),
    (["data.source=parquet"], "data.source", "folder, tfds, tfrecord, synthetic"),
    (["model.weights=/no/such/weights.h5"], "model.weights", "does not exist"),
    (["model.weights=weights.bin"], "model.weights", ".h5"),
    (["model.weights=imagenet", "model.alpha=0.6"], "model.alpha", "ImageNet weights exist"),
    (["data.batch_size=0"], "data.batch_size", "positive"),
    (["data.batch_size=abc"], "data.batch_size", "not a valid int"),
    (["train.feature_extraction.learning_rate=0"], "learning_rate", "positive"),
    (["train.fine_tuning.optimizer=lbfgs"], "train.fine_tuning.optimizer", "adam, rmsprop, sgd"),
    (["runtime.strategy=tpu"], "runtime.strategy", "multi_worker"),
    (["data.validation_fraction=0.6", "data.test_fraction=0.5"], "data.validation_fraction + data.test_fraction", "< 1"),
    (["data.max_bad_fraction=1.5"], "data.max_bad_fraction", "between 0 and 1"),
    (["train.steps_per_execution=0"], "train.steps_per_execution", "1 (one step per call) or more"),
    (["train.cached_validation=sometimes"], "train.cached_validation", "not a valid bool"),
    (["train.fine_tuning.schedule=step"], "train.fine_tuning.schedule", "constant, cosine"),
    (["train.fine_tuning.epochs=2", "train.fine_tuning.warmup_epochs=3"], "train.fine_tuning.warmup_epochs",
     "0 to train.fine_tuning.epochs (2)"),
    # Augmented images change the cached outputs every step: refused, naming both ways out.
    (["train.feature_extraction.cache_features=true"], "train.feature_extraction.cache_features",
     "set train.feature_extraction.augment: false, or train.feature_extraction.cache_features: false"),
    (["runtime.precision=float16"], "runtime.precision", "float32, mixed_float16, mixed_bfloat16"),
    (["runtime.jit_compile=maybe"], "runtime.jit_compile", "not a valid bool"),
    (["augment.placement=gpu"], "augment.placement", "pipeline, model"),
    # The rotation inside an XLA-compiled step: TensorFlow 2.21 has no XLA kernel for its op.
    (["runtime.jit_compile=true", "augment.placement=model"], "runtime.jit_compile: invalid value True",
     "(ImageProjectiveTransformV3) has no XLA kernel in TensorFlow 2.21"),
]


@pytest.mark.parametrize("overrides,key,fix", BAD, ids=[b[1] + ":" + b[0][-1] for b in BAD])
def test_bad_values_name_key_value_and_fix(overrides: list[str], key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "job" / "dry_run.yaml", overrides, environ={})
    message = str(info.value)
    assert key in message and fix in message


def test_absolute_tfrecord_glob_loads(tmp_path: Path) -> None:
    (tmp_path / "data-00000-of-00001.tfrecord").write_bytes(b"")
    pattern = str(tmp_path / "*.tfrecord")
    cfg = load_config(ROOT / "job" / "dry_run.yaml", ["data.source=tfrecord", f"data.train={pattern}"], environ={})
    assert cfg.data.train == pattern


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config("job/nope.yaml", environ={})


def test_digest_ignores_output_only() -> None:
    a = load_config(ROOT / "job" / "dry_run.yaml", ["output=/tmp/a"], environ={})
    b = load_config(ROOT / "job" / "dry_run.yaml", ["output=/tmp/b"], environ={})
    c = load_config(ROOT / "job" / "dry_run.yaml", ["data.batch_size=3"], environ={})
    assert digest(a) == digest(b) != digest(c)


def cli_without_tensorflow(*args: str) -> subprocess.CompletedProcess:
    """`tljob ARGS` in a fresh process that fails if TensorFlow was imported (config errors must be fast)."""
    code = (
        "import sys; from tljob.cli import main; rc = main(sys.argv[1:]); "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_cli_config_error_exits_2_before_tensorflow(tmp_path: Path) -> None:
    """Exit code 2, the message on stderr, and no TensorFlow import (fast failure)."""
    proc = cli_without_tensorflow("train", "--config", str(ROOT / "job" / "dry_run.yaml"),
                                  "--set", "train.fine_tuning.fine_tune_at=999", "--output", str(tmp_path / "run"))
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "train.fine_tuning.fine_tune_at" in proc.stderr and "999" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_reads_the_config_from_a_bucket(gcs_bucket: str, tmp_path: Path) -> None:
    from tljob import storage

    # The bucket's copy carries a bad value: its message proves the CLI read and validated that text.
    text = (ROOT / "job" / "dry_run.yaml").read_text().replace("fine_tune_at: 100", "fine_tune_at: 999")
    storage.write_text(gcs_bucket + "/jobs/job.yaml", text)
    proc = cli_without_tensorflow("train", "--config", gcs_bucket + "/jobs/job.yaml", "--output", str(tmp_path / "r"))
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "train.fine_tuning.fine_tune_at: invalid value 999" in proc.stderr
    proc = cli_without_tensorflow("train", "--config", gcs_bucket + "/jobs/nope.yaml", "--output", str(tmp_path / "r"))
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert f"--config {gcs_bucket}/jobs/nope.yaml: no such file" in proc.stderr


def test_changes_on_resume_lists_unsafe_keys_only() -> None:
    dry = ROOT / "job" / "dry_run.yaml"
    saved = to_yaml(load_config(dry, ["output=/runs/a"], environ={}))
    safe = load_config(dry, ["output=file:///runs/a", "runtime.staging_dir=/scratch", "runtime.peer_timeout_s=90",
                             "runtime.log_sync_s=5", "data.cache=none", "train.steps_per_execution=4"], environ={})
    assert changes_on_resume(saved, "params.yaml", safe) == []
    other = load_config(dry, ["train.fine_tuning.epochs=9", "data.source=folder", f"data.train={ROOT}",
                              "model.dropout=0.5", "runtime.log_sync_s=5"], environ={})
    assert changes_on_resume(saved, "params.yaml", other) == [
        "data.source: 'synthetic' -> 'folder'", f"data.train: None -> '{ROOT}'", "model.dropout: 0.2 -> 0.5",
        "train.fine_tuning.epochs: 2 -> 9"]
    # A key that an older params.yaml had, or lacked, is a difference too.
    older = saved.replace("seed: 42\n", "seed: 42\nretired_key: 1\n").replace("  alpha: 0.35\n", "")
    assert changes_on_resume(older, "params.yaml", safe) == ["model.alpha: (absent) -> 0.35",
                                                             "retired_key: 1 -> (absent)"]
    with pytest.raises(ConfigError, match="params.yaml: not a config"):
        changes_on_resume("[1, 2", "params.yaml", safe)


def test_export_section() -> None:
    assert load_config(None, environ={}).export.tflite is False
    assert load_config(None, ["export.tflite=true"], environ={}).export.tflite is True
    with pytest.raises(ConfigError, match=r"export\.tflite: 'yes please' is not a valid bool"):
        load_config(None, ["export.tflite=yes please"], environ={})
    with pytest.raises(ConfigError, match=r"unknown key 'export\.tfilte'.*Did you mean 'export\.tflite'"):
        load_config(None, ["export.tfilte=true"], environ={})


def test_cache_features_needs_unchanged_images_only() -> None:
    """Allowed where the phase's images are not augmented: the phase's own switch, or no augmentation at all."""
    path = ROOT / "job" / "dry_run.yaml"
    off = load_config(path, ["train.fine_tuning.cache_features=true", "train.fine_tuning.augment=false"], environ={})
    assert off.train.fine_tuning.cache_features and not off.train.fine_tuning.augment
    none = load_config(path, ["train.feature_extraction.cache_features=true", "augment.flip=none",
                              "augment.rotation=0"], environ={})
    assert none.train.feature_extraction.cache_features
    # The defaults are the tutorial's: every phase augmented, nothing cached, a constant rate.
    default = load_config(ROOT / "job" / "cats_vs_dogs.yaml", environ={})
    for phase in (default.train.feature_extraction, default.train.fine_tuning):
        assert (phase.augment, phase.cache_features, phase.schedule, phase.warmup_epochs) == (True, False, "constant", 0)


def test_gpu_settings_default_off() -> None:
    """Defaults: the recipe as before (float32, no XLA, augmentation in the input pipeline)."""
    for cfg in (load_config(None, environ={}), load_config(ROOT / "job" / "cats_vs_dogs.yaml", environ={}),
                load_config(ROOT / "job" / "dry_run.yaml", environ={})):
        assert (cfg.runtime.precision, cfg.runtime.jit_compile, cfg.augment.placement) == ("float32", False, "pipeline")


def test_xla_is_refused_only_with_the_rotation_inside_the_step() -> None:
    dry = ROOT / "job" / "dry_run.yaml"
    for allowed in (["runtime.jit_compile=true"],  # the rotation runs in the input pipeline
                    ["runtime.jit_compile=true", "augment.placement=model", "augment.rotation=0"]):  # flips compile
        assert load_config(dry, allowed, environ={}).runtime.jit_compile is True
    with pytest.raises(ConfigError, match=r"Set runtime.jit_compile: false, or augment.placement: pipeline"):
        load_config(dry, ["runtime.jit_compile=true", "augment.placement=model", "augment.rotation=0.1"], environ={})


def test_gpu_job_is_the_recipe_with_the_gpu_settings() -> None:
    gpu = load_config(ROOT / "job" / "cats_vs_dogs_gpu.yaml", environ={})
    recipe = load_config(ROOT / "job" / "cats_vs_dogs.yaml", environ={})
    assert (gpu.runtime.precision, gpu.runtime.jit_compile, gpu.augment.placement) == ("mixed_float16", False, "model")
    assert gpu.data.cache == "auto" and gpu.data.cache_budget_mb >= 2048  # cats_vs_dogs decoded: ~1.8 GB
    # Same data source and the same model; the training differs only by the batch and its learning rates.
    assert gpu.data.source == recipe.data.source and gpu.data.name == recipe.data.name
    assert (gpu.data.train, gpu.data.validation, gpu.data.test) == (recipe.data.train, recipe.data.validation,
                                                                   recipe.data.test)
    assert gpu.model == recipe.model and gpu.augment.flip == recipe.augment.flip
    assert gpu.augment.rotation == recipe.augment.rotation


def test_precision_is_not_safe_on_resume_unlike_the_rest_of_runtime() -> None:
    dry = ROOT / "job" / "dry_run.yaml"
    saved = to_yaml(load_config(dry, environ={}))
    moved = load_config(dry, ["runtime.jit_compile=true", "augment.placement=model", "augment.rotation=0"],
                        environ={})
    assert changes_on_resume(saved, "params.yaml", moved) == ["augment.rotation: 0.2 -> 0.0"]
    mixed = load_config(dry, ["runtime.precision=mixed_bfloat16"], environ={})
    assert changes_on_resume(saved, "params.yaml", mixed) == ["runtime.precision: 'float32' -> 'mixed_bfloat16'"]
    # The digest covers what a resume may not change: the precision, not where or how the run executes.
    base = load_config(dry, environ={})
    assert digest(mixed) != digest(base)
    for safe in (["runtime.jit_compile=true", "data.cache=none", "runtime.peer_timeout_s=9"],
                 ["augment.placement=model"]):
        assert digest(load_config(dry, safe, environ={})) == digest(base)
