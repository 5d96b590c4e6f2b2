"""What each speed lever buys: the real recipe, shortened, with one setting changed at a time.

    python -m bench.levers [--epochs 2] [--repeats 1] [--variants a,b] [--src DIR=NAME ...]

Needs TLJOB_CATS_DOGS_DIR and TLJOB_WEIGHTS. Each variant is `tljob train` (through bench/tljob_probe.py)
on the real photos and weights with `--epochs` epochs per phase; the variants run interleaved, `--repeats`
rounds, and the table shows per-phase medians. `--src DIR=NAME` adds variants that run the default
settings on another source tree (e.g. a copy with an earlier data.py) through PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

from bench import procs

log = logging.getLogger("bench.levers")

PHASES = ("feature_extraction", "fine_tuning")
TRAIN_IMAGES = 2000

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "no_cached_validation": ["train.cached_validation=false"],
    "steps_per_execution_9": ["train.steps_per_execution=9"],
    # What the input pipeline's flip + rotation take from the training step on the same cores.
    "no_augmentation": ["train.feature_extraction.augment=false", "train.fine_tuning.augment=false"],
}


def recipe_args(data: str, weights: str, out: Path, epochs: int, overrides: list[str]) -> list[str]:
    sets = [f"data.source=folder", f"data.train={data}/train", f"data.validation={data}/validation",
            "data.test=null", f"model.weights={weights}", f"train.feature_extraction.epochs={epochs}",
            f"train.fine_tuning.epochs={epochs}", *overrides]
    return ["-m", "bench.tljob_probe", "train", "--config", str(procs.ROOT / "job" / "cats_vs_dogs.yaml"),
            "--output", str(out), *[a for s in sets for a in ("--set", s)]]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--src", action="append", default=[], metavar="DIR=NAME")
    args = parser.parse_args()
    data, weights = os.environ.get("TLJOB_CATS_DOGS_DIR"), os.environ.get("TLJOB_WEIGHTS")
    if not (data and weights):
        raise SystemExit("set TLJOB_CATS_DOGS_DIR and TLJOB_WEIGHTS (the real photos and weights)")
    plan = [(name, VARIANTS[name], {}) for name in args.variants.split(",") if name]
    for item in args.src:
        src, _, name = item.partition("=")
        plan.append((name, [], {"PYTHONPATH": src}))
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    for repeat in range(args.repeats):
        for name, overrides, env in plan:
            with tempfile.TemporaryDirectory(prefix="tljob-lever-") as tmp:
                result = procs.run(recipe_args(data, weights, Path(tmp) / "run", args.epochs, overrides),
                                   timeout_s=1800, what=f"{name} #{repeat + 1}", env=env)
            summary = procs.recipe_summary(result, TRAIN_IMAGES, PHASES)
            summary["load"] = procs.load()
            rows[name].append(summary)
            log.info("%s: %s", name, json.dumps(summary))
    print("| variant | recipe s | phase 1 s | phase 2 s | step ms p1 / p2 | cores | val acc p1 / p2 |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        def med(get):
            return round(statistics.median(get(r) for r in runs), 2)
        p = [lambda r, ph=ph: r["phases"][ph] for ph in PHASES]
        print(f"| {name} | {med(lambda r: r['recipe_seconds'])} | {med(lambda r: p[0](r)['seconds'])} | "
              f"{med(lambda r: p[1](r)['seconds'])} | {med(lambda r: p[0](r)['step_ms_median'])} / "
              f"{med(lambda r: p[1](r)['step_ms_median'])} | {med(lambda r: r['cpu_cores_used'])} | "
              f"{med(lambda r: p[0](r)['val_accuracy'])} / {med(lambda r: p[1](r)['val_accuracy'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
