"""The evaluation report: per-class precision, recall, F1 and support, the confusion matrix, the worst-classified
images; as `evaluation.json`, `confusion.png` and the table `tljob evaluate` prints.

The figures are pure numpy functions of labels and predicted probabilities (tested against numbers computed by
hand); `evaluate_split` runs a model over a split to get them. Used by the chief at the end of training (test
split, on the chief alone: no collectives) and by `tljob evaluate`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable

import numpy as np

from tljob import rundir, storage

log = logging.getLogger(__name__)

# How many wrongly classified images the report names (the most confident mistakes first).
WORST_SHOWN = 25
# Keras' epsilon: probabilities are clipped to [EPSILON, 1 - EPSILON] before the log, as its cross-entropy does,
# so the report's loss is model.evaluate's.
EPSILON = 1e-7
UNDEFINED_NOTE = ("precision of a class never predicted and recall of a class with no examples are 0/0; they are "
                  "reported as 0.0 and listed in undefined_precision / undefined_recall")


# ----------------------------------------------------------------------------- pure figures


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """[n, classes] probabilities from a model's [n, 1] sigmoid (P(class 1)) or [n, classes] softmax outputs."""
    outputs = np.asarray(outputs, np.float64)
    if outputs.shape[-1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """Argmax; for two classes that is P(class 1) > 0.5, Keras' BinaryAccuracy threshold."""
    return np.argmax(probs, axis=-1)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] -> count."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def per_class_figures(matrix: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Precision, recall, F1, support per class, macro and support-weighted averages, from a confusion matrix.

    A 0/0 (a class never predicted has no precision, one without examples no recall) is reported as 0.0 and
    the class is named in undefined_precision / undefined_recall, as scikit-learn's zero_division=0 does.
    """
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
    per_class = {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                        "support": int(support[k]), "predicted": int(predicted[k])}
                 for k, name in enumerate(class_names)}
    total = support.sum()
    weights = support / total if total else np.zeros_like(support)

    def averages(w: np.ndarray) -> dict[str, float]:
        return {"precision": float(precision @ w), "recall": float(recall @ w), "f1": float(f1 @ w)}

    return {
        "per_class": per_class,
        "macro_avg": averages(np.full(len(class_names), 1.0 / len(class_names))),
        "weighted_avg": averages(weights),
        "undefined_precision": [n for k, n in enumerate(class_names) if predicted[k] == 0],
        "undefined_recall": [n for k, n in enumerate(class_names) if support[k] == 0],
        "undefined_note": UNDEFINED_NOTE,
    }


def worst_classified(names: list[str], labels: np.ndarray, probs: np.ndarray, class_names: list[str],
                     shown: int = WORST_SHOWN) -> list[dict[str, Any]]:
    """The wrongly classified images, the lowest probability given to the true class first."""
    predicted = predicted_classes(probs)
    true_prob = probs[np.arange(len(labels)), labels]
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(true_prob[wrong], kind="stable")][:shown]
    return [{"path": names[i], "true_class": class_names[labels[i]], "predicted_class": class_names[predicted[i]],
             "probability": round(float(probs[i, predicted[i]]), 6),
             "true_class_probability": round(float(true_prob[i]), 6)} for i in order]


def build_report(labels: np.ndarray, outputs: np.ndarray, class_names: list[str], names: list[str]) -> dict[str, Any]:
    """The whole report from integer labels and the model's raw outputs (sigmoid or softmax), one row each."""
    labels = np.asarray(labels, np.int64)
    probs = class_probabilities(outputs)
    predicted = predicted_classes(probs)
    matrix = confusion_matrix(labels, predicted, len(class_names))
    true_prob = np.clip(probs[np.arange(len(labels)), labels], EPSILON, 1.0 - EPSILON)
    return {
        "examples": int(len(labels)),
        "loss": float(-np.mean(np.log(true_prob))) if len(labels) else 0.0,
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 0.0,
        "class_names": list(class_names),
        **per_class_figures(matrix, class_names),
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class, in class_names order",
        "worst_classified": worst_classified(names, labels, probs, class_names),
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, for metrics.json and the model card."""
    return {"examples": report["examples"], "accuracy": report["accuracy"], "loss": report["loss"],
            "macro_precision": report["macro_avg"]["precision"], "macro_recall": report["macro_avg"]["recall"],
            "macro_f1": report["macro_avg"]["f1"], "report": rundir.EVALUATION}


def format_table(report: dict[str, Any]) -> str:
    """What `tljob evaluate` prints: overall figures, one row per class, the confusion matrix, the worst images."""
    width = max(12, *(len(n) for n in report["class_names"]))
    lines = [f"examples {report['examples']}  accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}", ""]
    lines.append(f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    rows = [(n, report["per_class"][n]) for n in report["class_names"]]
    rows += [("macro avg", {**report["macro_avg"], "support": report["examples"]}),
             ("weighted avg", {**report["weighted_avg"], "support": report["examples"]})]
    for name, r in rows:
        lines.append(f"{name:<{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} {r['f1']:>9.4f} {r['support']:>8d}")
    if report["undefined_precision"] or report["undefined_recall"]:
        lines.append(f"(0.0: {report['undefined_note']}: precision {report['undefined_precision']}, "
                     f"recall {report['undefined_recall']})")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    cell = max(6, *(len(n) for n in report["class_names"]),
               *(len(str(v)) for row in report["confusion_matrix"] for v in row))
    lines.append(f"{'':<{width}} " + " ".join(f"{n:>{cell}}" for n in report["class_names"]))
    for name, row in zip(report["class_names"], report["confusion_matrix"]):
        lines.append(f"{name:<{width}} " + " ".join(f"{v:>{cell}d}" for v in row))
    if report["worst_classified"]:
        lines += ["", "worst classified (true class -> predicted class, probability of the prediction)"]
        lines += [f"{w['path']}  {w['true_class']} -> {w['predicted_class']}  {w['probability']:.4f}"
                  for w in report["worst_classified"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def confusion_png(report: dict[str, Any]) -> bytes:
    """The confusion matrix as a PNG: counts in the cells, colour by the share of the true class (row)."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI (as in export.py, which may have chosen it already)
    import matplotlib.pyplot as plt

    matrix = np.asarray(report["confusion_matrix"], np.float64)
    names = report["class_names"]
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.5 * len(names), 20)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix ({report['examples']} images, accuracy {report['accuracy']:.3f})")
    if len(names) <= 30:  # beyond that the numbers no longer fit their cells
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, f"{int(count)}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(report: dict[str, Any], directory: str) -> list[str]:
    """evaluation.json and confusion.png into `directory` (local or gs://); returns their paths."""
    paths = [storage.join(directory, rundir.EVALUATION), storage.join(directory, rundir.CONFUSION)]
    if not storage.is_remote(directory):
        os.makedirs(storage.local_path(directory), exist_ok=True)
    storage.write_text(paths[0], json.dumps(report, indent=1) + "\n")
    storage.write_bytes(paths[1], confusion_png(report))
    log.info("evaluation report: %s, %s", *paths)
    return paths


# ----------------------------------------------------------------------------- running a model


def split_names(split: Any, source: str) -> list[str]:
    """Each example's name: its file or generated name, else `<source>[i]` (its position in reading order)."""
    return split.paths if split.paths is not None else [f"{source}[{i}]" for i in range(split.num_examples)]


def evaluate_split(classify: Callable[[Any], np.ndarray], split: Any, class_names: list[str], batch_size: int,
                   source: str) -> dict[str, Any]:
    """The report of `classify` (float32 image batch -> model outputs) on a data.Split, computed on this
    process alone (no collectives); `source` names the examples of a split without file names."""
    from tljob import data

    outputs, labels = [], []
    for x, y in data.ordered_batches(split, batch_size):
        outputs.append(classify(x))
        labels.append(y.numpy())
    if not outputs:
        raise ValueError(f"split {split.name} is empty")  # callers evaluate only splits with examples
    return build_report(np.concatenate(labels), np.concatenate(outputs), class_names, split_names(split, source))
