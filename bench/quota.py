"""The dry run under a CPU limit against a host with that many cores, run alternately:

    python -m bench.quota [--rounds 5] [--image localhost/tljob:dev] [--cpus 1]

Each round runs `tljob train --config job/dry_run.yaml` once in a podman container started with `--cpus N`
(a pod's CPU limit: a CFS quota, every core of the machine still schedulable) and once on this host pinned to
N cores with `taskset` (what the process would see on an N-core machine). Prints each run's images/s as
metrics.json has it (the mean of the epochs' rates), its steady epochs' rates (the second and third of phase
1) and the wall time, then the medians. The image is `./dev.sh image`'s; the host run uses this checkout's
installed `tljob`. No assertion: the figures go to bench/README.md ("CPU quota").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = ROOT / "job" / "dry_run.yaml"


def figures(out: Path, wall: float) -> dict[str, float]:
    history = json.loads((out / "history.json").read_text())
    return {"images_per_second": json.loads((out / "metrics.json").read_text())["images_per_second"],
            "steady": statistics.median(h["images_per_second"] for h in history[1:3]), "wall_s": round(wall, 1)}


def in_container(image: str, cpus: str, scratch: Path) -> dict[str, float]:
    out = scratch / "container"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # the image's user writes here
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                           str(ROOT / "container" / "containers.conf"))}
    start = time.monotonic()
    subprocess.run(["podman", "run", "--rm", "--cpus", cpus, "--network", "none",
                    "--mount", f"type=bind,source={DRY_RUN},destination=/etc/tljob/job.yaml,ro",
                    "--mount", f"type=bind,source={out},destination=/run-dir", image,
                    "train", "--config", "/etc/tljob/job.yaml", "--output", "/run-dir/run"],
                   check=True, capture_output=True, env=env, timeout=600)
    return figures(out / "run", time.monotonic() - start)


def on_host(cores: int, scratch: Path) -> dict[str, float]:
    out = scratch / "host"
    pinned = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    start = time.monotonic()
    subprocess.run(["taskset", "-c", pinned, str(Path(sys.executable).parent / "tljob"), "train", "--config",
                    str(DRY_RUN), "--output", str(out)], check=True, capture_output=True, timeout=600)
    return figures(out, time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image", default=os.environ.get("TLJOB_IMAGE", "localhost/tljob:dev"))
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"container": [], "host": []}
    for round_ in range(args.rounds):
        for where in runs:
            with tempfile.TemporaryDirectory(prefix="tljob-quota-") as scratch:
                result = (in_container(args.image, str(args.cpus), Path(scratch)) if where == "container"
                          else on_host(args.cpus, Path(scratch)))
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            runs[where].append(result)
            print(json.dumps({"round": round_ + 1, "where": where, **result, "load": load}), flush=True)
    for where, results in runs.items():
        print(json.dumps({"median": where, **{key: statistics.median(r[key] for r in results)
                                              for key in results[0]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
