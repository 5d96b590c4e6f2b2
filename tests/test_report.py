"""The evaluation report's figures against numbers computed by hand, and its files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tljob import report
from tljob.inference import top_classes

NAMES = ["a", "b", "c"]
# Eight images; class c is never predicted. Each row is the softmax output; the argmax is the prediction.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PROBS = np.array([
    [0.7, 0.2, 0.1],    # a -> a
    [0.6, 0.3, 0.1],    # a -> a
    [0.3, 0.6, 0.1],    # a -> b
    [0.2, 0.7, 0.1],    # b -> b
    [0.5, 0.4, 0.1],    # b -> a
    [0.1, 0.8, 0.1],    # c -> b
    [0.2, 0.5, 0.3],    # c -> b
    [0.45, 0.3, 0.25],  # c -> a
])
FILES = [f"img/{i}.jpg" for i in range(8)]


def test_per_class_figures_by_hand_with_a_class_never_predicted() -> None:
    r = report.build_report(LABELS, PROBS, NAMES, FILES)
    # rows: true a, b, c; columns: predicted a, b, c
    assert r["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 2, 0]]
    assert r["examples"] == 8 and r["accuracy"] == pytest.approx(3 / 8)
    a, b, c = (r["per_class"][n] for n in NAMES)
    # a: predicted 4 times, 2 right; 3 examples, 2 found.
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((2 / 4, 2 / 3, 4 / 7, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((1 / 4, 1 / 2, 1 / 3, 2))
    # c is never predicted: precision 0/0, reported as 0.0 and named.
    assert (c["precision"], c["recall"], c["f1"], c["support"], c["predicted"]) == (0.0, 0.0, 0.0, 3, 0)
    assert r["undefined_precision"] == ["c"] and r["undefined_recall"] == []
    assert "0.0" in r["undefined_note"]
    assert r["macro_avg"] == pytest.approx({"precision": 0.25, "recall": 7 / 18, "f1": 19 / 63})
    assert r["weighted_avg"] == pytest.approx({"precision": 0.25, "recall": 3 / 8, "f1": 25 / 84})
    expected_loss = -np.mean(np.log([0.7, 0.6, 0.3, 0.7, 0.4, 0.1, 0.3, 0.25]))
    assert r["loss"] == pytest.approx(expected_loss)


def test_worst_classified_are_the_mistakes_least_sure_of_the_true_class() -> None:
    worst = report.build_report(LABELS, PROBS, NAMES, FILES)["worst_classified"]
    assert [w["path"] for w in worst] == ["img/5.jpg", "img/7.jpg", "img/2.jpg", "img/6.jpg", "img/4.jpg"]
    assert worst[0] == {"path": "img/5.jpg", "true_class": "c", "predicted_class": "b", "probability": 0.8,
                        "true_class_probability": 0.1}
    assert len(report.worst_classified(FILES, LABELS, report.class_probabilities(PROBS), NAMES, shown=2)) == 2


def test_two_class_sigmoid_outputs() -> None:
    # P(class 1) per image; 0.5 is not above Keras' BinaryAccuracy threshold: class 0.
    r = report.build_report(np.array([0, 1, 1, 0, 1]), np.array([[0.2], [0.9], [0.4], [0.6], [0.5]]),
                            ["cat", "dog"], [f"{i}" for i in range(5)])
    assert r["confusion_matrix"] == [[1, 1], [2, 1]]
    assert r["per_class"]["dog"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3,
                                                   "predicted": 2})
    assert r["per_class"]["cat"]["precision"] == pytest.approx(1 / 3)
    loss = -np.mean(np.log([0.8, 0.9, 0.4, 0.4, 0.5]))
    assert r["loss"] == pytest.approx(loss)
    # Nothing predicted as dog: its precision is undefined.
    never = report.build_report(np.array([0, 1]), np.array([[0.1], [0.3]]), ["cat", "dog"], ["x", "y"])
    assert never["undefined_precision"] == ["dog"] and never["per_class"]["dog"]["precision"] == 0.0


def test_a_class_without_examples_has_undefined_recall() -> None:
    r = report.build_report(np.array([0, 0]), np.array([[0.2, 0.8, 0.0], [0.9, 0.1, 0.0]]), NAMES, ["x", "y"])
    assert r["undefined_recall"] == ["b", "c"] and r["undefined_precision"] == ["c"]
    assert r["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1}


def test_table_and_files(tmp_path: Path) -> None:
    r = report.build_report(LABELS, PROBS, NAMES, FILES)
    table = report.format_table(r)
    assert "accuracy 0.3750" in table and "img/5.jpg  c -> b  0.8000" in table
    assert any(line.split()[:5] == ["a", "0.5000", "0.6667", "0.5714", "3"] for line in table.splitlines())
    assert "precision ['c']" in table
    paths = report.write_report(r, str(tmp_path / "out"))
    assert json.loads(Path(paths[0]).read_text()) == json.loads(json.dumps(r))
    assert Path(paths[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.summary(r)["macro_f1"] == pytest.approx(19 / 63)


def test_top_classes_sigmoid_and_softmax() -> None:
    assert top_classes(np.array([[0.25]]), ["cat", "dog"], 2) == [[("cat", 0.75), ("dog", 0.25)]]
    best = top_classes(PROBS[:2], NAMES, 2)
    assert [[c for c, _ in row] for row in best] == [["a", "b"], ["a", "b"]]
    assert math.isclose(best[0][1][1], 0.2)


def test_examples_without_files_are_named_by_position() -> None:
    from types import SimpleNamespace

    records = SimpleNamespace(paths=None, num_examples=3, name="test")
    assert report.split_names(records, "gs://b/flowers/test") == [f"gs://b/flowers/test[{i}]" for i in range(3)]
    files = SimpleNamespace(paths=["a/1.jpg"], num_examples=1, name="test")
    assert report.split_names(files, "data.test") == ["a/1.jpg"]


def test_a_model_directory_without_metadata_is_a_config_error(tmp_path: Path) -> None:
    from tljob.errors import ConfigError
    from tljob.rundir import read_metadata

    with pytest.raises(ConfigError, match=r"--model .*metadata.json not found. Fix: .*copied into it"):
        read_metadata(str(tmp_path))


def test_predict_arguments_are_checked_before_any_work(tmp_path: Path) -> None:
    from tljob.errors import ConfigError
    from tljob.inference import predict

    (tmp_path / "metadata.json").write_text(json.dumps({"class_names": ["cat", "dog"], "image_size": 32}))
    with pytest.raises(ConfigError, match=r"--top-k 3: the model has 2 classes. Fix: use 1 to 2"):
        list(predict(str(tmp_path), ["x.jpg"], top_k=3))
    with pytest.raises(ConfigError, match=r"--batch-size 0"):
        list(predict(str(tmp_path), ["x.jpg"], batch_size=0))


def test_inputs_expand_folders_and_globs_in_argument_order(tmp_path: Path) -> None:
    from tljob.errors import ConfigError
    from tljob.inference import resolve_inputs

    for rel in ("d/b.jpg", "d/a.png", "d/sub/c.jpg", "d/.hidden.jpg", "e.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    shown = [s for s, _ in resolve_inputs([str(tmp_path / "e.jpg"), str(tmp_path / "d"),
                                           str(tmp_path / "d" / "**" / "*.jpg"), str(tmp_path / "gone.jpg")], "")]
    rel = [str(Path(s).relative_to(tmp_path)) for s in shown]
    assert rel == ["e.jpg", "d/a.png", "d/b.jpg", "d/sub/c.jpg", "d/b.jpg", "d/sub/c.jpg", "gone.jpg"]
    with pytest.raises(ConfigError, match=r"matches no file"):
        resolve_inputs([str(tmp_path / "*.tif")], "")
