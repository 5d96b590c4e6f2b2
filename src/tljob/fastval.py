"""Validation on cached features of the network's constant part: the frozen layers run once per phase.

Validation runs in inference mode, so every layer that has no trainable weights and whose inputs are
constant gives the same output for the same validation image all phase long: in phase 1 that is the whole
base plus pooling and dropout (only the classifier changes), in phase 2 the base below `fine_tune_at`.
The callback computes the tensors that cross from that constant part into the changing part once per fit
(the "boundary": MobileNetV2's residual adds can make it several tensors) and per epoch runs only the
changing part on them. The numbers are those of `model.evaluate` on the same images, within float
rounding; they go into the epoch's `logs` as `val_loss` / `val_accuracy`, so History, TensorBoard and
tljob's own records see them exactly like fit's own validation.

The split is read from the model's serialized graph (`get_config`, the public description of a Functional
model: each layer's inputs by name) and executed by calling the model's own layer objects, so the parts
share the model's weights and the model itself is left untouched (no new nodes, no new variables).

Multi-worker: every worker validates the full validation set locally, inside `strategy.run`, so variable
reads are local (reading a BatchNorm statistic across replicas would be an all-reduce) and no collective
runs: with identical weights every worker computes identical metrics. The constant part runs once per
phase, so distributing it would save little, and the per-epoch part is a fraction of one forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import tensorflow as tf

from tljob.faults import Watchdog
from tljob.model import head_units

log = logging.getLogger(__name__)

# Keyword arguments recorded on a graph node that executing it with training=False already covers.
_HANDLED_CALL_KWARGS = frozenset({"training"})


@dataclasses.dataclass(frozen=True)
class Step:
    """One layer call of the flattened graph; its outputs are the keys f"{name}:{i}"."""

    name: str
    layer: Any  # a Keras layer; Any so that the pure graph functions can be tested with stand-ins
    inputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Graph:
    """Layer calls in execution order, from `inputs` to `outputs` (tensor keys)."""

    steps: tuple[Step, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


# ----------------------------------------------------------------------------- pure graph policy


def producer(key: str) -> str:
    """The step name that produces a tensor key ("block_1_add:0" -> "block_1_add")."""
    return key.rsplit(":", 1)[0]


def split_graph(graph: Graph, changes: Callable[[Any], bool]) -> tuple[Graph, Graph]:
    """(constant bottom, changing top): a step is constant when its layer does not change and all its inputs
    are constant; the bottom's outputs are the constant tensors the top (or the graph's output) reads."""
    constant_names: set[str] = set()

    def is_constant(key: str) -> bool:
        return key in graph.inputs or producer(key) in constant_names

    bottom, top = [], []
    for step in graph.steps:
        if not changes(step.layer) and all(is_constant(k) for k in step.inputs):
            bottom.append(step)
            constant_names.add(step.name)
        else:
            top.append(step)
    boundary: list[str] = []
    for key in [k for step in top for k in step.inputs] + list(graph.outputs):
        if is_constant(key) and key not in boundary:
            boundary.append(key)
    needed = _ancestors(bottom, boundary)
    bottom = [step for step in bottom if step.name in needed]
    return Graph(tuple(bottom), graph.inputs, tuple(boundary)), Graph(tuple(top), tuple(boundary), graph.outputs)


def _ancestors(steps: Sequence[Step], keys: Sequence[str]) -> set[str]:
    """Names of the steps that the given keys depend on (steps in execution order)."""
    needed = {producer(k) for k in keys}
    for step in reversed(steps):
        if step.name in needed:
            needed.update(producer(k) for k in step.inputs)
    return needed


def changes_during_fit(layer: Any) -> bool:
    """Whether a layer's output for a fixed input can change while fit runs.

    Trainable weights change; layers without them do not, in inference mode: tljob calls the base with
    training=False and Keras runs frozen BatchNorm in inference mode, so no statistic moves either.
    """
    return bool(layer.trainable_weights)


# ----------------------------------------------------------------------------- reading the Keras graph


def flatten_graph(model: tf.keras.Model) -> Graph:
    """The model's layer calls with nested Functional models (the MobileNetV2 base) expanded in place."""
    config = model.get_config()
    inputs = tuple(f"{name}:{index}" for name, _, index in config["input_layers"])
    steps, outputs = _expand(config, model.get_layer, scope="", input_keys=inputs, model_name=model.name)
    return Graph(tuple(steps), inputs, tuple(outputs))


def _expand(config: dict, get_layer: Callable[[str], Any], *, scope: str, input_keys: Sequence[str],
            model_name: str) -> tuple[list[Step], list[str]]:
    if "input_layers" not in config or "output_layers" not in config:
        raise ValueError(
            f"model {model_name!r} is not a Functional model (no input_layers/output_layers in its config): "
            f"cached validation cannot read its graph. Fix: set train.cached_validation: false.")
    # Within one Functional model each layer has exactly one node, so "name:tensor_index" names a tensor.
    alias = {f"{name}:{index}": key for (name, _, index), key in zip(config["input_layers"], input_keys)}

    def resolve(name: str, index: int) -> str:
        key = f"{name}:{index}"
        return alias.get(key, f"{scope}{key}")

    steps: list[Step] = []
    for entry in config["layers"]:
        name, nodes = entry["name"], entry["inbound_nodes"]
        if not nodes:  # an InputLayer: its output is bound through `alias`
            continue
        if len(nodes) != 1:
            raise ValueError(
                f"layer {name!r} of {model_name!r} is called {len(nodes)} times in the model: cached validation "
                f"handles layers called once. Fix: set train.cached_validation: false.")
        refs = nodes[0]
        extra = {k for ref in refs for k in (ref[3] if len(ref) > 3 else {})} - _HANDLED_CALL_KWARGS
        if extra:
            raise ValueError(
                f"layer {name!r} of {model_name!r} is called with arguments {sorted(extra)} that cached validation "
                f"does not replay. Fix: set train.cached_validation: false.")
        in_keys = [resolve(ref[0], ref[2]) for ref in refs]
        layer = get_layer(name)
        if "layers" in entry["config"] and isinstance(layer, tf.keras.Model):
            inner_steps, inner_outputs = _expand(entry["config"], layer.get_layer, scope=f"{scope}{name}/",
                                                 input_keys=in_keys, model_name=name)
            steps.extend(inner_steps)
            alias.update({f"{name}:{i}": key for i, key in enumerate(inner_outputs)})
        else:
            steps.append(Step(f"{scope}{name}", layer, tuple(in_keys)))
    return steps, [resolve(name, index) for name, _, index in config["output_layers"]]


def run_graph(graph: Graph, inputs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Executes the layer calls in inference mode (call inside a tf.function: intermediates are not kept)."""
    values = dict(zip(graph.inputs, inputs))
    for step in graph.steps:
        args = [values[k] for k in step.inputs]
        out = step.layer(args[0] if len(args) == 1 else args, training=False)
        for i, tensor in enumerate(tf.nest.flatten(out)):
            values[f"{step.name}:{i}"] = tensor
    return [values[k] for k in graph.outputs]


# ----------------------------------------------------------------------------- the callback


def metric_sums(labels: tf.Tensor, probs: tf.Tensor, binary: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """(sum of per-example losses, number correct) as compile's loss and BinaryAccuracy /
    SparseCategoricalAccuracy compute them (called in a tf.function, Keras computes the binary loss from
    the sigmoid's logits, as evaluate does). The loss functions are used rather than Loss objects, whose
    default reduction Keras refuses under a distribution strategy."""
    if binary:
        targets = tf.cast(tf.reshape(labels, [-1, 1]), probs.dtype)
        losses = tf.keras.losses.binary_crossentropy(targets, probs)
        correct = tf.equal(tf.cast(probs[:, 0] > 0.5, labels.dtype), labels)
    else:
        losses = tf.keras.losses.sparse_categorical_crossentropy(labels, probs)
        correct = tf.equal(tf.cast(tf.argmax(probs, axis=-1), labels.dtype), labels)
    return tf.reduce_sum(tf.cast(losses, tf.float64)), tf.reduce_sum(tf.cast(correct, tf.float64))


class CachedValidation(tf.keras.callbacks.Callback):
    """Adds val_loss / val_accuracy to each epoch's logs from cached constant-part features.

    Put it first among fit's callbacks: later ones (History, TensorBoard, tljob's records) then see
    the validation metrics in `logs`.
    """

    def __init__(self, bottom: Graph, top: Graph, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 binary: bool, strategy: tf.distribute.Strategy, cache_features: bool,
                 watchdog: Watchdog | None = None):
        super().__init__()
        self.bottom, self.top = bottom, top
        self.images, self.labels = images, labels.astype(np.int64)
        self.batch_size = batch_size
        self.binary = binary
        self.strategy = strategy
        self.cache_features = cache_features
        self.watchdog = watchdog
        self._features: list[list[tf.Tensor]] | None = None
        # The last validation: when it started (perf_counter; at an epoch end, when training stopped), how
        # long it took, and what it found (the final weights' metrics once fit returns).
        self.last_started = 0.0
        self.last_seconds = 0.0
        self.last_metrics: dict[str, float] | None = None
        image_spec = tf.TensorSpec([None, *images.shape[1:]], tf.as_dtype(images.dtype))
        self._bottom_fn = tf.function(self._run_bottom, input_signature=[image_spec])
        boundary_specs = [tf.TensorSpec([None, *shape], dtype) for shape, dtype in boundary_shapes(bottom, images)]
        self._top_fn = tf.function(self._run_top, input_signature=[*boundary_specs, tf.TensorSpec([None], tf.int64)])
        self._full_fn = tf.function(self._run_full, input_signature=[image_spec, tf.TensorSpec([None], tf.int64)])

    # -- the computations (traced once each; run in replica context through `_local`)

    def _run_bottom(self, images: tf.Tensor) -> list[tf.Tensor]:
        return run_graph(self.bottom, [tf.cast(images, tf.float32)])

    def _run_top(self, *args: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        *features, labels = args
        return metric_sums(labels, run_graph(self.top, features)[0], self.binary)

    def _run_full(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return metric_sums(labels, run_graph(self.top, self._run_bottom(images))[0], self.binary)

    def _local(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs fn in replica context, where variables are read locally (no collective), and returns the first
        local replica's result (with several local GPUs each computes the same values)."""
        out = self.strategy.run(fn, args=args)
        return tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0], out)

    def _batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size])
                for i in range(0, len(self.images), self.batch_size)]

    def _working(self, stage: str, total: int) -> ContextManager[Callable[[int], None]]:
        """A watchdog stage beaten per batch: validation is local (no collective), and on thousands of
        images it takes longer than runtime.peer_timeout_s."""
        if self.watchdog is None:
            return contextlib.nullcontext(_no_progress)
        return self.watchdog.working(stage, collectives=False, total=total)

    def _extract(self) -> list[list[tf.Tensor]]:
        start = time.perf_counter()
        batches = self._batches()
        features = []
        with self._working("cached validation: feature pass", len(batches)) as progress:
            for x, _ in batches:
                features.append(list(self._local(self._bottom_fn, tf.constant(x))))
                progress(len(features))
        log.info("cached validation: boundary features of %d images computed in %.1f s", len(self.images),
                 time.perf_counter() - start)
        return features

    # -- public

    def evaluate(self) -> dict[str, float]:
        """val_loss and val_accuracy of the model's current weights on the validation images."""
        start = self.last_started = time.perf_counter()
        loss_sum = correct = 0.0
        if self.cache_features and self._features is None:
            self._features = self._extract()
        batches = self._batches()
        with self._working("cached validation", len(batches)) as progress:
            for i, (x, y) in enumerate(batches):
                if self._features is not None:
                    loss, right = self._local(self._top_fn, *self._features[i], tf.constant(y))
                else:
                    loss, right = self._local(self._full_fn, tf.constant(x), tf.constant(y))
                loss_sum, correct = loss_sum + float(loss), correct + float(right)
                progress(i + 1)
        n = len(self.images)
        self.last_seconds = time.perf_counter() - start
        self.last_metrics = {"val_loss": loss_sum / n, "val_accuracy": correct / n}
        return self.last_metrics

    def on_train_begin(self, logs: dict | None = None) -> None:
        # Features are computed at the first epoch end of each fit, after BackupAndRestore has restored
        # the weights: the constant part is then what this whole phase uses.
        self._features = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = self.evaluate()
        if logs is not None:
            logs.update(metrics)
        log.debug("epoch %d: cached validation %s in %.2f s", epoch + 1, metrics, self.last_seconds)


def _no_progress(done: int) -> None:
    """Progress report of a validation without a watchdog (fastval used on its own)."""


def boundary_shapes(bottom: Graph, images: np.ndarray) -> list[tuple[tuple[int, ...], tf.DType]]:
    """Per-image shape and dtype of each boundary tensor, from the layers' recorded outputs (no tracing)."""
    layers = {step.name: step.layer for step in bottom.steps}
    shapes = []
    for key in bottom.outputs:
        if key in bottom.inputs:  # the top reads the image itself (float32, as the pipeline feeds it)
            shapes.append((tuple(images.shape[1:]), tf.float32))
            continue
        tensor = tf.nest.flatten(layers[producer(key)].output)[int(key.rsplit(":", 1)[1])]
        shapes.append((tuple(tensor.shape[1:]), tf.as_dtype(tensor.dtype)))
    return shapes


def feature_megabytes(shapes: Sequence[tuple[tuple[int, ...], tf.DType]], num_images: int) -> float:
    return sum(int(np.prod(shape)) * dtype.size for shape, dtype in shapes) * num_images / 2**20


def make_validation_callback(model: tf.keras.Model, val_images_uint8: np.ndarray, val_labels: np.ndarray, *,
                             batch_size: int, num_classes: int, budget_mb: float,
                             steps: int | None = None, watchdog: Watchdog | None = None) -> CachedValidation:
    """A callback computing fit's validation metrics from cached constant-part features.

    Call it after the phase's unfreeze and compile (the split follows the layers' `trainable` flags at
    that moment) and pass it first in fit's callbacks, without `validation_data`. `budget_mb` caps the
    cached features; above it the callback still validates, running the whole network each epoch.
    `steps`, like fit's validation_steps, limits validation to the first steps x batch_size images.
    `watchdog` (the trainer's) gets a beat per batch of the once-per-phase feature pass.
    Creates no variables, so it may be called inside or outside `strategy.scope()`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use a positive batch size, e.g. the global batch.")
    if len(val_images_uint8) != len(val_labels) or len(val_labels) == 0:
        raise ValueError(f"validation images ({len(val_images_uint8)}) and labels ({len(val_labels)}) must be "
                         f"equally many and not none. Fix: pass a split's images and labels together.")
    if steps is not None:
        val_images_uint8, val_labels = val_images_uint8[:steps * batch_size], val_labels[:steps * batch_size]
    bottom, top = split_graph(flatten_graph(model), changes_during_fit)
    megabytes = feature_megabytes(boundary_shapes(bottom, val_images_uint8), len(val_images_uint8))
    cache = megabytes <= budget_mb
    log.info("cached validation: %d constant / %d changing layer calls, boundary %s; features %.0f MB %s "
             "budget %.0f MB%s", len(bottom.steps), len(top.steps), list(bottom.outputs), megabytes,
             "within" if cache else "over", budget_mb, "" if cache else ": running the whole network each epoch")
    return CachedValidation(bottom, top, val_images_uint8, val_labels, batch_size=batch_size,
                            binary=head_units(num_classes) == 1, strategy=model.distribute_strategy,
                            cache_features=cache, watchdog=watchdog)
