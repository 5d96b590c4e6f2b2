"""Step time of the recipe's model under a Keras precision policy: `python -m bench.precision [policy ...]`.

Each policy runs in its own process (the policy is global to a process): MobileNetV2 at 160 px with random
weights, batch 32, random images in memory, the tutorial's head (the classifier kept in float32, as mixed
precision needs); the median ms per step of frozen-base training, of fine-tuning from layer 100, and of
inference. Default policies: float32 and mixed_bfloat16. Under float32 this is the floor that bench.run compares
tljob's steps with (`--child float32 --image-size N --alpha A`, one result event).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench import events, procs

BATCH, STEPS = 32, 12


def measure(policy: str, size: int = 160, alpha: float = 1.0) -> dict[str, float]:
    import tljob  # noqa: F401 - selects tf-keras before TensorFlow loads
    import numpy as np
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy(policy)
    base = tf.keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=None, alpha=alpha)
    base.trainable = False
    inputs = tf.keras.Input((size, size, 3))
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    x = tf.keras.layers.Dropout(0.2)(x)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (BATCH * STEPS, size, size, 3)).astype("float32")
    labels = rng.integers(0, 2, BATCH * STEPS).astype("float32")

    def per_step(run) -> float:
        run(images[:2 * BATCH])  # traces and warms up outside the timing
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run(images)
            times.append((time.perf_counter() - start) / STEPS * 1000)
        return round(statistics.median(times), 1)

    out = {}
    model.compile(tf.keras.optimizers.Adam(1e-4), "binary_crossentropy")
    out["frozen_train_ms"] = per_step(lambda x: model.fit(x, labels[:len(x)], batch_size=BATCH, verbose=0))
    out["predict_ms"] = per_step(lambda x: model.predict(x, batch_size=BATCH, verbose=0))
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(tf.keras.optimizers.RMSprop(1e-5), "binary_crossentropy")
    out["fine_tune_train_ms"] = per_step(lambda x: model.fit(x, labels[:len(x)], batch_size=BATCH, verbose=0))
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("policy")
        parser.add_argument("--image-size", type=int, default=160)
        parser.add_argument("--alpha", type=float, default=1.0)
        args = parser.parse_args(argv[1:])
        events.emit("result", result=measure(args.policy, args.image_size, args.alpha))
        return 0
    for policy in argv or ["float32", "mixed_bfloat16"]:
        child = subprocess.run([sys.executable, "-m", "bench.precision", "--child", policy], check=True,
                               capture_output=True, text=True)
        print(policy, json.dumps(procs.first(events.parse(child.stdout), "result")["result"]))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
