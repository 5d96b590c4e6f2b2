"""`tljob predict`: the per-image loop it had against the batched tf.data path it has now.

    python -m bench.predict [--images 200] [--repeats 3] [--model DIR]

Writes `--images` generated JPEGs (sizes around 120x100, so every one is resized) and, without `--model`, a
small model like the dry run's (MobileNetV2 alpha 0.35, 64 px, random weights) exported as a run would. In one
process, alternately, `--repeats` times each:
  - per-image: what `inference.predict` did until issue 15: read one file, decode and resize it, one
    `model.predict` call per image;
  - batched: `inference.predict` now (one tf.data pipeline, 32 images per model call).
Both include loading the model (per-image: model.keras, as it did; batched: the SavedModel's `serve`), the
per-image one's timed as `per_image_load_s`. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(100 + i % 7, 120 + i % 5, 3), dtype=np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def make_model(model_dir: Path) -> None:
    from tljob import export, model as model_lib, rundir
    from tljob.config import ModelConfig

    model = model_lib.build_model(ModelConfig(weights="none", alpha=0.35), image_size=64, num_classes=2,
                                  cache_dir="")
    with contextlib.redirect_stdout(sys.stderr):  # Keras prints the SavedModel's endpoints: keep stdout JSON
        export.export_model(model, model_dir)
    rundir.write_json(model_dir / rundir.METADATA, {"class_names": ["a", "b"], "image_size": 64})


def per_image(model_dir: str, paths: list[str]) -> tuple[list[dict], float]:
    """The loop `tljob predict` ran before: one file, one decode, one model call at a time."""
    import tensorflow as tf

    from tljob import data, report, rundir, storage

    t0 = time.perf_counter()
    meta = rundir.read_metadata(model_dir)
    model = tf.keras.models.load_model(str(Path(model_dir) / rundir.KERAS_FILE))
    load_s = time.perf_counter() - t0
    rows = []
    for path in paths:
        image = data.decode_and_resize(storage.read_bytes(path), int(meta["image_size"]))
        outputs = model.predict(tf.cast(image, tf.float32)[None], verbose=0)
        probs = report.class_probabilities(outputs)[0]
        k = int(np.argmax(probs))
        rows.append({"path": path, "class": meta["class_names"][k], "probability": round(float(probs[k]), 6)})
    return rows, load_s


def batched(model_dir: str, paths: list[str]) -> list[dict]:
    from tljob import inference

    return list(inference.predict(model_dir, paths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="an exported model/ directory; default: a small one")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tljob-bench-predict-"))
    paths = make_images(scratch / "images", args.images)
    model_dir = args.model or str(scratch / "model")
    if not args.model:
        make_model(Path(model_dir))
    batched(model_dir, paths[:4])  # warm-up: first imports and graph building are in neither figure
    seconds: dict[str, list[float]] = {"per_image": [], "batched": []}
    loads = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        old, load_s = per_image(model_dir, paths)
        seconds["per_image"].append(time.perf_counter() - t0)
        loads.append(load_s)
        t0 = time.perf_counter()
        new = batched(model_dir, paths)
        seconds["batched"].append(time.perf_counter() - t0)
    same_class = sum(a["class"] == b["class"] for a, b in zip(old, new)) / len(paths)
    max_diff = max(abs(a["probability"] - b["probability"]) for a, b in zip(old, new))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({  # noqa: T201 - the benchmark's result
        "images": len(paths), "repeats": args.repeats, "load_average_1min": round(os.getloadavg()[0], 2),
        "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
        "median_s": {k: round(v, 2) for k, v in median.items()},
        "per_image_load_s_median": round(statistics.median(loads), 2),
        "speedup": round(median["per_image"] / median["batched"], 1),
        "same_class": same_class, "max_probability_diff": max_diff,
    }, indent=1))


if __name__ == "__main__":
    main()
