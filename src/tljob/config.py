"""The job's one typed config tree: frozen dataclasses, loaded from YAML, overridden, validated.

Order of precedence (later wins): dataclass defaults (the tutorial's recipe) < YAML file <
environment (``TLJOB__SECTION__KEY=value``) < command line (``--set section.key=value``).
Every error names the key, the value and the fix, and is raised before TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from tljob.errors import ConfigError

ENV_PREFIX = "TLJOB__"

# Layers in Keras' MobileNetV2(include_top=False); the same for every alpha and input size.
MOBILENET_V2_DEPTH = 154
# Keras ships ImageNet weights for these widths only.
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
# Keras refuses MobileNetV2 inputs smaller than this.
MIN_IMAGE_SIZE = 32

SOURCES = ("folder", "tfds", "tfrecord", "synthetic")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
OPTIMIZERS = ("adam", "rmsprop", "sgd")
CACHE_MODES = ("auto", "memory", "none")
LR_RULES = ("none", "linear", "sqrt")
SCHEDULES = ("constant", "cosine")
STRATEGIES = ("auto", "multi_worker", "mirrored", "default")
COMMUNICATIONS = ("auto", "ring", "nccl")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
PLACEMENTS = ("pipeline", "model")


@dataclass(frozen=True)
class SyntheticConfig:
    """A generated image set with a learnable pattern (each class has its own noise grain)."""

    num_classes: int = 2
    train_examples: int = 256
    validation_examples: int = 64
    test_examples: int = 64


@dataclass(frozen=True)
class DataConfig:
    source: str = "tfds"
    # TFDS dataset name (source: tfds only).
    name: str = "cats_vs_dogs"
    # folder: a directory with one sub-folder per class; tfrecord: a directory or glob of shards;
    # tfds: a split string such as "train[:80%]". Any of them may be gs://.
    train: str | None = "train[:80%]"
    validation: str | None = "train[80%:90%]"
    test: str | None = "train[90%:]"
    data_dir: str | None = None
    # folder and tfrecord: carve validation/test out of `train` when their own path is not given.
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    image_size: int = 160
    # Per replica; the global batch is this times the number of replicas.
    batch_size: int = 32
    # Streams only (TFDS, TFRecord, uncached folders): training data in memory is permuted whole each epoch.
    shuffle_buffer: int = 1000
    # auto: keep decoded, resized images in memory when they fit cache_budget_mb.
    cache: str = "auto"
    cache_budget_mb: int = 4096
    # Stop with a data error when more than this share of the files cannot be decoded.
    max_bad_fraction: float = 0.05
    # Where gs:// inputs are staged; default: <staging dir>/data-cache.
    cache_dir: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class AugmentConfig:
    flip: str = "horizontal"
    # Fraction of a full turn, as in RandomRotation(0.2).
    rotation: float = 0.2
    # pipeline: in the input pipeline on the CPU, beside the training step; model: a layer of the training model,
    # on the accelerator, for when the CPU cannot keep up (bench/README.md, "GPU pods"). Never in the export.
    placement: str = "pipeline"


@dataclass(frozen=True)
class ModelConfig:
    # imagenet | none | path or URI of a Keras .h5 weights file for MobileNetV2(include_top=False).
    weights: str = "imagenet"
    alpha: float = 1.0
    dropout: float = 0.2


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int = 10
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    # The rate over the phase: constant (the tutorial), or cosine decay to 0 by the phase's last step; either
    # after a linear warm-up from 0 over warmup_epochs (fractions allowed).
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    # Whether the `augment` section applies to this phase's training images.
    augment: bool = True
    # Train on the outputs of the layers that do not change in this phase (the frozen base in phase 1), computed
    # once per phase, instead of running them every step. Needs augment: false (an augmented image changes them).
    cache_features: bool = False


@dataclass(frozen=True)
class FineTuneConfig(PhaseConfig):
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-5
    # Layers of the base from this index on are trained; BatchNorm stays in inference mode.
    fine_tune_at: int = 100


@dataclass(frozen=True)
class TrainConfig:
    feature_extraction: PhaseConfig = field(default_factory=PhaseConfig)
    fine_tuning: FineTuneConfig = field(default_factory=FineTuneConfig)
    # null: as many steps as one pass over the training data (the shuffled stream runs on across epochs).
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    # Validate on cached features of the network's constant part (same metrics as model.evaluate, the
    # frozen layers run once per phase instead of every epoch); false runs model.evaluate every epoch.
    cached_validation: bool = True
    # Training steps per tf.function call: fewer Python round trips per epoch. Callbacks then see every
    # Nth batch only, so step backups and the SIGTERM check happen at those batches.
    steps_per_execution: int = 1
    # How the learning rate follows the global batch: none keeps the tutorial's rates as written.
    lr_scaling: str = "none"
    reference_batch_size: int = 32


@dataclass(frozen=True)
class RuntimeConfig:
    strategy: str = "auto"
    communication: str = "auto"
    collective_timeout_s: float | None = None
    # A worker that sees no training progress for this long exits with the retryable code.
    peer_timeout_s: float = 45.0
    # Backups are taken every epoch; also every N steps when set.
    backup_every_steps: int | None = None
    # After SIGTERM, how long to try to save a backup before exiting anyway.
    termination_grace_s: float = 25.0
    # Local scratch for staging outputs (an emptyDir in Kubernetes); default: the system temp dir.
    staging_dir: str | None = None
    # Upload TensorBoard logs every this many seconds at most (gs:// outputs).
    log_sync_s: float = 60.0
    # Keras dtype policy of the training model: mixed_* compute in 16 bits (the classifier head and the variables stay
    # float32; mixed_float16 adds loss scaling). On a GPU with tensor cores; slower on CPUs (bench/README.md).
    precision: str = "float32"
    # Compile the training step with XLA. Off by default: 16x slower steps on CPU (bench/README.md).
    jit_compile: bool = False


@dataclass(frozen=True)
class ExportConfig:
    # Also write model/model.tflite (float32, converted from the SavedModel), kept only when its outputs agree
    # with the SavedModel's on the test images (export.TFLITE_TOLERANCE).
    tflite: bool = False


@dataclass(frozen=True)
class JobConfig:
    name: str = "tljob"
    seed: int = 42
    # Run directory: local path, file:// or gs://; --output overrides it.
    output: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
    read: Callable[[str], str] | None = None,
) -> JobConfig:
    """Loads YAML, applies environment then ``--set`` overrides, builds and validates the tree.

    `read` gives the text of `path`; by default a local file is read. The CLI passes tljob.storage's
    reader, so that `--config gs://bucket/job.yaml` works (this module imports nothing of tljob).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(str(path), read or _read_local)
    for key, value in env_overrides(os.environ if environ is None else environ):
        _set_dotted(raw, key, value, origin=f"environment variable {ENV_PREFIX}{key.upper().replace('.', '__')}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, origin=f"--set {item}")
    cfg = _build(JobConfig, raw, prefix="")
    validate(cfg)
    return cfg


def _read_local(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def _read_yaml(path: str, read: Callable[[str], str]) -> dict[str, Any]:
    try:
        text = read(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise ConfigError(f"--config {path}: no such file. Fix: pass a YAML file such as job/dry_run.yaml "
                          f"(or gs://bucket/job.yaml).") from exc
    except PermissionError as exc:
        raise ConfigError(f"--config {path}: not readable ({exc}). Fix: make it readable by this user.") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text ({exc}). Fix: pass the YAML file itself.") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc}). Fix the syntax at the position shown.") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections, got {type(data).__name__}.")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML, so numbers, booleans and null keep their type)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.feature_extraction.epochs=2.")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    """``TLJOB__TRAIN__STEPS_PER_EPOCH=5`` -> ("train.steps_per_epoch", 5), sorted for a stable order."""
    found = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower().replace("__", ".")
            found.append((key, parse_override(f"{key}={environ[name]}")[1]))
    return found


def _set_dotted(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{part}' is a value, not a section; it has no key '{key}'.")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key '{prefix}{key}'.{hint} Valid keys here: {', '.join(sorted(names))}."
            )
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, prefix=f"{key}.")
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed. Fix: give a {hint.__name__} value.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: {value!r} is not a valid {hint.__name__}. Fix: give a {hint.__name__} value.")


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r}. Fix: {fix}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, f"use one of {', '.join(choices)}.")


def _is_uri(path: str) -> bool:
    return "://" in path


def validate(cfg: JobConfig) -> None:
    """Checks values that types cannot: ranges, choices, and local inputs that must exist."""
    d, m, t, r = cfg.data, cfg.model, cfg.train, cfg.runtime
    _choice("data.source", d.source, SOURCES)
    _choice("data.cache", d.cache, CACHE_MODES)
    _check(d.image_size >= MIN_IMAGE_SIZE, "data.image_size", d.image_size,
           f"MobileNetV2 needs images of at least {MIN_IMAGE_SIZE} pixels; the tutorial uses 160.")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "use a positive per-replica batch, e.g. 32.")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "use a positive buffer, e.g. 1000.")
    _check(d.cache_budget_mb >= 0, "data.cache_budget_mb", d.cache_budget_mb, "use 0 or more megabytes.")
    _check(0.0 <= d.max_bad_fraction < 1.0, "data.max_bad_fraction", d.max_bad_fraction,
           "use a share between 0 and 1, e.g. 0.05.")
    for key, frac in (("data.validation_fraction", d.validation_fraction), ("data.test_fraction", d.test_fraction)):
        _check(0.0 <= frac < 1.0, key, frac, "use a share between 0 and 1, e.g. 0.2.")
    _check(d.validation_fraction + d.test_fraction < 1.0, "data.validation_fraction + data.test_fraction",
           d.validation_fraction + d.test_fraction, "leave some data for training: the two shares must add to < 1.")
    s = d.synthetic
    _check(s.num_classes >= 2, "data.synthetic.num_classes", s.num_classes, "use 2 or more classes.")
    for key, n in (("train_examples", s.train_examples), ("validation_examples", s.validation_examples),
                   ("test_examples", s.test_examples)):
        _check(n >= 0, f"data.synthetic.{key}", n, "use 0 or more examples.")
    _check(s.train_examples >= 1, "data.synthetic.train_examples", s.train_examples, "use at least 1 example.")
    if d.source in ("folder", "tfrecord"):
        _check(bool(d.train), "data.train", d.train, f"give the training {d.source} path (local or gs://).")
        for key in ("train", "validation", "test"):
            path = getattr(d, key)
            if path and not _is_uri(path) and d.source == "folder" and not Path(path).is_dir():
                raise ConfigError(
                    f"data.{key}: directory {path!r} does not exist. Fix: point it at a folder with one "
                    f"sub-folder per class, or set it to null."
                )
            if path and not _is_uri(path) and d.source == "tfrecord" and not _tfrecord_exists(path):
                raise ConfigError(
                    f"data.{key}: no TFRecord files at {path!r}. Fix: write them with `tljob convert` "
                    f"or point to a directory or glob of *.tfrecord shards."
                )
    if d.source == "tfds":
        _check(bool(d.name), "data.name", d.name, "name a TFDS dataset, e.g. cats_vs_dogs.")
        _check(bool(d.train), "data.train", d.train, "give a TFDS split, e.g. 'train[:80%]'.")
    _choice("augment.flip", cfg.augment.flip, FLIPS)
    _choice("augment.placement", cfg.augment.placement, PLACEMENTS)
    _check(0.0 <= cfg.augment.rotation <= 1.0, "augment.rotation", cfg.augment.rotation,
           "use a fraction of a full turn between 0 and 1, e.g. 0.2.")
    if m.weights not in ("imagenet", "none"):
        _check(m.weights.endswith(".h5"), "model.weights", m.weights,
               "use imagenet, none, or the path/URI of a Keras .h5 weights file.")
        if not _is_uri(m.weights) and not Path(m.weights).is_file():
            raise ConfigError(
                f"model.weights: file {m.weights!r} does not exist. Fix: give an existing .h5 file, "
                f"or use imagenet / none."
            )
    if m.weights == "imagenet":
        _check(m.alpha in IMAGENET_ALPHAS, "model.alpha", m.alpha,
               f"ImageNet weights exist for alpha {', '.join(map(str, IMAGENET_ALPHAS))}; pick one or use weights: none.")
    _check(m.alpha > 0, "model.alpha", m.alpha, "use a positive width multiplier, e.g. 1.0.")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "use a rate between 0 and 1, e.g. 0.2.")
    for name in ("feature_extraction", "fine_tuning"):
        phase = getattr(t, name)
        _check(phase.epochs >= 0, f"train.{name}.epochs", phase.epochs, "use 0 or more epochs.")
        _check(phase.learning_rate > 0, f"train.{name}.learning_rate", phase.learning_rate,
               "use a positive rate, e.g. 1e-4.")
        _choice(f"train.{name}.optimizer", phase.optimizer, OPTIMIZERS)
        _choice(f"train.{name}.schedule", phase.schedule, SCHEDULES)
        _check(0 <= phase.warmup_epochs <= max(phase.epochs, 0), f"train.{name}.warmup_epochs", phase.warmup_epochs,
               f"use 0 to train.{name}.epochs ({phase.epochs}) epochs of warm-up, e.g. 0.5.")
        if phase.cache_features and phase.augment and augments(cfg.augment):
            raise ConfigError(
                f"train.{name}.cache_features: true needs the same images every epoch, but train.{name}.augment is "
                f"true (augment.flip={cfg.augment.flip!r}, augment.rotation={cfg.augment.rotation}): augmented images "
                f"change the cached layers' outputs every step. Fix: set train.{name}.augment: false, or "
                f"train.{name}.cache_features: false.")
    _check(t.feature_extraction.epochs + t.fine_tuning.epochs >= 1, "train.*.epochs",
           (t.feature_extraction.epochs, t.fine_tuning.epochs), "train at least one epoch in some phase.")
    _check(0 <= t.fine_tuning.fine_tune_at < MOBILENET_V2_DEPTH, "train.fine_tuning.fine_tune_at",
           t.fine_tuning.fine_tune_at,
           f"MobileNetV2's base has {MOBILENET_V2_DEPTH} layers: use an index from 0 to {MOBILENET_V2_DEPTH - 1} "
           f"(the tutorial uses 100).")
    _check(t.steps_per_execution >= 1, "train.steps_per_execution", t.steps_per_execution,
           "use 1 (one step per call) or more.")
    for key, value in (("train.steps_per_epoch", t.steps_per_epoch), ("train.validation_steps", t.validation_steps),
                       ("runtime.backup_every_steps", r.backup_every_steps)):
        _check(value is None or value >= 1, key, value, "use a positive number, or null.")
    _choice("train.lr_scaling", t.lr_scaling, LR_RULES)
    _check(t.reference_batch_size >= 1, "train.reference_batch_size", t.reference_batch_size,
           "use the batch size the learning rates were tuned for, e.g. 32.")
    _choice("runtime.strategy", r.strategy, STRATEGIES)
    _choice("runtime.communication", r.communication, COMMUNICATIONS)
    _choice("runtime.precision", r.precision, PRECISIONS)
    # Checked here, not at the first step: XLA refuses the whole step, after the data and the model are ready.
    _check(not (r.jit_compile and cfg.augment.placement == "model" and cfg.augment.rotation > 0), "runtime.jit_compile",
           r.jit_compile,
           f"with augment.placement: model and augment.rotation: {cfg.augment.rotation:g} the rotation runs inside the "
           f"compiled training step, and its op (ImageProjectiveTransformV3) has no XLA kernel in TensorFlow 2.21: the "
           f"step would not compile. Set runtime.jit_compile: false, or augment.placement: pipeline (the rotation then "
           f"runs in the input pipeline, outside the step), or augment.rotation: 0.")
    _check(r.collective_timeout_s is None or r.collective_timeout_s > 0, "runtime.collective_timeout_s",
           r.collective_timeout_s, "use a positive number of seconds, or null.")
    _check(r.peer_timeout_s > 0, "runtime.peer_timeout_s", r.peer_timeout_s, "use a positive number of seconds.")
    _check(r.termination_grace_s > 0, "runtime.termination_grace_s", r.termination_grace_s,
           "use a positive number of seconds, below the pod's terminationGracePeriodSeconds.")
    _check(r.log_sync_s > 0, "runtime.log_sync_s", r.log_sync_s, "use a positive number of seconds.")


def augments(aug: AugmentConfig) -> bool:
    """Whether the augment section changes images at all."""
    return aug.flip != "none" or aug.rotation > 0


def _tfrecord_exists(path: str) -> bool:
    """A local folder of shards, a shard, or a glob (absolute or relative) that matches at least one file."""
    p = Path(path)
    if p.is_dir():
        return any(p.glob("*.tfrecord*"))
    # glob.glob, not Path.glob: Path().glob refuses absolute patterns (NotImplementedError, exit 1).
    return any(os.path.isfile(f) for f in glob.glob(path)) if any(ch in path for ch in "*?[") else p.is_file()


# ----------------------------------------------------------------------------- output


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: JobConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# What may change when an unfinished run is resumed: where and how it runs, never what it trains. Any
# other difference would make the resumed run continue the old one with the new values mixed in.
SAFE_ON_RESUME_SECTIONS = (
    # staging_dir, peer_timeout_s, log_sync_s, termination_grace_s, backup_every_steps, collective_timeout_s,
    # strategy, communication: operational, like the number of workers (which may change between attempts).
    "runtime",
)
SAFE_ON_RESUME_KEYS = (
    "output",  # the same run addressed another way (a path and its file:// URI, a moved directory)
    "data.cache", "data.cache_budget_mb", "data.cache_dir",  # where decoded images wait, not which ones
    "train.cached_validation",  # the same validation metrics, computed faster
    "train.steps_per_execution",  # the same steps, fewer Python round trips
    # The same transform on the same images, run elsewhere: the augmentation layer has no variables, and a backup
    # restores into the model with or without it (tested).
    "augment.placement",
)
# Keys of a safe section that change what is trained after all.
UNSAFE_ON_RESUME_KEYS = (
    # The numerics of every step (and mixed_float16's loss scale, which a float32 backup lacks): weights continued
    # in another precision would make a run that is neither. runtime.jit_compile is safe: the same steps,
    # compiled, rounded differently at most, as thread timing does.
    "runtime.precision",
)


def safe_on_resume(key: str) -> bool:
    if key in UNSAFE_ON_RESUME_KEYS:
        return False
    return key in SAFE_ON_RESUME_KEYS or key.split(".", 1)[0] in SAFE_ON_RESUME_SECTIONS


def changes_on_resume(saved_yaml: str, origin: str, cfg: JobConfig) -> list[str]:
    """`key: old -> new` (dotted keys) for every difference between a run's saved params and `cfg` that is
    not safe on resume; [] when the run may continue with `cfg`. `origin` names the saved file in errors."""
    try:
        saved = yaml.safe_load(saved_yaml)
    except yaml.YAMLError as exc:
        saved = exc
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{origin}: not a config ({saved}), so this unfinished run cannot be checked before resuming. Fix: "
            f"restore the file, or start over with a new --output."
        )
    old, new = _flatten(saved), _flatten(to_dict(cfg))

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(absent)"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}"
            for key in [*new, *(k for k in old if k not in new)]
            if not safe_on_resume(key) and (key not in old or key not in new or old[key] != new[key])]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def digest(cfg: JobConfig) -> str:
    """A stable hash of everything that changes what is trained: the keys not safe on resume."""
    data = {key: value for key, value in _flatten(to_dict(cfg)).items() if not safe_on_resume(key)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
