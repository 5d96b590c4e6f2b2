"""A run's final artifacts: the curves plot, the metadata record, and the exported model.

Everything here writes into the run's local staging directory (names from tljob.rundir);
`rundir.publish` makes it visible.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display in pods or CI
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from tljob.rundir import KERAS_FILE, SAVED_MODEL_DIR

log = logging.getLogger(__name__)


def plot_curves(history: list[dict], path: Path, fine_tune_start: int | None) -> None:
    """Accuracy and loss, train and validation, with the start of fine-tuning marked (as in the tutorial)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, [h.get(metric) for h in history], marker="o", label=f"Training {metric}")
        if any("val_" + metric in h for h in history):
            ax.plot(epochs, [h.get("val_" + metric) for h in history], marker="o", label=f"Validation {metric}")
        if fine_tune_start is not None:
            ax.axvline(fine_tune_start + 0.5, color="gray", linestyle="--", label="Start fine-tuning")
        ax.set_ylabel(metric.capitalize())
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_title("Training and validation accuracy")
    axes[1].set_title("Training and validation loss")
    axes[1].set_xlabel("Epoch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def versions() -> dict[str, str]:
    import tensorflow as tf
    import tf_keras

    from tljob import __version__

    return {"tljob": __version__, "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
            "python": platform.python_version()}


def metadata(*, class_names: list[str], image_size: int, config_digest: str, num_workers: int,
             replicas: int, global_batch: int) -> dict[str, Any]:
    return {
        "class_names": class_names,
        "image_size": image_size,
        "input": "float32 RGB pixels in [0, 255], shape [batch, size, size, 3]",
        "preprocessing": "inside the model: x / 127.5 - 1 (mobilenet_v2.preprocess_input)",
        "output": "sigmoid P(class_names[1])" if len(class_names) == 2 else "softmax over class_names",
        "config_digest": config_digest,
        "num_workers": num_workers,
        "replicas": replicas,
        "global_batch_size": global_batch,
        "versions": versions(),
    }


def export_model(model: Any, model_dir: Path) -> None:
    """`.keras` for Keras users and a SavedModel ("serve" signature) for TF Serving / Vertex."""
    if model_dir.exists():
        shutil.rmtree(model_dir)  # a retried export must not mix two attempts' files
    model_dir.mkdir(parents=True)
    model.save(model_dir / KERAS_FILE)
    model.export(str(model_dir / SAVED_MODEL_DIR))
    log.info("exported %s and %s", model_dir / KERAS_FILE, model_dir / SAVED_MODEL_DIR)
