"""Data sources (image folder, TFRecord, TFDS, synthetic) and the tf.data pipelines built on them.

Runs on every worker: each worker builds the same pipelines from the same seed; the sharding policy set
here decides which part of each global batch a worker reads.

Undecodable files are found by a decode pass over every file (the same pass fills the in-memory cache when
the images fit): a file that fails is named in the log, counted in the metrics and left out; too many bad
files stop the run with a DataError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from tljob import cpus, storage
from tljob.config import AugmentConfig, DataConfig
from tljob.errors import ConfigError, DataError, RetryableError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
TFRECORD_META = "meta.json"
# Read in chunks so the decode pass never holds more than this many images beyond the cache itself.
_SCAN_CHUNK = 256
_SCAN_LOG_S = 10.0  # how often the decode pass logs its progress
_BAD_FILES_LOGGED = 20
# How long the other workers wait for the chief to prepare a TFDS dataset in a shared data_dir: far above
# cats_vs_dogs' download and preparation (786 MB, minutes), so that only a chief that died makes them give up
# (exit 75, and every worker restarts); and how often they look and say so.
TFDS_WAIT_S = 3600.0
TFDS_POLL_S = 2.0
TFDS_LOG_EVERY_S = 30.0


@dataclass
class Split:
    """One split, decoded: either in memory (``images`` set) or streamed from known-good files."""

    name: str
    num_examples: int
    images: np.ndarray | None = None  # uint8 [n, size, size, 3] when cached
    labels: np.ndarray | None = None
    stream: tf.data.Dataset | None = None  # (uint8 image, label) when not cached
    # FILE sharding is only correct when every worker can get at least one whole file.
    num_files: int = 0
    # Each example's file (folders) or generated name (synthetic), in the split's order, for the evaluation
    # report's worst-classified images; None where the source has no names. No pipeline reads it.
    paths: list[str] | None = None


@dataclass
class Dataset:
    """What the trainer needs: the splits, the class names, and the bad-file report."""

    class_names: list[str]
    train: Split
    validation: Split | None
    test: Split | None
    bad_files: list[str] = field(default_factory=list)
    total_files: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- pure policy


def split_fractions(items: list, validation_fraction: float, test_fraction: float, seed: int) -> tuple[list, list, list]:
    """Deterministic three-way split of a list (same seed -> same split on every worker and restart)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n_val = int(round(n * validation_fraction))
    n_test = int(round(n * test_fraction))
    return shuffled[n_val + n_test:], shuffled[:n_val], shuffled[n_val:n_val + n_test]


def fits_in_memory(num_images: int, image_size: int, budget_mb: int) -> bool:
    return num_images * image_size * image_size * 3 <= budget_mb * 1024 * 1024


def check_bad_share(bad: int, total: int, max_fraction: float) -> None:
    if total and bad / total > max_fraction:
        raise DataError(
            f"{bad} of {total} files ({bad / total:.1%}) could not be decoded, more than "
            f"data.max_bad_fraction={max_fraction}. Fix: repair or remove the files named above, or raise "
            f"data.max_bad_fraction."
        )


# ----------------------------------------------------------------------------- decoding


def resize_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """A decoded image -> uint8 [size, size, 3], bilinear as image_dataset_from_directory does: the one
    resize every source, predict and evaluate share, so a model sees at prediction time exactly the pixels
    it was trained and tested on."""
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Any JPEG/PNG/GIF/BMP -> uint8 [size, size, 3] (resize_image)."""
    return resize_image(tf.io.decode_image(encoded, channels=3, expand_animations=False), image_size)


def _scan_pipeline(encoded_ds: tf.data.Dataset, image_size: int, chunk: int = _SCAN_CHUNK) -> tf.data.Dataset:
    """(index, encoded bytes) -> chunks of (indices, images) of the elements that decoded.

    ``ignore_errors`` drops the elements whose decode raised; comparing the surviving indices with all of
    them names the bad files without a second pass.
    """
    # Plain TensorFlow calls: AutoGraph's source transform would only add ~0.1 s per traced function.
    decode = tf.autograph.experimental.do_not_convert(lambda i, data: (i, decode_and_resize(data, image_size)))
    ds = encoded_ds.map(decode, num_parallel_calls=parallel_calls(), deterministic=True)
    ds = ds.ignore_errors().batch(chunk).prefetch(2)
    return ds.with_options(_no_autotuner())


def parallel_calls() -> int:
    """Parallel calls of every stage of every pipeline: one per CPU this process may use (tljob.cpus), so in a
    pod with a CPU limit the quota's count, not the node's cores (which AUTOTUNE would count)."""
    return cpus.budget().usable


def _no_autotuner() -> tf.data.Options:
    """Options for every tljob pipeline: fixed parallelism (parallel_calls) instead of tf.data's autotuner.

    Prefetch buffers (AUTOTUNE) still grow on demand.
    The autotuner's model thread re-optimises at a period that doubles up to 60 s, and deleting an iterator
    waits for the period to run out, so `fit` stood still at the phase boundary and after the last epoch;
    it also left a core partly idle in the decode pass. Figures: bench/README.md, "What each change bought".
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def _scan(
    encoded_ds: tf.data.Dataset, count: int, image_size: int, keep_images: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decodes every element of (index, encoded bytes); returns the indices that decoded (and the images).

    Logs how far it got every _SCAN_LOG_S: on thousands of files it is the longest stage before training."""
    good: list[np.ndarray] = []
    images = np.empty((count, image_size, image_size, 3), np.uint8) if keep_images else None
    n = 0
    started = last_log = time.monotonic()
    for idx, batch in _scan_pipeline(encoded_ds, image_size).as_numpy_iterator():
        good.append(idx)
        if images is not None:
            images[n:n + len(idx)] = batch
        n += len(idx)
        if time.monotonic() - last_log >= _SCAN_LOG_S:
            last_log = time.monotonic()
            log.info("decode pass: %d of %d files decoded after %.0f s", n, count, last_log - started)
    good_idx = np.concatenate(good) if good else np.empty((0,), np.int64)
    return good_idx, (images[:n] if images is not None else None)


def _read_encoded(paths: list[str]) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    read = tf.autograph.experimental.do_not_convert(lambda i, p: (i, tf.io.read_file(p)))
    return ds.map(read, num_parallel_calls=parallel_calls(), deterministic=True)


# ----------------------------------------------------------------------------- folder source


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and (file, label) pairs; hidden files are not data."""
    base = Path(root)
    if not base.is_dir():  # a gs:// path is checked only here, once staged: it may name a single object
        raise ConfigError(
            f"data folder {root!r} {'is a file, not a folder' if base.exists() else 'does not exist'}. Fix: point "
            f"it at a folder with one sub-folder per class."
        )
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"data folder {root!r} has no class sub-folders. Fix: lay it out as {root}/<class>/<image files>."
        )
    items = []
    for label, name in enumerate(classes):
        for path in sorted((base / name).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                items.append((str(path), label))
    return classes, items


def check_every_class_has_images(key: str, root: str, class_names: list[str], items: list[tuple[str, int]],
                                 bad: list[str]) -> None:
    """Every class sub-folder must give at least one image that decodes.

    The class names are the sub-folders, so an empty one (or one of bad files only) would still get an output
    of the model's head that no image ever trains: a 2-class model trained on one class, and exit 0.
    """
    bad_set = set(bad)
    files = Counter(label for _, label in items)
    usable = Counter(label for path, label in items if path not in bad_set)
    empty = [(name, files[k]) for k, name in enumerate(class_names) if not usable[k]]
    if empty:
        shown = "; ".join(f"{storage.join(root, name)} ({f'{n} files, none decodes' if n else 'no files'})"
                          for name, n in empty)
        raise DataError(f"{key}: class folders without a usable image: {shown}. Fix: add images of that class, "
                        f"or remove the folder to train without the class.")


def _folder_splits(parts: dict[str, list[tuple[str, int]]], cfg: DataConfig, cache: bool,
                   bad: list[str]) -> dict[str, Split]:
    """Every split in one decode pass: one pipeline to build, warm up and drain instead of one per split."""
    names = [k for k, v in parts.items() if v]
    paths = [p for k in names for p, _ in parts[k]]
    labels = np.array([lbl for k in names for _, lbl in parts[k]], np.int64)
    good_idx, images = _scan(_read_encoded(paths), len(paths), cfg.image_size, keep_images=cache)
    decoded = np.zeros(len(paths), bool)
    decoded[good_idx] = True
    bad.extend(p for p, ok in zip(paths, decoded) if not ok)
    splits, start = {}, 0
    for name in names:
        end = start + len(parts[name])
        # good_idx is ascending (deterministic scan), so a split's images are one contiguous run.
        lo, hi = np.searchsorted(good_idx, [start, end])
        if cache:
            splits[name] = Split(name, int(hi - lo), images=images[lo:hi], labels=labels[good_idx[lo:hi]],
                                 num_files=int(hi - lo), paths=[paths[i] for i in good_idx[lo:hi]])
        else:
            good_paths = [paths[i] for i in good_idx[lo:hi]]
            stream = tf.data.Dataset.from_tensor_slices((good_paths, labels[good_idx[lo:hi]])).map(
                lambda p, y: (decode_and_resize(tf.io.read_file(p), cfg.image_size), y),
                num_parallel_calls=parallel_calls())
            splits[name] = Split(name, len(good_paths), stream=stream, num_files=len(good_paths), paths=good_paths)
        start = end
    return splits


def _load_folder(cfg: DataConfig, seed: int, cache_dir: str) -> Dataset:
    train_root = storage.stage_input(cfg.train, cache_dir)
    class_names, train_items = list_image_folder(train_root)
    # Each folder as listed, before any fractions are carved out of it: every class must have images there.
    folders = {"train": train_items}
    parts: dict[str, list[tuple[str, int]]] = {"train": train_items}
    val_items = test_items = None
    if cfg.validation_fraction or cfg.test_fraction:
        train_items, val_items, test_items = split_fractions(train_items, cfg.validation_fraction, cfg.test_fraction, seed)
        parts = {"train": train_items, "validation": val_items, "test": test_items}
    for key in ("validation", "test"):
        path = getattr(cfg, key)
        if path:
            names, items = list_image_folder(storage.stage_input(path, cache_dir))
            if names != class_names:
                raise DataError(
                    f"data.{key}: classes {names} differ from data.train's {class_names}. Fix: use the same "
                    f"class sub-folders in every split."
                )
            parts[key] = folders[key] = items
    total = sum(len(v) for v in parts.values())
    cache = _want_cache(cfg, total)
    if not cache:
        # Streamed, the files reach a bounded shuffle buffer in this order: mix the classes (on disk they
        # are class by class) the same way on every worker. Cached images are permuted whole each epoch.
        random.Random(seed).shuffle(parts["train"])
    bad: list[str] = []
    splits = _folder_splits(parts, cfg, cache, bad)
    dataset = _finish(cfg, class_names, splits, bad, total)
    for key, items in folders.items():
        check_every_class_has_images(f"data.{key}", getattr(cfg, key), class_names, items, bad)
    return dataset


# ----------------------------------------------------------------------------- TFRecord source

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    # Names a record that does not decode; `tljob convert` writes it, other writers may not.
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=b""),
}


def _tfrecord_source(key: str, path: str, cache_dir: str) -> tuple[list[str], dict]:
    """data.<key>'s shards, staged locally, and the meta.json that `tljob convert` wrote beside them.

    `path` is a folder of shards, one shard, or a glob of shards in one folder (`/data/train-*.tfrecord`,
    `gs://bucket/flowers/*.tfrecord`), local or gs://.
    """
    if storage.has_wildcards(path):
        folder = storage.parent(path)
        if storage.has_wildcards(folder):
            raise ConfigError(
                f"data.{key}: {path!r} has wildcards in a folder name; tljob reads the class names from the "
                f"{TFRECORD_META} beside the shards, so they must be in one folder. Fix: put the wildcards in "
                f"the file name only, e.g. gs://bucket/flowers/train-*.tfrecord."
            )
        files = storage.stage_matching(path, cache_dir)
    else:
        local = storage.stage_input(path, cache_dir)
        if Path(local).is_dir():  # the local copy: a gs:// folder is staged whole
            folder, files = path, sorted(str(f) for f in Path(local).glob("*.tfrecord*"))
        else:
            folder, files = storage.parent(path), [local]
    if not files:
        raise ConfigError(
            f"data.{key}: no TFRecord files at {path!r}. Fix: write them with `tljob convert`, or point it at a "
            f"folder, a file or a glob (*.tfrecord) of shards."
        )
    return files, _read_tfrecord_meta(key, storage.join(folder, TFRECORD_META))


def _read_tfrecord_meta(key: str, meta_path: str) -> dict:
    try:
        meta = json.loads(storage.read_text(meta_path))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"data.{key}: {meta_path} not found: tljob needs the class names written by `tljob convert`. Fix: "
            f"convert the folder with `tljob convert`, or add {TFRECORD_META} with {{\"class_names\": [...]}}."
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"data.{key}: {meta_path} is not valid JSON ({exc}). Fix: write it again with "
                        f"`tljob convert`.") from exc
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f"data.{key}: {meta_path} has no list of class names (\"class_names\": [...]). Fix: write "
                        f"it again with `tljob convert`.")
    return meta


def _tfrecord_split(name: str, files: list[str], cfg: DataConfig, cache: bool,
                    num_examples: int) -> tuple[Split, list[str]]:
    """The split, and the records that do not decode (found by the decode pass when the split is cached)."""
    records = tf.data.TFRecordDataset(files, num_parallel_reads=parallel_calls()).map(
        lambda r: tf.io.parse_single_example(r, _FEATURES), num_parallel_calls=parallel_calls()
    )
    if cache:
        rows = list(records.map(lambda r: (r["image/class/label"], r["image/filename"])).as_numpy_iterator())
        labels = np.array([label for label, _ in rows], np.int64)
        encoded = records.enumerate().map(lambda i, r: (i, r["image/encoded"]))
        good_idx, images = _scan(encoded, len(labels), cfg.image_size, keep_images=True)
        # Dropped by the decode pass, they are bad files like a folder's: named, counted, held to the limit.
        bad = [f"data.{name} record {i}" + (f" ({rows[i][1].decode(errors='replace')})" if rows[i][1] else "")
               for i in np.setdiff1d(np.arange(len(rows)), good_idx)]
        return Split(name, len(good_idx), images=images, labels=labels[good_idx], num_files=len(files)), bad
    # Streamed: files are read per worker (FILE sharding when there are enough of them); the converter
    # already left out undecodable images, so decode errors here would be corruption and must surface.
    stream = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, num_parallel_calls=parallel_calls(), deterministic=True
    ).map(
        lambda r: _parse_decode(r, cfg.image_size), num_parallel_calls=parallel_calls()
    )
    return Split(name, num_examples, stream=stream, num_files=len(files)), []


def _parse_decode(record: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    ex = tf.io.parse_single_example(record, _FEATURES)
    return decode_and_resize(ex["image/encoded"], image_size), ex["image/class/label"]


def _load_tfrecord(cfg: DataConfig, seed: int, cache_dir: str) -> Dataset:
    del seed  # TFRecord splits are given as separate directories; shuffling happens in the pipeline
    paths = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    sources = {k: _tfrecord_source(k, v, cache_dir) for k, v in paths.items() if v}
    metas = {k: meta for k, (_, meta) in sources.items()}
    class_names = metas["train"]["class_names"]
    for key, meta in metas.items():
        if meta["class_names"] != class_names:
            raise DataError(f"data.{key}: classes {meta['class_names']} differ from data.train's {class_names}.")
    counts = {k: _count_examples(k, files, meta) for k, (files, meta) in sources.items()}
    records = sum(counts.values())
    cache = _want_cache(cfg, records)
    splits, bad_records = {}, []
    for key, (files, _) in sources.items():
        splits[key], bad = _tfrecord_split(key, files, cfg, cache, counts[key])
        bad_records.extend(bad)
    # Files `tljob convert` left out count as this run's bad files: same report, same limit. Splits that are
    # globs over one converted folder share its meta.json: each left-out file counts once.
    left_out = list(dict.fromkeys(f for m in metas.values() for f in m.get("bad_files", [])))
    return _finish(cfg, class_names, splits, left_out + bad_records, records + len(left_out))


def _count_examples(key: str, files: list[str], meta: dict) -> int:
    """meta.json's count describes all of its folder's shards; a glob that picks some of them is counted."""
    if len(files) == meta.get("shards") and "num_examples" in meta:
        return int(meta["num_examples"])
    n = int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda count, _: count + 1))
    log.info("data.%s: %d of the folder's %s shards, %d records (counted)", key, len(files),
             meta.get("shards", "?"), n)
    return n


def convert_folder(input_dir: str, output_dir: str, *, shards: int = 8, image_size: int | None = None) -> dict:
    """Writes sharded TFRecords (+ meta.json) from an image folder; undecodable files are left out and named."""
    if shards < 1:
        raise ConfigError(f"--shards {shards}: use 1 or more shards (at least the number of workers).")
    if image_size is not None and image_size < 32:
        raise ConfigError(f"--image-size {image_size}: MobileNetV2 needs at least 32 pixels.")
    scratch = Path(tempfile.mkdtemp(prefix="tljob-convert-"))
    root = storage.stage_input(input_dir, str(scratch / "input"))
    class_names, items = list_image_folder(root)
    paths = [p for p, _ in items]
    good_idx, _ = _scan(_read_encoded(paths), len(paths), image_size or 32, keep_images=False)
    good = sorted(good_idx.tolist())
    good_set = set(good)
    # Records in a fixed random order: listed class by class, each shard would hold one run per class and
    # a bounded shuffle buffer over them would give one-class batches.
    random.Random(0).shuffle(good)
    bad = [p for i, p in enumerate(paths) if i not in good_set]
    _report_bad(bad, len(paths))
    check_every_class_has_images("--input", input_dir, class_names, items, bad)
    # Local outputs are written in place; gs:// outputs are written to scratch and uploaded in one sync.
    out = scratch / "records" if storage.is_remote(output_dir) else Path(storage.local_path(output_dir))
    out.mkdir(parents=True, exist_ok=True)
    writers = [tf.io.TFRecordWriter(str(out / f"data-{s:05d}-of-{shards:05d}.tfrecord")) for s in range(shards)]
    for n, i in enumerate(good):
        data = Path(paths[i]).read_bytes()
        if image_size is not None:
            data = tf.io.encode_jpeg(decode_and_resize(data, image_size), quality=95).numpy()
        example = tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[items[i][1]])),
            "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[Path(paths[i]).name.encode()])),
        }))
        writers[n % shards].write(example.SerializeToString())
    for w in writers:
        w.close()
    meta = {"class_names": class_names, "num_examples": len(good), "shards": shards, "bad_files": bad}
    (out / TFRECORD_META).write_text(json.dumps(meta, indent=1))
    storage.Mirror(str(out), output_dir).push()
    log.info("wrote %d examples in %d shards to %s (%d bad files left out)", len(good), shards, output_dir, len(bad))
    return {"output": output_dir, **meta}


# ----------------------------------------------------------------------------- TFDS source


def tfds_prepared_marker(data_dir: str, name: str, version: str) -> str:
    """The file the chief writes once `name` is fully prepared in `data_dir`: on gs:// TFDS's final rename is a
    copy object by object, so the dataset's own folder exists before it is complete."""
    return storage.join(data_dir, f"{name}-{version}.tljob-prepared")


def prepare_tfds(cfg: DataConfig, *, chief: bool, wait_s: float = TFDS_WAIT_S, poll_s: float = TFDS_POLL_S) -> None:
    """Makes the TFDS dataset readable on this worker; runs on every worker before the splits are read.

    No data_dir: TFDS's own ~/tensorflow_datasets, one per machine, so every worker prepares its copy. A
    data_dir is shared by the workers (gs:// or one volume): the chief downloads and prepares the dataset there
    and writes the marker, the others wait for the marker (bounded, logged); a restarted worker finds it and
    prepares nothing.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    if cfg.data_dir is None:
        # Downloads and prepares on first use (the container's users have the internet; CI does not).
        builder.download_and_prepare()
        return
    marker = tfds_prepared_marker(cfg.data_dir, cfg.name, str(builder.version))
    if storage.exists(marker):
        log.info("TFDS %s %s: prepared in %s, reused", cfg.name, builder.version, cfg.data_dir)
        return
    if chief:
        started = time.monotonic()
        log.info("TFDS %s %s: preparing in %s for every worker", cfg.name, builder.version, cfg.data_dir)
        # The archives are scratch (only the prepared records are shared): on local disk, not in the bucket.
        with tempfile.TemporaryDirectory(prefix="tljob-tfds-downloads-") as downloads:
            builder.download_and_prepare(download_dir=downloads)
        storage.write_text(marker, f"{cfg.name} {builder.version}\n")
        log.info("TFDS %s %s: prepared in %.1f s", cfg.name, builder.version, time.monotonic() - started)
        return
    started = time.monotonic()
    logged = started
    log.info("TFDS %s %s: waiting for the chief to prepare it in %s (at most %.0f s)", cfg.name, builder.version,
             cfg.data_dir, wait_s)
    while not storage.exists(marker):
        now = time.monotonic()
        if now - started > wait_s:
            raise RetryableError(f"TFDS {cfg.name} {builder.version} was not prepared in {cfg.data_dir} within "
                                 f"{wait_s:.0f} s ({marker} is missing): the chief is stuck or gone; restart all "
                                 f"workers to try again")
        if now - logged >= TFDS_LOG_EVERY_S:
            log.info("TFDS %s: still waiting for the chief (%.0f s)", cfg.name, now - started)
            logged = now
        time.sleep(poll_s)
    log.info("TFDS %s %s: prepared by the chief, after %.1f s of waiting", cfg.name, builder.version,
             time.monotonic() - started)


def _load_tfds(cfg: DataConfig, seed: int, cache_dir: str) -> Dataset:
    del cache_dir  # TFDS manages its own data_dir
    import tensorflow_datasets as tfds

    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    label_feature = builder.info.features["label"]
    class_names = list(label_feature.names)
    splits_cfg = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    raw = {k: builder.as_dataset(split=v, as_supervised=True, read_config=tfds.ReadConfig(shuffle_seed=seed))
           for k, v in splits_cfg.items() if v}
    sizes = {k: _tfds_size(ds, builder, splits_cfg[k]) for k, ds in raw.items()}
    cache = _want_cache(cfg, sum(sizes.values()))
    splits = {}
    for key, ds in raw.items():
        ds = ds.map(lambda x, y: (resize_image(x, cfg.image_size), y), num_parallel_calls=parallel_calls())
        if cache:
            images = np.empty((sizes[key], cfg.image_size, cfg.image_size, 3), np.uint8)
            labels = np.empty((sizes[key],), np.int64)
            n = 0
            for x, y in ds.batch(_SCAN_CHUNK).as_numpy_iterator():
                images[n:n + len(x)], labels[n:n + len(x)] = x, y
                n += len(x)
            splits[key] = Split(key, n, images=images[:n], labels=labels[:n])
        else:
            splits[key] = Split(key, sizes[key], stream=ds)
    return _finish(cfg, class_names, splits, [], sum(sizes.values()))


def _tfds_size(ds: tf.data.Dataset, builder, split: str) -> int:
    n = int(ds.cardinality())
    return n if n >= 0 else builder.info.splits[split].num_examples


# ----------------------------------------------------------------------------- synthetic source


def synthetic_images(num: int, num_classes: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey-level noise whose grain is the class: class 0 pixel-fine, the last class blobs 1/8 of the image.

    The grain survives flips and rotations, and a random-initialised MobileNetV2 keeps it in its pooled
    features (a class-centroid probe on them: 0.92-0.95); a per-class colour cast, tried first, it mostly
    loses (0.6-0.8), and the dry run's accuracy barely rose.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num)
    images = np.empty((num, image_size, image_size, 3), np.float32)
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        # Grids from image_size down to image_size / 8, evenly spaced on a log scale.
        grid = max(2, round(image_size * 8.0 ** (-k / max(1, num_classes - 1))))
        if len(idx):
            noise = rng.normal(0, 40, size=(len(idx), grid, grid, 3)).astype(np.float32)
            images[idx] = tf.image.resize(noise, (image_size, image_size), "bicubic").numpy()
    return np.clip(images + 128, 0, 255).astype(np.uint8), labels.astype(np.int64)


def _load_synthetic(cfg: DataConfig, seed: int, cache_dir: str) -> Dataset:
    del cache_dir
    s = cfg.synthetic
    splits = {}
    for offset, (key, n) in enumerate((("train", s.train_examples), ("validation", s.validation_examples),
                                       ("test", s.test_examples))):
        if n:
            images, labels = synthetic_images(n, s.num_classes, cfg.image_size, seed + offset)
            splits[key] = Split(key, n, images=images, labels=labels, paths=[f"synthetic/{key}/{i}" for i in range(n)])
    names = [f"class_{k}" for k in range(s.num_classes)]
    return _finish(cfg, names, splits, [], sum(sp.num_examples for sp in splits.values()))


# ----------------------------------------------------------------------------- assembly


_LOADERS = {"folder": _load_folder, "tfrecord": _load_tfrecord, "tfds": _load_tfds, "synthetic": _load_synthetic}


def _want_cache(cfg: DataConfig, total: int) -> bool:
    if cfg.cache == "none":
        return False
    fits = fits_in_memory(total, cfg.image_size, cfg.cache_budget_mb)
    if cfg.cache == "memory" and not fits:
        log.warning("data.cache=memory: %d images exceed data.cache_budget_mb=%d; caching anyway",
                    total, cfg.cache_budget_mb)
    log.info("decoded-image cache: %s (%d images, %.0f MB, budget %d MB)",
             "on" if (fits or cfg.cache == "memory") else "off", total,
             total * cfg.image_size ** 2 * 3 / 2**20, cfg.cache_budget_mb)
    return fits or cfg.cache == "memory"


def _report_bad(bad: list[str], total: int) -> None:
    if bad:
        shown = ", ".join(bad[:_BAD_FILES_LOGGED]) + (" ..." if len(bad) > _BAD_FILES_LOGGED else "")
        log.warning("skipped %d of %d files that could not be decoded: %s", len(bad), total, shown)


def _finish(cfg: DataConfig, class_names: list[str], splits: dict[str, Split], bad: list[str], total: int) -> Dataset:
    _report_bad(bad, total)
    check_bad_share(len(bad), total, cfg.max_bad_fraction)
    if "train" not in splits or splits["train"].num_examples == 0:
        raise DataError("the training split has no usable images. Fix: check data.train and its files.")
    if len(class_names) < 2:
        raise DataError(f"found {len(class_names)} class(es) {class_names}: classification needs at least 2.")
    for s in splits.values():
        log.info("split %s: %d examples%s", s.name, s.num_examples, " (in memory)" if s.images is not None else "")
    return Dataset(class_names, splits["train"], splits.get("validation"), splits.get("test"), bad, total)


def load_dataset(cfg: DataConfig, *, seed: int, cache_dir: str, chief: bool = True) -> Dataset:
    """Reads the configured source; runs on every worker (same seed -> same data and order everywhere).
    `chief`: whether this worker prepares a TFDS dataset in a shared data_dir (a lone process is its own chief)."""
    if cfg.source == "tfds":
        prepare_tfds(cfg, chief=chief)
    return _LOADERS[cfg.source](cfg, seed, cache_dir)


# ----------------------------------------------------------------------------- pipelines


def _rotation_matrices(angles: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """The projective transforms RandomRotation uses (rotation about the image centre)."""
    h = tf.cast(height, tf.float32) - 1
    w = tf.cast(width, tf.float32) - 1
    cos, sin = tf.cos(angles), tf.sin(angles)
    x_offset = (w - (cos * w - sin * h)) / 2.0
    y_offset = (h - (sin * w + cos * h)) / 2.0
    zeros = tf.zeros_like(angles)
    return tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zeros, zeros], axis=1)


def augment_batch(images: tf.Tensor, aug: AugmentConfig) -> tf.Tensor:
    """RandomFlip + RandomRotation(factor) on a float batch, as the tutorial's Keras layers compute them.

    Done in the input pipeline by default: it then runs in parallel with the training step (in-model rotation
    costs about as much as the frozen network on CPU) and the exported model carries no training-only layers.
    With augment.placement: model the training model calls it (model.Augmentation), on the accelerator.
    Stateless per-op randomness means no variables to place under a strategy.
    """
    batch = tf.shape(images)[0]
    flip_h = flip_v = None
    if aug.flip in ("horizontal", "horizontal_and_vertical"):
        flip_h = tf.random.uniform([batch]) < 0.5
    if aug.flip in ("vertical", "horizontal_and_vertical"):
        flip_v = tf.random.uniform([batch]) < 0.5
    angles = None
    if aug.rotation > 0:
        limit = aug.rotation * 2 * math.pi
        angles = tf.random.uniform([batch], -limit, limit)
    return _flip_and_rotate(images, flip_h, flip_v, angles)


def _flip_and_rotate(images: tf.Tensor, flip_h: tf.Tensor | None, flip_v: tf.Tensor | None,
                     angles: tf.Tensor | None) -> tf.Tensor:
    """Flips the images where flip_h / flip_v are true, then rotates them by `angles` (radians).

    With a rotation, the flips are folded into its projective transform (a flip maps pixel x to
    width - 1 - x, which the transform can do as it samples): each image is resampled once, with no
    separate flip pass (what that saved: bench/README.md, "What each change bought"). The result
    equals flipping first and rotating after, up to float rounding of the sampling positions (tested).
    """
    if angles is None:
        for flip, axis in ((flip_h, 2), (flip_v, 1)):
            if flip is not None:
                images = tf.where(tf.reshape(flip, [-1, 1, 1, 1]), tf.reverse(images, axis=[axis]), images)
        return images
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    transforms = _rotation_matrices(angles, height, width)
    # A transform row maps an output pixel to the input position it samples: [a0 a1 a2 b0 b1 b2 0 0] gives
    # x = a0*u + a1*v + a2, y = b0*u + b1*v + b2. Sampling the flipped image at x is sampling the image at
    # width - 1 - x: negate the x row and shift it by width - 1 (likewise y for a vertical flip).
    for flip, row, size in ((flip_h, slice(0, 3), width), (flip_v, slice(3, 6), height)):
        if flip is not None:
            sign = tf.where(flip, -1.0, 1.0)[:, None]
            shift = tf.where(flip, tf.cast(size, tf.float32) - 1, 0.0)
            part = transforms[:, row] * sign + tf.stack([tf.zeros_like(shift)] * 2 + [shift], axis=1)
            transforms = tf.concat([transforms[:, :row.start], part, transforms[:, row.stop:]], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.stack([height, width]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def _rows(arrays: tuple[np.ndarray, ...]) -> Callable[[tf.Tensor], tuple[tf.Tensor, ...]]:
    """A tf.data map function: a batch of indices -> those rows of each in-memory array, gathered by numpy.

    The arrays stay the one copy of the data: a tf.constant (or from_tensor_slices) of them copies them into
    TensorFlow's memory, and the conversion holds yet another copy while it runs (peak memory: bench/README.md).
    Each call copies one batch.
    """
    dtypes = [tf.as_dtype(a.dtype) for a in arrays]

    def take(idx: np.ndarray) -> list[np.ndarray]:
        return [a[idx] for a in arrays]

    def gather(idx: tf.Tensor) -> tuple[tf.Tensor, ...]:
        out = tf.numpy_function(take, [idx], dtypes, stateful=False)
        for tensor, array in zip(out, arrays):
            tensor.set_shape([None, *array.shape[1:]])
        return tuple(out)

    return gather


def _batches_in_order(split: Split, batch: int, drop_remainder: bool) -> tf.data.Dataset:
    """(uint8 images, labels) batches of the split in its stored order."""
    if split.images is not None:
        indices = tf.data.Dataset.range(split.num_examples).batch(batch, drop_remainder=drop_remainder)
        return indices.map(_rows((split.images, split.labels)), num_parallel_calls=parallel_calls())
    assert split.stream is not None  # a Split is built with exactly one of the two; not user input
    return split.stream.batch(batch, drop_remainder=drop_remainder)


def shard_policy(split: Split, num_workers: int) -> "tf.data.experimental.AutoShardPolicy":
    """FILE when every worker gets whole files, DATA otherwise (in-memory data is always DATA)."""
    policy = tf.data.experimental.AutoShardPolicy
    if num_workers <= 1:
        return policy.OFF
    if split.images is None and split.num_files >= num_workers:
        return policy.FILE
    return policy.DATA


def _with_options(ds: tf.data.Dataset, policy: "tf.data.experimental.AutoShardPolicy") -> tf.data.Dataset:
    options = _no_autotuner()
    options.experimental_distribute.auto_shard_policy = policy
    options.deterministic = False
    return ds.with_options(options)


def train_pipeline(split: Split, *, global_batch: int, aug: AugmentConfig, shuffle_buffer: int, seed: int,
                   num_workers: int, repeat: bool) -> tf.data.Dataset:
    """Shuffle (seeded, reshuffled each epoch) -> batch (global) -> augment (parallel) -> prefetch."""
    ds = _shuffled_batches(split, batch=global_batch, aug=aug, shuffle_buffer=shuffle_buffer, seed=seed,
                           # Equal batch counts on every worker: one batch fewer would hang the all-reduce.
                           drop_remainder=num_workers > 1 or repeat, repeat=repeat)
    return _with_options(ds, shard_policy(split, num_workers))


def distributed_train_input(strategy: tf.distribute.Strategy, split: Split, *, global_batch: int,
                            aug: AugmentConfig, shuffle_buffer: int, seed: int,
                            num_workers: int) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """The endless training stream, in the form `fit` takes under `strategy`.

    In memory with several workers: each worker builds its own pipeline over its share of the images
    (worker_train_pipeline). Handed to Keras whole, such data is sharded by DATA: every worker would
    shuffle, batch and augment the global batch and then drop the other workers' part, on the worker's own
    cores (what that cost: bench/README.md, "What each change bought"). Everything else
    (one worker; streams from TFDS, TFRecord or uncached folders: shard_policy) goes to Keras as is.
    """
    if split.images is None or num_workers <= 1:
        return train_pipeline(split, global_batch=global_batch, aug=aug, shuffle_buffer=shuffle_buffer,
                              seed=seed, num_workers=num_workers, repeat=True)
    return strategy.distribute_datasets_from_function(
        lambda context: worker_train_pipeline(split, context, global_batch=global_batch, aug=aug,
                                              shuffle_buffer=shuffle_buffer, seed=seed))


def worker_train_pipeline(split: Split, context: tf.distribute.InputContext, *, global_batch: int,
                          aug: AugmentConfig, shuffle_buffer: int, seed: int) -> tf.data.Dataset:
    """One worker's endless stream of per-replica batches over every n-th in-memory image.

    Runs on every worker (context.input_pipeline_id is the worker). The shares are disjoint and
    together hold every image; each is shuffled on its own, so a global batch draws equally from them.
    """
    assert split.images is not None  # distributed_train_input sends only in-memory splits here
    ds = _shuffled_batches(split, batch=context.get_per_replica_batch_size(global_batch), aug=aug,
                           shuffle_buffer=shuffle_buffer, seed=seed, drop_remainder=True, repeat=True,
                           share=(context.num_input_pipelines, context.input_pipeline_id))
    # This is the worker's own data already: nothing for tf.data to shard again.
    return _with_options(ds, tf.data.experimental.AutoShardPolicy.OFF)


def _shuffled_batches(split: Split, *, batch: int, aug: AugmentConfig, shuffle_buffer: int, seed: int,
                      drop_remainder: bool, repeat: bool, share: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
    """Shuffled (reshuffled every epoch), batched, augmented batches of `split`, or of its share (n, i):
    every n-th image from the i-th on (in-memory splits only)."""
    def augmented(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(x, tf.float32)
        # augment.placement model: the training model augments (model.Augmentation); here only batch and cast.
        return (augment_batch(x, aug) if aug.placement == "pipeline" else x), y

    if split.images is not None:
        # In memory, a whole permutation of the indices each epoch costs 8 bytes an image; a bounded
        # buffer over the images in stored order (an image folder is class by class) gave the recipe
        # batches of mostly cats at the start of every epoch and mostly dogs at its end (validation
        # accuracy after phase 1: 0.950 instead of 0.955-0.959). One gather per batch copies each image once.
        ds = _permuted_indices(split.num_examples, seed, share)
        rows = _rows((split.images, split.labels))

        def load(idx: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return augmented(*rows(idx))
    else:
        # A stream arrives mixed (an uncached folder's files in a seeded random order, `tljob convert`'s
        # records in one, TFDS's examples shuffled when it prepared them); the buffer reshuffles each epoch.
        ds = split.stream.shuffle(min(shuffle_buffer, max(split.num_examples, 1)), seed=seed,
                                  reshuffle_each_iteration=True)
        load = augmented
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch, drop_remainder=drop_remainder).map(load, num_parallel_calls=parallel_calls())
    return ds.prefetch(AUTOTUNE)


def _permuted_indices(num_examples: int, seed: int, share: tuple[int, int] = (1, 0)) -> tf.data.Dataset:
    """Indices of every n-th example from the i-th on (share (n, i)), in a new seeded order each epoch."""
    count, index = share
    ds = tf.data.Dataset.range(num_examples).shard(count, index)
    return ds.shuffle(max(len(range(index, num_examples, count)), 1), seed=seed, reshuffle_each_iteration=True)


def feature_train_input(strategy: tf.distribute.Strategy, features: list[np.ndarray], labels: np.ndarray, *,
                        global_batch: int, seed: int,
                        num_workers: int) -> tf.data.Dataset | tf.distribute.DistributedDataset:
    """The endless training stream of cached features (train.<phase>.cache_features), in the form `fit` takes.

    `features` (one array per tensor the model's changing part reads) and `labels` are this worker's share of
    the training set already (share_batches): permuted whole each epoch, full batches, no augmentation (the
    config refuses it with cached features). Several workers: each reads its own share at the per-replica batch,
    as worker_train_pipeline does with images.
    """
    load = _feature_rows(features, labels)

    def batches(batch: int) -> tf.data.Dataset:
        ds = _permuted_indices(len(labels), seed).repeat().batch(batch, drop_remainder=True)
        ds = ds.map(load, num_parallel_calls=parallel_calls()).prefetch(AUTOTUNE)
        return _with_options(ds, tf.data.experimental.AutoShardPolicy.OFF)

    if num_workers <= 1:
        return batches(global_batch)
    return strategy.distribute_datasets_from_function(
        lambda context: batches(context.get_per_replica_batch_size(global_batch)))


def feature_eval_pipeline(features: list[np.ndarray], labels: np.ndarray, *, global_batch: int,
                          num_workers: int) -> tf.data.Dataset:
    """Validation batches of cached features, for fit's validation_data in a cache_features phase; sharded by
    DATA between the workers, like eval_pipeline's."""
    ds = tf.data.Dataset.range(len(labels)).batch(global_batch, drop_remainder=num_workers > 1)
    ds = ds.map(_feature_rows(features, labels), num_parallel_calls=parallel_calls())
    policy = tf.data.experimental.AutoShardPolicy
    return _with_options(ds.prefetch(AUTOTUNE), policy.DATA if num_workers > 1 else policy.OFF)


def _feature_rows(features: list[np.ndarray], labels: np.ndarray) -> Callable[[tf.Tensor], tuple]:
    """Indices -> (features, labels): the features a tuple when the changing part reads several tensors."""
    rows = _rows((*features, labels))

    def load(idx: tf.Tensor) -> tuple:
        *x, y = rows(idx)
        return (tuple(x) if len(x) > 1 else x[0]), y

    return load


def share_batches(split: Split, batch_size: int, share: tuple[int, int]) -> tf.data.Dataset:
    """(float32 images, labels) of every n-th example from the i-th on (share (n, i)), in stored order, on this
    worker alone: a worker's part of the training set for the feature pass of train.<phase>.cache_features."""
    count, index = share
    if split.images is not None:
        part = dataclasses.replace(split, num_examples=len(range(index, split.num_examples, count)),
                                   images=split.images[index::count], labels=split.labels[index::count])
        return ordered_batches(part, batch_size)
    assert split.stream is not None  # a Split is built with exactly one of the two; not user input
    return ordered_batches(dataclasses.replace(split, stream=split.stream.shard(count, index)), batch_size)


def ordered_batches(split: Split, batch_size: int) -> tf.data.Dataset:
    """(float32 images, labels) batches of the whole split in its stored order, on this worker alone: the
    evaluation report pairs each prediction with the example's name (Split.paths) by position."""
    ds = _batches_in_order(split, batch_size, drop_remainder=False)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=parallel_calls())
    # Unlike the training pipelines (_with_options), order kept: parallel maps stay deterministic.
    return ds.prefetch(AUTOTUNE).with_options(_no_autotuner())


def eval_pipeline(split: Split, *, global_batch: int, num_workers: int) -> tf.data.Dataset:
    ds = _batches_in_order(split, global_batch, drop_remainder=num_workers > 1)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=parallel_calls())
    return _with_options(ds.prefetch(AUTOTUNE), shard_policy(split, num_workers))


def steps_per_epoch(num_examples: int, global_batch: int, drop_remainder: bool) -> int:
    return num_examples // global_batch if drop_remainder else math.ceil(num_examples / global_batch)


def decoded_file_batches(paths: list[str], image_size: int, batch_size: int) -> tf.data.Dataset:
    """For predict: batches of (indices into `paths`, uint8 images) of the local files that decode, in order.

    A file that is missing or does not decode is left out of its batch (the decode pass's ignore_errors):
    the gap in the indices tells the caller which one, so its error can still be reported in input order.
    """
    return _scan_pipeline(_read_encoded(paths), image_size, chunk=batch_size)
