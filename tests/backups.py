"""Reading what a run's backup holds, from the checkpoint itself (not from logs or history)."""

from __future__ import annotations

from pathlib import Path


def backed_up_epoch(backup_dir: Path) -> int | None:
    """The 1-based epoch whose end the latest backup under `backup_dir` holds; None while there is none.

    tf-keras' BackupAndRestore keeps the chief's checkpoints in `<backup_dir>/chief` and records the last
    finished (0-based) epoch in the variable `ckpt_saved_epoch`.
    """
    import tljob  # noqa: F401  (tf-keras before TensorFlow)
    import tensorflow as tf

    ckpt = tf.train.latest_checkpoint(str(backup_dir / "chief"))
    if ckpt is None:
        return None
    try:
        reader = tf.train.load_checkpoint(ckpt)
    except (tf.errors.NotFoundError, tf.errors.DataLossError):
        return None  # the writer is replacing it right now (polling a live run)
    key = next(k for k in reader.get_variable_to_shape_map() if k.startswith("ckpt_saved_epoch"))
    return int(reader.get_tensor(key)) + 1
