"""Using an exported model: `tljob predict` and `tljob evaluate`."""

from __future__ import annotations

import json
import logging
import tempfile
from typing import Iterator

import numpy as np
import tensorflow as tf

from tljob import data, export, storage
from tljob.config import DataConfig
from tljob.errors import ConfigError
from tljob.model import load_exported

log = logging.getLogger(__name__)


def load_metadata(model_dir: str) -> dict:
    """metadata.json sits beside model/ in the run directory."""
    run_dir = model_dir.rstrip("/").rsplit("/", 1)[0] if "/" in model_dir.rstrip("/") else "."
    path = storage.join(run_dir, export.METADATA)
    if not storage.exists(path):
        raise ConfigError(f"--model {model_dir}: {path} not found. Fix: point at <run>/model of a finished run.")
    return json.loads(storage.read_text(path))


def interpret(probs: np.ndarray, class_names: list[str]) -> tuple[str, float]:
    """(class name, probability of that class) from one sigmoid or softmax output row (pure)."""
    if probs.shape[-1] == 1:
        p = float(probs[0])
        return (class_names[1], p) if p >= 0.5 else (class_names[0], 1.0 - p)
    k = int(np.argmax(probs))
    return class_names[k], float(probs[k])


def predict(model_dir: str, images: list[str]) -> Iterator[dict]:
    """One dict per image: path, class, probability (or the error for a file that does not decode)."""
    meta = load_metadata(model_dir)
    model = load_exported(model_dir)
    size = int(meta["image_size"])
    for path, image in data.iter_image_files(images):
        if image is None:
            yield {"path": path, "error": "not a decodable image"}
            continue
        resized = tf.image.resize(image, (size, size), method="bilinear")
        batch = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.float32)[None]
        name, prob = interpret(model.predict(batch, verbose=0)[0], meta["class_names"])
        yield {"path": path, "class": name, "probability": round(prob, 6)}


def evaluate(model_dir: str, data_path: str, *, source: str, batch_size: int) -> dict:
    """Metrics of the exported model on a labelled folder or TFRecord directory."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: use a positive batch size.")
    meta = load_metadata(model_dir)
    model = load_exported(model_dir)
    cfg = DataConfig(source=source, train=data_path, validation=None, test=None,
                     image_size=int(meta["image_size"]), batch_size=batch_size, max_bad_fraction=0.99)
    ds = data.load_dataset(cfg, seed=0, cache_dir=tempfile.mkdtemp(prefix="tljob-eval-"))
    if ds.class_names != meta["class_names"]:
        raise ConfigError(f"--data {data_path}: classes {ds.class_names} differ from the model's {meta['class_names']}.")
    out = model.evaluate(data.eval_pipeline(ds.train, global_batch=batch_size, num_workers=1),
                         return_dict=True, verbose=0)
    return {**{k: float(v) for k, v in out.items()}, "examples": ds.train.num_examples,
            "bad_files": len(ds.bad_files)}
