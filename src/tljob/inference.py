"""Using an exported model: `tljob predict` and `tljob evaluate`."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow as tf

from tljob import data, rundir, storage
from tljob.config import DataConfig
from tljob.errors import ConfigError

log = logging.getLogger(__name__)


def load_exported(model_dir: str) -> tf.keras.Model:
    """Loads the Keras file of a run's model folder (local or gs://)."""
    path = storage.join(model_dir, rundir.KERAS_FILE)
    if not storage.exists(path):
        raise ConfigError(f"--model {model_dir}: no {rundir.KERAS_FILE} inside. Fix: point at a finished run's "
                          f"model/ directory.")
    if not storage.is_remote(path):
        return tf.keras.models.load_model(path)
    # Keras loads from a local file only; the copy is not needed once the model is in memory.
    with tempfile.TemporaryDirectory(prefix="tljob-model-") as tmp:
        local = Path(tmp) / rundir.KERAS_FILE
        local.write_bytes(storage.read_bytes(path))
        return tf.keras.models.load_model(str(local))


def interpret(probs: np.ndarray, class_names: list[str]) -> tuple[str, float]:
    """(class name, probability of that class) from one sigmoid or softmax output row (pure)."""
    if probs.shape[-1] == 1:
        p = float(probs[0])
        return (class_names[1], p) if p >= 0.5 else (class_names[0], 1.0 - p)
    k = int(np.argmax(probs))
    return class_names[k], float(probs[k])


def predict(model_dir: str, images: list[str]) -> Iterator[dict]:
    """One dict per image: path, class, probability (or the error for a file that does not decode)."""
    meta = rundir.read_metadata(model_dir)
    model = load_exported(model_dir)
    size = int(meta["image_size"])
    for path, image in data.iter_image_files(images):
        if image is None:
            yield {"path": path, "error": "not a decodable image"}
            continue
        batch = tf.cast(data.resize_image(image, size), tf.float32)[None]
        name, prob = interpret(model.predict(batch, verbose=0)[0], meta["class_names"])
        yield {"path": path, "class": name, "probability": round(prob, 6)}


def evaluate(model_dir: str, data_path: str, *, source: str, batch_size: int) -> dict:
    """Metrics of the exported model on a labelled folder or TFRecord directory."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: use a positive batch size.")
    meta = rundir.read_metadata(model_dir)
    model = load_exported(model_dir)
    cfg = DataConfig(source=source, train=data_path, validation=None, test=None,
                     image_size=int(meta["image_size"]), batch_size=batch_size, max_bad_fraction=0.99)
    # The staged inputs and any disk cache live until the evaluation has read them, then go.
    with tempfile.TemporaryDirectory(prefix="tljob-eval-") as cache_dir:
        ds = data.load_dataset(cfg, seed=0, cache_dir=cache_dir)
        if ds.class_names != meta["class_names"]:
            raise ConfigError(f"--data {data_path}: classes {ds.class_names} differ from the model's "
                              f"{meta['class_names']}.")
        out = model.evaluate(data.eval_pipeline(ds.train, global_batch=batch_size, num_workers=1),
                             return_dict=True, verbose=0)
    return {**{k: float(v) for k, v in out.items()}, "examples": ds.train.num_examples,
            "bad_files": len(ds.bad_files)}
