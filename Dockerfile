# The tljob training image: the tljob wheel with TensorFlow (GPU by default), ImageNet MobileNetV2 weights
# baked in, non-root. Every input of the build is a build argument with the registry build as its default:
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/tljob/tljob:0.1.0 .       # registry base, [gpu], weights downloaded
#   ./dev.sh image                                                          # localhost/tljob:dev with podman (README)
#
#   --build-arg TLJOB_EXTRAS=            CPU only (no CUDA wheels: about 3 GB instead of 8)
#   --build-arg MOBILENET_V2_WEIGHTS=    bake no weights (pods with model.weights=imagenet download them at start)
#   --build-arg WEIGHTS_SOURCE=local     bake the Keras-named .h5 files of container/weights/ instead of
#                                        downloading them (air-gapped builds)
#   --build-arg BASE_IMAGE=IMAGE         another Debian-based image with Python 3.11 at /usr/local/bin/python
#
# Base: python:3.11.14-slim-bookworm (Debian 12, Python 3.11), pinned by the digest of its multi-arch
# index. The digest was taken from public Dockerfiles that pin this tag, not pulled here: verify it with
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm` before the first build and when bumping.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# checkov:skip=CKV_DOCKER_7: the base is the BASE_IMAGE build argument, whose default is pinned by tag and digest (tests/test_dockerfile.py)
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS base

# --- stage 1: the tljob wheel (the runtime stage gets the wheel only, not the source tree) -------------
FROM base AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
# The default job config ships in the wheel as package data (src/tljob/job/ links to it).
COPY job/ job/
RUN pip wheel --no-deps --wheel-dir /dist .

# The wheel's dependencies (with the extras) as a requirements file, from pyproject.toml alone: the runtime
# installs them in a layer of their own, cached until the dependencies change, not on every change of src/.
FROM base AS requirements
# `gpu` adds TensorFlow's CUDA wheels; empty: CPU only.
ARG TLJOB_EXTRAS=gpu
COPY pyproject.toml /src/
RUN python -c 'import sys, tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
      extras = [r for e in sys.argv[1:] for r in p["optional-dependencies"][e]]; \
      open("/src/requirements.txt", "w").write("\n".join(p["dependencies"] + extras) + "\n")' ${TLJOB_EXTRAS}

# --- stage 2: the ImageNet weights Keras would otherwise download in every pod at start --------------
# Either source ends in /opt/keras/models with keras.json beside it, every file checked to be HDF5 (Keras
# publishes no checksums; an error page or a truncated body fails the build, not the first pod).
FROM base AS weights
# download: from the bucket Keras itself downloads from (or a mirror: MOBILENET_V2_WEIGHTS_URL);
# local: the Keras-named .h5 files put in container/weights/ of the build context (air-gapped builds).
ARG WEIGHTS_SOURCE=download
# <alpha>_<input size> of each MobileNetV2 no-top file to download: the recipe's alpha 1.0 at every input
# size Keras has weights for (about 9 MB each). Empty: bake none.
ARG MOBILENET_V2_WEIGHTS="1.0_96 1.0_128 1.0_160 1.0_192 1.0_224"
ARG MOBILENET_V2_WEIGHTS_URL=https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2
COPY container/ /tmp/container/
RUN python /tmp/container/bake_weights.py /opt/keras "${WEIGHTS_SOURCE}" "${MOBILENET_V2_WEIGHTS_URL}" \
      /tmp/container/weights ${MOBILENET_V2_WEIGHTS}

# --- stage 3: the runtime -------------------------------------------------------------------------
FROM base AS runtime
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="tljob" \
      org.opencontainers.image.description="MobileNetV2 transfer-learning training job (TensorFlow, multi-worker)" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# UID/GID 10001: above the host's user range, and the pods' securityContext.runAsUser (manifests/).
RUN groupadd --gid 10001 tljob \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tljob

# constraints.txt pins every dependency at the versions CI tested (README "Development" says how to
# refresh it: ./dev.sh lock), so an image built next month gets the same libraries.
# pip compiles every module to bytecode here, so the read-only container never needs to write .pyc files.
COPY constraints.txt /tmp/deps/
COPY --from=requirements /src/requirements.txt /tmp/deps/
RUN pip install --constraint /tmp/deps/constraints.txt --requirement /tmp/deps/requirements.txt \
 && rm -rf /tmp/deps
# The wheel itself is this build's: its dependencies are installed above, and pip check proves it.
COPY --from=wheel /dist/ /tmp/dist/
# hadolint ignore=DL3013
RUN pip install --no-deps /tmp/dist/tljob-*.whl \
 && pip check \
 && rm -rf /tmp/dist

# Root-owned and read-only for the tljob user.
COPY --from=weights /opt/keras/ /opt/keras/

# KERAS_HOME: where tf-keras reads keras.json and where tljob looks for the baked weights files.
# HOME and the working directory are /tmp, the one writable place (an emptyDir in the pods): TFDS
# downloads, matplotlib's cache and any stray file land there and nowhere else.
ENV KERAS_HOME=/opt/keras \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp

USER 10001:10001

# checkov:skip=CKV_DOCKER_2: a batch trainer serves nothing to probe, and Kubernetes ignores HEALTHCHECK; a stalled worker exits 75 by itself (runtime.peer_timeout_s)
ENTRYPOINT ["tljob"]
CMD ["--help"]
