"""Training policy as small pure functions: the global batch, learning-rate scaling and schedule steps, the
phases' epochs, the ETA, and which history records a resumed attempt redoes. No TensorFlow (tests/test_policy.py runs without it).
The values come validated from tljob.config.
"""

from __future__ import annotations

import math

from tljob.config import JobConfig
from tljob.errors import ConfigError


def check_global_batch(num_examples: int, batch_size: int, replicas: int) -> None:
    """ConfigError when the global batch is larger than the training set, before any training step.

    The endless training stream would fill each batch with repeats of the same images, and a batch's
    augmentation holds the whole batch as float images at once: far too large a batch ended in an
    out-of-memory traceback (exit 1) instead of this message. With it, every epoch has a full batch.
    """
    global_batch = batch_size * replicas
    if global_batch <= num_examples:
        return
    most = num_examples // replicas
    fix = (f"set data.batch_size to at most {most}, or add training data" if most
           else f"add training data: {replicas} replicas need at least {replicas} images")
    raise ConfigError(
        f"data.batch_size={batch_size}: the global batch ({batch_size} x {replicas} replicas = {global_batch}) is "
        f"larger than the {num_examples} training images. Fix: {fix}.")


def learning_rate(base_lr: float, rule: str, global_batch: int, reference_batch: int) -> float:
    """The rate for `global_batch`, given `base_lr` tuned at `reference_batch` (config.LR_RULES).

    none: the tutorial's rate as written; linear: scaled by global/reference (Goyal et al. 2017);
    sqrt: by its square root, gentler for adaptive optimizers such as Adam and RMSprop.
    """
    ratio = global_batch / reference_batch
    return base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def schedule_steps(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> tuple[int, int]:
    """(warm-up steps, steps after the warm-up) of a phase's learning-rate schedule (train.<phase>.schedule)."""
    total = epochs * steps_per_epoch
    warmup = min(round(warmup_epochs * steps_per_epoch), total)
    return warmup, total - warmup


def phase_epochs(cfg: JobConfig) -> dict[str, tuple[int, int]]:
    """(initial_epoch, end_epoch) per phase; fine-tuning continues the epoch count."""
    p1 = cfg.train.feature_extraction.epochs
    return {"feature_extraction": (0, p1), "fine_tuning": (p1, p1 + cfg.train.fine_tuning.epochs)}


def trim_history(history: list[dict], first_epoch: int) -> list[dict]:
    """Drops records of epochs that are about to run again (1-based `epoch` > 0-based `first_epoch`)."""
    return [h for h in history if h["epoch"] <= first_epoch]


def eta_seconds(history: list[dict], total_epochs: int, epoch_s: float = 0.0) -> float:
    """Seconds left after the newest record: the epochs still to run times the mean duration of the last three
    recorded ones (`epoch_s` while none is)."""
    timed = [h["seconds"] for h in history if "seconds" in h][-3:]
    left = max(total_epochs - (history[-1]["epoch"] if history else 0), 0)
    return (sum(timed) / len(timed) if timed else epoch_s) * left
