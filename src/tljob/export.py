"""A run's final artifacts: the curves plot, the metadata record, the exported model, and what makes model/
stand alone (its metadata, labels, model card, and the optional TFLite file).

Everything here writes into the run's local staging directory (names from tljob.rundir);
`rundir.RunFiles.publish` makes it visible.
"""

from __future__ import annotations

import logging
import platform
import shutil
from pathlib import Path
from typing import Any, Iterable

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display in pods or CI
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from tljob import console, rundir  # noqa: E402

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


def metadata(*, class_names: list[str], image_size: int, config_digest: str, num_workers: int,
             replicas: int, global_batch: int, tflite: dict[str, Any] | None = None) -> dict[str, Any]:
    import tensorflow as tf
    import tf_keras

    from tljob import __version__

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
        "versions": {"tljob": __version__, "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
                     "python": platform.python_version()},
        # export_tflite's result (export.tflite: true), else absent.
        **({"tflite": tflite} if tflite else {}),
    }


def export_model(model: Any, model_dir: Path) -> None:
    """`.keras` for Keras users and a SavedModel ("serve" signature) for TF Serving / Vertex."""
    if model_dir.exists():
        shutil.rmtree(model_dir)  # a retried export must not mix two attempts' files
    model_dir.mkdir(parents=True)
    model.save(model_dir / rundir.KERAS_FILE)
    with console.keras_messages_to_log():
        model.export(str(model_dir / rundir.SAVED_MODEL_DIR))
    log.info("exported %s and %s", model_dir / rundir.KERAS_FILE, model_dir / rundir.SAVED_MODEL_DIR)


def write_model_package(model_dir: Path, meta: dict[str, Any], card: str) -> None:
    """What makes model/ stand alone: its metadata, the class names in output order, the model card."""
    rundir.write_json(model_dir / rundir.METADATA, meta)  # the same file as the run directory's
    (model_dir / rundir.LABELS).write_text("".join(f"{name}\n" for name in meta["class_names"]))
    (model_dir / rundir.MODEL_CARD).write_text(card)


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def model_card(*, name: str, meta: dict[str, Any], params: dict[str, Any], metrics: dict[str, Any],
               evaluation: dict[str, Any] | None, split_sizes: dict[str, int]) -> str:
    """The model's README.md: data, recipe, the run's metrics, input, preprocessing, how to call it (pure)."""
    d, t, m = params["data"], params["train"], params["model"]
    fe, ft = t["feature_extraction"], t["fine_tuning"]
    size = meta["image_size"]
    classes = meta["class_names"]
    lines = [
        f"# {name}: MobileNetV2 image classifier ({len(classes)} classes)",
        "",
        f"Trained with tljob {meta['versions']['tljob']} (TensorFlow {meta['versions']['tensorflow']}), config "
        f"digest `{meta['config_digest']}`. Classes, in output order (`{rundir.LABELS}`): "
        + ", ".join(f"`{c}`" for c in classes) + ".",
        "",
        "## Data",
        "",
        (f"Generated images (`data.source: synthetic`, {d['synthetic']['num_classes']} noise-grain classes)."
         if d["source"] == "synthetic" else
         f"Source `{d['source']}`" + (f" `{d['name']}`" if d["source"] == "tfds" else "")
         + f"; train `{d['train']}`, validation `{d['validation']}`, test `{d['test']}`"
         + (f" (fractions of train: validation {d['validation_fraction']}, test {d['test_fraction']})"
            if d["validation_fraction"] or d["test_fraction"] else "") + "."),
        "Images: " + ", ".join(f"{k} {n}" for k, n in split_sizes.items())
        + f"; {metrics['bad_files']} undecodable files left out.",
        "",
        "## Recipe",
        "",
        f"MobileNetV2 (alpha {m['alpha']}, weights `{m['weights']}`, called with training=False), global average "
        f"pooling, dropout {m['dropout']}, a dense {'sigmoid' if len(classes) == 2 else 'softmax'} head. "
        f"Feature extraction (base frozen): {fe['epochs']} epochs, {fe['optimizer']} {fe['learning_rate']:g}; "
        f"fine-tuning (base layers from {ft['fine_tune_at']} trainable, BatchNorm in inference mode): "
        f"{ft['epochs']} epochs, {ft['optimizer']} {ft['learning_rate']:g}. Augmentation: flip "
        f"`{params['augment']['flip']}`, rotation {params['augment']['rotation']}. Global batch "
        f"{meta['global_batch_size']} on {meta['num_workers']} worker(s), {meta['replicas']} replica(s).",
        "",
        "## Metrics",
        "",
        "| split | accuracy | loss |",
        "|---|---|---|",
    ]
    for phase, figures in metrics["phases"].items():
        lines.append(f"| validation after {phase.replace('_', ' ')} | {_figure(figures.get('val_accuracy'))} | "
                     f"{_figure(figures.get('val_loss'))} |")
    if metrics["test"]:
        lines.append(f"| test | {_figure(metrics['test'].get('test_accuracy'))} | "
                     f"{_figure(metrics['test'].get('test_loss'))} |")
    if evaluation:
        lines += ["", f"Per class on the test split ({evaluation['examples']} images; `{rundir.EVALUATION}` and "
                      f"`{rundir.CONFUSION}` in the run directory have the confusion matrix and the worst-classified "
                      "images):", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
                  for c, r in evaluation["per_class"].items()]
        macro = evaluation["macro_avg"]
        lines.append(f"| macro average | {macro['precision']:.4f} | {macro['recall']:.4f} | {macro['f1']:.4f} | "
                     f"{evaluation['examples']} |")
    else:
        lines += ["", "No test split: no per-class figures."]
    lines += [
        "",
        "## Input and preprocessing",
        "",
        f"Input `image`: {meta['input'].replace('size, size', f'{size}, {size}')}. Resize any image to {size}x{size} "
        "(bilinear, rounded to whole pixel values, as training did); no other preprocessing: "
        f"{meta['preprocessing']}. Output: {meta['output']}.",
        "",
        "## Use",
        "",
        "```bash",
        "tljob predict --model model photo.jpg more/photos/ 'shots/*.png'   # one JSON line per image",
        "tljob evaluate --model model --data labelled_folder/              # per-class report",
        "```",
        "",
        f"The SavedModel (`{rundir.SAVED_MODEL_DIR}/`, for TF Serving or Vertex AI) has the `serve` endpoint "
        "(also the `serving_default` signature):",
        "",
        "```python",
        "import tensorflow as tf",
        f"model = tf.saved_model.load(\"model/{rundir.SAVED_MODEL_DIR}\")",
        f"probabilities = model.serve(tf.zeros([1, {size}, {size}, 3], tf.float32))  # float RGB pixels in [0, 255]",
        "```",
        "",
        f"`{rundir.KERAS_FILE}` loads with `tf_keras.models.load_model`.",
        "",
    ]
    lite = meta.get("tflite")
    if lite and lite["file"]:
        lines += [f"`{rundir.TFLITE_FILE}` (TFLite, float32, same input and output) agrees with the SavedModel on "
                  f"{lite['checked_images']} test images within {lite['max_abs_diff']:.1e}.", ""]
    elif lite:
        lines += [f"No TFLite file: {lite['error']}.", ""]
    return "\n".join(lines)


# Largest difference in any output probability between model.tflite and the SavedModel on the checked images;
# float32 conversion without quantisation differs by rounding only (about 1e-6 measured on the dry run).
TFLITE_TOLERANCE = 1e-4


def export_tflite(model_dir: Path, batches: Iterable[np.ndarray], tolerance: float = TFLITE_TOLERANCE
                  ) -> dict[str, Any]:
    """model/model.tflite from the SavedModel, checked against it on `batches` (float images); the result.

    A file that disagrees beyond `tolerance` is removed again (a model that answers differently must not ship
    under the same name) and the result says why; the run itself still succeeds.
    """
    import tensorflow as tf

    path = model_dir / rundir.TFLITE_FILE
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(model_dir / rundir.SAVED_MODEL_DIR)).convert())
    saved = tf.saved_model.load(str(model_dir / rundir.SAVED_MODEL_DIR))
    interpreter = tf.lite.Interpreter(model_path=str(path))
    source, result = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    checked, max_diff = 0, 0.0
    for x in batches:
        interpreter.resize_tensor_input(source, x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        lite, reference = interpreter.get_tensor(result), saved.serve(x).numpy()
        max_diff = max(max_diff, float(np.abs(lite - reference).max()))
        checked += len(x)
    check = {"file": rundir.TFLITE_FILE, "checked_images": checked, "max_abs_diff": max_diff, "tolerance": tolerance}
    if not checked:
        log.warning("export.tflite: no test images to check %s against the SavedModel; kept unchecked", path)
    elif max_diff > tolerance:
        path.unlink()
        check = {**check, "file": None, "error": f"outputs differ from the SavedModel's by {max_diff:.2e} > "
                                                  f"{tolerance:.0e} on the test images; {rundir.TFLITE_FILE} not kept"}
        log.error("export.tflite: %s", check["error"])
    else:
        log.info("export.tflite: %s agrees with the SavedModel on %d test images (max difference %.2e)",
                 path, checked, max_diff)
    return check
