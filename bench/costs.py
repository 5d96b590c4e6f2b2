"""Publishing a finished run to a real GCS emulator, timed (started by bench/run.py):

    python -m bench.costs publish --run RUN_DIR --repeats N

Starts gcp-storage-emulator (tests/fixtures_gcs.py's GcsEmulator), then publishes the run as the trainer does (`rundir.RunFiles.publish`)
directory to a fresh prefix N times: upload of every file, listing with checksums, `_SUCCESS` last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench import events
from bench.procs import ROOT


def publish(run: Path, repeats: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_gcs import GcsEmulator, create_bucket

    from tljob import rundir

    files = [p for p in run.rglob("*") if p.is_file() and p.name != "_SUCCESS"]
    emulator = GcsEmulator().start()
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        bucket = create_bucket(emulator.url)
        seconds = []
        for i in range(repeats):
            start = time.perf_counter()
            rundir.RunFiles(run, f"{bucket}/run-{i}").publish()
            seconds.append(time.perf_counter() - start)
    finally:
        emulator.stop()
    return {"files": len(files), "megabytes": round(sum(p.stat().st_size for p in files) / 2**20, 2),
            "seconds": [round(s, 3) for s in seconds], "median_seconds": round(statistics.median(seconds), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("publish",))
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    events.emit("result", result=publish(args.run, args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
