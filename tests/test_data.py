"""Data sources and pipelines on images the tests make (real JPEGs, real TFRecords, TFDS mock data)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tljob  # noqa: F401  (selects tf-keras before TensorFlow loads)
import tensorflow as tf

from tljob import cpus, data, storage
from tljob.config import AugmentConfig, DataConfig
from tljob.errors import ConfigError, DataError

from imagegen import make_image_folder


def folder_cfg(root: Path, **kw) -> DataConfig:
    base = DataConfig(source="folder", train=str(root), validation=None, test=None, image_size=32, batch_size=4)
    return dataclasses.replace(base, **kw)


def test_folder_skips_and_names_bad_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"cat": 6, "dog": 6}, size=40)
    truncated = root / "cat" / "truncated.jpg"
    truncated.write_bytes((root / "cat" / "cat_0.jpg").read_bytes()[:200])
    not_image = root / "dog" / "notes.jpg"
    not_image.write_text("this is not an image")
    empty = root / "dog" / "empty.png"
    empty.write_bytes(b"")
    ds = data.load_dataset(folder_cfg(root, max_bad_fraction=0.5), seed=1, cache_dir=str(tmp_path / "c"))
    assert ds.class_names == ["cat", "dog"]
    assert sorted(Path(p).name for p in ds.bad_files) == ["empty.png", "notes.jpg", "truncated.jpg"]
    assert ds.total_files == 15
    assert ds.train.num_examples == 12
    assert ds.train.images is not None and ds.train.images.shape == (12, 32, 32, 3)
    assert sorted(np.bincount(ds.train.labels).tolist()) == [6, 6]


def test_no_file_is_passed_over_for_its_extension(tmp_path: Path) -> None:
    # Nothing is filtered by name: what decodes trains (WebP too), the rest joins the bad-file report and limit.
    root = make_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, size=32)
    Image.open(root / "cat" / "cat_0.jpg").save(root / "cat" / "photo.webp", "WEBP")
    (root / "dog" / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (root / "dog" / "scan.tiff").write_bytes(b"II*\x00" + bytes(64))
    (root / "dog" / "labels.csv").write_text("file,label\n")
    (root / "dog" / ".DS_Store").write_bytes(b"\x00")
    ds = data.load_dataset(folder_cfg(root, max_bad_fraction=0.5), seed=1, cache_dir=str(tmp_path / "c"))
    assert sorted(Path(p).name for p in ds.bad_files) == ["labels.csv", "photo.heic", "scan.tiff"]
    assert ds.total_files == 10 and ds.train.num_examples == 7
    with pytest.raises(DataError, match="3 of 10 files"):
        data.load_dataset(folder_cfg(root, max_bad_fraction=0.2), seed=1, cache_dir=str(tmp_path / "c"))


def test_folder_streamed_when_cache_off(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 5, "b": 3}, size=36)
    (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = data.load_dataset(folder_cfg(root, cache="none", max_bad_fraction=0.5), seed=1, cache_dir=str(tmp_path))
    assert ds.train.images is None and len(ds.bad_files) == 1
    batches = list(data.eval_pipeline(ds.train, global_batch=4, num_workers=1))
    assert sum(int(x.shape[0]) for x, _ in batches) == 8
    assert batches[0][0].dtype == tf.float32 and batches[0][0].shape[1:] == (32, 32, 3)


def test_streamed_folder_mixes_the_classes(tmp_path: Path) -> None:
    # Listed class by class, a stream would reach the shuffle buffer as one run of each class.
    root = make_image_folder(tmp_path / "imgs", {"a": 12, "b": 12}, size=32)
    orders = []
    for _ in range(2):
        ds = data.load_dataset(folder_cfg(root, cache="none"), seed=3, cache_dir=str(tmp_path))
        orders.append([int(v) for _, y in data.eval_pipeline(ds.train, global_batch=24, num_workers=1) for v in y])
    assert orders[0] == orders[1], "every worker must list the files in the same order"
    assert sorted(orders[0]) == [0] * 12 + [1] * 12
    assert 3 <= sum(orders[0][:12]) <= 9, orders[0]


def test_too_many_bad_files_is_a_data_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 2, "b": 2}, size=32)
    for i in range(3):
        (root / "a" / f"bad{i}.jpg").write_text("nope")
    with pytest.raises(DataError, match="max_bad_fraction"):
        data.load_dataset(folder_cfg(root, max_bad_fraction=0.1), seed=1, cache_dir=str(tmp_path))


def test_class_folder_without_usable_images_is_a_data_error(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"cat": 4, "dog": 0, "fox": 0}, size=32)
    (root / "fox" / "broken.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"data\.train: class folders without a usable image: .*/imgs/dog \(no files\); "
                                        r".*/imgs/fox \(1 files, none decodes\)"):
        data.load_dataset(folder_cfg(root, max_bad_fraction=0.5), seed=1, cache_dir=str(tmp_path))
    val = make_image_folder(tmp_path / "val", {"cat": 1, "dog": 0, "fox": 1}, size=32)
    (root / "dog" / "dog.jpg").write_bytes((val / "cat" / "cat_0.jpg").read_bytes())
    (root / "fox" / "fox.jpg").write_bytes((val / "cat" / "cat_0.jpg").read_bytes())
    with pytest.raises(DataError, match=r"data\.validation: .*/val/dog \(no files\)\."):
        data.load_dataset(folder_cfg(root, validation=str(val), max_bad_fraction=0.5), seed=1, cache_dir=str(tmp_path))
    (root / "dog" / "dog.jpg").unlink()
    with pytest.raises(DataError, match=r"--input: .*/imgs/dog \(no files\)"):
        data.convert_folder(str(root), str(tmp_path / "rec"), shards=1)


def test_fraction_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 10, "b": 10}, size=32)
    cfg = folder_cfg(root, validation_fraction=0.2, test_fraction=0.1)
    one = data.load_dataset(cfg, seed=3, cache_dir=str(tmp_path))
    two = data.load_dataset(cfg, seed=3, cache_dir=str(tmp_path))
    assert (one.train.num_examples, one.validation.num_examples, one.test.num_examples) == (14, 4, 2)
    np.testing.assert_array_equal(one.validation.images, two.validation.images)
    train_a, val_a, test_a = data.split_fractions(list(range(20)), 0.2, 0.1, seed=3)
    assert not set(train_a) & set(val_a) and not set(val_a) & set(test_a) and len(train_a) == 14


def test_separate_split_folders_must_share_classes(tmp_path: Path) -> None:
    train = make_image_folder(tmp_path / "train", {"a": 2, "b": 2}, size=32)
    val = make_image_folder(tmp_path / "val", {"a": 2, "c": 2}, size=32)
    with pytest.raises(DataError, match="classes"):
        data.load_dataset(folder_cfg(train, validation=str(val)), seed=1, cache_dir=str(tmp_path))


def test_folder_without_classes_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="class sub-folders"):
        data.load_dataset(folder_cfg(tmp_path / "flat"), seed=1, cache_dir=str(tmp_path))



def test_folder_that_is_a_file_is_a_config_error(tmp_path: Path, gcs_bucket: str) -> None:
    # Config checks local folders at load; a gs:// one is known only once staged (NotADirectoryError, exit 1).
    storage.write_bytes(gcs_bucket + "/data/train.zip", b"PK")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        data.load_dataset(folder_cfg(gcs_bucket + "/data/train.zip"), seed=1, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="/no/such/folder' does not exist"):
        data.list_image_folder("/no/such/folder")  # tljob evaluate --data is not checked by config.py


def test_convert_then_read_tfrecords(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"x": 5, "y": 4, "z": 3}, size=48)
    (root / "y" / "broken.jpg").write_bytes(b"junk")
    report = data.convert_folder(str(root), str(tmp_path / "rec"), shards=3, image_size=40)
    assert report["num_examples"] == 12 and report["class_names"] == ["x", "y", "z"]
    assert [Path(p).name for p in report["bad_files"]] == ["broken.jpg"]
    shards = sorted((tmp_path / "rec").glob("*.tfrecord"))
    assert len(shards) == 3
    meta = json.loads((tmp_path / "rec" / "meta.json").read_text())
    assert meta["shards"] == 3
    for cache in ("auto", "none"):
        cfg = DataConfig(source="tfrecord", train=str(tmp_path / "rec"), validation=None, test=None,
                         image_size=32, batch_size=4, cache=cache, max_bad_fraction=0.1)
        ds = data.load_dataset(cfg, seed=0, cache_dir=str(tmp_path))
        assert ds.num_classes == 3 and ds.train.num_examples == 12
        assert [Path(p).name for p in ds.bad_files] == ["broken.jpg"] and ds.total_files == 13
        labels = np.concatenate([y.numpy() for _, y in data.eval_pipeline(ds.train, global_batch=5, num_workers=1)])
        assert sorted(np.bincount(labels).tolist()) == [3, 4, 5]
        assert data.shard_policy(ds.train, 2) == (
            tf.data.experimental.AutoShardPolicy.DATA if cache == "auto" else tf.data.experimental.AutoShardPolicy.FILE)
    assert data.shard_policy(ds.train, 4) == tf.data.experimental.AutoShardPolicy.DATA  # 3 files < 4 workers
    # Written in a mixed order: class by class, each shard would hold one run per class.
    per_shard = [[tf.train.Example.FromString(r.numpy()).features.feature["image/class/label"].int64_list.value[0]
                  for r in tf.data.TFRecordDataset(str(f))] for f in shards]
    assert any(labels != sorted(labels) for labels in per_shard), per_shard


def test_tfrecord_globs_local_and_gs(tmp_path: Path, gcs_bucket: str) -> None:
    root = make_image_folder(tmp_path / "imgs", {"x": 4, "y": 4}, size=36)
    data.convert_folder(str(root), str(tmp_path / "rec"), shards=4)
    (tmp_path / "rec" / "notes.txt").write_text("not a shard")
    storage.upload_tree(str(tmp_path / "rec"), gcs_bucket + "/rec")
    cache = str(tmp_path / "cache")
    for train in (str(tmp_path / "rec" / "*.tfrecord"), gcs_bucket + "/rec/*.tfrecord"):
        cfg = DataConfig(source="tfrecord", train=train, validation=None, test=None, image_size=32, batch_size=4)
        ds = data.load_dataset(cfg, seed=0, cache_dir=cache)
        assert ds.class_names == ["x", "y"] and ds.train.num_examples == 8, train
    # Half the shards (records are dealt round robin): counted, not meta.json's count of the whole folder.
    part = DataConfig(source="tfrecord", train=gcs_bucket + "/rec/data-0000[01]-*.tfrecord", validation=None,
                      test=None, image_size=32, batch_size=4, cache="none")
    ds = data.load_dataset(part, seed=0, cache_dir=cache)
    assert ds.train.num_examples == 4 and ds.train.num_files == 2
    assert sum(int(x.shape[0]) for x, _ in data.eval_pipeline(ds.train, global_batch=3, num_workers=1)) == 4
    nothing = dataclasses.replace(part, train=gcs_bucket + "/rec/train-*.tfrecord")
    with pytest.raises(ConfigError, match=r"data\.train: no TFRecord files at .*/rec/train-\*\.tfrecord"):
        data.load_dataset(nothing, seed=0, cache_dir=cache)


def test_cached_tfrecords_that_do_not_decode_join_the_bad_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"x": 3, "y": 3}, size=32)
    data.convert_folder(str(root), str(tmp_path / "rec"), shards=1)
    shard = next((tmp_path / "rec").glob("*.tfrecord"))
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
    junk = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not an image"])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"junk.jpg"])),
    })).SerializeToString()
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in [*records[:2], junk, *records[2:]]:
            writer.write(record)
    meta = json.loads((tmp_path / "rec" / "meta.json").read_text())
    (tmp_path / "rec" / "meta.json").write_text(json.dumps({**meta, "num_examples": 7}))
    cfg = DataConfig(source="tfrecord", train=str(tmp_path / "rec"), validation=None, test=None, image_size=32,
                     batch_size=2, max_bad_fraction=0.2)
    ds = data.load_dataset(cfg, seed=0, cache_dir=str(tmp_path))
    assert ds.bad_files == ["data.train record 2 (junk.jpg)"] and ds.train.num_examples == 6
    with pytest.raises(DataError, match="1 of 7 files"):
        data.load_dataset(dataclasses.replace(cfg, max_bad_fraction=0.1), seed=0, cache_dir=str(tmp_path))


def test_tfds_source_with_mock_data(tmp_path: Path) -> None:
    import tensorflow_datasets as tfds

    cfg = DataConfig(source="tfds", name="cats_vs_dogs", train="train[:80%]", validation="train[80%:]", test=None,
                     image_size=32, batch_size=4)
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load_dataset(cfg, seed=0, cache_dir=str(tmp_path))
    assert ds.class_names == ["cat", "dog"]
    # mock_data yields num_examples for every split string (it does not slice).
    assert ds.train.num_examples == 20 and ds.validation.num_examples == 20
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.train.images.dtype == np.uint8


def test_synthetic_classes_differ_in_grain() -> None:
    images, labels = data.synthetic_images(200, 3, 16, seed=0)
    assert set(labels) == {0, 1, 2}
    # Neighbouring pixels differ most in class 0 (pixel-fine noise), least in the last (coarse blobs).
    roughness = [np.abs(np.diff(images[labels == k].astype(float), axis=2)).mean() for k in range(3)]
    assert roughness[0] > 1.5 * roughness[1] > 1.5 * 1.5 * roughness[2] > 0, roughness
    again, _ = data.synthetic_images(200, 3, 16, seed=0)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, data.synthetic_images(200, 3, 16, seed=1)[0])


def test_train_pipeline_batches_augments_and_reshuffles() -> None:
    images, labels = data.synthetic_images(40, 2, 32, seed=0)
    split = data.Split("train", 40, images=images, labels=labels)
    ds = data.train_pipeline(split, global_batch=8, aug=AugmentConfig(), shuffle_buffer=40, seed=1,
                             num_workers=1, repeat=False)
    epoch1 = [y.numpy() for _, y in ds]
    epoch2 = [y.numpy() for _, y in ds]
    assert len(epoch1) == 5 and all(len(b) == 8 for b in epoch1)
    assert not all((a == b).all() for a, b in zip(epoch1, epoch2)), "shuffle must differ between epochs"
    x, _ = next(iter(ds))
    assert x.dtype == tf.float32 and float(tf.reduce_max(x)) <= 255.0


def test_in_memory_training_data_is_permuted_whole_every_epoch() -> None:
    # Stored class by class (as an image folder is read) with a buffer a quarter of the data: a bounded
    # shuffle buffer would give mostly class 0 in the first half of each epoch and class 1 in the second.
    images = np.zeros((200, 8, 8, 3), np.uint8)
    split = data.Split("train", 200, images=images, labels=np.repeat([0, 1], 100))
    ds = data.train_pipeline(split, global_batch=20, aug=AugmentConfig(flip="none", rotation=0.0),
                             shuffle_buffer=50, seed=1, num_workers=1, repeat=False)
    for _ in range(2):
        labels = np.concatenate([y.numpy() for _, y in ds])
        assert sorted(labels.tolist()) == [0] * 100 + [1] * 100
        assert 0.35 < labels[:100].mean() < 0.65, labels


def test_each_worker_trains_on_its_own_share() -> None:
    # Labels number the images, so the batches show which images each worker's pipeline reads.
    images, _ = data.synthetic_images(40, 2, 32, seed=0)
    split = data.Split("train", 40, images=images, labels=np.arange(40))
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker,
                                             num_replicas_in_sync=2)
        ds = data.worker_train_pipeline(split, context, global_batch=8, aug=AugmentConfig(), shuffle_buffer=100,
                                        seed=1)
        # The job lets batches finish out of order (faster); in order, passes can be told apart here.
        options = tf.data.Options()
        options.deterministic = True
        batches = list(ds.with_options(options).take(10))  # two passes over the worker's 20 images
        assert all(x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 for x, _ in batches)
        labels = [int(v) for _, y in batches for v in y.numpy()]
        assert sorted(labels[:20]) == sorted(labels[20:]) == list(range(worker, 40, 2))
        assert labels[:20] != list(range(worker, 40, 2)), "the share must be shuffled"
        seen.append(labels[:20])
    assert not set(seen[0]) & set(seen[1])


def test_cached_features_stream_is_permuted_whole_each_epoch_without_augmentation() -> None:
    # Two boundary tensors (as MobileNetV2's residual branches can give) whose rows number the examples.
    features = [np.arange(30, dtype=np.float32).reshape(30, 1) * [1, 1], np.arange(30, dtype=np.float32)[:, None]]
    labels = np.arange(30)
    ds = data.feature_train_input(tf.distribute.get_strategy(), features, labels, global_batch=10, seed=3, num_workers=1)
    assert ds.cardinality() == tf.data.INFINITE_CARDINALITY
    assert ds.options().autotune.enabled is False
    options = tf.data.Options()
    options.deterministic = True
    epochs = [[], []]
    for i, ((a, b), y) in enumerate(ds.with_options(options).take(6)):
        assert a.shape == (10, 2) and b.shape == (10, 1)
        # Each row travels with its label, unchanged (no augmentation of features).
        assert np.array_equal(a.numpy()[:, 0], y.numpy()) and np.array_equal(b.numpy()[:, 0], y.numpy())
        epochs[i // 3].extend(y.numpy().tolist())
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(30))


def test_a_workers_share_is_read_in_order_for_the_feature_pass() -> None:
    images, _ = data.synthetic_images(10, 2, 8, seed=0)
    cached = data.Split("train", 10, images=images, labels=np.arange(10))
    streamed = data.Split("train", 10, stream=tf.data.Dataset.from_tensor_slices((images, np.arange(10))))
    for split in (cached, streamed):
        batches = list(data.share_batches(split, 2, (3, 1)))
        assert [y.numpy().tolist() for _, y in batches] == [[1, 4], [7]]
        assert batches[0][0].dtype == tf.float32
        assert np.array_equal(batches[0][0].numpy()[1], images[4].astype(np.float32))


def test_one_worker_and_streams_are_left_to_keras_to_distribute() -> None:
    images, labels = data.synthetic_images(16, 2, 32, seed=0)
    kwargs = dict(global_batch=8, aug=AugmentConfig(), shuffle_buffer=16, seed=1)
    strategy = tf.distribute.get_strategy()
    in_memory = data.Split("train", 16, images=images, labels=labels)
    streamed = data.Split("train", 16, stream=tf.data.Dataset.from_tensor_slices((images, labels)), num_files=4)
    policy = tf.data.experimental.AutoShardPolicy
    for split, workers, sharding in ((in_memory, 1, policy.OFF), (streamed, 2, policy.FILE)):
        ds = data.distributed_train_input(strategy, split, num_workers=workers, **kwargs)
        assert isinstance(ds, tf.data.Dataset) and ds.cardinality() == tf.data.INFINITE_CARDINALITY
        assert ds.options().experimental_distribute.auto_shard_policy == sharding
        assert ds.options().autotune.enabled is False  # the autotuner's thread stalled iterator deletion


def test_eval_and_decode_pipelines_run_without_the_autotuner() -> None:
    images, labels = data.synthetic_images(8, 2, 32, seed=0)
    split = data.Split("v", 8, images=images, labels=labels)
    assert data.eval_pipeline(split, global_batch=4, num_workers=1).options().autotune.enabled is False
    encoded = tf.data.Dataset.from_tensor_slices((np.arange(2), [tf.io.encode_png(images[0]), b"not an image"]))
    scan = data._scan_pipeline(encoded, 16)
    assert scan.options().autotune.enabled is False
    [(idx, decoded)] = list(scan.as_numpy_iterator())
    assert idx.tolist() == [0] and decoded.shape == (1, 16, 16, 3)


def test_augment_rotation_and_flip() -> None:
    img = np.zeros((1, 8, 8, 1), np.float32)
    img[0, :, :4] = 1.0  # left half bright
    flipped = data.augment_batch(tf.constant(np.repeat(img, 64, axis=0)), AugmentConfig(flip="horizontal", rotation=0.0))
    left = flipped[:, :, :4].numpy().mean(axis=(1, 2, 3))
    assert 10 < int((left == 0).sum()) < 54, "about half of the batch must be flipped"
    same = data.augment_batch(tf.constant(img), AugmentConfig(flip="none", rotation=0.0))
    np.testing.assert_array_equal(same.numpy(), img)
    rotated = data.augment_batch(tf.constant(np.repeat(img, 16, axis=0)), AugmentConfig(flip="none", rotation=0.25))
    assert not np.allclose(rotated.numpy(), img)


def test_flips_folded_into_the_rotation_equal_flipping_then_rotating() -> None:
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (6, 24, 16, 3)).astype(np.float32))  # not square: x vs y matter
    flip_h = tf.constant([True, False, True, False, True, True])
    flip_v = tf.constant([False, False, True, True, True, False])
    angles = tf.constant([0.3, -1.1, 0.0, 2.5, -0.7, 1.2])
    expected = tf.where(tf.reshape(flip_h, [-1, 1, 1, 1]), tf.reverse(images, axis=[2]), images)
    expected = tf.where(tf.reshape(flip_v, [-1, 1, 1, 1]), tf.reverse(expected, axis=[1]), expected)
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=expected, transforms=data._rotation_matrices(angles, 24, 16), output_shape=[24, 16],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    fused = data._flip_and_rotate(images, flip_h, flip_v, angles)
    np.testing.assert_allclose(fused.numpy(), expected.numpy(), atol=0.01)
    only_h = data._flip_and_rotate(images, flip_h, None, tf.zeros([6]))
    np.testing.assert_allclose(only_h.numpy(), tf.where(tf.reshape(flip_h, [-1, 1, 1, 1]),
                                                         tf.reverse(images, axis=[2]), images).numpy(), atol=0.01)


def test_multiworker_batches_drop_remainder() -> None:
    images, labels = data.synthetic_images(21, 2, 32, seed=0)
    split = data.Split("v", 21, images=images, labels=labels)
    sizes = [int(x.shape[0]) for x, _ in data.eval_pipeline(split, global_batch=4, num_workers=2)]
    assert sizes == [4] * 5
    assert data.steps_per_epoch(21, 4, drop_remainder=True) == 5
    assert data.steps_per_epoch(21, 4, drop_remainder=False) == 6


def test_fits_in_memory() -> None:
    assert data.fits_in_memory(1000, 160, 100)
    assert not data.fits_in_memory(10_000, 160, 100)


def test_decode_pass_logs_its_progress(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # On thousands of files the decode pass is the longest stage before training: it says how far it got.
    monkeypatch.setattr(data, "_SCAN_LOG_S", 0.0)
    png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    encoded = tf.data.Dataset.from_tensor_slices((np.arange(300, dtype=np.int64), [png] * 299 + [b"not an image"]))
    with caplog.at_level(logging.INFO, logger="tljob.data"):
        good, images = data._scan(encoded, 300, 8, keep_images=True)
    assert len(good) == 299 and images.shape == (299, 8, 8, 3)
    assert "decode pass: 256 of 300 files decoded after" in caplog.text
    assert "decode pass: 299 of 300 files decoded after" in caplog.text


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_test_split_names_each_image_in_order(tmp_path: Path, cache: str) -> None:
    """The evaluation report pairs predictions with Split.paths by position: ordered_batches must keep the order."""
    root = make_image_folder(tmp_path / "imgs", {"a": 7, "b": 6}, size=32)
    (root / "b" / "bad.jpg").write_bytes(b"not an image")
    cfg = folder_cfg(root, cache=cache, test_fraction=0.5, max_bad_fraction=0.5)
    ds = data.load_dataset(cfg, seed=2, cache_dir=str(tmp_path / "c"))
    test = ds.test
    assert test is not None and len(test.paths) == test.num_examples
    assert str(root / "b" / "bad.jpg") not in test.paths
    batches = list(data.ordered_batches(test, 3))
    pixels = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    for path, image, label in zip(test.paths, pixels, labels):
        assert ds.class_names[label] == Path(path).parent.name
        assert np.array_equal(image, data.decode_and_resize(Path(path).read_bytes(), 32).numpy())
    synthetic = data.load_dataset(DataConfig(source="synthetic", image_size=32), seed=0, cache_dir="")
    assert synthetic.test.paths[:2] == ["synthetic/test/0", "synthetic/test/1"]


def test_decoded_file_batches_leave_gaps_for_bad_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", {"a": 4}, size=40)
    files = sorted(str(p) for p in (root / "a").iterdir())
    (tmp_path / "bad.png").write_bytes(b"\x89PNG nope")
    paths = [files[0], str(tmp_path / "bad.png"), str(tmp_path / "missing.jpg"), *files[1:]]
    batches = list(data.decoded_file_batches(paths, 24, batch_size=2).as_numpy_iterator())
    assert [idx.tolist() for idx, _ in batches] == [[0, 3], [4, 5]]
    assert batches[0][1].shape == (2, 24, 24, 3) and batches[0][1].dtype == np.uint8


def test_placement_model_leaves_the_batches_unaugmented() -> None:
    # Labels number the images, so each batch can be compared with the images it holds.
    images, _ = data.synthetic_images(16, 2, 32, seed=0)
    split = data.Split("train", 16, images=images, labels=np.arange(16))
    for placement, untouched in (("model", True), ("pipeline", False)):
        ds = data.train_pipeline(split, global_batch=8, aug=AugmentConfig(placement=placement), shuffle_buffer=16,
                                 seed=1, num_workers=1, repeat=False)
        for x, y in ds:
            assert x.dtype == tf.float32
            assert np.array_equal(x.numpy(), images[y.numpy()].astype(np.float32)) is untouched, placement


def parallel_calls_of(ds: tf.data.Dataset) -> list[int]:
    """num_parallel_calls (or reads) of every parallel stage: the last input of each Parallel* dataset node."""
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef.FromString(ds._as_serialized_graph().numpy())
    consts = {node.name: node for node in graph.node if node.op == "Const"}
    return [int(tf.make_ndarray(consts[node.input[-1].split(":")[0]].attr["value"].tensor))
            for node in graph.node if node.op.startswith("Parallel")]


@pytest.mark.parametrize("budget,calls", [(cpus.CpuBudget(cores=8, quota=1.0), 1),
                                          (cpus.CpuBudget(cores=8, quota=2.5), 3),
                                          (cpus.CpuBudget(cores=3, quota=None), 3)])
def test_every_pipeline_runs_one_call_per_usable_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     budget: cpus.CpuBudget, calls: int) -> None:
    # In a pod limited to 1 CPU on an 8-core node, AUTOTUNE would have started 8 calls per stage.
    monkeypatch.setattr(cpus, "budget", lambda: budget)
    images, labels = data.synthetic_images(8, 2, 16, seed=0)
    split = data.Split("t", 8, images=images, labels=labels)
    root = make_image_folder(tmp_path / "imgs", {"a": 2, "b": 2}, size=16)
    data.convert_folder(str(root), str(tmp_path / "records"), shards=2)
    streamed = data.load_dataset(DataConfig(source="tfrecord", train=str(tmp_path / "records"), validation=None,
                                            test=None, image_size=16, cache="none"), seed=0, cache_dir="")
    pipelines = {
        "train": data.train_pipeline(split, global_batch=4, aug=AugmentConfig(), shuffle_buffer=8, seed=1,
                                     num_workers=1, repeat=True),
        "eval": data.eval_pipeline(split, global_batch=4, num_workers=1),
        "ordered": data.ordered_batches(split, 4),
        "decode pass": data.decoded_file_batches([str(p) for p in (root / "a").iterdir()], 16, batch_size=2),
        "tfrecord stream": data.train_pipeline(streamed.train, global_batch=2, aug=AugmentConfig(), shuffle_buffer=4,
                                               seed=1, num_workers=1, repeat=True),
    }
    for name, ds in pipelines.items():
        found = parallel_calls_of(ds)
        assert found and set(found) == {calls}, (name, found)
