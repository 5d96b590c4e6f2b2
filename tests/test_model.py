"""The model: the tutorial's structure, weights loading, and the fine-tuning unfreeze."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tljob  # noqa: F401  (selects tf-keras before TensorFlow loads)
import tensorflow as tf

from tljob import model as model_lib
from tljob.config import MOBILENET_V2_DEPTH, AugmentConfig, FineTuneConfig, ModelConfig, PhaseConfig
from tljob.errors import ConfigError


def small(num_classes: int = 2, weights: str = "none", size: int = 32) -> tf.keras.Model:
    return model_lib.build_model(ModelConfig(weights=weights, alpha=0.35), image_size=size,
                                 num_classes=num_classes, cache_dir="/tmp")


def test_structure_is_the_tutorials() -> None:
    m = small()
    names = [layer.name for layer in m.layers]
    assert names[1:] == ["preprocess", names[2], "pool", "dropout", "classifier"]
    base = model_lib.get_base(m)
    assert len(base.layers) == MOBILENET_V2_DEPTH
    assert not base.trainable and m.layers[-1].activation.__name__ == "sigmoid"
    assert m.layers[-1].units == 1
    # preprocess_input: 0 -> -1, 255 -> 1
    pre = m.get_layer("preprocess")(tf.constant([[0.0, 255.0]]))
    np.testing.assert_allclose(pre.numpy(), [[-1.0, 1.0]], atol=1e-6)


def test_more_than_two_classes_uses_softmax() -> None:
    m = small(num_classes=5)
    assert m.layers[-1].units == 5 and m.layers[-1].activation.__name__ == "softmax"
    loss, _ = model_lib.loss_and_metrics(5)
    assert isinstance(loss, tf.keras.losses.SparseCategoricalCrossentropy)


@pytest.mark.parametrize("fine_tune_at", [0, 100, 150])
def test_unfreeze_matches_config(fine_tune_at: int) -> None:
    m = small()
    assert model_lib.unfreeze_from(m, fine_tune_at) == MOBILENET_V2_DEPTH - fine_tune_at
    base = model_lib.get_base(m)
    assert all(not layer.trainable for layer in base.layers[:fine_tune_at])
    assert all(layer.trainable for layer in base.layers[fine_tune_at:])


def test_batchnorm_stays_in_inference_mode_when_unfrozen() -> None:
    m = small()
    model_lib.unfreeze_from(m, 0)
    model_lib.compile_for_phase(m, FineTuneConfig(), 1e-3, 2)
    bn = next(layer for layer in model_lib.get_base(m).layers if isinstance(layer, tf.keras.layers.BatchNormalization))
    before = bn.moving_mean.numpy().copy()
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    m.fit(x, np.array([0, 1] * 4), epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)


def test_batchnorm_statistics_are_read_from_the_first_replica() -> None:
    # They never change in training (inference-mode BatchNorm), so no all-reduce is needed to read them.
    m = small()
    bn_layers = [l for l in model_lib.get_base(m).layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    stats = [v for v in m.variables if "moving_" in v.name]
    assert len(stats) == 2 * len(bn_layers) > 0
    assert {v.aggregation for v in stats} == {tf.VariableAggregation.ONLY_FIRST_REPLICA}
    others = {v.aggregation for v in m.variables if "moving_" not in v.name}
    assert others and tf.VariableAggregation.ONLY_FIRST_REPLICA not in others


def test_weights_from_h5_file(tmp_path: Path) -> None:
    base = tf.keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35)
    path = tmp_path / "base.h5"
    base.save_weights(str(path))
    m = model_lib.build_model(ModelConfig(weights=str(path), alpha=0.35), image_size=32, num_classes=2,
                              cache_dir=str(tmp_path))
    np.testing.assert_array_equal(model_lib.get_base(m).get_weights()[0], base.get_weights()[0])


def test_wrong_h5_is_a_config_error(tmp_path: Path) -> None:
    other = tf.keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.5)
    path = tmp_path / "alpha05.h5"
    other.save_weights(str(path))
    with pytest.raises(ConfigError, match="model.weights"):
        model_lib.build_model(ModelConfig(weights=str(path), alpha=0.35), image_size=32, num_classes=2,
                              cache_dir=str(tmp_path))


def test_optimizers_per_phase() -> None:
    assert isinstance(model_lib.make_optimizer(PhaseConfig(optimizer="adam"), 1e-4), tf.keras.optimizers.Adam)
    opt = model_lib.make_optimizer(FineTuneConfig(), 1e-5)
    assert isinstance(opt, tf.keras.optimizers.RMSprop)
    assert float(opt.learning_rate) == pytest.approx(1e-5)


def rates(schedule, steps: list[int]) -> list[float]:
    return [float(schedule(step)) for step in steps]


def test_learning_rate_schedules() -> None:
    # The tutorial's constant rate is the plain number, as before.
    assert model_lib.learning_rate_schedule(PhaseConfig(learning_rate=1e-4), 1e-4, 63) == 1e-4
    # Warm-up then constant: linear from 0 over 1 epoch (10 steps), then the peak for the rest.
    warm = model_lib.learning_rate_schedule(PhaseConfig(epochs=3, warmup_epochs=1), 1e-4, 10)
    assert rates(warm, [0, 5, 10, 20, 29]) == pytest.approx([0, 5e-5, 1e-4, 1e-4, 1e-4])
    # Cosine after half an epoch of warm-up (5 of 20 steps): the peak at the warm-up's end, half of it midway
    # through the other 15 (step 12.5), 0 at the end.
    cosine = model_lib.learning_rate_schedule(PhaseConfig(epochs=2, schedule="cosine", warmup_epochs=0.5), 2e-5, 10)
    assert rates(cosine, [0, 5, 12.5, 20]) == pytest.approx([0, 2e-5, 1e-5, 0], rel=1e-5, abs=1e-11)
    assert rates(model_lib.learning_rate_schedule(PhaseConfig(epochs=2, schedule="cosine"), 1e-3, 10),
                 [0, 10, 20]) == pytest.approx([1e-3, 5e-4, 0], rel=1e-5, abs=1e-11)
    assert isinstance(model_lib.make_optimizer(PhaseConfig(optimizer="rmsprop"), cosine), tf.keras.optimizers.RMSprop)


AGREE = """
import json
import tljob
import numpy as np
import tensorflow as tf
from tljob import model as model_lib
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope(), tf.variable_creator_scope(model_lib._first_replica_statistics):
    bn = tf.keras.layers.BatchNormalization()
    bn.build((None, 3))
def local(v):
    return [t.numpy().tolist() for t in strategy.experimental_local_results(v)]
# Replica r holds statistics r + 1 and 10 (r + 1): as if each had summed its batch in another order.
strategy.run(tf.function(lambda: [v.assign(tf.fill([3], tf.cast(tf.distribute.get_replica_context()
             .replica_id_in_sync_group + 1, tf.float32) * s)) for v, s in ((bn.moving_mean, 1.0),
             (bn.moving_variance, 10.0))]))
before = local(bn.moving_mean)
with strategy.scope():  # as in training: calibration runs in the strategy's scope
    model_lib.agree_statistics([bn])
print("RESULT " + json.dumps({"before": before, "mean": local(bn.moving_mean), "var": local(bn.moving_variance)}))
"""


def test_statistics_agree_across_replicas_after_calibration() -> None:
    out = subprocess.run([sys.executable, "-c", AGREE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["before"] == [[1.0] * 3, [2.0] * 3], "the replicas must start apart for the test to mean anything"
    assert result["mean"] == [[1.5] * 3, [1.5] * 3]
    assert result["var"] == [[15.0] * 3, [15.0] * 3]


# --- GPU settings: precision, XLA, augmentation in the model ----------------------------------------------


@pytest.mark.parametrize("precision,compute,scaled", [("mixed_float16", "float16", True),
                                                      ("mixed_bfloat16", "bfloat16", False)])
def test_mixed_precision_keeps_the_head_and_the_variables_in_float32(precision: str, compute: str,
                                                                     scaled: bool) -> None:
    with model_lib.precision_scope(precision):
        m = small()
        model_lib.compile_for_phase(m, PhaseConfig(), 1e-3, 2)
    assert tf.keras.mixed_precision.global_policy().name == "float32", "the scope restores the policy"
    base = model_lib.get_base(m)
    assert {m.get_layer("preprocess").compute_dtype, base.compute_dtype, base.layers[5].compute_dtype} == {compute}
    head = m.get_layer("classifier")
    assert (head.compute_dtype, head.variable_dtype) == ("float32", "float32")
    assert {v.dtype for v in m.weights} == {tf.float32}
    out = m(tf.zeros([2, 32, 32, 3]), training=False)
    assert out.dtype == tf.float32
    # tf-keras's compile adds loss scaling for float16 only (bfloat16 has float32's exponent range).
    assert isinstance(m.optimizer, tf.keras.mixed_precision.LossScaleOptimizer) is scaled


def test_set_precision_sets_the_global_policy_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    with model_lib.precision_scope("float32"), caplog.at_level(logging.INFO, logger="tljob.model"):
        model_lib.set_precision("mixed_float16")
        assert tf.keras.mixed_precision.global_policy().name == "mixed_float16"
    assert "precision: mixed_float16 (layers compute in float16, variables and the classifier head in float32; " \
           "loss scaling)" in caplog.text


def test_float32_model_is_unchanged_by_the_float32_head() -> None:
    m = small()
    assert {layer.dtype_policy.name for layer in m.layers} == {"float32"}


def test_jit_compile_is_requested_only_when_asked() -> None:
    m = small()
    model_lib.compile_for_phase(m, PhaseConfig(), 1e-3, 2)
    assert m.jit_compile is False
    model_lib.compile_for_phase(m, PhaseConfig(), 1e-3, 2, jit_compile=True)
    assert m.jit_compile is True


def augmented(placement: str | None) -> tf.keras.Model:
    augment = None if placement is None else AugmentConfig(placement=placement)
    return model_lib.build_model(ModelConfig(weights="none", alpha=0.35), image_size=32, num_classes=2,
                                 cache_dir="/tmp", augment=augment)


def test_augmentation_layer_only_with_placement_model() -> None:
    assert [layer.name for layer in augmented("model").layers][:3] == ["image", "augment", "preprocess"]
    for placement in ("pipeline", None):
        assert "augment" not in [layer.name for layer in augmented(placement).layers]


def test_augmentation_layer_is_active_in_training_only_and_has_no_weights() -> None:
    with_layer, without = augmented("model"), augmented(None)
    assert with_layer.get_layer("augment").weights == []
    # The same weights list: the serving copy (built without the layer) takes the training model's weights.
    without.set_weights(with_layer.get_weights())
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32))
    np.testing.assert_array_equal(with_layer(x, training=False).numpy(), without(x, training=False).numpy())
    np.testing.assert_array_equal(with_layer.predict(x, verbose=0), without.predict(x, verbose=0))
    layer = with_layer.get_layer("augment")
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    assert not np.allclose(layer(x, training=True).numpy(), x.numpy())
    assert layer.get_config()["flip"] == "horizontal" and layer.get_config()["rotation"] == 0.2
    # Called as fit calls it (training=True), the model augments: without dropout, nothing else differs.
    no_dropout = model_lib.build_model(ModelConfig(weights="none", alpha=0.35, dropout=0.0), image_size=32,
                                       num_classes=2, cache_dir="/tmp", augment=AugmentConfig(placement="model"))
    model_lib.calibrate_batchnorm(no_dropout, x.numpy())  # random weights: else every output is 0.5
    inference = no_dropout(x, training=False).numpy()
    assert inference.std() > 1e-3
    assert not np.allclose(no_dropout(x, training=True).numpy(), inference)


def test_a_backup_restores_across_augmentation_placements(tmp_path: Path) -> None:
    """augment.placement is safe on resume (config.SAFE_ON_RESUME_KEYS): weights and optimizer state restore."""
    x = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    y = np.array([0, 1] * 4)
    models = {}
    for placement in ("pipeline", "model"):
        models[placement] = augmented(placement)
        model_lib.compile_for_phase(models[placement], PhaseConfig(), 1e-2, 2)
        models[placement].fit(x, y, epochs=1, batch_size=4, verbose=0)
    saved = tf.train.Checkpoint(model=models["pipeline"]).save(str(tmp_path / "backup"))
    tf.train.Checkpoint(model=models["model"]).restore(saved).assert_existing_objects_matched()
    for a, b in zip(models["pipeline"].get_weights(), models["model"].get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(models["pipeline"].optimizer.variables, models["model"].optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
