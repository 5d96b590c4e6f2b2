"""The run directory: the name of every file a run holds, where its model, backups and logs go, and the
typed records that the trainer writes and `tljob status` reads. No other module spells a run file's name
(tests/test_rundir.py checks it); a new file is one line below. The layout itself: README "What a run writes".

The chief writes into the run's local staging directory (RunFiles), which mirrors the output and `publish`
copies to it at the end; readers (`tljob status`, a resumed run, `tljob predict`) read the output itself, local
or gs://. No TensorFlow or matplotlib here: `tljob status` imports this module alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import posixpath
from pathlib import Path
from typing import Any, Mapping

from tljob import config, storage
from tljob.config import JobConfig
from tljob.errors import ConfigError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"  # written last, listing every other file: nothing without it is a finished run
PARAMS = "params.yaml"  # the config, from the start of training: a resumed run is checked against it
STATE = "state.json"
HISTORY = "history.json"
STATUS = "status.json"
METRICS = "metrics.json"
METADATA = "metadata.json"  # in the run directory and, the same file, in the model folder (it must stand alone)
CURVES = "curves.png"
EVALUATION = "evaluation.json"  # with a test split: the per-class report (also `tljob evaluate --output`)
CONFUSION = "confusion.png"  # with a test split: its confusion matrix
CHECKPOINTS = "checkpoints"  # <phase>.weights.h5 at the end of each phase
KERAS_FILE = "model.keras"  # in the model folder
SAVED_MODEL_DIR = "saved_model"  # in the model folder
LABELS = "labels.txt"  # in the model folder: the class names in output order
MODEL_CARD = "README.md"  # in the model folder
TFLITE_FILE = "model.tflite"  # in the model folder, with export.tflite: true
# The epoch metrics that status.json carries, in the order `tljob status` and the epoch log line show them.
METRIC_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")

MODEL_ENV = "AIP_MODEL_DIR"
CHECKPOINT_ENV = "AIP_CHECKPOINT_DIR"
TENSORBOARD_ENV = "AIP_TENSORBOARD_LOG_DIR"


# --- where the model, backups and logs go (Vertex AI's AIP_* folders under a custom job given no --output) ---


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Folders relative to the run directory ('/'-separated, as in gs:// URIs)."""

    model: str = "model"
    backup: str = "backup"
    logs: str = "logs"


@dataclasses.dataclass(frozen=True)
class VertexRun:
    output: str  # the run directory: the parent of AIP_MODEL_DIR
    layout: RunLayout


def _relative(base: str, var: str, value: str) -> str:
    path = value.rstrip("/")
    if not path.startswith(base + "/"):
        raise ConfigError(f"{var}={value!r} is not inside {base!r}, the folder that {MODEL_ENV} is in, so the run "
                          f"directory cannot hold it. Fix: pass --output to choose the run directory yourself, or "
                          f"let Vertex AI set the AIP_* variables from the job's baseOutputDirectory.")
    return path[len(base) + 1:]


def vertex_run(environ: Mapping[str, str]) -> VertexRun | None:
    """The run directory and layout that Vertex AI's AIP_* variables ask for; None when they are not set.

    Vertex sets AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR (BASE/model/, BASE/checkpoints/,
    BASE/logs/ for the job's baseOutputDirectory BASE) and expects the model, checkpoints and logs there; the run
    directory is then BASE, so that the rest of it (history, metrics, the success marker) lies beside them.
    """
    model_dir = environ.get(MODEL_ENV, "").rstrip("/")
    if not model_dir:
        stray = [var for var in (CHECKPOINT_ENV, TENSORBOARD_ENV) if environ.get(var)]
        if stray:
            raise ConfigError(f"{', '.join(stray)} set without {MODEL_ENV}: the run directory is the folder that "
                              f"{MODEL_ENV} is in. Fix: pass --output, or set {MODEL_ENV} too (Vertex AI sets all "
                              f"three from the job's baseOutputDirectory).")
        return None
    base = posixpath.dirname(model_dir)
    if base in ("", "/") or base.endswith(":"):
        raise ConfigError(f"{MODEL_ENV}={environ[MODEL_ENV]!r} is the top of its bucket or file system: the run's "
                          f"other files need the folder above it. Fix: pass --output, or give the Vertex AI job a "
                          f"baseOutputDirectory such as gs://BUCKET/runs/NAME.")
    layout = RunLayout(
        model=_relative(base, MODEL_ENV, model_dir),
        # A backup/ folder inside it: Vertex's BASE/checkpoints/ also holds the phases' weights
        # (checkpoints/<phase>.weights.h5), which removing the backups at the end must not take with them.
        backup=posixpath.join(_relative(base, CHECKPOINT_ENV, environ[CHECKPOINT_ENV]), "backup")
        if environ.get(CHECKPOINT_ENV) else RunLayout.backup,
        logs=_relative(base, TENSORBOARD_ENV, environ[TENSORBOARD_ENV])
        if environ.get(TENSORBOARD_ENV) else RunLayout.logs,
    )
    log.info("Vertex AI outputs: run directory %s, model %s/, backups %s/, TensorBoard logs %s/", base, layout.model,
             layout.backup, layout.logs)
    return VertexRun(base, layout)


# --- records and files ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Status:
    """status.json: where the run stands, rewritten by the chief after every epoch and at the end. Every field
    but `state` may be null (a run that succeeded before any epoch was recorded has none)."""

    state: str  # "running" | "succeeded"
    phase: str | None = None
    epoch: int | None = None
    total_epochs: int | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    images_per_second: float | None = None
    eta_s: float | None = None
    updated_at: str | None = None
    started_at: str | None = None
    name: str | None = None
    num_workers: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Status:
        """Tolerant of other tljob versions' files: unknown keys are dropped, missing ones are null."""
        known = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**{**known, "state": known.get("state") or "-", "metrics": known.get("metrics") or {}})

    @classmethod
    def after(cls, history: list[dict], *, state: str, eta_s: float, **run: Any) -> Status:
        """The status after the newest record in `history`; `run`: total_epochs, started_at, name, num_workers."""
        last = history[-1] if history else {}
        return cls(state=state, phase=last.get("phase"), epoch=last.get("epoch"),
                   metrics={k: last[k] for k in METRIC_KEYS if k in last},
                   images_per_second=last.get("images_per_second"), eta_s=round(eta_s, 1), updated_at=now(), **run)


@dataclasses.dataclass(frozen=True)
class State:
    """state.json: how many attempts the run has had, and which phases are finished."""

    attempts: int = 0
    completed_phases: tuple[str, ...] = ()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    # storage's local writes are atomic: a reader or an upload never sees half a file.
    storage.write_text(str(path), json.dumps(data, indent=1) + "\n")


class RunFiles(storage.Mirror):
    """The run's files in its local staging directory `root` (read on every worker, written by the chief) and
    their copy at `output`, which push, push_files and pull keep in step (storage.Mirror)."""

    def __init__(self, root: Path, output: str) -> None:
        super().__init__(str(root), output)
        self.root = root

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.root / name, data)

    def _read_json(self, name: str, default: Any) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else default

    def history(self) -> list[dict]:
        return self._read_json(HISTORY, [])

    def write_history(self, history: list[dict]) -> None:
        self.write_json(HISTORY, history)

    def state(self) -> State:
        saved = self._read_json(STATE, {})
        return State(int(saved.get("attempts", 0)), tuple(saved.get("completed_phases", ())))

    def write_state(self, state: State) -> None:
        self.write_json(STATE, dataclasses.asdict(state))

    def write_status(self, status: Status) -> None:
        self.write_json(STATUS, dataclasses.asdict(status))

    def write_params(self, cfg: JobConfig) -> None:
        storage.write_text(str(self.root / PARAMS), config.to_yaml(cfg))

    def publish(self) -> dict:
        """Copies the staged run to the output and writes SUCCESS last (storage.publish)."""
        return storage.publish(self.local_dir, self.remote, marker=SUCCESS)


# --- reading a run where it is (local or gs://) ----------------------------------------------------------


def is_finished(run: str) -> bool:
    return storage.is_file(storage.join(run, SUCCESS))


def read_status(run: str) -> Status | None:
    """The run's status, or None when the chief has not written one yet."""
    path = storage.join(run, STATUS)
    try:
        data = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}). Fix: point at a tljob run directory.") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}. "
                          f"Fix: point at a tljob run directory.")
    return Status.from_json(data)


def read_metadata(model_dir: str) -> dict:
    """model/metadata.json: class names, image size, input and output of the exported model (the model folder
    holds its own copy, so that a copy of model/ made anywhere can be used)."""
    path = storage.join(model_dir, METADATA)
    if not storage.exists(path):
        raise ConfigError(f"--model {model_dir}: {path} not found. Fix: point --model at the model/ directory of a "
                          f"finished run (or a copy of it); a model exported before model/ held its metadata works "
                          f"once its run's {METADATA} is copied into it.")
    return json.loads(storage.read_text(path))


def check_resumed(cfg: JobConfig, output: str) -> None:
    """ConfigError when `output` is an unfinished run that started training with another config than `cfg`.

    Runs on every worker, before anything is built, reading params.yaml from the output itself (the bucket for
    gs:// outputs): all workers refuse alike. Keys safe to change: config.SAFE_ON_RESUME_SECTIONS and _KEYS.
    """
    params = storage.join(output, PARAMS)
    try:
        saved = storage.read_text(params)
    except FileNotFoundError:
        return  # training never started there: a new run, or one stopped by a config or data error
    changes = config.changes_on_resume(saved, params, cfg)
    if changes:
        safe = ", ".join([f"{s}.*" for s in config.SAFE_ON_RESUME_SECTIONS] + list(config.SAFE_ON_RESUME_KEYS))
        raise ConfigError(
            f"{output} is an unfinished run that started with another config; resuming would continue it with "
            f"the new values mixed in. Changed: {'; '.join(changes)}. Fix: resume with the values in {params}, or "
            f"start a new run with another --output (or delete {output} to start over). Safe to change when "
            f"resuming: {safe}.")
