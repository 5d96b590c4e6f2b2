"""What a run is: the two phases, resume, and publishing the result (the callbacks: tljob.callbacks).

Runs on every worker. All workers execute the same program (the collectives need it); only the chief
writes the run's files (rundir.RunFiles: staged locally, mirrored to a gs:// `output`), the others what the
collectives force them to write, in scratch folders (cluster.worker_write_dir).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from tljob import callbacks, cluster, console, cpus, data, export, fastval, faults, policy, report, rundir, storage
from tljob import model as model_lib
from tljob.config import AugmentConfig, JobConfig, PhaseConfig, digest, to_dict
from tljob.errors import EXIT_OK, RetryableError
from tljob.rundir import RunLayout

log = logging.getLogger(__name__)

PHASES = ("feature_extraction", "fine_tuning")
# A phase with train.<phase>.augment: false trains on the images as they are.
NO_AUGMENTATION = AugmentConfig(flip="none", rotation=0.0)
# The file of a checkpoint folder that names its latest checkpoint (tf.train.CheckpointManager's): a backup
# uploads it after the files it names.
CHECKPOINT_INDEX = frozenset({"checkpoint"})


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Facts fixed for the whole run, computed once on every worker and passed down."""

    cfg: JobConfig
    spec: cluster.ClusterSpec
    replicas: int
    global_batch: int
    staging: Path  # local directory mirrored to cfg.output
    is_chief: bool
    layout: RunLayout  # where the model, backups and logs go in the run directory


# ----------------------------------------------------------------------------- paths


def staging_dir(output: str, staging_root: str | None, task_index: int) -> Path:
    """Local outputs are written in place; remote ones are staged on local disk (an emptyDir in Kubernetes)."""
    if not storage.is_remote(output):
        return Path(storage.local_path(output)).resolve()
    root = Path(staging_root or tempfile.gettempdir())
    # One stable directory per output URI and worker: a container restarted on the same node reuses
    # it, and workers sharing a disk (several on one machine) never write into each other's.
    name = "".join(ch if ch.isalnum() else "_" for ch in output.removeprefix("gs://"))
    return root / "tljob-staging" / name / f"worker-{task_index}"


def tfds_data_dir(output: str, data_dir: str | None) -> str | None:
    """data.data_dir, or for a gs:// run gs://BUCKET/tfds: one copy of each TFDS dataset that the chief prepares
    and every worker and restart of every run in the bucket reads (outside the run directory, which a restarted
    pod pulls whole). A local run keeps TFDS's own ~/tensorflow_datasets (None)."""
    if data_dir is not None or not storage.is_remote(output):
        return data_dir
    return "gs://" + output.removeprefix("gs://").split("/", 1)[0] + "/tfds"


def weights_digest(weights: list[np.ndarray]) -> str:
    digest_ = hashlib.sha256()
    for w in weights:
        digest_.update(np.ascontiguousarray(w).tobytes())
    return digest_.hexdigest()[:16]


# ----------------------------------------------------------------------------- entry


def run(cfg: JobConfig, layout: RunLayout) -> int:
    """Trains, resumes, or recognises as finished the run described by `cfg`; returns the exit code."""
    if cfg.output is None:
        raise ValueError("run() needs cfg.output; cli.py sets it")  # programming error, not user input
    spec = cluster.resolve_cluster(os.environ)
    storage.preflight(cfg.output)
    if rundir.is_finished(cfg.output):
        log.info("run %s is already finished (%s exists): not retraining", cfg.output, rundir.SUCCESS)
        return EXIT_OK
    rundir.check_resumed(cfg, cfg.output)
    cluster.apply_cluster_env(spec, os.environ)
    # Before the strategy: TensorFlow's thread pools are fixed once its runtime starts.
    tf_threads = cpus.limit_tensorflow_threads()
    # Created before anything else touches TensorFlow's runtime: it configures the runtime's collectives.
    strategy = cluster.create_strategy(spec, cfg.runtime.strategy, cfg.runtime.communication,
                                       cfg.runtime.collective_timeout_s)
    replicas = int(strategy.num_replicas_in_sync)
    ctx = RunContext(
        cfg=cfg,
        spec=spec,
        replicas=replicas,
        # Each replica takes data.batch_size examples per step; the step's gradient averages all of them.
        global_batch=cfg.data.batch_size * replicas,
        staging=staging_dir(cfg.output, cfg.runtime.staging_dir, spec.task_index),
        is_chief=spec.is_chief,
        layout=layout,
    )
    log.info("role=%s task_index=%d workers=%d replicas=%d chief=%s global_batch=%d staging=%s",
             spec.task_type, spec.task_index, spec.num_workers, replicas, ctx.is_chief, ctx.global_batch,
             ctx.staging)
    calls = data.parallel_calls()
    log.info("input pipeline: %d parallel call%s per stage (%s)%s; augmentation in the %s", calls,
             "" if calls == 1 else "s", cpus.budget().describe(),
             f"; TensorFlow's thread pools sized {tf_threads}" if tf_threads else "", cfg.augment.placement)
    # Before any model is built, on every worker.
    model_lib.set_precision(cfg.runtime.precision)
    try:
        return Trainer(ctx, strategy).run()
    except tf.errors.OpError as exc:
        # Any collective (training step, evaluation, a checkpoint's reads) can be where a peer's
        # death shows up; all of them mean the same thing: restart every worker from the backup.
        if faults.is_peer_failure(exc):
            raise RetryableError(
                f"the cluster broke ({type(exc).__name__}: {str(exc).splitlines()[0]}); restart all workers "
                f"with the same command to resume from the last backup") from exc
        raise


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """One attempt at a run, on one worker."""

    def __init__(self, ctx: RunContext, strategy: tf.distribute.Strategy):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.strategy = strategy
        self.files = rundir.RunFiles(ctx.staging, self.cfg.output or "")
        self.history: list[dict] = []
        self.attempt = 1
        self.started_at = rundir.now()
        self.ends = policy.phase_epochs(self.cfg)
        self.total_epochs = self.ends["fine_tuning"][1]
        self.watchdog = faults.Watchdog(self.cfg.runtime.peer_timeout_s)
        self.termination = faults.GracefulTermination(self.cfg.runtime.termination_grace_s)
        # Multi-worker: every worker must agree to stop at the same step (a lone backup would deadlock).
        self.agree = cluster.make_any_worker(strategy)

    # -- files

    def _path(self, *parts: str) -> Path:
        return self.ctx.staging.joinpath(*parts)

    def _push_backup(self) -> None:
        if self.ctx.is_chief:
            # tf.train.CheckpointManager's index last: a kill mid-upload leaves the bucket's previous backup whole.
            self._upload("backup", lambda: self.files.push(self.ctx.layout.backup, last=CHECKPOINT_INDEX))

    def _upload(self, what: str, push: Callable[[], object]) -> None:
        """Chief only: a transfer to the output. A local stage for the watchdog: storage retries end in
        exit 75 at their own deadline (TLJOB_STORAGE_DEADLINE_S), which may be longer than peer_timeout_s."""
        with self.watchdog.working(f"upload of {what}", collectives=False):
            push()

    # -- state

    def _restore_state(self) -> list[str]:
        """Brings the bucket's copy of an unfinished run to local disk; returns the finished phases."""
        self.ctx.staging.mkdir(parents=True, exist_ok=True)
        self.files.pull()
        self.history = self.files.history()
        state = self.files.state()
        self.attempt = state.attempts + 1
        done = list(state.completed_phases)
        if self.history or done:
            log.info("resuming: finished phases %s, %d epochs recorded, attempt %d", done or "none",
                     len(self.history), self.attempt)
        if self.ctx.is_chief:
            # Uploaded with params.yaml once training starts (Trainer.run), not with the next phase's end: an
            # attempt that dies in its first phase still counts.
            self.files.write_state(dataclasses.replace(state, attempts=self.attempt))
        return done

    def _mark_phase_done(self, phase: str, done: list[str]) -> None:
        done.append(phase)
        if self.ctx.is_chief:
            self.files.write_state(rundir.State(self.attempt, tuple(done)))
            self._upload("the run's state", self.files.push)

    def on_epoch_recorded(self, record: dict) -> None:
        metrics = {k: record[k] for k in rundir.METRIC_KEYS if k in record}
        eta = policy.eta_seconds(self.history, self.total_epochs)
        log.info("phase=%s epoch %d/%d %s %.1f img/s ETA %s", record["phase"], record["epoch"], self.total_epochs,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), record["images_per_second"],
                 dt.timedelta(seconds=round(eta)))
        if not self.ctx.is_chief:
            return
        self.files.write_history(self.history)
        self._write_status("running", eta)
        self._upload("history and status", lambda: self.files.push_files(rundir.HISTORY, rundir.STATUS))

    def _write_status(self, state: str, eta_s: float) -> None:
        self.files.write_status(rundir.Status.after(
            self.history, state=state, eta_s=eta_s, total_epochs=self.total_epochs, started_at=self.started_at,
            name=self.cfg.name, num_workers=self.ctx.spec.num_workers))

    # -- the run

    def run(self) -> int:
        self.termination.install()
        # Armed for the whole attempt: every stage below either beats or has its own limit (Watchdog.working).
        # Left armed when the attempt raises, so an exit that hangs on a broken collective is still bounded.
        self.watchdog.arm()
        with self.watchdog.working("restoring the run from its output", collectives=False):
            done = self._restore_state()
        cache_dir = self.cfg.data.cache_dir or str(self.ctx.staging.parent / "tljob-data-cache")
        data_cfg = self.cfg.data
        if data_cfg.source == "tfds":
            data_cfg = dataclasses.replace(data_cfg, data_dir=tfds_data_dir(self.cfg.output or "", data_cfg.data_dir))
        # No watchdog limit: the decode pass is local, and waiting for the chief's TFDS preparation is bounded
        # by data.TFDS_WAIT_S.
        with self.watchdog.working("loading data (decode pass)", collectives=False):
            ds = data.load_dataset(data_cfg, seed=self.cfg.seed, cache_dir=cache_dir, chief=self.ctx.is_chief)
        workers = self.ctx.spec.num_workers
        policy.check_global_batch(ds.train.num_examples, self.cfg.data.batch_size, self.ctx.replicas)
        steps = self.cfg.train.steps_per_epoch or data.steps_per_epoch(
            ds.train.num_examples, self.ctx.global_batch, drop_remainder=workers > 1)
        tf.keras.utils.set_random_seed(self.cfg.seed)
        with self.strategy.scope():
            # Variables of both phases are created in this scope: the model here, the optimizers in compile.
            # Creating a variable under MultiWorkerMirroredStrategy broadcasts its value: collectives.
            with self.watchdog.working("model build", collectives=True):
                model = model_lib.build_model(self.cfg.model, image_size=self.cfg.data.image_size,
                                              num_classes=ds.num_classes, cache_dir=cache_dir, augment=self.cfg.augment)
            if self.cfg.model.weights == "none" and "fine_tuning" not in done:
                with self.watchdog.working("BatchNorm calibration", collectives=True):
                    model_lib.calibrate_batchnorm(model, self._calibration_sample(ds.train))
        if self.ctx.is_chief:
            # When training starts (its data and model are ready), not only at the end: a resumed run is checked
            # against it (rundir.check_resumed). Rewritten each attempt, with the safe keys' new values.
            # After the model build: its collectives are reached by every worker only once it has pulled the run,
            # so no upload here changes a file under another worker's download.
            self.files.write_params(self.cfg)
            self.files.push_files(rundir.PARAMS, rundir.STATE)
        for phase in PHASES:
            phase_cfg = getattr(self.cfg.train, phase)
            ckpt = self._path(rundir.CHECKPOINTS, f"{phase}.weights.h5")
            if phase == "fine_tuning":
                with self.strategy.scope():
                    model_lib.unfreeze_from(model, self.cfg.train.fine_tuning.fine_tune_at)
            if phase in done:
                log.info("phase %s already finished: loading %s", phase, ckpt)
                with self.watchdog.working(f"loading {phase} weights", collectives=True):
                    model.load_weights(str(ckpt))
                continue
            # Compile, fit's own set-up and the backup's restore are a stage with collectives; inside fit,
            # FaultCallback switches to per-batch beats.
            with self.watchdog.working(f"phase {phase}", collectives=True):
                self._fit_phase(model, phase, phase_cfg, ds, steps)
            with self.watchdog.working(f"saving {phase} weights", collectives=True):
                self._save_phase_weights(model, phase)
            self._mark_phase_done(phase, done)
        if model.optimizer is None:
            # The test evaluation in _finish needs a compiled model: a restart after both phases (the chief died
            # in the final publish) used to fail there with exit 1, on every retry; a phase trained on cached
            # features compiled its FeatureModel, not the model.
            self._compile(model, self.cfg.train.fine_tuning, ds.num_classes, steps)
        result = self._finish(model, ds)
        self.watchdog.disarm()
        return result

    def _calibration_sample(self, split: data.Split, n: int = 64) -> "np.ndarray":
        """The first n training images in the seeded shuffle order (the same on every worker)."""
        ds = data.train_pipeline(split, global_batch=n, aug=NO_AUGMENTATION, shuffle_buffer=self.cfg.data.shuffle_buffer,
                                 seed=self.cfg.seed, num_workers=1, repeat=False)
        return next(iter(ds))[0].numpy()

    def _fit_phase(self, model: tf.keras.Model, phase: str, phase_cfg: PhaseConfig, ds: data.Dataset,
                   steps: int) -> None:
        num_classes = ds.num_classes
        start, end = self.ends[phase]
        if end == start:
            log.info("phase %s: 0 epochs configured, skipped", phase)
            return
        cached_validation = None
        model_lib.set_augmentation(model, phase_cfg.augment)  # augment.placement: model
        if phase_cfg.cache_features:
            fit_model, train_ds, val_ds = self._feature_inputs(model, phase, ds)
        else:
            fit_model = model
            # One endless stream, `steps` batches per epoch: with a finite dataset Keras makes a new iterator
            # every epoch, and tearing the old one down stalled epochs by up to 40 s (real recipe, 2 CPUs).
            train_ds = data.distributed_train_input(
                self.strategy, ds.train, global_batch=self.ctx.global_batch,
                aug=self.cfg.augment if phase_cfg.augment else NO_AUGMENTATION,
                shuffle_buffer=self.cfg.data.shuffle_buffer, seed=self.cfg.seed, num_workers=self.ctx.spec.num_workers)
            # The cached-validation split follows the layers' trainable flags of this phase (set by the unfreeze).
            cached_validation, val_ds = self._validation(model, ds)
        lr = self._compile(fit_model, phase_cfg, num_classes, steps)
        trainable = sum(int(tf.size(v)) for v in fit_model.trainable_variables)
        log.info("phase %s: epochs %d..%d, %s lr=%g (%s%s), %d trainable parameters, %d steps/epoch%s", phase,
                 start + 1, end, phase_cfg.optimizer, lr, phase_cfg.schedule,
                 f", {phase_cfg.warmup_epochs:g} warm-up epochs" if phase_cfg.warmup_epochs else "", trainable, steps,
                 ", on cached features" if phase_cfg.cache_features else "")
        ctx, runtime, logs = self.ctx, self.cfg.runtime, self.ctx.layout.logs
        chief_remote = ctx.is_chief and storage.is_remote(self.cfg.output or "")
        fit_callbacks = callbacks.make_callbacks(
            phase=phase, steps=steps, global_batch=ctx.global_batch, history=self.history,
            tags={"global_batch_size": ctx.global_batch, "replicas": ctx.replicas,
                  "num_workers": ctx.spec.num_workers, "attempt": self.attempt}, on_record=self.on_epoch_recorded,
            backup_dir=str(self._path(ctx.layout.backup, phase)), backup_every_steps=runtime.backup_every_steps,
            on_backup_saved=self._push_backup, watchdog=self.watchdog, cached_validation=cached_validation,
            # A bar per epoch on the chief in a terminal (console.wants_progress_bar); a pod's log has the epoch line.
            progress_bar=console.wants_progress_bar(ctx.is_chief), total_epochs=self.total_epochs,
            # Multi-worker: the SIGTERM agreement is an all-reduce (~3.5 ms on loopback), so not every batch.
            stop=faults.StopCheck(self.termination, self.agree, faults.calls_between_checks(
                self.cfg.train.steps_per_execution, ctx.spec.num_workers)),
            tensorboard_dir=str(self._path(logs, phase)) if ctx.is_chief else None,
            sync_logs=(lambda: self.files.push(logs)) if chief_remote else None, log_sync_s=runtime.log_sync_s)
        fit_model.fit(train_ds, validation_data=val_ds, epochs=end, initial_epoch=start, steps_per_epoch=steps,
                      validation_steps=self.cfg.train.validation_steps, callbacks=fit_callbacks, verbose=0)

    def _compile(self, model: tf.keras.Model, phase_cfg: PhaseConfig, num_classes: int, steps: int) -> float:
        """Compiles for a phase on every worker (the optimizer's variables are created in the strategy's
        scope); returns the peak learning rate (train.<phase>.schedule shapes it over the phase's steps)."""
        lr = policy.learning_rate(phase_cfg.learning_rate, self.cfg.train.lr_scaling, self.ctx.global_batch,
                                  self.cfg.train.reference_batch_size)
        with self.strategy.scope():
            model_lib.compile_for_phase(model, phase_cfg, model_lib.learning_rate_schedule(phase_cfg, lr, steps),
                                        num_classes, steps_per_execution=self.cfg.train.steps_per_execution,
                                        jit_compile=self.cfg.runtime.jit_compile)
        return lr

    def _feature_inputs(self, model: tf.keras.Model, phase: str, ds: data.Dataset,
                        ) -> tuple[tf.keras.Model, object, tf.data.Dataset | None]:
        """Runs on every worker: (the model to fit, its training input, its validation data) for a phase that
        trains on cached features (train.<phase>.cache_features). The layers that do not change in this phase
        run once, on this worker's share of the training images and on every validation image; fit then trains
        the changing part (fastval.FeatureModel, the model's own layers) on their outputs."""
        batch, image_shape = self.ctx.global_batch, (self.cfg.data.image_size, self.cfg.data.image_size, 3)
        bottom, top = fastval.split_model(model, image_shape, training=True)
        with self.strategy.scope():  # no variables of its own, but compile's optimizer is made for it
            fit_model = fastval.FeatureModel(top, [shape for shape, _ in fastval.boundary_shapes(bottom, image_shape)],
                                             name=f"{model.name}_{phase}_top")
        share = cluster.worker_share(self.ctx.spec)
        features, labels = fastval.compute_features(
            model, bottom, data.share_batches(ds.train, batch, share), image_shape=image_shape,
            total_batches=-(-ds.train.num_examples // (batch * share[0])), what=f"training images (share {share[1] + 1} "
            f"of {share[0]})", watchdog=self.watchdog)
        train_ds = data.feature_train_input(self.strategy, features, labels, global_batch=batch, seed=self.cfg.seed,
                                            num_workers=share[0])
        val_ds = None
        if ds.validation is not None:
            val_features, val_labels = fastval.compute_features(
                model, bottom, data.ordered_batches(ds.validation, batch), image_shape=image_shape,
                total_batches=-(-ds.validation.num_examples // batch), what="validation images", watchdog=self.watchdog)
            val_ds = data.feature_eval_pipeline(val_features, val_labels, global_batch=batch, num_workers=share[0])
        return fit_model, train_ds, val_ds

    def _validation(self, model: tf.keras.Model, ds: data.Dataset,
                    ) -> tuple[fastval.CachedValidation | None, tf.data.Dataset | None]:
        """Runs on every worker: (cached-validation callback, validation_data for fit). Cached validation
        needs the decoded validation images in memory; every worker validates all of them locally."""
        split = ds.validation
        if split is None:
            return None, None
        if not self.cfg.train.cached_validation or split.images is None:
            if self.cfg.train.cached_validation:
                log.info("cached validation: the validation split is streamed, not held in memory (data.cache, "
                         "data.cache_budget_mb): model.evaluate validates every epoch instead")
            return None, data.eval_pipeline(split, global_batch=self.ctx.global_batch,
                                            num_workers=self.ctx.spec.num_workers)
        callback = fastval.make_validation_callback(
            model, split.images, split.labels, batch_size=self.ctx.global_batch, num_classes=ds.num_classes,
            budget_mb=self.cfg.data.cache_budget_mb, steps=self.cfg.train.validation_steps, watchdog=self.watchdog)
        return callback, None

    def _save_phase_weights(self, model: tf.keras.Model, phase: str) -> None:
        # Every worker saves (under a multi-worker strategy a save may run collectives that all must join);
        # non-chiefs to a scratch folder of their own (cluster.worker_write_dir), removed again.
        target = Path(cluster.worker_write_dir(str(self._path(rundir.CHECKPOINTS)), self.ctx.spec))
        target.mkdir(parents=True, exist_ok=True)
        model.save_weights(str(target / f"{phase}.weights.h5"))
        if not self.ctx.is_chief:
            shutil.rmtree(target.parent)

    def _finish(self, model: tf.keras.Model, ds: data.Dataset) -> int:
        workers = self.ctx.spec.num_workers
        test_metrics = {}
        if ds.test is not None:
            test_ds = data.eval_pipeline(ds.test, global_batch=self.ctx.global_batch, num_workers=workers)
            with self.watchdog.working("test evaluation", collectives=True):
                out = model.evaluate(test_ds, return_dict=True, verbose=0)
            test_metrics = {f"test_{k}": float(v) for k, v in out.items()}
        # Every worker logs it (all take part, as reading a distributed variable may be a collective):
        # equal digests prove the replicas stayed in sync.
        with self.watchdog.working("reading the final weights", collectives=True):
            weights = model.get_weights()
        log.info("final weights digest: %s", weights_digest(weights))
        if not self.ctx.is_chief:
            log.info("worker %d done; the chief publishes the run", self.ctx.spec.task_index)
            return EXIT_OK
        # Chief only, after the last collective: export and publish wait on no peer.
        with self.watchdog.working("export", collectives=False):
            serving = self._serving_copy(ds.num_classes, weights)
            export.export_model(serving, self._path(self.ctx.layout.model))
            tflite = self._tflite(ds) if self.cfg.export.tflite else None
            self._write_final_files(ds, test_metrics, self._evaluation_report(serving, ds), tflite)
        with self.watchdog.working("publish", collectives=False):
            # Backups were uploaded during the run; syncs never delete, so drop the bucket's copy here.
            storage.remove_tree(storage.join(self.cfg.output or "", self.ctx.layout.backup))
            listing = self.files.publish()
        log.info("published %d files to %s", len(listing["files"]), self.cfg.output)
        return EXIT_OK

    def _serving_copy(self, num_classes: int, weights: list[np.ndarray]) -> tf.keras.Model:
        """The trained model rebuilt outside the distribution strategy, for export on the chief alone.

        Saving the distributed model would make every worker trace and write a full export (a save under
        MultiWorkerMirroredStrategy must run on every worker); a plain copy with the same weights is saved
        by the chief only, and loads anywhere without a strategy. It holds no training state. It is built in
        float32 whatever runtime.precision (the variables are float32 in every policy, so the weights carry
        over as they are) and without the augmentation layer (which has no weights): the export takes float32
        pixels and gives float32 probabilities, and serving never augments.
        """
        cfg = self.cfg
        with model_lib.precision_scope("float32"):
            copy = model_lib.build_model(dataclasses.replace(cfg.model, weights="none"),
                                         image_size=cfg.data.image_size, num_classes=num_classes, cache_dir="")
            model_lib.unfreeze_from(copy, cfg.train.fine_tuning.fine_tune_at)
            copy.set_weights(weights)
            model_lib.compile_for_phase(copy, cfg.train.fine_tuning, cfg.train.fine_tuning.learning_rate,
                                        num_classes)
        return copy

    def _evaluation_report(self, serving: tf.keras.Model, ds: data.Dataset) -> dict | None:
        """Chief only: the per-class report on the test split, computed with the serving copy on this worker
        alone (no collectives: the other workers may have exited); written as evaluation.json, confusion.png."""
        if ds.test is None or ds.test.num_examples == 0:
            return None
        evaluation = report.evaluate_split(serving.predict_on_batch, ds.test, ds.class_names, self.ctx.global_batch,
                                           source="data.test")
        report.write_report(evaluation, str(self.ctx.staging))
        return evaluation

    def _tflite(self, ds: data.Dataset) -> dict:
        """Chief only: model/model.tflite, checked against the SavedModel on the test images (if any)."""
        batches = (x.numpy() for x, _ in data.ordered_batches(ds.test, self.ctx.global_batch)) if ds.test else ()
        return export.export_tflite(self._path(self.ctx.layout.model), batches)

    def _write_final_files(self, ds: data.Dataset, test_metrics: dict, evaluation: dict | None,
                           tflite: dict | None) -> None:
        cfg, ctx = self.cfg, self.ctx
        # The phases' own backups are gone (BackupAndRestore deletes them); drop the empty parent too.
        shutil.rmtree(self._path(self.ctx.layout.backup), ignore_errors=True)
        # Each phase's last epoch: its validation ran on the phase's final weights, so no second evaluation.
        last = {h["phase"]: h for h in self.history}
        by_phase = {p: {k: v for k, v in last[p].items() if k.startswith("val_")} for p in PHASES if p in last}
        ips = [h["images_per_second"] for h in self.history]
        metrics = {
            "phases": by_phase,
            "test": test_metrics,
            "images_per_second": round(sum(ips) / len(ips), 1) if ips else None,
            "bad_files": len(ds.bad_files),
            "bad_file_names": ds.bad_files,
            "total_files": ds.total_files,
            "epochs": len(self.history),
            "global_batch_size": ctx.global_batch,
            "num_workers": ctx.spec.num_workers,
            "replicas": ctx.replicas,
            "evaluation": report.summary(evaluation) if evaluation else None,
        }
        self.files.write_json(rundir.METRICS, metrics)
        self.files.write_history(self.history)
        p1_end = self.ends["feature_extraction"][1]
        export.plot_curves(self.history, self._path(rundir.CURVES),
                           p1_end if cfg.train.fine_tuning.epochs and p1_end else None)
        meta = export.metadata(
            class_names=ds.class_names, image_size=cfg.data.image_size, config_digest=digest(cfg),
            num_workers=ctx.spec.num_workers, replicas=ctx.replicas, global_batch=ctx.global_batch, tflite=tflite)
        self.files.write_json(rundir.METADATA, meta)
        splits = {s.name: s.num_examples for s in (ds.train, ds.validation, ds.test) if s is not None}
        export.write_model_package(self._path(self.ctx.layout.model), meta, export.model_card(
            name=cfg.name, meta=meta, params=to_dict(cfg), metrics=metrics, evaluation=evaluation, split_sizes=splits))
        self._write_status("succeeded", 0.0)
        console.log_summary(cfg.output or "", metrics, self.history)
