"""Using an exported model: `tljob predict` and `tljob evaluate`.

Both need only the model/ directory (local or gs://): its metadata.json has the class names and image size,
so a copy of model/ made anywhere works.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from tljob import report, rundir, storage
from tljob.config import DataConfig
from tljob.errors import ConfigError

log = logging.getLogger(__name__)

_WILDCARDS = "*?["


def load_serving(model_dir: str, scratch: str) -> Callable[[Any], np.ndarray]:
    """The SavedModel's `serve` endpoint as float32 [batch, size, size, 3] -> outputs: what a server runs.

    Loaded as traced graphs, in about 1 s here, where rebuilding the Keras model from model.keras and tracing
    its predict function took 2.5-3.5 s: most of what a predict of a few images costs.
    """
    import tensorflow as tf

    path = storage.join(model_dir, rundir.SAVED_MODEL_DIR)
    if not storage.exists(path):
        raise ConfigError(f"--model {model_dir}: no {rundir.SAVED_MODEL_DIR}/ inside. Fix: point --model at the "
                          f"model/ directory of a finished run (or a copy of it).")
    saved = tf.saved_model.load(storage.stage_input(path, scratch))
    # The closure keeps `saved` alive: its variables go with it, and a bare `saved.serve` would outlive them.
    return lambda images: saved.serve(images).numpy()


def top_classes(outputs: np.ndarray, class_names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The k most probable (class, probability) of each output row, most probable first (pure)."""
    probs = report.class_probabilities(outputs)
    # A stable sort on the negated probabilities keeps ties in class order, as argmax breaks them.
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(class_names[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def _local_files(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))


def resolve_inputs(args: list[str], scratch: str) -> list[tuple[str, str]]:
    """(shown path, local path) for every image the arguments name, in argument order.

    A file; a folder (its files, recursively, sorted; hidden ones left out); a glob (`shots/*.jpg`,
    `**` recursive, sorted); a gs:// object or prefix (staged into `scratch`, shown by its URI). A plain file
    that does not exist stays in the list and gets its error line.
    """
    found: list[tuple[str, str]] = []
    for arg in args:
        if storage.is_remote(arg):
            local = storage.stage_input(arg, scratch)
            if Path(local).is_dir():
                found += [(storage.join(arg, os.path.relpath(f, local)), f) for f in _local_files(local)]
            else:
                found.append((arg, local))
        elif any(ch in arg for ch in _WILDCARDS):
            matches = sorted(m for m in glob.glob(storage.local_path(arg), recursive=True) if os.path.isfile(m))
            if not matches:
                raise ConfigError(f"images {arg!r}: the pattern matches no file. Fix: correct the pattern (quote it "
                                  f"so the shell does not expand it).")
            found += [(m, m) for m in matches]
        elif os.path.isdir(storage.local_path(arg)):
            files = _local_files(storage.local_path(arg))
            if not files:
                raise ConfigError(f"images {arg!r}: the folder holds no files. Fix: name a folder with images.")
            found += [(f, f) for f in files]
        else:
            found.append((arg, storage.local_path(arg)))
    return found


def _error_row(shown: str, local: str) -> dict[str, str]:
    reason = "not a decodable image" if os.path.isfile(local) else "no such file"
    log.warning("cannot classify %s: %s", shown, reason)
    return {"path": shown, "error": reason}


def predict(model_dir: str, images: list[str], *, batch_size: int = 32, top_k: int = 1) -> Iterator[dict[str, Any]]:
    """One dict per image, in input order: path, class, probability (and with top_k > 1 the k best), or the
    error for a file that is missing or does not decode. Yields each batch's rows as soon as it is classified."""
    import tensorflow as tf

    from tljob import data

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: use a positive batch size, e.g. 32.")
    meta = rundir.read_metadata(model_dir)
    names = meta["class_names"]
    if not 1 <= top_k <= len(names):
        raise ConfigError(f"--top-k {top_k}: the model has {len(names)} classes. Fix: use 1 to {len(names)}.")
    # The staged gs:// inputs and model live until the last batch has been read, then go.
    with tempfile.TemporaryDirectory(prefix="tljob-predict-") as scratch:
        inputs = resolve_inputs(images, scratch)
        serve = load_serving(model_dir, scratch)
        batches = data.decoded_file_batches([local for _, local in inputs], int(meta["image_size"]), batch_size)
        done = 0  # inputs before this index have had their row
        for indices, pixels in batches.as_numpy_iterator():
            outputs = serve(tf.constant(pixels, tf.float32))
            for i, best in zip(indices, top_classes(outputs, names, top_k)):
                # Files between the last row and this one were left out of the batch: they did not decode.
                yield from (_error_row(*inputs[j]) for j in range(done, i))
                row: dict[str, Any] = {"path": inputs[i][0], "class": best[0][0],
                                       "probability": round(best[0][1], 6)}
                if top_k > 1:
                    row["top_k"] = [{"class": c, "probability": round(p, 6)} for c, p in best]
                yield row
                done = i + 1
        yield from (_error_row(*inputs[j]) for j in range(done, len(inputs)))


def evaluate(model_dir: str, data_path: str, *, source: str, batch_size: int) -> dict[str, Any]:
    """The evaluation report (report.build_report) of the exported model on a labelled folder or TFRecords."""
    from tljob import data

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: use a positive batch size.")
    meta = rundir.read_metadata(model_dir)
    cfg = DataConfig(source=source, train=data_path, validation=None, test=None,
                     image_size=int(meta["image_size"]), batch_size=batch_size, max_bad_fraction=0.99)
    # The staged model and inputs and any disk cache live until the evaluation has read them, then go.
    with tempfile.TemporaryDirectory(prefix="tljob-eval-") as scratch:
        serve = load_serving(model_dir, scratch)
        ds = data.load_dataset(cfg, seed=0, cache_dir=scratch)
        if ds.class_names != meta["class_names"]:
            raise ConfigError(f"--data {data_path}: classes {ds.class_names} differ from the model's "
                              f"{meta['class_names']}.")
        result = report.evaluate_split(serve, ds.train, ds.class_names, batch_size, source=data_path)
    return {**result, "data": data_path, "bad_files": len(ds.bad_files), "bad_file_names": ds.bad_files}
