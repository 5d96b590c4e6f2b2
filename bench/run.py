"""tljob against the tutorial's own code, side by side in one run: `python -m bench.run --mode quick|full`.

Sections (bench/README.md says what each measures and why):
  1. input pipeline, images/s with no model: tljob (first epoch, cached epochs) vs the tutorial's
     image_dataset_from_directory(...).prefetch vs the decode ceiling;
  2. the full recipe end to end: bench/tutorial_baseline.py, tljob (job/cats_vs_dogs.yaml) and tljob's fast
     config (job/cats_vs_dogs_fast.yaml), alternated, `--repeats` rounds; and the floor: the bare model's
     step time (bench/precision.py) in each phase, measured in each round, which tljob's median step is
     compared with;
  3. multi-worker: 2 workers pinned one core each vs 1 worker pinned to one core (weak scaling), and the
     all-reduce time of each phase's gradients, alternated, `--repeats` rounds;
  4. job costs: time to the first training step, backup share of an epoch, publishing to a GCS emulator.
Writes bench/results/<date>.json (full; <date>-quick.json in quick mode), a Markdown table and a PNG chart.
quick: generated JPEGs, a small random-weight MobileNetV2, a few steps (a smoke test of every path, in the
default test suite). full: TLJOB_CATS_DOGS_DIR and TLJOB_WEIGHTS, the tutorial's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import procs, report

log = logging.getLogger("bench.run")

PHASES = ("feature_extraction", "fine_tuning")


@dataclasses.dataclass(frozen=True)
class Mode:
    """Everything that differs between quick and full mode."""

    name: str
    image_size: int
    alpha: float
    epochs: int  # per phase, in the recipe
    pipeline_epochs: int
    mw_steps: int  # training steps per phase in the multi-worker runs
    mw_phases: tuple[str, ...]  # phases the multi-worker runs train
    allreduce_repeats: int
    publish_repeats: int
    timeout_s: float

    def tljob_sets(self, data: Path, weights: str, *, epochs: bool = True) -> list[str]:
        """`epochs`: the mode's epoch counts (the recipe's in full mode); False keeps the config's own, as the
        fast config's runs in full mode do."""
        sets = [f"data.source=folder", f"data.train={data}/train", f"data.validation={data}/validation",
                "data.test=null", f"data.image_size={self.image_size}", f"model.weights={weights}",
                f"model.alpha={self.alpha}"]
        return sets + ([f"train.feature_extraction.epochs={self.epochs}", f"train.fine_tuning.epochs={self.epochs}"]
                       if epochs else [])


# Quick mode keeps the default test suite short: one phase in the multi-worker runs (3 processes).
QUICK = Mode("quick", image_size=32, alpha=0.35, epochs=1, pipeline_epochs=2, mw_steps=5,
             mw_phases=("feature_extraction",), allreduce_repeats=5, publish_repeats=1, timeout_s=150)
FULL = Mode("full", image_size=160, alpha=1.0, epochs=10, pipeline_epochs=4, mw_steps=25, mw_phases=PHASES,
            allreduce_repeats=30, publish_repeats=3, timeout_s=1800)


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


# The job configs the recipe section runs: the tutorial's recipe, and the fast one (issue 16).
CONFIGS = {"tljob": "cats_vs_dogs.yaml", "fast": "cats_vs_dogs_fast.yaml"}


def _tljob(out: Path, sets: list[str], config: str = CONFIGS["tljob"]) -> list[str]:
    return ["-m", "bench.tljob_probe", "train", "--config", str(procs.ROOT / "job" / config),
            "--output", str(out), *_sets(sets)]


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


# ----------------------------------------------------------------------------- sections


def pipeline_section(mode: Mode, data: Path) -> dict[str, Any]:
    keras3 = {"TF_USE_LEGACY_KERAS": "0"}
    out = {}
    for variant in ("ceiling", "tutorial", "tljob"):
        result = procs.run(["-m", "bench.pipeline", variant, "--data", str(data), "--image-size", str(mode.image_size),
                            "--epochs", str(mode.pipeline_epochs)], timeout_s=mode.timeout_s,
                           what=f"pipeline {variant}", env=keras3 if variant == "tutorial" else None)
        out[variant] = procs.first(result.events, "result")["result"]
    ceiling = out["ceiling"]["median"]
    tl = out["tljob"]
    out["ratios_to_ceiling"] = {
        "tutorial": round(out["tutorial"]["median"] / ceiling, 2),
        "tljob_first_epoch": round(tl["first_epoch"]["median"] / ceiling, 2),
        "tljob_cached_plain": round(tl["cached_plain"]["median"] / ceiling, 2),
        "tljob_cached_augmented": round(tl["cached_augmented"]["median"] / ceiling, 2),
    }
    return out


def recipe_section(mode: Mode, data: Path, weights: str, repeats: int, keep: Path,
                   who: tuple[str, ...], first_seed: int = 1, with_floor: bool = False) -> dict[str, Any]:
    """Runs the tutorial's code and each tljob config in `who` ("tljob", "fast") in turn, `repeats` rounds; `keep`
    receives the last tljob run directory (for publishing). `with_floor`: the bare model's step (floor_section)
    too, in each round just before tljob's runs: this machine's speed drifts by tens of percent within minutes,
    so a step compares only with a floor measured beside it (bench/README.md, "The limit").

    Each tljob run has its own seed (round i: seed first_seed + i), as each run of the tutorial's code draws its
    own: with one fixed seed, tljob's runs would differ only by thread timing, and its accuracy would be one
    draw against the tutorial's several (over seeds, tljob's accuracy after phase 2 ranged 0.9675-0.980). Seeds
    other than those a config was tuned with check that it was not tuned to them."""
    n_train = count_images(data / "train")
    baseline = ["bench/tutorial_baseline.py", "--data", str(data), "--weights", weights,
                "--image-size", str(mode.image_size), "--alpha", str(mode.alpha),
                "--initial-epochs", str(mode.epochs), "--fine-tune-epochs", str(mode.epochs)]
    runs: dict[str, list[dict[str, Any]]] = {"tutorial": [], **{w: [] for w in who}}
    backups: list[dict[str, Any]] = []
    floors: list[dict[str, float]] = []
    for i in range(repeats):
        result = procs.run(baseline, timeout_s=mode.timeout_s, what=f"tutorial recipe #{i + 1}",
                           env={"TF_USE_LEGACY_KERAS": "0"})
        runs["tutorial"].append({**procs.recipe_summary(result, n_train, PHASES), "load": procs.load()})
        if with_floor:
            floors.append(floor_section(mode, weights))
        for w in who:
            with tempfile.TemporaryDirectory(prefix="bench-tljob-") as tmp:
                run_dir = Path(tmp) / "run"
                # Quick mode shortens both configs alike; in full mode the fast config keeps its own epochs.
                sets = mode.tljob_sets(data, weights, epochs=w == "tljob" or mode is QUICK)
                result = procs.run(_tljob(run_dir, [*sets, f"seed={first_seed + i}"], CONFIGS[w]),
                                   timeout_s=mode.timeout_s, what=f"{w} recipe #{i + 1}")
                if w == who[0] and i == repeats - 1:
                    run_dir.rename(keep)
            runs[w].append({**procs.recipe_summary(result, n_train, PHASES), "seed": first_seed + i,
                            "load": procs.load()})
            if w == "tljob":
                backups.append(backup_share(result.events))
    out: dict[str, Any] = {"train_images": n_train, "runs": runs, "floors": floors,
                           "median": {w: median_summary(rs) for w, rs in runs.items()}, "backups": backups,
                           "val_accuracy_spread": {w: spread([r["phases"]["fine_tuning"]["val_accuracy"] for r in rs])
                                                   for w, rs in runs.items()}}
    for w, key in (("tljob", "recipe_time_ratio"), ("fast", "fast_time_ratio")):
        if w in who:
            ratios = [t["recipe_seconds"] / b["recipe_seconds"] for t, b in zip(runs[w], runs["tutorial"])]
            out[f"{key}_per_round"] = [round(r, 3) for r in ratios]
            out[key] = round(statistics.median(ratios), 3)
    return out


def spread(values: list[float | None]) -> dict[str, Any]:
    """Median, range and every value: accuracy over seeds, not one lucky draw. Rounded as median_summary rounds,
    so a one-seed run's spread and its median agree."""
    if not values or any(v is None for v in values):
        return {"runs": values}
    runs = [round(v, 4) for v in values]
    return {"median": round(statistics.median(values), 4), "min": min(runs), "max": max(runs), "runs": runs}


def floor_section(mode: Mode, weights: str) -> dict[str, Any]:
    """The bare model's training step in each phase (bench/precision.py, float32, the recipe's weights, one batch
    repeated from memory: no input pipeline, no augmentation, no callbacks of tljob's): the limit of this
    computation on this machine."""
    result = procs.run(["-m", "bench.precision", "--child", "float32", "--image-size", str(mode.image_size),
                        "--alpha", str(mode.alpha), *(["--weights", weights] if weights != "none" else [])],
                       timeout_s=mode.timeout_s, what="bare model step (floor)")
    measured = procs.first(result.events, "result")["result"]
    return {"feature_extraction": measured["frozen_train_ms"], "fine_tuning": measured["fine_tune_train_ms"],
            "predict": measured["predict_ms"]}


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of every figure report.py shows."""
    def med(get: Any) -> Any:
        values = [get(r) for r in runs]
        return None if any(v is None for v in values) else round(statistics.median(values), 4)

    out: dict[str, Any] = {k: med(lambda r, k=k: r[k]) for k in
                           ("recipe_seconds", "process_seconds", "first_step_seconds", "cpu_cores_used",
                            "peak_memory_mb")}
    out["phases"] = {p: {k: med(lambda r, p=p, k=k: r["phases"][p][k]) for k in
                         ("seconds", "step_ms_median", "images_per_second", "cpu_cores_used", "val_accuracy",
                          "val_loss")}
                     for p in PHASES}
    return out


def backup_share(evts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: median backup seconds and their share of the median epoch (epoch ends are taken after
    the backup, so an epoch's time includes its backup)."""
    out = {}
    for phase in PHASES:
        saves = [e["seconds"] for e in evts if e["event"] == "backup" and e["phase"] == phase]
        epochs = procs.phase_summary(evts, phase, 0)["epoch_seconds"]
        if saves and epochs:
            out[phase] = {"backup_seconds": round(statistics.median(saves), 3),
                          "epoch_seconds": round(statistics.median(epochs), 2),
                          "share": round(statistics.median(saves) / statistics.median(epochs), 4)}
    return out


def multiworker_section(mode: Mode, data: Path, weights: str, work: Path, repeats: int) -> dict[str, Any]:
    """`repeats` rounds, each a 1-worker run then a 2-worker run: the machine's speed drifts by tens of
    percent within minutes here, so each round's efficiency compares runs made back to back."""
    if len(os.sched_getaffinity(0)) < 2:
        return {"skipped": "fewer than 2 cores available"}
    sets = [*mode.tljob_sets(data, weights), f"train.steps_per_epoch={mode.mw_steps}", "data.validation=null",
            *(f"train.{p}.epochs={int(p in mode.mw_phases)}" for p in PHASES)]
    rounds: list[dict[str, Any]] = []
    for r in range(repeats):
        one = procs.run(_tljob(work / f"one-{r}", sets), timeout_s=mode.timeout_s, what="1 worker on core 0",
                        cores=[0])
        ports = procs.free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        started = []
        for i in range(2):
            env = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   "BENCH_ALLREDUCE_REPEATS": str(mode.allreduce_repeats)}
            started.append(procs.start(_tljob(work / f"two-{r}-{i}", sets), env=env, cores=[i]))
        two = [procs.finish(s, mode.timeout_s, f"worker {i} of 2") for i, s in enumerate(started)]
        row = {}
        for phase in mode.mw_phases:
            single = procs.phase_summary(one.events, phase, 0)["step_ms_median"]
            double = procs.phase_summary(two[0].events, phase, 0)["step_ms_median"]
            allreduce = procs.first(two[0].events, "allreduce", phase)
            # Same per-replica batch: perfect weak scaling keeps the step time.
            row[phase] = {"step_ms_1_worker": single, "step_ms_2_workers": double,
                          "efficiency": round(single / double, 3), "allreduce_ms": round(allreduce["ms"], 2),
                          "gradient_parameters": allreduce["parameters"]}
        log.info("multi-worker round %d: %s", r + 1, json.dumps(row))
        rounds.append(row)
    out: dict[str, Any] = {"per_replica_batch": 32, "steps_per_phase": mode.mw_steps, "rounds": rounds}
    for phase in mode.mw_phases:
        def med(key: str, phase: str = phase) -> float:
            return statistics.median(row[phase][key] for row in rounds)
        single, double = med("step_ms_1_worker"), med("step_ms_2_workers")
        out[phase] = {
            "step_ms_1_worker": single, "step_ms_2_workers": double,
            "images_per_second_1_worker": round(32 / single * 1000, 1),
            "images_per_second_2_workers": round(64 / double * 1000, 1),
            "weak_scaling_efficiency": round(med("efficiency"), 3),
            "efficiency_per_round": [row[phase]["efficiency"] for row in rounds],
            "allreduce_ms": round(med("allreduce_ms"), 2),
            "gradient_parameters": rounds[0][phase]["gradient_parameters"],
        }
    return out


def publish_section(mode: Mode, run_dir: Path) -> dict[str, Any]:
    result = procs.run(["-m", "bench.costs", "publish", "--run", str(run_dir), "--repeats", str(mode.publish_repeats)],
                       timeout_s=mode.timeout_s, what="publish to the GCS emulator")
    return procs.first(result.events, "result")["result"]


def step_over_floor(runs: dict[str, list[dict[str, Any]]], floors: list[dict[str, float]]) -> dict[str, Any]:
    """Per phase: each tljob config's median training step over the bare model's step measured in the same round
    (1.0: no overhead at all), the median over the rounds. A phase trained on cached features has no image step to
    compare (its step is the head's alone): None."""
    out: dict[str, Any] = {}
    for w in (w for w in runs if w != "tutorial"):
        out[w] = {}
        for phase in PHASES:
            pairs = [(r["phases"][phase]["step_ms_median"], f[phase]) for r, f in zip(runs[w], floors)]
            image_steps = pairs and all(step and step > 0.2 * floor for step, floor in pairs)
            out[w][phase] = round(statistics.median(s / f for s, f in pairs), 3) if image_steps else None
    return out


def floor_summary(floors: list[dict[str, float]]) -> dict[str, float]:
    """The floor's median per phase over the rounds."""
    return {key: round(statistics.median(f[key] for f in floors), 1) for key in floors[0]}


def peak_memory(results: dict[str, Any], data: Path, mode: Mode) -> dict[str, Any] | None:
    """Peak RSS up to the end of the recipe: each job's, and the tutorial's plus tljob's decoded-image cache (the
    train and validation images at the recipe's size, uint8), which is what tljob holds that the tutorial does not."""
    if "recipe" not in results:
        return None
    images = count_images(data / "train") + count_images(data / "validation")
    cache_mb = round(images * mode.image_size ** 2 * 3 / 2**20, 1)
    med = results["recipe"]["median"]
    return {"decoded_cache_mb": cache_mb, **{w: med[w]["peak_memory_mb"] for w in med},
            "tutorial_plus_cache_mb": round(med["tutorial"]["peak_memory_mb"] + cache_mb, 1)}


# ----------------------------------------------------------------------------- inputs


def quick_inputs(work: Path) -> tuple[Path, str]:
    """Generated JPEG folders shaped like cats_and_dogs_filtered, and random weights."""
    sys.path.insert(0, str(procs.ROOT / "tests"))
    from imagegen import make_image_folder

    data = work / "data"
    make_image_folder(data / "train", {"cats": 48, "dogs": 48}, size=64, seed=0)
    make_image_folder(data / "validation", {"cats": 16, "dogs": 16}, size=64, seed=1)
    return data, "none"


def full_inputs() -> tuple[Path, str]:
    data, weights = os.environ.get("TLJOB_CATS_DOGS_DIR"), os.environ.get("TLJOB_WEIGHTS")
    if not (data and weights and Path(data, "train").is_dir() and Path(weights).is_file()):
        raise SystemExit(f"full mode needs the real photos and weights: TLJOB_CATS_DOGS_DIR={data!r} (a folder with "
                         f"train/ and validation/) and TLJOB_WEIGHTS={weights!r} (the MobileNetV2 no-top .h5). "
                         f"Fix: set both, or run --mode quick.")
    return Path(data), weights


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    parser.add_argument("--repeats", type=int, default=None,
                        help="tutorial/tljob recipe pairs and multi-worker rounds (default: 1 quick, 3 full)")
    parser.add_argument("--out", type=Path, default=procs.ROOT / "bench" / "results")
    parser.add_argument("--sections", default="pipeline,recipe,floor,multiworker,costs",
                        help="comma-separated subset, for re-measuring one part")
    parser.add_argument("--first-seed", type=int, default=1,
                        help="tljob's seed in the first round (the next rounds count up from it)")
    parser.add_argument("--configs", default="tljob,fast",
                        help="the tljob configs the recipe section runs beside the tutorial's code: tljob "
                             "(job/cats_vs_dogs.yaml), fast (job/cats_vs_dogs_fast.yaml); the first also gives the "
                             "job costs")
    args = parser.parse_args(argv)
    mode = QUICK if args.mode == "quick" else FULL
    repeats = args.repeats or (1 if mode is QUICK else 3)
    sections = set(args.sections.split(","))
    started = dt.datetime.now()
    results: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "mode": mode.name,
                               "machine": report.machine(), "load_before": procs.load(),
                               "settings": dataclasses.asdict(mode) | {"repeats": repeats, "first_seed": args.first_seed,
                                                                       "configs": args.configs},
                               # A PYTHONPATH here means tljob was measured from another source tree.
                               "pythonpath": os.environ.get("PYTHONPATH")}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        data, weights = quick_inputs(work) if mode is QUICK else full_inputs()
        if "pipeline" in sections:
            results["pipeline"] = pipeline_section(mode, data)
        if "recipe" in sections or "costs" in sections:
            who = tuple(w for w in args.configs.split(",") if w)
            recipe = recipe_section(mode, data, weights, repeats, keep=work / "last-tljob-run", who=who,
                                    first_seed=args.first_seed, with_floor="floor" in sections)
            for key in ("recipe_time_ratio", "fast_time_ratio"):
                if key in recipe:
                    results[key] = recipe[key]
            results["val_accuracy"] = {w: {p: recipe["median"][w]["phases"][p]["val_accuracy"] for p in PHASES}
                                       for w in recipe["median"]}
            results["val_accuracy_spread"] = recipe["val_accuracy_spread"]
            results["recipe"] = recipe
        if "floor" in sections:
            floors = results["recipe"]["floors"] if "recipe" in results else [floor_section(mode, weights)]
            results["floor_step_ms"] = floor_summary(floors)
            if "recipe" in results:
                results["step_over_floor"] = step_over_floor(results["recipe"]["runs"], floors)
        results["peak_memory_mb"] = peak_memory(results, data, mode)
        if "multiworker" in sections:
            results["multiworker"] = multiworker_section(mode, data, weights, work / "mw", repeats)
        if "costs" in sections:
            results["job_costs"] = {
                "first_step_seconds": {w: results["recipe"]["median"][w]["first_step_seconds"]
                                       for w in results["recipe"]["median"]},
                "backup": results["recipe"]["backups"][-1] if results["recipe"]["backups"] else None,
                "publish": publish_section(mode, work / "last-tljob-run"),
            }
    results["load_after"] = procs.load()
    results["wall_seconds"] = round((dt.datetime.now() - started).total_seconds(), 1)
    results["acceptance"] = report.acceptance(results)
    stem = started.date().isoformat() + ("" if mode is FULL else "-quick")
    paths = report.write(results, args.out, stem)
    for line in report.summary_lines(results):
        print(line)  # noqa: T201 - the benchmark's answer on stdout
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
