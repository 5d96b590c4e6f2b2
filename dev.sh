#!/usr/bin/env bash
# The commands a developer (and CI) needs; each sets up what it uses first.
#   ./dev.sh dry-run [OUTPUT_DIR]   set up, then train job/dry_run.yaml locally (generated data, < 90 s)
#   ./dev.sh image                  build the container image localhost/tljob:dev with podman (container/build.sh)
#   ./dev.sh test [PYTEST_ARGS...]  set up, build the image, then run the test suite
#   ./dev.sh bench [quick|full] [ARGS...]  set up, then benchmark tljob against the tutorial's code
#   ./dev.sh lock                   re-resolve every dependency into constraints.txt (then run ./dev.sh test)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

setup() {
  if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
  .venv/bin/python -m pip install -q --upgrade pip
  # The built wheel, as users and the image get it (not an editable install), so a file the package reads
  # from the source tree instead of its own data fails the suite; constraints.txt: the versions CI tested,
  # the same ones the image gets. The second install replaces an earlier build of the same version.
  rm -rf build/dist
  .venv/bin/python -m pip wheel -q --no-deps --wheel-dir build/dist .
  local wheel
  wheel="$(ls build/dist/tljob-*.whl)"
  .venv/bin/python -m pip install -q --constraint constraints.txt "$wheel[test]"
  .venv/bin/python -m pip install -q --no-deps --force-reinstall "$wheel"
}

# podman builds and runs the image; container/containers.conf fixes its defaults for hosts like CI's.
image() {
  if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null; then
    echo "dev.sh: podman and mmdebstrap are needed to build the image: apt-get install -y podman buildah runc mmdebstrap" >&2
    exit 2
  fi
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/container/containers.conf}"
  container/build.sh
}

# Every dependency re-resolved from pyproject.toml in a fresh venv (runtime and [test]), plus the
# versions pip picks for [gpu]'s CUDA wheels beside them (resolved only, not downloaded).
lock() {
  local venv
  venv="$(mktemp -d)/venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q ".[test]"
  {
    sed -n '1,/^# ---- resolved/p' constraints.txt
    "$venv/bin/python" -m pip freeze --all --exclude pip --exclude tljob
    "$venv/bin/python" -m pip freeze --all --exclude pip --exclude tljob > "$venv/../freeze.txt"
    "$venv/bin/python" -m pip install -q --dry-run --ignore-installed --report "$venv/../gpu.json" \
      --constraint "$venv/../freeze.txt" ".[gpu]"
    "$venv/bin/python" -c 'import json, sys; print("\n".join(sorted(i["metadata"]["name"] + "==" + i["metadata"]["version"]
      for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"].startswith("nvidia-"))))' "$venv/../gpu.json"
  } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  rm -rf "$(dirname "$venv")"
  echo "dev.sh: constraints.txt re-resolved; run ./dev.sh test, then commit it" >&2
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
  image)
    use_shared_data
    image
    ;;
  test)
    setup
    setup_checkov
    use_shared_data
    # The suite's container tests run this image; building it first keeps its output out of pytest's.
    image
    shift
    .venv/bin/python -m pytest "$@"
    ;;
  lock)
    lock
    ;;
  bench)
    setup
    use_shared_data
    mode="${2:-quick}"
    shift $(( $# < 2 ? $# : 2 ))
    .venv/bin/python -m bench.run --mode "$mode" "$@"
    ;;
  *)
    echo "usage: ./dev.sh dry-run [OUTPUT_DIR] | image | test [PYTEST_ARGS...] | bench [quick|full] [ARGS...] | lock" >&2
    exit 2
    ;;
esac
