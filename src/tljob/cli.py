"""The `tljob` command: parse, validate, log, call one function per subcommand, map errors to exit codes.

Modules that import TensorFlow are imported inside the subcommand functions, so that `--help`, config
errors and `tljob manifests` answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Sequence

from tljob import __version__, console
from tljob.errors import EXIT_INTERNAL, EXIT_OK, ConfigError, TljobError

log = logging.getLogger("tljob")


def cmd_train(args: argparse.Namespace) -> int:
    from tljob import storage  # no TensorFlow in these: config errors come back fast
    from tljob.config import digest, load_config, to_yaml
    from tljob.rundir import PARAMS, RunLayout, vertex_run  # Vertex AI's AIP_* folders when no --output is given

    # Through storage: users keep job configs in buckets (--config gs://bucket/job.yaml).
    cfg = load_config(args.config, args.set, read=storage.read_text)
    layout = RunLayout()
    vertex = None if args.output else vertex_run(os.environ)
    if args.output:
        cfg = dataclasses.replace(cfg, output=args.output)
    elif vertex is not None:
        if cfg.output:
            log.info("output %s of the config replaced by Vertex AI's %s (AIP_MODEL_DIR)", cfg.output, vertex.output)
        cfg, layout = dataclasses.replace(cfg, output=vertex.output), vertex.layout
    if not cfg.output:
        raise ConfigError("output: not set. Fix: pass --output DIR (or gs://bucket/prefix) or set `output:` in the YAML.")
    # In full only with -v: it is 60 lines, and params.yaml in the run holds it.
    log.info("final config: %s, digest %s (saved as %s; -v logs it)", cfg.name, digest(cfg), PARAMS)
    log.debug("final config:\n%s", to_yaml(cfg))
    console.import_tensorflow()
    from tljob.train import run

    return run(cfg, layout)


def cmd_convert(args: argparse.Namespace) -> int:
    console.import_tensorflow()
    from tljob.data import convert_folder

    report = convert_folder(args.input, args.output, shards=args.shards, image_size=args.image_size)
    print(json.dumps(report))  # noqa: T201 - the command's result goes to stdout for scripts
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    console.import_tensorflow()
    from tljob.inference import predict

    for row in predict(args.model, args.images, batch_size=args.batch_size, top_k=args.top_k):
        print(json.dumps(row), flush=True)  # noqa: T201 - one JSON line per image is the interface
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    console.import_tensorflow()
    from tljob import report
    from tljob.inference import evaluate

    result = evaluate(args.model, args.data, source=args.source, batch_size=args.batch_size)
    if args.output:
        report.write_report(result, args.output)
    # The report is the command's output: a table to read, or one JSON document for scripts.
    print(json.dumps(result) if args.json else report.format_table(result))  # noqa: T201
    return EXIT_OK


def cmd_manifests(args: argparse.Namespace) -> int:
    from tljob.manifests import render_to_dir

    written = render_to_dir(
        args.out_dir,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        image=args.image,
        output=args.output,
        namespace=args.namespace,
        config_path=args.config,
        queue=args.queue,
        priority_class=args.priority_class,
        gcp_service_account=args.gcp_service_account,
        gcsfuse_bucket=args.gcsfuse_bucket,
    )
    log.info("wrote %d manifest files to %s", len(written), args.out_dir)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from tljob.status import show_status

    return show_status(args.run, k8s_job=args.k8s, namespace=args.namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tljob", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tljob {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and TensorFlow's own log lines")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run (or resume) the two-phase training job")
    p.add_argument("--config", required=True, help="job YAML, e.g. job/dry_run.yaml or gs://bucket/job.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--output", help="run directory: local path, file:// or gs://bucket/prefix")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="write sharded TFRecords from an image folder")
    p.add_argument("--input", required=True, help="folder with one sub-folder per class (local or gs://)")
    p.add_argument("--output", required=True, help="directory for the shards (local or gs://)")
    p.add_argument("--shards", type=int, default=8, help="number of TFRecord shards (>= number of workers)")
    p.add_argument("--image-size", type=int, default=None, help="resize to this square size before encoding")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("predict", help="classify images with an exported model; one JSON line each")
    p.add_argument("--model", required=True, help="a model/ directory, in its run or copied anywhere (local or gs://)")
    p.add_argument("images", nargs="+", help="image files, folders, globs ('shots/*.jpg'), gs:// objects or prefixes")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--top-k", type=int, default=1, help="also list the k most probable classes of each image")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics of an exported model on labelled data")
    p.add_argument("--model", required=True, help="a model/ directory, in its run or copied anywhere (local or gs://)")
    p.add_argument("--data", required=True, help="image folder (one sub-folder per class) or TFRecord dir")
    p.add_argument("--source", choices=("folder", "tfrecord"), default="folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="also write the report here (local or gs://), as JSON and a "
                   "confusion-matrix PNG (the files a training run writes)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document instead of a table")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("manifests", help="render the Kubernetes manifests for a run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpus-per-worker", type=int, default=1)
    p.add_argument("--image", default=None, help="container image (tag@digest); default: the checked-in one")
    p.add_argument("--output", default=None, help="gs:// run directory; default: the checked-in one")
    p.add_argument("--namespace", default=None)
    p.add_argument("--config", default=None, help="job YAML for the ConfigMap; default job/cats_vs_dogs.yaml")
    p.add_argument("--queue", default=None, help="Kueue LocalQueue that admits the Job, JobSet or TFJob")
    p.add_argument("--priority-class", default=None, help="Kueue WorkloadPriorityClass of the workload")
    p.add_argument("--gcp-service-account", default=None, metavar="EMAIL",
                   help="Google service account to impersonate; default: roles granted to the Kubernetes SA itself")
    p.add_argument("--gcsfuse-bucket", default=None, metavar="BUCKET",
                   help="mount gs://BUCKET read-only at /gcs/BUCKET (GKE Cloud Storage FUSE CSI driver)")
    p.add_argument("-o", "--out-dir", required=True, help="directory to write the YAML files to")
    p.set_defaults(func=cmd_manifests)

    p = sub.add_parser("status", help="phase, epoch, metrics and ETA of a run")
    p.add_argument("run", help="run directory (local or gs://)")
    p.add_argument("--k8s", metavar="JOB", default=None, help="also show the Kubernetes Job's and pods' state")
    p.add_argument("--namespace", default="default")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TljobError as exc:
        log.error("%s (exit %d)", exc, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
