"""The TensorFlow transfer-learning tutorial's own code, as the baseline tljob is measured against.

https://www.tensorflow.org/tutorials/images/transfer_learning: the same calls with the same settings,
run as its own process with default Keras (Keras 3; the benchmark starts it with TF_USE_LEGACY_KERAS=0):
`image_dataset_from_directory` (shuffle, batch 32, 160x160), `.prefetch(AUTOTUNE)`, RandomFlip('horizontal')
+ RandomRotation(0.2) inside the model, `mobilenet_v2.preprocess_input`, MobileNetV2(include_top=False)
called with training=False, GlobalAveragePooling2D, Dropout(0.2), Dense(1, sigmoid); the initial
evaluate; 10 epochs Adam(1e-4), then layers from 100 on trainable and 10 epochs RMSprop(1e-5), validating
every epoch; all with fit's defaults (verbose progress output included).

Deviations, each needed to measure rather than to change the work:
- weights: the path in TLJOB_WEIGHTS (`--weights`) instead of weights="imagenet", as there is no internet;
  it is the same ImageNet file Keras would download.
- validation: the whole validation folder (800 images, what tljob validates on) instead of the
  tutorial's take/skip split of it into validation and test (which, on a dataset that reshuffles each
  epoch, changes the validation images every epoch): both jobs are then scored on the same images.
  The final test-set evaluate and the plots are left out (not training).
- timing events (bench/events.py) from one callback added after fit's own.
- for the benchmark's quick mode only: `--weights none`, `--alpha`, `--image-size` and the epoch counts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Runnable as a script (`python bench/tutorial_baseline.py`): make `bench` importable without tljob.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import events  # noqa: E402 - after the path set-up above


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with train/ and validation/ (cats_and_dogs_filtered)")
    parser.add_argument("--weights", required=True, help="MobileNetV2 no-top .h5 file, or 'none' (quick mode)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--initial-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    args = parser.parse_args()
    if os.environ.get("TF_USE_LEGACY_KERAS", "0") not in ("", "0", "false", "False"):
        raise SystemExit("TF_USE_LEGACY_KERAS is set: the tutorial's code runs on default Keras (Keras 3). "
                         "Fix: unset it for this process.")
    events.emit("start")

    import tensorflow as tf

    train_dir = os.path.join(args.data, "train")
    validation_dir = os.path.join(args.data, "validation")
    BATCH_SIZE = 32
    IMG_SIZE = (args.image_size, args.image_size)
    train_dataset = tf.keras.utils.image_dataset_from_directory(train_dir, shuffle=True, batch_size=BATCH_SIZE,
                                                                image_size=IMG_SIZE)
    validation_dataset = tf.keras.utils.image_dataset_from_directory(validation_dir, shuffle=True,
                                                                     batch_size=BATCH_SIZE, image_size=IMG_SIZE)
    AUTOTUNE = tf.data.AUTOTUNE
    train_dataset = train_dataset.prefetch(buffer_size=AUTOTUNE)
    validation_dataset = validation_dataset.prefetch(buffer_size=AUTOTUNE)

    data_augmentation = tf.keras.Sequential([
        tf.keras.layers.RandomFlip("horizontal"),
        tf.keras.layers.RandomRotation(0.2),
    ])
    preprocess_input = tf.keras.applications.mobilenet_v2.preprocess_input
    IMG_SHAPE = IMG_SIZE + (3,)
    weights = None if args.weights == "none" else args.weights
    base_model = tf.keras.applications.MobileNetV2(input_shape=IMG_SHAPE, include_top=False, weights=weights,
                                                   alpha=args.alpha)
    image_batch, label_batch = next(iter(train_dataset))
    feature_batch = base_model(image_batch)
    base_model.trainable = False
    global_average_layer = tf.keras.layers.GlobalAveragePooling2D()
    feature_batch_average = global_average_layer(feature_batch)
    prediction_layer = tf.keras.layers.Dense(1, activation="sigmoid")
    prediction_layer(feature_batch_average)

    inputs = tf.keras.Input(shape=IMG_SHAPE)
    x = data_augmentation(inputs)
    x = preprocess_input(x)
    x = base_model(x, training=False)
    x = global_average_layer(x)
    x = tf.keras.layers.Dropout(0.2)(x)
    outputs = prediction_layer(x)
    model = tf.keras.Model(inputs, outputs)

    base_learning_rate = 0.0001
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=base_learning_rate),
                  loss=tf.keras.losses.BinaryCrossentropy(),
                  metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.5, name="accuracy")])
    events.emit("initial_evaluate_begin")
    model.evaluate(validation_dataset)
    initial_epochs = args.initial_epochs
    history = model.fit(train_dataset, epochs=initial_epochs, validation_data=validation_dataset,
                        callbacks=[events.make_callback(tf.keras.callbacks.Callback, "feature_extraction")])

    base_model.trainable = True
    fine_tune_at = 100
    for layer in base_model.layers[:fine_tune_at]:
        layer.trainable = False
    model.compile(loss=tf.keras.losses.BinaryCrossentropy(),
                  optimizer=tf.keras.optimizers.RMSprop(learning_rate=base_learning_rate / 10),
                  metrics=[tf.keras.metrics.BinaryAccuracy(threshold=0.5, name="accuracy")])
    total_epochs = initial_epochs + args.fine_tune_epochs
    model.fit(train_dataset, epochs=total_epochs, initial_epoch=len(history.epoch),
              validation_data=validation_dataset,
              callbacks=[events.make_callback(tf.keras.callbacks.Callback, "fine_tuning")])
    events.emit("done", code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
