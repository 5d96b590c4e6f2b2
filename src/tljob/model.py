"""MobileNetV2 base + the tutorial's head, weights loading, the fine-tuning unfreeze, and the dtype policy
(runtime.precision) and in-model augmentation (augment.placement: model) it is built with.

Every function that creates variables is called inside ``strategy.scope()`` by the trainer, in both
phases (the model, and each phase's optimizer through ``compile``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from tljob import data, policy, storage
from tljob.config import AugmentConfig, ModelConfig, PhaseConfig
from tljob.errors import ConfigError

log = logging.getLogger(__name__)


def head_units(num_classes: int) -> int:
    """One sigmoid unit for two classes (the tutorial's head), one softmax unit per class otherwise."""
    return 1 if num_classes == 2 else num_classes


def imagenet_weights_file(alpha: float, image_size: int) -> str:
    """The file tf-keras downloads for MobileNetV2(include_top=False, weights="imagenet")."""
    rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def resolve_weights(weights: str, cache_dir: str, *, alpha: float, image_size: int) -> str | None:
    """imagenet -> the copy baked into $KERAS_HOME/models if there, else Keras' own download;
    none -> random; anything else -> a local copy of the .h5 file (staged from gs:// if needed)."""
    if weights == "none":
        return None
    if weights == "imagenet":
        # tf-keras' get_file never looks in KERAS_HOME (it falls back to /tmp/.keras when ~/.keras is
        # read-only); the container bakes the weights there, so hand Keras the file itself.
        baked = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / imagenet_weights_file(
            alpha, image_size)
        return str(baked) if baked.is_file() else "imagenet"
    return storage.stage_input(weights, cache_dir)


def set_precision(precision: str) -> None:
    """Sets the Keras dtype policy (runtime.precision) for the models built after it; on every worker."""
    tf.keras.mixed_precision.set_global_policy(precision)
    policy = tf.keras.mixed_precision.global_policy()
    log.info("precision: %s (layers compute in %s, variables and the classifier head in float32%s)", policy.name,
             policy.compute_dtype, "; loss scaling" if policy.name == "mixed_float16" else "")


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """The dtype policy `precision` for the models built inside, the previous one after."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


class Augmentation(tf.keras.layers.Layer):
    """data.augment_batch as the training model's first layer (augment.placement: model): it then runs inside
    the training step, on the accelerator. In inference (evaluate, validation, predict) it passes the images
    through. It has no variables, so the model's weights are those of a model without it."""

    def __init__(self, flip: str, rotation: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.augment = AugmentConfig(flip=flip, rotation=rotation, placement="model")
        # False in a phase with train.<phase>.augment: false (set_augmentation, before the phase's compile, which
        # makes fit trace its step again).
        self.active = True

    def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return data.augment_batch(images, self.augment) if training and self.active else images

    def get_config(self) -> dict[str, Any]:
        # Read by cached validation (tljob.fastval) to split the model's graph.
        return {**super().get_config(), "flip": self.augment.flip, "rotation": self.augment.rotation}


def set_augmentation(model: tf.keras.Model, active: bool) -> None:
    """Turns the in-model augmentation (augment.placement: model) on or off for the steps of the next compile."""
    for layer in model.layers:
        if isinstance(layer, Augmentation):
            layer.active = active


def build_model(cfg: ModelConfig, *, image_size: int, num_classes: int, cache_dir: str,
                augment: AugmentConfig | None = None) -> tf.keras.Model:
    """Input (float 0..255) -> [augment] -> preprocess -> MobileNetV2 (training=False) -> GAP -> Dropout -> Dense.

    Built in the current dtype policy (set_precision), with the classifier head in float32: a softmax or
    sigmoid computed in 16 bits is numerically unstable (TensorFlow's mixed-precision guide). `augment`: the
    training model's augmentation settings; with placement model it becomes the Augmentation layer. None (the
    serving copy): no augmentation.
    """
    weights = resolve_weights(cfg.weights, cache_dir, alpha=cfg.alpha, image_size=image_size)
    try:
        with tf.variable_creator_scope(_first_replica_statistics):
            base = tf.keras.applications.MobileNetV2(
                input_shape=(image_size, image_size, 3), include_top=False, weights=weights, alpha=cfg.alpha
            )
    except (ValueError, OSError) as exc:
        raise ConfigError(
            f"model.weights={cfg.weights!r} with alpha={cfg.alpha}, image_size={image_size}: {exc}. Fix: give "
            f"a Keras MobileNetV2 include_top=False .h5 file for this alpha, or use imagenet / none."
        ) from exc
    base.trainable = False
    inputs = tf.keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    if augment is not None and augment.placement == "model":
        # float32: the pixels as the input pipeline augments them, whatever the policy.
        x = Augmentation(augment.flip, augment.rotation, name="augment", dtype="float32")(x)
    # mobilenet_v2.preprocess_input is x / 127.5 - 1; a Rescaling layer computes the same and serialises
    # cleanly, so the exported model takes raw 0..255 pixels.
    x = tf.keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)
    # training=False keeps BatchNorm in inference mode in both phases: its statistics stay ImageNet's even
    # when the layers are unfrozen (otherwise fine-tuning wrecks what the base learned).
    x = base(x, training=False)
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = tf.keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    units = head_units(num_classes)
    outputs = tf.keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax", name="classifier",
                                    dtype="float32")(x)
    return tf.keras.Model(inputs, outputs, name="tljob_mobilenetv2")


def _first_replica_statistics(next_creator: Any, **kwargs: Any) -> tf.Variable:
    """Creates BatchNorm moving statistics with ONLY_FIRST_REPLICA instead of MEAN aggregation.

    The base always runs with training=False, so its statistics never change while training and every
    replica holds the same values (loaded, or calibrated from the same images on each replica). With
    MEAN, every cross-replica read (building the model, each backup, each weights file) is an
    all-reduce per statistic, 104 of them for MobileNetV2, under MultiWorkerMirroredStrategy; reading
    replica 0 gives the same value (what it saved: bench/README.md, "What each change bought").
    """
    if (kwargs.get("synchronization") == tf.VariableSynchronization.ON_READ
            and kwargs.get("aggregation") == tf.VariableAggregation.MEAN
            and kwargs.get("name") in ("moving_mean", "moving_variance")):
        kwargs["aggregation"] = tf.VariableAggregation.ONLY_FIRST_REPLICA
    return next_creator(**kwargs)


def calibrate_batchnorm(model: tf.keras.Model, images: np.ndarray) -> None:
    """Sets the base's BatchNorm statistics from a sample of training images.

    For `weights: none` only: with a random base, inference-mode BatchNorm (mean 0, variance 1) lets the
    activations shrink by orders of magnitude per block, and the head sees constant features. One
    training-mode pass with momentum 0 makes each layer's moving statistics those of the sample, so
    the random features carry the input's signal. Every worker computes them from the same images, then
    one all-reduce makes them equal to the bit (agree_statistics). Call it in the strategy's scope.
    """
    base = get_base(model)
    layers = [layer for layer in base.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    x = model.get_layer("preprocess")(tf.constant(images, tf.float32))
    # A frozen BatchNorm layer runs in inference mode whatever `training` says: unfreeze for this one pass.
    was_trainable = base.trainable
    base.trainable = True
    # In replica context (strategy.run), each replica updates its own copy of the statistics from the
    # same images: no collective. Called eagerly in cross-replica context, every moving-average update
    # would read the on-read-synchronised statistics through an all-reduce, about 200 of them under
    # MultiWorkerMirroredStrategy, ~10 s on two CPU workers.
    tf.distribute.get_strategy().run(tf.function(lambda images: base(images, training=True)), args=(x,))
    base.trainable = was_trainable
    agree_statistics(layers)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    log.info("weights: none -> BatchNorm statistics of %d base layers set from %d training images",
             len(layers), len(images))


def agree_statistics(layers: list[tf.keras.layers.BatchNormalization]) -> None:
    """Replaces every replica's BatchNorm statistics with their mean over all replicas, in one all-reduce.

    The same images do not give bit-identical statistics on every worker: with 3 workers on 2 CPUs,
    3 of 4 runs ended with two variants of the statistics among the workers (the trainable weights
    agreed), as multi-threaded sums change their order with scheduling. Statistics are read from
    each worker's first replica (_first_replica_statistics), so without this the workers would export
    different models. An all-reduce hands every worker the same result, bit for bit.
    """
    stats = [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]
    sizes = [int(np.prod(v.shape)) for v in stats]
    strategy = tf.distribute.get_strategy()

    def mean_over_replicas() -> None:
        # Runs on each replica: reads and writes that replica's own copy of the statistics.
        flat = tf.concat([tf.reshape(v.read_value(), [-1]) for v in stats], axis=0)
        mean = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, flat)
        for v, part in zip(stats, tf.split(mean, sizes)):
            v.assign(tf.reshape(part, v.shape))

    tf.function(lambda: strategy.run(mean_over_replicas))()


def get_base(model: tf.keras.Model) -> tf.keras.Model:
    """The MobileNetV2 base: the one nested model among the layers."""
    return next(layer for layer in model.layers if isinstance(layer, tf.keras.Model))


def unfreeze_from(model: tf.keras.Model, fine_tune_at: int) -> int:
    """Makes base layers [fine_tune_at:] trainable; returns how many base layers are now trainable."""
    base = get_base(model)
    base.trainable = True
    for layer in base.layers[:fine_tune_at]:
        layer.trainable = False
    trainable = sum(1 for layer in base.layers if layer.trainable)
    log.info("fine-tuning: %d of %d base layers trainable (from index %d)", trainable, len(base.layers), fine_tune_at)
    return trainable


def learning_rate_schedule(phase: PhaseConfig, peak: float,
                           steps_per_epoch: int) -> float | tf.keras.optimizers.schedules.LearningRateSchedule:
    """The phase's rate as the optimizer takes it: `peak` itself, or Keras' CosineDecay for a warm-up (linear from
    0 to `peak`) and then a cosine to 0 (schedule: cosine) or a constant `peak` (alpha 1: no decay). It follows
    the optimizer's step counter, which backups keep: a resumed phase continues the schedule where it was."""
    if phase.schedule == "constant" and not phase.warmup_epochs:
        return peak
    warmup, rest = policy.schedule_steps(phase.epochs, steps_per_epoch, phase.warmup_epochs)
    return tf.keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else peak, max(rest, 1), alpha=1.0 if phase.schedule == "constant" else 0.0,
        warmup_target=peak if warmup else None, warmup_steps=warmup)


def make_optimizer(phase: PhaseConfig, learning_rate: float | tf.keras.optimizers.schedules.LearningRateSchedule,
                   ) -> tf.keras.optimizers.Optimizer:
    if phase.optimizer == "adam":
        return tf.keras.optimizers.Adam(learning_rate)
    if phase.optimizer == "rmsprop":
        return tf.keras.optimizers.RMSprop(learning_rate)
    return tf.keras.optimizers.SGD(learning_rate, momentum=0.9)


def loss_and_metrics(num_classes: int) -> tuple[tf.keras.losses.Loss, list]:
    """Binary cross-entropy on a sigmoid (two classes, as the tutorial) or sparse categorical otherwise."""
    if head_units(num_classes) == 1:
        return tf.keras.losses.BinaryCrossentropy(), [tf.keras.metrics.BinaryAccuracy(name="accuracy")]
    return tf.keras.losses.SparseCategoricalCrossentropy(), [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")]


def compile_for_phase(model: tf.keras.Model, phase: PhaseConfig,
                      learning_rate: float | tf.keras.optimizers.schedules.LearningRateSchedule, num_classes: int,
                      steps_per_execution: int = 1, jit_compile: bool = False) -> None:
    """Compiles (again) for a phase; Keras only sees a change of `trainable` after a recompile. Under the
    mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer. `jit_compile`: XLA for the
    training, evaluation and prediction steps (runtime.jit_compile)."""
    loss, metrics = loss_and_metrics(num_classes)
    model.compile(optimizer=make_optimizer(phase, learning_rate), loss=loss, metrics=metrics,
                  steps_per_execution=steps_per_execution, jit_compile=jit_compile)
