"""Runs the real `tljob` command with measuring points added, for the benchmark only.

    python -m bench.tljob_probe train --config ... --output ...     (the same arguments as `tljob`)

What it adds, without changing what tljob computes: an event callback last in every fit (phase, first
step, per-step and per-epoch times, the metrics fit logged), the duration of every backup tljob takes,
and, when BENCH_ALLREDUCE_REPEATS is set (multi-worker runs), the time of one all-reduce of the phase's
gradients (zeros shaped like the trainable variables, through the same replica-context all_reduce the
optimizer uses) after each phase, on every worker at the same point so the collectives pair up.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import tljob  # noqa: F401 - selects tf-keras before TensorFlow loads
import numpy as np
import tensorflow as tf

from bench import events
from tljob import callbacks, cli, train

_phase: dict[str, str] = {"name": "?"}


def _allreduce_ms(model: tf.keras.Model, repeats: int) -> float:
    strategy = model.distribute_strategy
    shapes = [v.shape for v in model.trainable_variables]

    @tf.function
    def step() -> list[tf.Tensor]:
        grads = [tf.zeros(s) for s in shapes]
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)

    strategy.run(step)  # trace and warm the collective
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for tensor in tf.nest.flatten(strategy.experimental_local_results(strategy.run(step))):
            tensor.numpy()  # waits for the collective
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _install() -> None:
    fit = tf.keras.Model.fit
    fit_phase = train.Trainer._fit_phase
    backup = callbacks.RunBackup.backup_now

    def probed_fit(self: tf.keras.Model, *args: Any, callbacks: list | None = None, **kwargs: Any) -> Any:
        callbacks = [*(callbacks or []), events.make_callback(tf.keras.callbacks.Callback, _phase["name"])]
        return fit(self, *args, callbacks=callbacks, **kwargs)

    def probed_fit_phase(self: train.Trainer, model: tf.keras.Model, phase: str, *args: Any, **kwargs: Any) -> Any:
        _phase["name"] = phase
        result = fit_phase(self, model, phase, *args, **kwargs)
        repeats = int(os.environ.get("BENCH_ALLREDUCE_REPEATS", "0"))
        if repeats:
            events.emit("allreduce", phase=phase, ms=_allreduce_ms(model, repeats),
                        parameters=int(sum(int(np.prod(v.shape)) for v in model.trainable_variables)))
        return result

    def probed_backup(self: callbacks.RunBackup) -> None:
        start = time.perf_counter()
        backup(self)
        events.emit("backup", phase=_phase["name"], seconds=time.perf_counter() - start)

    tf.keras.Model.fit = probed_fit
    train.Trainer._fit_phase = probed_fit_phase
    callbacks.RunBackup.backup_now = probed_backup


def main() -> int:
    _install()
    code = cli.main(sys.argv[1:])
    events.emit("done", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
