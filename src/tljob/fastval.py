"""Cached features of the network's constant part: the layers that do not change in a phase run once per phase.

Validation runs in inference mode, so every layer that has no trainable weights and whose inputs are
constant gives the same output for the same validation image all phase long: in phase 1 that is the whole
base plus pooling and dropout (only the classifier changes), in phase 2 the base below `fine_tune_at`.
The callback computes the tensors that cross from that constant part into the changing part once per fit
(the "boundary": MobileNetV2's residual adds can make it several tensors) and per epoch runs only the
changing part on them. The numbers are those of `model.evaluate` on the same images, within float
rounding; they go into the epoch's `logs` as `val_loss` / `val_accuracy`, so History, TensorBoard and
tljob's own records see them exactly like fit's own validation.

Training can use the same split (`train.<phase>.cache_features`): with un-augmented images the constant part
gives the same output every epoch in training mode too, as long as it holds no random layer (Dropout stays
in the changing part). `FeatureModel` is the changing part as a Keras model that fit trains on the cached
boundary features; it shares the model's layers, so training it trains the model.

The split is read from the model's serialized graph (`get_config`, the public description of a Functional
model: each layer's inputs by name) and executed by calling the model's own layer objects, so the parts
share the model's weights and the model itself is left untouched (no new nodes, no new variables). The
boundary is then moved down past frozen layers while that makes it smaller (`narrow_boundary`): the cache
holds the narrowest tensors and the changing part recomputes a few frozen layers.

Multi-worker: every worker validates the full validation set locally, inside `strategy.run`, so variable
reads are local (reading a BatchNorm statistic across replicas would be an all-reduce) and no collective
runs: with identical weights every worker computes identical metrics. The constant part runs once per
phase, so distributing it would save little, and the per-epoch part is a fraction of one forward pass.
For training, each worker computes the features of its own share of the training images only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, ContextManager, Iterable, Sequence

import numpy as np
import tensorflow as tf

from tljob.faults import Watchdog
from tljob.model import Augmentation, head_units

log = logging.getLogger(__name__)

# Keyword arguments recorded on a graph node that Step.training replays.
_HANDLED_CALL_KWARGS = frozenset({"training"})
# Layers whose training-mode output is random (Dropout, the Random* augmentation layers).
_RANDOM_LAYER = tf.keras.__internal__.layers.BaseRandomLayer


@dataclasses.dataclass(frozen=True)
class Step:
    """One layer call of the flattened graph; its outputs are the keys f"{name}:{i}"."""

    name: str
    layer: Any  # a Keras layer; Any so that the pure graph functions can be tested with stand-ins
    inputs: tuple[str, ...]
    # The `training` value the model fixes for this call (the base is called with training=False, and so is
    # every layer inside it); None: the mode of whoever runs the graph.
    training: bool | None = None


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


def split_graph(graph: Graph, changes: Callable[[Step], bool]) -> tuple[Graph, Graph]:
    """(constant bottom, changing top): a step is constant when it does not change and all its inputs
    are constant; the bottom's outputs are the constant tensors the top (or the graph's output) reads."""
    constant_names: set[str] = set()

    def is_constant(key: str) -> bool:
        return key in graph.inputs or producer(key) in constant_names

    bottom, top = [], []
    for step in graph.steps:
        if not changes(step) and all(is_constant(k) for k in step.inputs):
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


def narrow_boundary(bottom: Graph, top: Graph, nbytes: Callable[[str], int],
                    max_moves: int = 32) -> tuple[Graph, Graph]:
    """Moves the bottom's last steps into the top while that makes the boundary smaller (bytes per image).

    A step moves when nothing left in the bottom reads its outputs; the top then recomputes it from its inputs,
    which join the boundary. Moves that keep the size (a ReLU or a BatchNorm: same shape in and out) are taken
    on the way to one that shrinks it (the 1x1 expansion below them), and the smallest boundary seen wins.
    MobileNetV2 from layer 100: the expand ReLU (576 channels) and the residual branch (96) become the
    residual branch alone, a sixth of the bytes, for one frozen 1x1 convolution recomputed per epoch.
    Moved steps are constant, so the top computes with them what the bottom did.
    """
    steps, boundary, top_steps = list(bottom.steps), list(bottom.outputs), list(top.steps)

    def size(keys: Sequence[str]) -> int:
        return sum(nbytes(k) for k in keys)

    best = (size(boundary), len(top_steps), tuple(steps), tuple(boundary), tuple(top_steps))
    for _ in range(max_moves):
        read_below = {producer(k) for step in steps for k in step.inputs}
        movable = [step for step in steps if step.name not in read_below]
        options = []
        for step in movable:
            after = [k for k in boundary if producer(k) != step.name]
            after += [k for k in step.inputs if k not in after]
            options.append((size(after), step, after))
        if not options:
            break
        new_size, step, after = min(options, key=lambda o: o[0])
        if new_size > size(boundary):
            break
        steps.remove(step)
        top_steps.insert(0, step)
        boundary = after
        if new_size < best[0]:
            best = (new_size, len(top_steps), tuple(steps), tuple(boundary), tuple(top_steps))
    _, _, steps_, boundary_, top_ = best
    needed = _ancestors(steps_, boundary_)
    kept = tuple(step for step in steps_ if step.name in needed)
    return Graph(kept, bottom.inputs, boundary_), Graph(top_, boundary_, top.outputs)


def changes_in_inference(step: Step) -> bool:
    """Whether a call's output for a fixed input can change while fit runs, as validation computes it.

    Trainable weights change; layers without them do not, in inference mode: tljob calls the base with
    training=False and Keras runs frozen BatchNorm in inference mode, so no statistic moves either.
    """
    return bool(step.layer.trainable_weights)


def changes_in_training(step: Step) -> bool:
    """The same for a training step: random layers (Dropout, the in-model augmentation while it is on) change
    too, unless the model fixes them to inference mode (everything inside the base)."""
    random = isinstance(step.layer, _RANDOM_LAYER) or (isinstance(step.layer, Augmentation) and step.layer.active)
    return changes_in_inference(step) or (step.training is not False and random)


# ----------------------------------------------------------------------------- reading the Keras graph


def flatten_graph(model: tf.keras.Model) -> Graph:
    """The model's layer calls with nested Functional models (the MobileNetV2 base) expanded in place."""
    config = model.get_config()
    inputs = tuple(f"{name}:{index}" for name, _, index in config["input_layers"])
    steps, outputs = _expand(config, model.get_layer, scope="", input_keys=inputs, model_name=model.name,
                             training=None)
    return Graph(tuple(steps), inputs, tuple(outputs))


# Where a graph the split cannot read is used: the fix names both.
_FIX = "Fix: set train.cached_validation: false and train.<phase>.cache_features: false."


def _expand(config: dict, get_layer: Callable[[str], Any], *, scope: str, input_keys: Sequence[str],
            model_name: str, training: bool | None) -> tuple[list[Step], list[str]]:
    """`training`: the value the enclosing call fixes (a nested model called with training=False)."""
    if "input_layers" not in config or "output_layers" not in config:
        raise ValueError(
            f"model {model_name!r} is not a Functional model (no input_layers/output_layers in its config): "
            f"cached features cannot read its graph. {_FIX}")
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
                f"layer {name!r} of {model_name!r} is called {len(nodes)} times in the model: cached features "
                f"handle layers called once. {_FIX}")
        refs = nodes[0]
        kwargs = {k: v for ref in refs for k, v in (ref[3] if len(ref) > 3 else {}).items()}
        extra = set(kwargs) - _HANDLED_CALL_KWARGS
        if extra:
            raise ValueError(
                f"layer {name!r} of {model_name!r} is called with arguments {sorted(extra)} that cached features "
                f"do not replay. {_FIX}")
        fixed = kwargs.get("training", training)
        in_keys = [resolve(ref[0], ref[2]) for ref in refs]
        layer = get_layer(name)
        if "layers" in entry["config"] and isinstance(layer, tf.keras.Model):
            inner_steps, inner_outputs = _expand(entry["config"], layer.get_layer, scope=f"{scope}{name}/",
                                                 input_keys=in_keys, model_name=name, training=fixed)
            steps.extend(inner_steps)
            alias.update({f"{name}:{i}": key for i, key in enumerate(inner_outputs)})
        else:
            steps.append(Step(f"{scope}{name}", layer, tuple(in_keys), fixed))
    return steps, [resolve(name, index) for name, _, index in config["output_layers"]]


def run_graph(graph: Graph, inputs: Sequence[tf.Tensor], training: bool = False) -> list[tf.Tensor]:
    """Executes the layer calls (call inside a tf.function: intermediates are not kept); a call the model fixes
    to a mode (Step.training) runs in that mode, the others in `training`'s."""
    values = dict(zip(graph.inputs, inputs))
    for step in graph.steps:
        args = [values[k] for k in step.inputs]
        out = step.layer(args[0] if len(args) == 1 else args,
                         training=training if step.training is None else step.training)
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


def split_model(model: tf.keras.Model, image_shape: Sequence[int], *, training: bool) -> tuple[Graph, Graph]:
    """(constant bottom, changing top) of `model` as its layers' `trainable` flags stand now, the boundary
    narrowed; `training`: for fit's training steps (random layers change) rather than for validation."""
    graph = flatten_graph(model)
    bottom, top = split_graph(graph, changes_in_training if training else changes_in_inference)
    layers = {step.name: step.layer for step in graph.steps}

    def nbytes(key: str) -> int:
        shape, dtype = key_shape(key, layers, graph.inputs, image_shape)
        return int(np.prod(shape)) * dtype.size

    return narrow_boundary(bottom, top, nbytes)


def key_shape(key: str, layers: dict[str, Any], inputs: Sequence[str],
              image_shape: Sequence[int]) -> tuple[tuple[int, ...], tf.DType]:
    """Per-image shape and dtype of a tensor, from the layers' recorded outputs (no tracing)."""
    if key in inputs:  # the image itself (float32, as the pipeline feeds it)
        return tuple(image_shape), tf.float32
    tensor = tf.nest.flatten(layers[producer(key)].output)[int(key.rsplit(":", 1)[1])]
    return tuple(tensor.shape[1:]), tf.as_dtype(tensor.dtype)


def boundary_shapes(bottom: Graph, image_shape: Sequence[int]) -> list[tuple[tuple[int, ...], tf.DType]]:
    layers = {step.name: step.layer for step in bottom.steps}
    return [key_shape(key, layers, bottom.inputs, image_shape) for key in bottom.outputs]


def feature_megabytes(shapes: Sequence[tuple[tuple[int, ...], tf.DType]], num_images: int) -> float:
    return sum(int(np.prod(shape)) * dtype.size for shape, dtype in shapes) * num_images / 2**20


def local(strategy: tf.distribute.Strategy, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs fn in replica context, where variables are read locally (no collective), and returns the first
    local replica's result (with several local GPUs each computes the same values)."""
    out = strategy.run(fn, args=args)
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], out)


def working(watchdog: Watchdog | None, stage: str, total: int) -> ContextManager[Callable[[int], None]]:
    """A watchdog stage beaten per batch: feature passes are local (no collective), and on thousands of
    images they take longer than runtime.peer_timeout_s."""
    if watchdog is None:
        return contextlib.nullcontext(_no_progress)
    return watchdog.working(stage, collectives=False, total=total)


def _no_progress(done: int) -> None:
    """Progress report of a pass without a watchdog (fastval used on its own)."""


class ConstantPart:
    """The bottom graph as one traced function of a batch of images, run on this worker alone."""

    def __init__(self, bottom: Graph, strategy: tf.distribute.Strategy, image_shape: Sequence[int],
                 image_dtype: tf.DType):
        self.strategy = strategy
        self.fn = tf.function(lambda images: run_graph(bottom, [tf.cast(images, tf.float32)]),
                              input_signature=[tf.TensorSpec([None, *image_shape], image_dtype)])

    def __call__(self, images: Any) -> list[tf.Tensor]:
        return list(local(self.strategy, self.fn, tf.convert_to_tensor(images)))


def compute_features(model: tf.keras.Model, bottom: Graph, batches: Iterable[tuple[Any, Any]], *,
                     image_shape: Sequence[int], total_batches: int, what: str,
                     watchdog: Watchdog | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(boundary features, one array per boundary tensor; labels) of (float32 images, labels) batches.

    Runs on every worker, on the images it is given, without collectives: `model`'s variables are read locally.
    `what` names the images in the log and the watchdog stage."""
    start = time.perf_counter()
    part = ConstantPart(bottom, model.distribute_strategy, image_shape, tf.float32)
    chunks: list[list[np.ndarray]] = []
    labels: list[np.ndarray] = []
    with working(watchdog, f"cached features: {what}", total_batches) as progress:
        for images, batch_labels in batches:
            chunks.append([out.numpy() for out in part(images)])
            labels.append(np.asarray(batch_labels))
            progress(len(chunks))
    if not chunks:
        raise ValueError(f"cached features: no {what} to compute features of")  # callers pass non-empty splits
    features = [np.concatenate(parts) for parts in zip(*chunks)]
    log.info("cached features: %s, %d images through %d constant layer calls in %.1f s (%.0f MB)", what,
             len(features[0]), len(bottom.steps), time.perf_counter() - start,
             sum(f.nbytes for f in features) / 2**20)
    return features, np.concatenate(labels)


class FeatureModel(tf.keras.Model):
    """The changing part of a model (`top`) as a Keras model that fit trains on cached boundary features.

    It calls the model's own layer objects, so training it trains the model: no copy, no new variable. Layers
    inside the base keep their inference mode (Step.training); the head's Dropout follows fit's mode.
    """

    def __init__(self, top: Graph, input_shapes: Sequence[Sequence[int]], name: str):
        """`input_shapes`: per-image shapes of the top's inputs (boundary_shapes of the bottom)."""
        super().__init__(name=name)
        self.top = top
        # Tracked: the model's trainable_variables (and a backup's checkpoint) are these layers'.
        self.parts = [step.layer for step in top.steps]
        # Built now (traced on placeholders, no variable read): BackupAndRestore restores nothing into an unbuilt
        # model, and fit would only build it at its first step.
        shapes = [tf.TensorShape([None, *shape]) for shape in input_shapes]
        self.build(shapes if len(shapes) > 1 else shapes[0])

    def call(self, features: Any, training: bool | None = None) -> tf.Tensor:
        return run_graph(self.top, tf.nest.flatten(features), training=bool(training))[0]


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
        self._bottom = ConstantPart(bottom, strategy, images.shape[1:], tf.as_dtype(images.dtype))
        boundary_specs = [tf.TensorSpec([None, *shape], dtype)
                          for shape, dtype in boundary_shapes(bottom, images.shape[1:])]
        self._top_fn = tf.function(self._run_top, input_signature=[*boundary_specs, tf.TensorSpec([None], tf.int64)])
        self._full_fn = tf.function(self._run_full, input_signature=[self._bottom.fn.input_signature[0],
                                                                     tf.TensorSpec([None], tf.int64)])

    # -- the computations (traced once each; run in replica context through `local`)

    def _run_top(self, *args: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        *features, labels = args
        return metric_sums(labels, run_graph(self.top, features)[0], self.binary)

    def _run_full(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return metric_sums(labels, run_graph(self.top, self._bottom.fn(images))[0], self.binary)

    def _batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size])
                for i in range(0, len(self.images), self.batch_size)]

    def _extract(self) -> list[list[tf.Tensor]]:
        start = time.perf_counter()
        batches = self._batches()
        features = []
        with working(self.watchdog, "cached validation: feature pass", len(batches)) as progress:
            for x, _ in batches:
                features.append(self._bottom(x))
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
        with working(self.watchdog, "cached validation", len(batches)) as progress:
            for i, (x, y) in enumerate(batches):
                if self._features is not None:
                    loss, right = local(self.strategy, self._top_fn, *self._features[i], tf.constant(y))
                else:
                    loss, right = local(self.strategy, self._full_fn, tf.constant(x), tf.constant(y))
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
    bottom, top = split_model(model, val_images_uint8.shape[1:], training=False)
    megabytes = feature_megabytes(boundary_shapes(bottom, val_images_uint8.shape[1:]), len(val_images_uint8))
    cache = megabytes <= budget_mb
    log.info("cached validation: %d constant / %d changing layer calls, boundary %s; features %.0f MB %s "
             "budget %.0f MB%s", len(bottom.steps), len(top.steps), list(bottom.outputs), megabytes,
             "within" if cache else "over", budget_mb, "" if cache else ": running the whole network each epoch")
    return CachedValidation(bottom, top, val_images_uint8, val_labels, batch_size=batch_size,
                            binary=head_units(num_classes) == 1, strategy=model.distribute_strategy,
                            cache_features=cache, watchdog=watchdog)
