"""How the fast config was tuned: phase 1 on features computed once, phase 2 under a schedule, one seed a run.

    python -m bench.tune_fast --seed 1 --e2 4 --lr2 1e-4 [--e1 20 --lr1 1e-3 --warmup 0.5 --schedule cosine]

Needs TLJOB_CATS_DOGS_DIR and TLJOB_WEIGHTS. A lighter stand-in for `tljob train --config
job/cats_vs_dogs_fast.yaml` made of tljob's own parts (data.load_dataset, model.build_model, the training and
evaluation pipelines, learning_rate_schedule), without the run directory, backups or cached validation, so
that a grid of settings over several seeds fits in an afternoon on 2 cores. It prints one result event with
the validation accuracy and loss after every phase-2 epoch. The chosen settings were then run with tljob
itself on other seeds (`python -m bench.run --first-seed 11`): bench/README.md, "The fast config".
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import tljob  # noqa: F401 - selects tf-keras before TensorFlow loads
import numpy as np
import tensorflow as tf

from bench import events
from tljob import data, model as model_lib
from tljob.config import FineTuneConfig, load_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--e1", type=int, default=20, help="phase-1 epochs, on cached features")
    parser.add_argument("--lr1", type=float, default=1e-3)
    parser.add_argument("--e2", type=int, default=4, help="phase-2 epochs, augmented images")
    parser.add_argument("--lr2", type=float, default=1e-4, help="phase 2's peak rate")
    parser.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    parser.add_argument("--warmup", type=float, default=0.5, help="phase-2 warm-up epochs")
    args = parser.parse_args()
    folder, weights = os.environ["TLJOB_CATS_DOGS_DIR"], os.environ["TLJOB_WEIGHTS"]
    started = time.perf_counter()
    cfg = load_config(None, ["data.source=folder", f"data.train={folder}/train",
                             f"data.validation={folder}/validation", "data.test=null", f"model.weights={weights}"],
                      environ={})
    cache = tempfile.mkdtemp(prefix="tune-fast-")
    ds = data.load_dataset(cfg.data, seed=args.seed, cache_dir=cache)
    tf.keras.utils.set_random_seed(args.seed)
    model = model_lib.build_model(cfg.model, image_size=cfg.data.image_size, num_classes=2, cache_dir=cache)
    # Phase 1: the head on the pooled features of the un-augmented images, computed once.
    pooled = tf.keras.Model(model.input, model.get_layer("pool").output)
    train_x, val_x = (pooled.predict(s.images.astype(np.float32), batch_size=64, verbose=0)
                      for s in (ds.train, ds.validation))
    features = tf.keras.Input(train_x.shape[1:])
    head = tf.keras.Model(features, model.get_layer("classifier")(model.get_layer("dropout")(features)))
    head.compile(tf.keras.optimizers.Adam(args.lr1), "binary_crossentropy", metrics=["accuracy"])
    phase1 = head.fit(train_x, ds.train.labels, batch_size=32, epochs=args.e1, verbose=0,
                      validation_data=(val_x, ds.validation.labels))
    # Phase 2: the tutorial's fine-tuning from layer 100 with augmentation, the schedule tljob builds.
    model_lib.unfreeze_from(model, 100)
    steps = data.steps_per_epoch(ds.train.num_examples, 32, drop_remainder=False)
    phase = FineTuneConfig(epochs=args.e2, learning_rate=args.lr2, schedule=args.schedule, warmup_epochs=args.warmup)
    model_lib.compile_for_phase(model, phase, model_lib.learning_rate_schedule(phase, args.lr2, steps), 2)
    train = data.train_pipeline(ds.train, global_batch=32, aug=cfg.augment, shuffle_buffer=1000, seed=args.seed,
                                num_workers=1, repeat=True)
    val = data.eval_pipeline(ds.validation, global_batch=32, num_workers=1)
    phase2 = model.fit(train, epochs=args.e2, steps_per_epoch=steps, validation_data=val, verbose=0)
    events.emit("result", result={
        **vars(args), "phase1_val_accuracy": phase1.history["val_accuracy"][-1],
        "val_accuracy": phase2.history["val_accuracy"], "val_loss": phase2.history["val_loss"],
        "seconds": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
