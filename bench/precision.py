"""Step time of the recipe's model under a Keras precision policy: `python -m bench.precision [policy ...]`.

Each policy runs in its own process (the policy is global to a process): MobileNetV2 at 160 px with random
weights (or the weights file bench.run passes, as tljob's runs load), batch 32, random images in memory, the tutorial's head (the classifier kept in float32, as mixed
precision needs); the median ms per step of frozen-base training, of fine-tuning from layer 100, and of
inference (timed as tljob's steps are, between batch ends). Default policies: float32 and mixed_bfloat16.
Under float32 this is the floor that bench.run compares tljob's steps with (`--child float32 --image-size N
--alpha A [--weights FILE]`, one result event).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

from bench import events, procs

BATCH, STEPS = 32, 25


def measure(policy: str, size: int = 160, alpha: float = 1.0, weights: str | None = None) -> dict[str, float]:
    """Median ms per step, timed between batch ends as bench/events.py times tljob's steps, of one batch of
    random images repeated from memory: no input pipeline to wait for, no augmentation, no copies."""
    import tljob  # noqa: F401 - selects tf-keras before TensorFlow loads
    import numpy as np
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy(policy)
    base = tf.keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=weights,
                                             alpha=alpha)
    base.trainable = False
    inputs = tf.keras.Input((size, size, 3))
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    x = tf.keras.layers.Dropout(0.2)(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x))
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.uniform(0, 255, (BATCH, size, size, 3)).astype("float32")),
             tf.constant(rng.integers(0, 2, BATCH).astype("float32")))
    repeated = tf.data.Dataset.from_tensors(batch).repeat()

    def median_step_ms(run: Callable[[list], None]) -> float:
        ends: list[float] = []
        run([tf.keras.callbacks.LambdaCallback()])  # traces and warms up outside the timing
        run([tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_: ends.append(time.perf_counter()),
                                               on_predict_batch_end=lambda *_: ends.append(time.perf_counter()))])
        return round(statistics.median(b - a for a, b in zip(ends, ends[1:])) * 1000, 1)

    def fit(callbacks: list) -> None:
        model.fit(repeated, steps_per_epoch=STEPS, epochs=1, verbose=0, callbacks=callbacks)

    out = {}
    model.compile(tf.keras.optimizers.Adam(1e-4), "binary_crossentropy")
    out["frozen_train_ms"] = median_step_ms(fit)
    out["predict_ms"] = median_step_ms(
        lambda callbacks: model.predict(repeated.map(lambda x, y: x), steps=STEPS, verbose=0, callbacks=callbacks))
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(tf.keras.optimizers.RMSprop(1e-5), "binary_crossentropy")
    out["fine_tune_train_ms"] = median_step_ms(fit)
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("policy")
        parser.add_argument("--image-size", type=int, default=160)
        parser.add_argument("--alpha", type=float, default=1.0)
        parser.add_argument("--weights", default=None, help="a MobileNetV2 no-top .h5 file (default: random)")
        args = parser.parse_args(argv[1:])
        events.emit("result", result=measure(args.policy, args.image_size, args.alpha, args.weights))
        return 0
    for policy in argv or ["float32", "mixed_bfloat16"]:
        child = subprocess.run([sys.executable, "-m", "bench.precision", "--child", policy], check=True,
                               capture_output=True, text=True)
        print(policy, json.dumps(procs.first(events.parse(child.stdout), "result")["result"]))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
