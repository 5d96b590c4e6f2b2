"""The benchmark: its event arithmetic and acceptance checks (pure), and one real quick-mode run that must
write the JSON, the Markdown table and the PNG chart with every section's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import procs, report, run  # noqa: E402 - after the path set-up above


def ev(event: str, t: float, **fields) -> dict:
    return {"event": event, "t": t, "cpu_s": t * 1.5, "max_rss_mb": 100 + t, **fields}


EVENTS = [
    ev("first_step", 3.0, phase="feature_extraction"),
    ev("phase_begin", 2.0, phase="feature_extraction"),
    ev("epoch_end", 6.0, phase="feature_extraction", epoch=1, metrics={"val_accuracy": 0.8}, step_s=[2.0, 0.5, 0.7]),
    ev("epoch_end", 9.0, phase="feature_extraction", epoch=2, metrics={"val_accuracy": 0.9}, step_s=[0.9, 0.6, 0.5]),
    ev("phase_end", 9.0, phase="feature_extraction"),
    ev("phase_begin", 10.0, phase="fine_tuning"),
    ev("epoch_end", 20.0, phase="fine_tuning", epoch=3, metrics={"val_accuracy": 0.95}, step_s=[3.0, 1.0]),
    ev("phase_end", 20.0, phase="fine_tuning"),
]


def test_phase_and_recipe_summaries_from_events() -> None:
    phase = procs.phase_summary(EVENTS, "feature_extraction", images_per_epoch=70)
    assert phase["seconds"] == 7.0 and phase["epochs"] == 2 and phase["epoch_seconds"] == [4.0, 3.0]
    assert phase["cpu_cores_used"] == 1.5  # CPU seconds over wall seconds between the phase's begin and end
    # Each epoch's first step (iterator start, tracing) is left out of the median.
    assert phase["step_ms_median"] == 550.0
    assert phase["images_per_second"] == 20.0 and phase["val_accuracy"] == 0.9
    recipe = procs.recipe_summary(procs.Run(25.0, EVENTS, ""), 70, ("feature_extraction", "fine_tuning"))
    assert recipe["recipe_seconds"] == 20.0 and recipe["process_seconds"] == 25.0
    assert recipe["first_step_seconds"] == 3.0 and recipe["cpu_cores_used"] == 1.5
    assert recipe["phases"]["fine_tuning"]["val_accuracy"] == 0.95
    with pytest.raises(procs.MeasuredProcessError, match="allreduce"):
        procs.first(EVENTS, "allreduce")


def test_acceptance_checks_follow_the_figures() -> None:
    results = {"recipe_time_ratio": 0.45,
               "val_accuracy": {"tljob": {"fine_tuning": 0.97}, "tutorial": {"fine_tuning": 0.972}},
               "pipeline": {"ratios_to_ceiling": {"tljob_first_epoch": 0.9, "tljob_cached_plain": 3.5,
                                                  "tljob_cached_augmented": 1.1}},
               "multiworker": {"feature_extraction": {"weak_scaling_efficiency": 0.9}}}
    checks = report.acceptance(results)
    assert checks["recipe_time_ratio"]["pass"] is True
    assert checks["val_accuracy_after_phase_2"]["pass"] is False
    assert checks["pipeline_cached_vs_ceiling"]["pass"] is True
    assert checks["pipeline_first_epoch_vs_ceiling"]["pass"] is True
    assert checks["weak_scaling_feature_extraction"]["pass"] is True
    assert checks["weak_scaling_fine_tuning"]["pass"] is None  # not measured
    assert checks["fast_time_ratio"]["pass"] is None and checks["peak_memory"]["pass"] is None


def test_issue_16_checks_fast_config_floor_and_memory() -> None:
    results = {"fast_time_ratio": 0.3,
               "val_accuracy_spread": {"fast": {"median": 0.9775}, "tutorial": {"median": 0.976}},
               "step_over_floor": {"tljob": {"feature_extraction": 1.1, "fine_tuning": 1.2}},
               "peak_memory_mb": {"tljob": 1500, "tutorial_plus_cache_mb": 1545}}
    checks = report.acceptance(results)
    assert checks["fast_time_ratio"]["pass"] is True
    assert checks["fast_val_accuracy_median"]["pass"] is True
    assert checks["step_over_floor_feature_extraction"]["pass"] is True
    assert checks["step_over_floor_fine_tuning"]["pass"] is False
    assert checks["peak_memory"]["pass"] is True
    results["val_accuracy_spread"]["fast"]["median"] = 0.975
    assert report.acceptance(results)["fast_val_accuracy_median"]["pass"] is False


def test_spread_rounds_runs_as_the_median_is_rounded() -> None:
    # Keras reports float32 accuracies (0.9737499952...); a one-seed spread must equal the summary's median.
    assert run.spread([0.53125]) == {"median": 0.5312, "min": 0.5312, "max": 0.5312, "runs": [0.5312]}
    assert run.spread([0.97374999, 0.98, 0.9712]) == {"median": 0.9737, "min": 0.9712, "max": 0.98,
                                                       "runs": [0.9737, 0.98, 0.9712]}
    assert run.spread([0.9, None]) == {"runs": [0.9, None]}


def steps(fe: float, ft: float) -> dict:
    return {"phases": {"feature_extraction": {"step_ms_median": fe}, "fine_tuning": {"step_ms_median": ft}}}


def test_step_over_floor_pairs_each_round_with_its_own_floor() -> None:
    # Round 2 ran on a machine 1.5x slower throughout: against its own floor it is 1.1x, as round 1.
    runs = {"tutorial": [{}, {}], "tljob": [steps(176.0, 330.0), steps(264.0, 495.0)],
            "fast": [steps(3.1, 320.0), steps(3.0, 480.0)]}
    floors = [{"feature_extraction": 160.0, "fine_tuning": 300.0, "predict": 100.0},
              {"feature_extraction": 240.0, "fine_tuning": 450.0, "predict": 140.0}]
    got = run.step_over_floor(runs, floors)
    # A phase on cached features has no image step to compare.
    assert got == {"tljob": {"feature_extraction": 1.1, "fine_tuning": 1.1},
                   "fast": {"feature_extraction": None, "fine_tuning": pytest.approx(1.067, abs=1e-3)}}
    assert run.floor_summary(floors) == {"feature_extraction": 200.0, "fine_tuning": 375.0, "predict": 120.0}


@pytest.mark.multiworker
@pytest.mark.timeout(600)
def test_quick_mode_writes_json_table_and_chart(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--mode", "quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [json_path] = tmp_path.glob("*-quick.json")
    results = json.loads(json_path.read_text())
    assert isinstance(results["recipe_time_ratio"], float) and results["recipe_time_ratio"] > 0
    assert isinstance(results["fast_time_ratio"], float) and results["fast_time_ratio"] > 0
    for who in ("tutorial", "tljob", "fast"):
        assert set(results["val_accuracy"][who]) == {"feature_extraction", "fine_tuning"}
        assert all(0.0 <= v <= 1.0 for v in results["val_accuracy"][who].values())
        assert results["recipe"]["median"][who]["first_step_seconds"] > 0
    assert [r["seed"] for r in results["recipe"]["runs"]["tljob"]] == [1]  # round i runs with seed i + 1
    assert results["val_accuracy_spread"]["fast"]["runs"] == [results["val_accuracy"]["fast"]["fine_tuning"]]
    # The floor: the bare model's steps, and tljob's over them (the fast config's phase 1 steps on features).
    assert results["floor_step_ms"]["feature_extraction"] > 0 and results["floor_step_ms"]["fine_tuning"] > 0
    assert results["step_over_floor"]["tljob"]["fine_tuning"] > 0 and len(results["recipe"]["floors"]) == 1
    memory = results["peak_memory_mb"]
    assert memory["tljob"] > 0 and memory["tutorial_plus_cache_mb"] > memory["tutorial"]
    pipeline = results["pipeline"]
    assert set(pipeline["ratios_to_ceiling"]) == {"tutorial", "tljob_first_epoch", "tljob_cached_plain",
                                                  "tljob_cached_augmented"}
    assert all(v > 0 for v in pipeline["ratios_to_ceiling"].values())
    mw = results["multiworker"]["feature_extraction"]
    assert mw["weak_scaling_efficiency"] > 0 and mw["allreduce_ms"] > 0 and mw["gradient_parameters"] > 0
    # One round in quick mode (--repeats 1): the median is that round's efficiency.
    assert len(results["multiworker"]["rounds"]) == 1 and mw["efficiency_per_round"] == [mw["weak_scaling_efficiency"]]
    costs = results["job_costs"]
    assert 0 < costs["backup"]["feature_extraction"]["share"] < 1
    assert costs["publish"]["files"] > 0 and costs["publish"]["median_seconds"] > 0
    assert set(results["acceptance"]) >= {"recipe_time_ratio", "val_accuracy_after_phase_2",
                                          "pipeline_cached_vs_ceiling", "weak_scaling_feature_extraction",
                                          "fast_time_ratio", "fast_val_accuracy_median", "peak_memory",
                                          "step_over_floor_fine_tuning"}
    table = json_path.with_suffix(".md").read_text()
    assert "recipe_time_ratio" in table and "## Input pipeline" in table and "## Multi-worker" in table
    assert "fast_time_ratio" in table and "bare model step" in table and "## Peak memory" in table
    assert json_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recipe_time_ratio=" in proc.stdout
