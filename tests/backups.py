"""Reading what a run's backup holds, from the checkpoint itself (not from logs or history)."""

from __future__ import annotations

from pathlib import Path


def backed_up_epoch(backup_dir: Path) -> int | None:
    """The 1-based epoch whose end the latest backup under `backup_dir` holds; None while there is none."""
    saved = backed_up_step(backup_dir)
    return None if saved is None else saved[0] + 1


def backed_up_step(backup_dir: Path) -> tuple[int, int] | None:
    """(0-based epoch, 0-based step) the latest backup under `backup_dir` records; None while there is none.

    tf-keras' BackupAndRestore keeps the chief's checkpoints in `<backup_dir>/chief` and records the epoch
    in the variable `ckpt_saved_epoch` and the step in `ckpt_saved_batch` (tljob: the last finished step;
    the epoch's last step for an epoch-end backup).
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
    names = reader.get_variable_to_shape_map()
    epoch, batch = (next(k for k in names if k.startswith(f"ckpt_saved_{what}")) for what in ("epoch", "batch"))
    return int(reader.get_tensor(epoch)), int(reader.get_tensor(batch))
