#!/usr/bin/env bash
# The two commands a developer (and CI) needs; each sets up what it uses first.
#   ./dev.sh dry-run [OUTPUT_DIR]   set up, then train job/dry_run.yaml locally (generated data, < 90 s)
#   ./dev.sh test [PYTEST_ARGS...]  set up, then run the test suite
#   ./dev.sh bench [quick|full] [ARGS...]  set up, then benchmark tljob against the tutorial's code
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

setup() {
  if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
}

# checkov pins packages that clash with TensorFlow's, so it lives in a virtualenv of its own.
setup_checkov() {
  if [ ! -x .venv-checkov/bin/checkov ]; then
    "$PYTHON" -m venv .venv-checkov
    .venv-checkov/bin/python -m pip install -q "checkov>=3.2,<4"
  fi
  export TLJOB_CHECKOV="$PWD/.venv-checkov/bin/checkov"
}

# The real photos and weights, when a ../shared folder has them, switch on the slow real-data tests.
use_shared_data() {
  local shared="${TLJOB_SHARED_DIR:-../shared}"
  if [ -d "$shared/data/cats_and_dogs_filtered" ] && [ -z "${TLJOB_CATS_DOGS_DIR:-}" ]; then
    export TLJOB_CATS_DOGS_DIR="$(cd "$shared/data/cats_and_dogs_filtered" && pwd)"
  fi
  local weights="$shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
  if [ -f "$weights" ] && [ -z "${TLJOB_WEIGHTS:-}" ]; then
    export TLJOB_WEIGHTS="$(cd "$(dirname "$weights")" && pwd)/$(basename "$weights")"
  fi
}

case "${1:-}" in
  dry-run)
    setup
    .venv/bin/tljob train --config job/dry_run.yaml --output "${2:-runs/dry-run}"
    ;;
  test)
    setup
    setup_checkov
    use_shared_data
    shift
    .venv/bin/python -m pytest "$@"
    ;;
  bench)
    setup
    use_shared_data
    mode="${2:-quick}"
    shift $(( $# < 2 ? $# : 2 ))
    .venv/bin/python -m bench.run --mode "$mode" "$@"
    ;;
  *)
    echo "usage: ./dev.sh dry-run [OUTPUT_DIR] | ./dev.sh test [PYTEST_ARGS...] | ./dev.sh bench [quick|full] [ARGS...]" >&2
    exit 2
    ;;
esac
