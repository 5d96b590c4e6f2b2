"""The Keras callbacks of a training phase, built by `make_callbacks`: progress, backups, fault handling, and
the terminal's progress bar.

Runs on every worker (all must run the same collectives in the same order). The callbacks measure and signal;
the trainer writes the run's files (`on_record`, `on_backup_saved`). The SIGTERM path: faults.GracefulTermination
notices it -> FaultCallback asks faults.StopCheck at a batch end (with several workers an all-reduce, so all
stop at the same step) -> RunBackup.backup_now -> RetryableError, exit 75.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from typing import Any, Callable

import tensorflow as tf

from tljob import fastval, faults
from tljob.errors import RetryableError
from tljob.policy import eta_seconds, trim_history

log = logging.getLogger(__name__)


def make_callbacks(*, phase: str, steps: int, global_batch: int, tags: dict[str, Any], history: list[dict],
                   on_record: Callable[[dict], None], backup_dir: str, backup_every_steps: int | None,
                   on_backup_saved: Callable[[], None], watchdog: faults.Watchdog, stop: faults.StopCheck,
                   cached_validation: fastval.CachedValidation | None, tensorboard_dir: str | None,
                   sync_logs: Callable[[], object] | None, log_sync_s: float, progress_bar: bool = False,
                   total_epochs: int = 0) -> list[tf.keras.callbacks.Callback]:
    """One phase's callbacks in the order they must run. `tags`: the fields every history record carries;
    tensorboard_dir and sync_logs are None except on the chief (sync_logs: for a remote output only);
    progress_bar: Progress's bar (of `total_epochs` in the run), for the chief in a terminal only."""
    backup = RunBackup(backup_dir, backup_every_steps, on_backup_saved, watchdog)
    callbacks: list[tf.keras.callbacks.Callback] = [
        # First: the epoch's val_* metrics must be in `logs` before Progress and TensorBoard read them.
        *([cached_validation] if cached_validation else []),
        # History before backup at each epoch end: a crash between the two re-runs an epoch that
        # history already has (trimmed on resume), never leaves a backed-up epoch out of history.
        Progress(phase=phase, steps=steps, global_batch=global_batch, total_epochs=total_epochs, tags=tags,
                 history=history, on_record=on_record, cached_validation=cached_validation, bar=progress_bar),
        backup,
        FaultCallback(watchdog, stop, backup.backup_now),
    ]
    if tensorboard_dir is not None:
        callbacks.append(tf.keras.callbacks.TensorBoard(tensorboard_dir, update_freq="epoch"))
    if sync_logs is not None:
        callbacks.append(FileSync(sync_logs, log_sync_s))
    return callbacks


class RunBackup(tf.keras.callbacks.BackupAndRestore):
    """BackupAndRestore that saves every `every_steps` steps, at each epoch end and on demand (SIGTERM), and
    hands every saved backup to `on_saved` (the chief uploads it).

    The parent restores in on_train_begin and deletes the backup when fit ends; the saves are made here. Keras
    resumes mid-epoch only when `save_freq` is an int, so the parent always gets one. A backup records the last
    finished step: the parent records the first step of the running execution, which with steps_per_execution
    N > 1 would redo N - 1 steps on resume. Private tf-keras members (tf-keras is pinned): `_training_state`,
    which the parent's on_train_begin sets, and its `_ckpt_saved_batch`. Each save is a watchdog stage.
    """

    _NEVER = 2**62

    def __init__(self, backup_dir: str, every_steps: int | None, on_saved: Callable[[], None],
                 watchdog: faults.Watchdog):
        super().__init__(backup_dir, save_freq=every_steps or self._NEVER, delete_checkpoint=True)
        self._on_saved, self._watchdog = on_saved, watchdog
        self._epoch = self._calls = 0  # _calls: batch-end calls (one per execution) since the last step backup

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """The step is recorded when it has finished (on_train_batch_end), not when it starts."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # `batch` is the last step the execution ran: a restore continues with the one after it.
        self._training_state._ckpt_saved_batch.assign(batch)
        self._calls += 1
        if self._calls >= self.save_freq:
            self._calls = 0
            self.backup_now()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_begin(epoch, logs)  # records the epoch in the training state
        self._epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.backup_now()  # the recorded step is the epoch's last: a restore starts the next epoch

    def backup_now(self) -> None:
        """Saves at the last finished step; a restore continues with the next."""
        with self._watchdog.working("backup", collectives=True):
            self._training_state.back_up(epoch=self._epoch)
            self._on_saved()


class FaultCallback(tf.keras.callbacks.Callback):
    """Feeds the watchdog from fit's batch ends and turns a termination request into a backup + exit 75.

    While fit trains, the watchdog's stage is "training": every batch end (train and validation) and epoch
    boundary beats, and `peer_timeout_s` without a beat means a dead or frozen peer. The first training step
    and the first validation step trace and compile their step function, which contains collectives: each is
    a stage of its own with the bounded allowance.
    """

    def __init__(self, watchdog: faults.Watchdog, stop: faults.StopCheck, on_terminate: Callable[[], None]):
        super().__init__()
        self.watchdog, self.stop, self.on_terminate = watchdog, stop, on_terminate
        self._training: int | None = None
        self._tracing: int | None = None
        self._traced: set[str] = set()

    def _enter_tracing(self, what: str) -> None:
        if what not in self._traced:
            self._traced.add(what)
            self._tracing = self.watchdog.enter(f"first {what} step (tracing)", self.watchdog.allowance_s)

    def _leave_tracing(self) -> None:
        if self._tracing is not None:
            self.watchdog.leave(self._tracing)
            self._tracing = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._training = self.watchdog.enter("training", self.watchdog.timeout_s)
        self._enter_tracing("training")

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._training is not None:
            self.watchdog.leave(self._training)
            self._training = self._tracing = None

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._enter_tracing("validation")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.watchdog.beat()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.watchdog.beat()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._leave_tracing()
        self.watchdog.beat()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._leave_tracing()
        self.watchdog.beat()
        if self.stop.should_stop():
            log.warning("termination requested (SIGTERM here or on a peer) at batch %d: saving a backup", batch)
            self.on_terminate()
            raise RetryableError(
                f"stopped at batch {batch} after SIGTERM (here or on a peer); the backup is saved and a "
                "restarted job resumes from it"
            )


class Progress(tf.keras.callbacks.Callback):
    """One history record per epoch, appended to `history` (first trimmed of the epochs this attempt redoes)
    and handed to `on_record`. With `bar` (the chief in a terminal), a tqdm bar per epoch on stderr: steps,
    images/s, loss and the run's ETA, cleared before the epoch's record, whose log line is what stays. Log
    lines go above it (console's handler in a terminal)."""

    def __init__(self, *, phase: str, steps: int, global_batch: int, total_epochs: int, tags: dict[str, Any],
                 history: list[dict], on_record: Callable[[dict], None],
                 cached_validation: fastval.CachedValidation | None, bar: bool):
        super().__init__()
        self.phase, self.steps, self.global_batch, self.total_epochs = phase, steps, global_batch, total_epochs
        self.tags, self.history, self.on_record, self.cached_validation = tags, history, on_record, cached_validation
        self._tqdm: Any = None
        if bar:
            from tqdm import tqdm  # only where a bar is shown (a terminal)

            self._tqdm = tqdm
        self._bar: Any = None
        self._epoch_start = self._train_seconds = 0.0
        self._first = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._first:
            # The first epoch of this attempt: anything recorded for it or later is being redone.
            self._first = False
            self.history[:] = trim_history(self.history, epoch)
        self._epoch_start = time.perf_counter()
        self._train_seconds = 0.0
        if self._tqdm is not None:
            self._bar = self._tqdm(total=self.steps, desc=f"{self.phase} epoch {epoch + 1}/{self.total_epochs}",
                                   file=sys.stderr, leave=False, dynamic_ncols=True,
                                   bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps{postfix}")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._bar is None:
            return
        done = batch + 1  # with steps_per_execution N, `batch` is the last of the N steps just run
        rate = done / (time.perf_counter() - self._epoch_start)  # steps per second in this epoch so far
        # The rest of this epoch, then the epochs after it (total - 1: this one has no record yet) as the status
        # counts them, at this epoch's rate while no epoch has a record.
        eta = (self.steps - done) / rate + eta_seconds(self.history, self.total_epochs - 1, self.steps / rate)
        loss = (logs or {}).get("loss")
        self._bar.set_postfix_str(
            f"{rate * self.global_batch:.0f} img/s" + (f", loss {float(loss):.4f}" if loss is not None else "")
            + f", run ETA {dt.timedelta(seconds=round(eta))}", refresh=False)
        self._bar.update(done - self._bar.n)

    def on_test_begin(self, logs: dict | None = None) -> None:
        # Validation runs inside the epoch; images per second counts training steps only.
        self._train_seconds = time.perf_counter() - self._epoch_start

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # Validation has run by now (fit's, or cached validation's callback, which comes first).
        seconds = time.perf_counter() - self._epoch_start
        self._close_bar()
        # fit's own validation is timed from on_test_begin; cached validation reports its own duration.
        train_seconds = self._train_seconds or seconds - (
            self.cached_validation.last_seconds if self.cached_validation else 0.0)
        record = {"epoch": epoch + 1, "phase": self.phase, **{k: float(v) for k, v in (logs or {}).items()},
                  # The rate of the epoch's last step: train.<phase>.schedule's course shows in the history.
                  "learning_rate": float(tf.keras.backend.get_value(self.model.optimizer.learning_rate)),
                  "seconds": round(seconds, 3),
                  "images_per_second": round(self.steps * self.global_batch / train_seconds, 1), **self.tags}
        self.history.append(record)
        self.on_record(record)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close_bar()  # fit stopped mid-epoch (SIGTERM): leave the terminal clean

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class FileSync(tf.keras.callbacks.Callback):
    """Chief only: uploads TensorBoard logs at most every `every_s` seconds (gs:// outputs)."""

    def __init__(self, push: Callable[[], object], every_s: float):
        super().__init__()
        self.push, self.every_s = push, every_s
        self._last = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.push()
            self._last = time.monotonic()
