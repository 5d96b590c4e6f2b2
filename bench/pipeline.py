"""Input pipeline throughput with no model, one variant per process (started by bench/run.py):

    python -m bench.pipeline ceiling|tutorial|tljob --data DIR --image-size N --epochs N

- ceiling: the JPEG bytes already in memory, `decode_jpeg` + bilinear `resize` in a parallel map on all
  cores (one call per core, tf.data's autotuner off), batched: what any pipeline that decodes every epoch
  can reach at best.
- tutorial: `image_dataset_from_directory(train, shuffle=True, batch_size=32, image_size)
  .prefetch(AUTOTUNE)`, the tutorial's input pipeline (run under Keras 3, as the tutorial does).
- tljob: `data.load_dataset` on the folder (its first epoch: the decode pass that fills the in-memory
  cache, train and validation), then `data.train_pipeline` epochs from the cache, with the recipe's
  augmentation (what training consumes) and without it (what corresponds to the tutorial's pipeline,
  whose augmentation runs inside the model).
Each prints one result event with images per second per epoch; epochs after the first are the repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench import events

BATCH = 32


def _rate(epoch_images: int, seconds: list[float]) -> dict[str, object]:
    rates = [epoch_images / s for s in seconds]
    # The first epoch also builds the pipeline (and autotunes it); the others are the steady state.
    steady = rates[1:] or rates
    return {"per_epoch": [round(r, 1) for r in rates], "median": round(statistics.median(steady), 1)}


def _time_epochs(ds, epochs: int) -> tuple[int, list[float]]:  # type: ignore[no-untyped-def]
    seconds, count = [], 0
    for _ in range(epochs):
        start, count = time.perf_counter(), 0
        for x, _ in ds:
            count += int(x.shape[0])
        seconds.append(time.perf_counter() - start)
    return count, seconds


def _files(train_dir: Path) -> list[str]:
    return sorted(str(p) for p in train_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def ceiling(data: Path, size: int, epochs: int) -> dict[str, object]:
    import tensorflow as tf

    blobs = [Path(p).read_bytes() for p in _files(data / "train")]

    def decode(blob: tf.Tensor) -> tf.Tensor:
        return tf.image.resize(tf.io.decode_jpeg(blob, channels=3), (size, size), method="bilinear")

    ds = tf.data.Dataset.from_tensor_slices(blobs).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(BATCH).map(lambda x: (x, 0)).prefetch(tf.data.AUTOTUNE)
    # The better of the two settings here: with the autotuner on, about half of the runs stayed at
    # ~1,100 images/s with a core partly idle; off, AUTOTUNE means one call per core (bench/README.md).
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.with_options(options)
    count, seconds = _time_epochs(ds, epochs)
    return {"images": count, **_rate(count, seconds)}


def tutorial(data: Path, size: int, epochs: int) -> dict[str, object]:
    import tensorflow as tf

    ds = tf.keras.utils.image_dataset_from_directory(str(data / "train"), shuffle=True, batch_size=BATCH,
                                                     image_size=(size, size))
    ds = ds.prefetch(buffer_size=tf.data.AUTOTUNE)
    count, seconds = _time_epochs(ds, epochs)
    return {"images": count, **_rate(count, seconds)}


def tljob(data: Path, size: int, epochs: int) -> dict[str, object]:
    import tljob as _  # noqa: F401 - tf-keras before TensorFlow
    from tljob import data as tljob_data
    from tljob.config import AugmentConfig, DataConfig

    cfg = DataConfig(source="folder", train=str(data / "train"), validation=str(data / "validation"), test=None,
                     image_size=size, batch_size=BATCH)
    start = time.perf_counter()
    ds = tljob_data.load_dataset(cfg, seed=0, cache_dir=str(data))
    scan_s = time.perf_counter() - start
    if ds.train.images is None:
        raise SystemExit(f"tljob did not cache the {ds.total_files} images (data.cache_budget_mb too small?)")
    decoded = ds.total_files - len(ds.bad_files)
    out: dict[str, object] = {"images": ds.train.num_examples,
                              "first_epoch": {"decoded": decoded, "seconds": round(scan_s, 2),
                                              "median": round(decoded / scan_s, 1)}}
    for name, aug in (("cached_augmented", AugmentConfig()),
                      ("cached_plain", AugmentConfig(flip="none", rotation=0.0))):
        pipe = tljob_data.train_pipeline(ds.train, global_batch=BATCH, aug=aug, shuffle_buffer=cfg.shuffle_buffer,
                                         seed=0, num_workers=1, repeat=False)
        count, seconds = _time_epochs(pipe, epochs)
        out[name] = _rate(count, seconds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=("ceiling", "tutorial", "tljob"))
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if args.variant == "tutorial" and os.environ.get("TF_USE_LEGACY_KERAS", "0") not in ("", "0"):
        raise SystemExit("the tutorial's pipeline runs under Keras 3: unset TF_USE_LEGACY_KERAS")
    run = {"ceiling": ceiling, "tutorial": tutorial, "tljob": tljob}[args.variant]
    events.emit("result", variant=args.variant, result=run(args.data, args.image_size, args.epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
