"""Where a run puts its model, backups and TensorBoard logs inside its run directory.

tljob's own names (model/, backup/, logs/) unless the run is a Vertex AI custom job given no --output:
Vertex sets AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR (BASE/model/, BASE/checkpoints/,
BASE/logs/ for the job's baseOutputDirectory BASE) and expects the model, checkpoints and logs there;
the run directory is then BASE, so that the rest of it (history, metrics, _SUCCESS) lies beside them.
No TensorFlow here: the command line resolves it before training starts.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Mapping

from tljob.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_ENV = "AIP_MODEL_DIR"
CHECKPOINT_ENV = "AIP_CHECKPOINT_DIR"
TENSORBOARD_ENV = "AIP_TENSORBOARD_LOG_DIR"


@dataclass(frozen=True)
class RunLayout:
    """Folders relative to the run directory ('/'-separated, as in gs:// URIs)."""

    model: str = "model"
    backup: str = "backup"
    logs: str = "logs"


@dataclass(frozen=True)
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
    """The run directory and layout that Vertex AI's AIP_* variables ask for; None when they are not set."""
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
