"""Slow: the tutorial recipe on the real photos and ImageNet weights, one epoch per phase.

Skipped unless TLJOB_CATS_DOGS_DIR names a cats_and_dogs_filtered-style folder (train/, validation/)
and TLJOB_WEIGHTS a Keras MobileNetV2 no-top .h5 file (./dev.sh test sets both when ../shared has them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("TLJOB_CATS_DOGS_DIR")
WEIGHTS = os.environ.get("TLJOB_WEIGHTS")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA and WEIGHTS), reason="TLJOB_CATS_DOGS_DIR and TLJOB_WEIGHTS not set"),
]


def test_recipe_on_real_photos_reaches_093(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tljob.cli", "train", "--config", str(ROOT / "job" / "cats_vs_dogs.yaml"),
         "--output", str(out),
         "--set", "data.source=folder", "--set", f"data.train={DATA}/train",
         "--set", f"data.validation={DATA}/validation", "--set", "data.test=null",
         "--set", f"model.weights={WEIGHTS}",
         "--set", "train.feature_extraction.epochs=1", "--set", "train.fine_tuning.epochs=1"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["phase"] for h in history] == ["feature_extraction", "fine_tuning"]
    assert history[-1]["val_accuracy"] >= 0.93, history
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bad_files"] == 0 and metrics["total_files"] == 2800
