"""Cached validation: the graph split (pure), metrics equal to model.evaluate on a real MobileNetV2 in both
phases, fit's logs/History/TensorBoard, no variables, an untouched model, and two real workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tljob  # noqa: F401 - selects tf-keras before TensorFlow loads
import tensorflow as tf

from tljob import data, fastval, model as model_lib
from tljob.config import AugmentConfig, FineTuneConfig, ModelConfig, PhaseConfig
from tljob.data import synthetic_images
from tljob.fastval import Graph, Step, narrow_boundary, split_graph

SIZE = 32


# --- pure: the split ----------------------------------------------------------------------------------


def layer(changes: bool) -> SimpleNamespace:
    return SimpleNamespace(changes=changes)


def changes(step: Step) -> bool:
    return step.layer.changes


def residual_graph(trainable: set[str]) -> Graph:
    """x -> a -> b -> c -> d ; add(b, d) -> out ; a also feeds an unused side branch s."""
    names = {"a": ("x:0",), "s": ("a:0",), "b": ("a:0",), "c": ("b:0",), "d": ("c:0",), "add": ("b:0", "d:0"),
             "out": ("add:0",)}
    steps = tuple(Step(n, layer(n in trainable), ins) for n, ins in names.items())
    return Graph(steps, ("x:0",), ("out:0",))


def test_split_finds_every_tensor_crossing_a_residual_boundary() -> None:
    bottom, top = split_graph(residual_graph({"d"}), changes)
    # d changes; c (no weights) stays constant; the add reads b directly: two boundary tensors.
    assert bottom.outputs == top.inputs == ("c:0", "b:0")
    assert [s.name for s in top.steps] == ["d", "add", "out"]
    # The side branch feeds nothing in the top: not computed.
    assert [s.name for s in bottom.steps] == ["a", "b", "c"]


def test_split_downstream_of_a_change_is_never_constant() -> None:
    bottom, top = split_graph(residual_graph({"b"}), changes)
    assert [s.name for s in bottom.steps] == ["a"]
    assert bottom.outputs == ("a:0",)
    assert [s.name for s in top.steps] == ["b", "c", "d", "add", "out"]


def test_split_extremes_everything_or_nothing_constant() -> None:
    bottom, top = split_graph(residual_graph(set()), changes)
    assert bottom.outputs == ("out:0",) and top.steps == () and top.outputs == ("out:0",)
    bottom, top = split_graph(residual_graph({"a"}), changes)
    assert bottom.steps == () and bottom.outputs == ("x:0",) and len(top.steps) == 7


def test_in_model_augmentation_changes_in_training_only_while_on() -> None:
    model = model_lib.build_model(ModelConfig(weights="none", alpha=0.35), image_size=SIZE, num_classes=2,
                                  cache_dir="/nonexistent", augment=AugmentConfig(placement="model"))
    step = next(s for s in fastval.flatten_graph(model).steps if s.name == "augment")
    assert fastval.changes_in_training(step) and not fastval.changes_in_inference(step)
    model_lib.set_augmentation(model, False)  # a phase with train.<phase>.augment: false
    assert not fastval.changes_in_training(step)


def sized(nbytes: dict[str, int]):
    return lambda key: nbytes[key.split(":")[0]]


def test_narrow_boundary_recomputes_a_frozen_expansion_to_cache_the_narrow_branch() -> None:
    # c expands b (b small, c large, as MobileNetV2's block_11_expand from block_10_project_BN); d changes.
    bottom, top = split_graph(residual_graph({"d"}), changes)
    bottom, top = narrow_boundary(bottom, top, sized({"x": 30, "a": 40, "b": 10, "c": 60}))
    assert bottom.outputs == top.inputs == ("b:0",)
    assert [s.name for s in bottom.steps] == ["a", "b"]
    assert [s.name for s in top.steps] == ["c", "d", "add", "out"]


def test_narrow_boundary_passes_same_size_steps_on_the_way_to_a_smaller_one_and_stops_at_the_smallest() -> None:
    # x -> a -> s (a ReLU: a's size) -> change: moving s keeps the size, moving a then shrinks it to x.
    steps = (Step("a", layer(False), ("x:0",)), Step("s", layer(False), ("a:0",)),
             Step("d", layer(True), ("s:0",)), Step("out", layer(False), ("d:0",)))
    bottom, top = split_graph(Graph(steps, ("x:0",), ("out:0",)), changes)
    assert bottom.outputs == ("s:0",)
    bottom, top = narrow_boundary(bottom, top, sized({"x": 10, "a": 50, "s": 50}))
    assert bottom.outputs == ("x:0",) and bottom.steps == ()
    assert [s.name for s in top.steps] == ["a", "s", "d", "out"]
    # A tie that leads nowhere smaller is not taken.
    bottom, top = split_graph(Graph(steps, ("x:0",), ("out:0",)), changes)
    bottom, top = narrow_boundary(bottom, top, sized({"x": 90, "a": 50, "s": 50}))
    assert bottom.outputs == ("s:0",) and [s.name for s in bottom.steps] == ["a", "s"]


def test_training_split_keeps_random_layers_in_the_changing_part_unless_fixed_to_inference() -> None:
    dropout = tf.keras.layers.Dropout(0.5)
    free, fixed = Step("drop", dropout, ("x:0",)), Step("drop", dropout, ("x:0",), training=False)
    assert not fastval.changes_in_inference(free) and fastval.changes_in_training(free)
    assert not fastval.changes_in_training(fixed)
    dense = tf.keras.layers.Dense(2)
    dense.build((None, 3))
    assert fastval.changes_in_training(Step("dense", dense, ("x:0",), training=False))


# --- real MobileNetV2 ---------------------------------------------------------------------------------


def build(num_classes: int, strategy: tf.distribute.Strategy | None = None) -> tf.keras.Model:
    with (strategy or tf.distribute.get_strategy()).scope():
        model = model_lib.build_model(ModelConfig(weights="none", alpha=0.35), image_size=SIZE,
                                      num_classes=num_classes, cache_dir="/nonexistent")
        images, _ = synthetic_images(32, num_classes, SIZE, seed=7)
        model_lib.calibrate_batchnorm(model, images.astype(np.float32))
        model_lib.compile_for_phase(model, PhaseConfig(learning_rate=1e-2), 1e-2, num_classes)
    return model


def evaluate(model: tf.keras.Model, images: np.ndarray, labels: np.ndarray, batch: int) -> dict[str, float]:
    out = model.evaluate(images.astype(np.float32), labels, batch_size=batch, return_dict=True, verbose=0)
    return {"val_loss": out["loss"], "val_accuracy": out["accuracy"]}


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == {"val_loss", "val_accuracy"}
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-4, abs=1e-6)
    assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-6)


def unfreeze(model: tf.keras.Model, num_classes: int) -> None:
    with model.distribute_strategy.scope():
        model_lib.unfreeze_from(model, 100)
        model_lib.compile_for_phase(model, FineTuneConfig(learning_rate=1e-3), 1e-3, num_classes)


def perturb_trainable(model: tf.keras.Model, seed: int) -> None:
    """Moves every trainable weight, as a training step would (cheaper than tracing fit)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + rng.normal(0, 0.05, v.shape).astype(np.float32))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_metrics_equal_evaluate_in_both_phases_and_follow_the_weights(num_classes: int) -> None:
    model = build(num_classes)
    val_x, val_y = synthetic_images(40, num_classes, SIZE, seed=2)  # 40: a last, partial batch of 8
    callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=16, num_classes=num_classes,
                                                budget_mb=64)
    # Phase 1: only the classifier changes. At 32 px the last block's output (1x1x112) is narrower than the
    # pooled features (1280): it is cached, and the frozen Conv_1, pooling and dropout run each epoch.
    assert [k.split("/")[-1] for k in callback.bottom.outputs] == ["block_16_project_BN:0"]
    assert [s.name for s in callback.top.steps][-3:] == ["pool", "dropout", "classifier"]
    before = callback.evaluate()
    assert_same(before, evaluate(model, val_x, val_y, 16))
    perturb_trainable(model, seed=1)
    after = callback.evaluate()  # the cached features, the new head
    assert after != before
    assert_same(after, evaluate(model, val_x, val_y, 16))

    unfreeze(model, num_classes)
    callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=16, num_classes=num_classes,
                                                budget_mb=64)
    # MobileNetV2 from index 100: the expand ReLU (576 channels) and the residual branch (96) cross the split;
    # narrowed, the residual branch alone is cached and the frozen expansion is recomputed.
    assert [k.split("/")[-1] for k in callback.bottom.outputs] == ["block_10_project_BN:0"]
    assert [s.name.split("/")[-1] for s in callback.top.steps[:4]] == [
        "block_11_expand", "block_11_expand_BN", "block_11_expand_relu", "block_11_depthwise"]
    assert_same(callback.evaluate(), evaluate(model, val_x, val_y, 16))
    perturb_trainable(model, seed=2)  # now also the base's top layers
    assert_same(callback.evaluate(), evaluate(model, val_x, val_y, 16))


def test_over_budget_runs_the_whole_network_with_the_same_result() -> None:
    model = build(2)
    unfreeze(model, 2)
    val_x, val_y = synthetic_images(24, 2, SIZE, seed=3)
    callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=8, num_classes=2, budget_mb=0)
    assert not callback.cache_features
    assert_same(callback.evaluate(), evaluate(model, val_x, val_y, 8))
    limited = fastval.make_validation_callback(model, val_x, val_y, batch_size=8, num_classes=2, budget_mb=64,
                                               steps=2)
    assert_same(limited.evaluate(), evaluate(model, val_x[:16], val_y[:16], 8))


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_augmentation_layer_and_mixed_precision_validate_as_evaluate(precision: str) -> None:
    """augment.placement: model puts a layer without weights first (constant, identity in inference); a mixed
    policy makes the boundary tensors 16-bit. Both phases still give model.evaluate's metrics."""
    with model_lib.precision_scope(precision):
        model = model_lib.build_model(ModelConfig(weights="none", alpha=0.35), image_size=SIZE, num_classes=2,
                                      cache_dir="/nonexistent", augment=AugmentConfig(placement="model"))
        images, _ = synthetic_images(32, 2, SIZE, seed=7)
        model_lib.calibrate_batchnorm(model, images.astype(np.float32))
        model_lib.compile_for_phase(model, PhaseConfig(learning_rate=1e-2), 1e-2, 2)
        val_x, val_y = synthetic_images(24, 2, SIZE, seed=2)
        for phase in range(2):
            if phase:
                unfreeze(model, 2)
            perturb_trainable(model, seed=phase)
            callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=8, num_classes=2, budget_mb=64)
            assert "augment" in [step.name for step in callback.bottom.steps]
            boundary = {dtype for _, dtype in fastval.boundary_shapes(callback.bottom, val_x)}
            assert boundary == {tf.float32 if precision == "float32" else tf.bfloat16}
            assert_same(callback.evaluate(), evaluate(model, val_x, val_y, 8))


def test_fit_logs_history_and_tensorboard_see_the_metrics(tmp_path: Path) -> None:
    model = build(2)
    train_x, train_y = synthetic_images(48, 2, SIZE, seed=4)
    val_x, val_y = synthetic_images(24, 2, SIZE, seed=5)
    callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=8, num_classes=2, budget_mb=64)
    seen: list[dict] = []
    recorder = tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(dict(logs)))
    board = tf.keras.callbacks.TensorBoard(str(tmp_path / "logs"), update_freq="epoch")
    history = model.fit(train_x.astype(np.float32), train_y, epochs=2, batch_size=8, verbose=0,
                        callbacks=[callback, recorder, board])
    assert len(history.history["val_loss"]) == len(history.history["val_accuracy"]) == 2
    assert [s["val_loss"] for s in seen] == history.history["val_loss"]
    # The last epoch's metrics are those of the final weights.
    assert_same({k: history.history[k][-1] for k in ("val_loss", "val_accuracy")}, evaluate(model, val_x, val_y, 8))
    assert list((tmp_path / "logs" / "validation").glob("events.out.tfevents.*"))


def test_creates_no_variables_and_leaves_the_model_untouched() -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    model = build(2, strategy)
    unfreeze(model, 2)
    config = model.get_config()
    nodes = {lyr.name: len(lyr._inbound_nodes) for lyr in model_lib.get_base(model).layers}
    created: list[str] = []

    def spy(next_creator, **kwargs):
        created.append(kwargs.get("name") or "?")
        return next_creator(**kwargs)

    val_x, val_y = synthetic_images(16, 2, SIZE, seed=6)
    with tf.variable_creator_scope(spy):  # outside strategy.scope(), as a callback runs
        callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=8, num_classes=2, budget_mb=64)
        got = callback.evaluate()
    assert created == []
    assert model.get_config() == config
    assert {lyr.name: len(lyr._inbound_nodes) for lyr in model_lib.get_base(model).layers} == nodes
    assert_same(got, evaluate(model, val_x, val_y, 8))


@pytest.mark.parametrize("fine_tune", [False, True], ids=["phase1", "phase2"])
def test_feature_model_trains_the_models_own_layers_on_cached_features(fine_tune: bool) -> None:
    model = build(2)
    if fine_tune:
        unfreeze(model, 2)
    config = model.get_config()
    images, labels = synthetic_images(32, 2, SIZE, seed=8)
    bottom, top = fastval.split_model(model, images.shape[1:], training=True)
    if not fine_tune:
        # Dropout is random in training: it stays in the changing part (in validation's split, constant).
        graph = fastval.flatten_graph(model)
        assert "dropout" in [s.name for s in split_graph(graph, fastval.changes_in_training)[1].steps]
        assert "dropout" not in [s.name for s in split_graph(graph, fastval.changes_in_inference)[1].steps]
    batches = data.ordered_batches(data.Split("train", 32, images=images, labels=labels), 8)
    features, got_labels = fastval.compute_features(model, bottom, batches, image_shape=images.shape[1:],
                                                    total_batches=4, what="test images")
    assert np.array_equal(got_labels, labels) and all(len(f) == 32 for f in features)
    shapes = [shape for shape, _ in fastval.boundary_shapes(bottom, images.shape[1:])]
    top_model = fastval.FeatureModel(top, shapes, name="top")
    assert {v.ref() for v in top_model.trainable_variables} == {v.ref() for v in model.trainable_variables}
    x = tuple(features) if len(features) > 1 else features[0]

    def same_outputs() -> None:
        want = model.predict(images.astype(np.float32), batch_size=8, verbose=0)
        np.testing.assert_allclose(top_model.predict(x, batch_size=8, verbose=0), want, rtol=1e-4, atol=1e-5)

    same_outputs()
    before = [v.numpy() for v in model.trainable_variables]
    model_lib.compile_for_phase(top_model, PhaseConfig(learning_rate=1e-2), 1e-2, 2)
    top_model.fit(x, labels, batch_size=8, epochs=1, verbose=0)
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    same_outputs()  # trained through the top, the whole model computes the same
    assert model.get_config() == config


def test_rejects_mismatched_inputs() -> None:
    model = build(2)
    x, y = synthetic_images(8, 2, SIZE, seed=0)
    with pytest.raises(ValueError, match="equally many"):
        fastval.make_validation_callback(model, x, y[:4], batch_size=4, num_classes=2, budget_mb=64)
    with pytest.raises(ValueError, match="batch_size=0"):
        fastval.make_validation_callback(model, x, y, batch_size=0, num_classes=2, budget_mb=64)


# --- two real workers ---------------------------------------------------------------------------------

WORKER = """
import json, os, sys
import numpy as np
import tljob
from tljob import cluster, fastval, model as model_lib
from tljob.config import FineTuneConfig, ModelConfig, PhaseConfig
from tljob.data import synthetic_images
spec = cluster.resolve_cluster(os.environ)
cluster.apply_cluster_env(spec, os.environ)
strategy = cluster.create_strategy(spec, "auto")
import tensorflow as tf
tf.keras.utils.set_random_seed(0)
with strategy.scope():
    model = model_lib.build_model(ModelConfig(weights="none", alpha=0.35), image_size=32, num_classes=2,
                                  cache_dir="/nonexistent")
    model_lib.unfreeze_from(model, 100)
    model_lib.compile_for_phase(model, FineTuneConfig(learning_rate=1e-3), 1e-3, 2)
x, y = synthetic_images(64, 2, 32, seed=1)
vx, vy = synthetic_images(32, 2, 32, seed=2)
callback = fastval.make_validation_callback(model, vx, vy, batch_size=8, num_classes=2, budget_mb=64)
train = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y)).batch(16, drop_remainder=True)
history = model.fit(train, epochs=1, verbose=0, callbacks=[callback])
val = tf.data.Dataset.from_tensor_slices((vx.astype(np.float32), vy)).batch(16, drop_remainder=True)
out = model.evaluate(val, return_dict=True, verbose=0)
print("RESULT " + json.dumps({"history": history.history["val_loss"], "acc": history.history["val_accuracy"],
                              "evaluate": out}), flush=True)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.multiworker
@pytest.mark.timeout(180)
def test_two_workers_validate_identically_and_equal_distributed_evaluate() -> None:
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "JOB_COMPLETION_INDEX", "CLUSTER_SPEC")}
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "TF_CONFIG": json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})})
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert results[0]["history"] == results[1]["history"] and results[0]["acc"] == results[1]["acc"]
    # evaluate shards the 32 images over both workers and sums: the same full-set metrics.
    assert results[0]["history"][-1] == pytest.approx(results[0]["evaluate"]["loss"], rel=1e-4)
    assert results[0]["acc"][-1] == pytest.approx(results[0]["evaluate"]["accuracy"], abs=1e-6)
