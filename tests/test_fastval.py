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

from tljob import fastval, model as model_lib
from tljob.config import AugmentConfig, FineTuneConfig, ModelConfig, PhaseConfig
from tljob.data import synthetic_images
from tljob.fastval import Graph, Step, split_graph

SIZE = 32


# --- pure: the split ----------------------------------------------------------------------------------


def layer(changes: bool) -> SimpleNamespace:
    return SimpleNamespace(changes=changes)


def changes(stand_in: SimpleNamespace) -> bool:
    return stand_in.changes


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
    assert callback.bottom.outputs == ("dropout:0",)  # phase 1: only the classifier changes
    before = callback.evaluate()
    assert_same(before, evaluate(model, val_x, val_y, 16))
    perturb_trainable(model, seed=1)
    after = callback.evaluate()  # the cached features, the new head
    assert after != before
    assert_same(after, evaluate(model, val_x, val_y, 16))

    unfreeze(model, num_classes)
    callback = fastval.make_validation_callback(model, val_x, val_y, batch_size=16, num_classes=num_classes,
                                                budget_mb=64)
    # MobileNetV2 from index 100: the expand ReLU and the residual branch both cross the boundary.
    assert [k.split("/")[-1] for k in callback.bottom.outputs] == ["block_11_expand_relu:0", "block_10_project_BN:0"]
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
