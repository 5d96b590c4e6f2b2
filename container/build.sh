#!/usr/bin/env bash
# Builds the tljob image with podman (./dev.sh image, and the container tests' fixture).
#
#   container/build.sh                 the tljob image
#   container/build.sh gcs-emulator    the GCS emulator the container tests run (localhost/tljob-gcs-emulator:dev)
#
#   TLJOB_IMAGE        tag to build (default localhost/tljob:dev)
#   TLJOB_BASE_IMAGE   base image; default: the Dockerfile's pinned python:3.11-slim, or, when no registry
#                      can be reached, a stand-in made here from Debian bookworm packages (said plainly)
#   TLJOB_EXTRAS       pip extras of the image (default empty: CPU only; `gpu` adds the CUDA wheels)
#   TLJOB_WEIGHTS      a Keras MobileNetV2 no-top .h5 file to bake in (air-gapped builds); default: none
#   TLJOB_WEIGHTS_SIZES input sizes to bake that file under (default "160 224": the recipe's and Keras' default)
#
# podman's layer cache keeps rebuilds quick: the dependencies' layer changes only with constraints.txt
# or pyproject.toml's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/container/containers.conf}"

IMAGE="${TLJOB_IMAGE:-localhost/tljob:dev}"
STANDIN_BASE=localhost/tljob-base:bookworm
say() { echo "container/build.sh: $*" >&2; }

# Debian's Python at /usr/local as in the official image: a venv there puts python and pip on PATH.
make_standin_base() {
  local tar
  tar="$(mktemp -d)/base.tar"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    --customize-hook='chroot "$1" python3 -m venv /usr/local' \
    --customize-hook='chroot "$1" ln -sf /usr/local/bin/python3 /usr/local/bin/python' \
    bookworm "$tar"
  podman import --quiet --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$tar" "$STANDIN_BASE" >/dev/null
  rm -rf "$(dirname "$tar")"
}

choose_base() {
  if [ -n "${TLJOB_BASE_IMAGE:-}" ]; then echo "$TLJOB_BASE_IMAGE"; return; fi
  local pinned
  pinned="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)"
  # Docker's short names: NAME is docker.io/library/NAME, USER/NAME is docker.io/USER/NAME.
  case "$pinned" in
    */*) case "${pinned%%/*}" in *.*|*:*|localhost) ;; *) pinned="docker.io/$pinned" ;; esac ;;
    *) pinned="docker.io/library/$pinned" ;;
  esac
  if podman image exists "$pinned" || podman pull --quiet "$pinned" >/dev/null 2>&1; then
    echo "$pinned"
    return
  fi
  say "cannot pull $pinned (no registry reachable): building on a STAND-IN base made from Debian bookworm" \
      "packages ($STANDIN_BASE: Debian's Python 3.11 instead of python.org's; README 'Build the image offline')"
  if ! podman image exists "$STANDIN_BASE"; then
    say "making $STANDIN_BASE with mmdebstrap (about 30 s, once)"
    make_standin_base
  fi
  echo "$STANDIN_BASE"
}

# pip inside the build uses this host's package index and CA: the certificates and pip's configuration
# files, read-only. --network host is how the build reaches that index.
mounts=()
[ -d /etc/ssl/certs ] && mounts+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
for conf in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip"; do
  [ -e "$conf" ] && mounts+=(-v "$conf:${conf/#$HOME//root}:ro")
done

BASE="$(choose_base)"
if [ "${1:-tljob}" = gcs-emulator ]; then
  podman build --quiet --network host "${mounts[@]}" --build-arg "BASE_IMAGE=$BASE" \
    --file tests/containers/gcs-emulator.Containerfile --tag localhost/tljob-gcs-emulator:dev . >/dev/null
  exit 0
fi
args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "TLJOB_EXTRAS=${TLJOB_EXTRAS:-}")

# container/weights/ is the Dockerfile's local weights source; only this script fills it, and empties it after.
weights_dir="$PWD/container/weights"
rm -rf "$weights_dir"
if [ -n "${TLJOB_WEIGHTS:-}" ]; then
  mkdir -p "$weights_dir"
  trap 'rm -rf "$weights_dir"' EXIT
  for size in ${TLJOB_WEIGHTS_SIZES:-160 224}; do
    # The one ImageNet file serves every input size; Keras looks for it under a name per size.
    cp "$TLJOB_WEIGHTS" "$weights_dir/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_${size}_no_top.h5"
  done
  args+=(--build-arg WEIGHTS_SOURCE=local)
  say "baking $TLJOB_WEIGHTS as the ImageNet weights for input sizes ${TLJOB_WEIGHTS_SIZES:-160 224}"
else
  args+=(--build-arg MOBILENET_V2_WEIGHTS=)
  say "baking no ImageNet weights (set TLJOB_WEIGHTS=FILE.h5 to bake a local file): model.weights=imagenet" \
      "downloads them at start"
fi

say "building $IMAGE on $BASE"
podman build --network host "${mounts[@]}" "${args[@]}" --tag "$IMAGE" .
