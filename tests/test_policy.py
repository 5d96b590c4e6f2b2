"""The pure training policy (tljob.policy): the global batch check, learning-rate scaling, epochs, ETA, history
trimming. No TensorFlow: the module must not import it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tljob.config import load_config
from tljob.errors import ConfigError
from tljob.policy import (
    check_global_batch,
    eta_seconds,
    learning_rate,
    phase_epochs,
    schedule_steps,
    trim_history,
)

DRY_RUN = str(Path(__file__).parent.parent / "job" / "dry_run.yaml")


def test_learning_rate_scaling() -> None:
    assert learning_rate(1e-4, "none", 128, 32) == 1e-4
    assert learning_rate(1e-4, "linear", 128, 32) == pytest.approx(4e-4)
    assert learning_rate(1e-4, "sqrt", 128, 32) == pytest.approx(2e-4)
    assert math.isclose(learning_rate(1e-4, "linear", 16, 32), 5e-5)


def test_schedule_steps() -> None:
    assert schedule_steps(5, 63, 0.5) == (32, 283)  # half an epoch rounds to 32 of 63 steps
    assert schedule_steps(5, 63, 0) == (0, 315)
    assert schedule_steps(2, 10, 2) == (20, 0)  # all warm-up


@pytest.mark.parametrize(("override", "key"), [("train.lr_scaling=cubic", "train.lr_scaling"),
                                               ("train.reference_batch_size=0", "train.reference_batch_size"),
                                               ("data.batch_size=0", "data.batch_size")])
def test_the_policy_inputs_are_validated_by_the_config(override: str, key: str) -> None:
    """The policy trusts its inputs: the config refuses bad ones, naming the key and the fix."""
    with pytest.raises(ConfigError, match=f"{key}: invalid value .* Fix: "):
        load_config(DRY_RUN, [override], environ={})


def test_global_batch_larger_than_the_training_set() -> None:
    check_global_batch(160, 80, 2)
    with pytest.raises(ConfigError, match=r"\(81 x 2 replicas = 162\) is larger than the 160 .* at most 80,"):
        check_global_batch(160, 81, 2)
    with pytest.raises(ConfigError, match="2 replicas need at least 2 images"):
        check_global_batch(1, 1, 2)


def test_fine_tuning_continues_the_epoch_count() -> None:
    cfg = load_config(DRY_RUN, ["train.feature_extraction.epochs=3", "train.fine_tuning.epochs=2"], environ={})
    assert phase_epochs(cfg) == {"feature_extraction": (0, 3), "fine_tuning": (3, 5)}


def test_trim_history_drops_the_epochs_that_run_again() -> None:
    history = [{"epoch": e} for e in (1, 2, 3)]
    assert trim_history(history, 2) == [{"epoch": 1}, {"epoch": 2}]  # epoch index 2 is the third epoch
    assert trim_history(history, 0) == []


def test_eta_is_the_mean_of_the_last_three_epochs_times_those_left() -> None:
    assert eta_seconds([], 5) == 0.0
    history = [{"epoch": 1, "seconds": 100.0}] + [{"epoch": e, "seconds": 10.0} for e in (2, 3, 4)]
    assert eta_seconds(history, 6) == pytest.approx(20.0)
    assert eta_seconds(history, 4) == 0.0
    # Before any epoch has a record (the progress bar in the first epoch): the epoch's estimate, given.
    assert eta_seconds([], 5, epoch_s=3.0) == 15.0 and eta_seconds(history, 6, epoch_s=3.0) == pytest.approx(20.0)


def test_policy_does_not_import_tensorflow() -> None:
    code = "import sys, tljob.policy; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
