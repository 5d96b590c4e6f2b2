# The tljob training image: the tljob wheel with GPU TensorFlow, ImageNet MobileNetV2 weights baked in, non-root.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/tljob/tljob:0.1.0 .
#   docker build --build-arg MOBILENET_V2_WEIGHTS= ...   # bake no weights (pods download them at start)
#
# Base: python:3.11.14-slim-bookworm (Debian 12, Python 3.11), pinned by the digest of its multi-arch
# index. The digest was taken from public Dockerfiles that pin this tag, not pulled here: verify it with
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm` before the first build and when bumping.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS base

# --- stage 1: the tljob wheel (the runtime stage gets the wheel only, not the source tree) -------------
FROM base AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip wheel --no-deps --wheel-dir /dist .

# --- stage 2: the ImageNet weights Keras would otherwise download in every pod at start --------------
FROM base AS weights
# <alpha>_<input size> of each MobileNetV2 no-top file to bake: the recipe's alpha 1.0 at every input
# size Keras has weights for (about 9 MB each). Empty: bake none.
ARG MOBILENET_V2_WEIGHTS="1.0_96 1.0_128 1.0_160 1.0_192 1.0_224"
# Keras publishes no checksums for these files: they come over HTTPS from the bucket Keras itself
# downloads from, and a file that is not HDF5 (an error page, a truncated body) fails the build.
RUN mkdir -p /opt/keras/models \
 && printf '%s\n' '{"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow", "image_data_format": "channels_last"}' \
      > /opt/keras/keras.json \
 && for pair in ${MOBILENET_V2_WEIGHTS}; do \
      name="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_${pair}_no_top.h5"; \
      python -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/${name}" "/opt/keras/models/${name}" \
      && python -c 'import sys; sys.exit(None if open(sys.argv[1], "rb").read(8) == b"\x89HDF\r\n\x1a\n" else sys.argv[1] + ": not an HDF5 file")' \
        "/opt/keras/models/${name}" \
      || exit 1; \
    done

# --- stage 3: the runtime -------------------------------------------------------------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="tljob" \
      org.opencontainers.image.description="MobileNetV2 transfer-learning training job (TensorFlow, multi-worker)" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# UID/GID 10001: above the host's user range, and the pods' securityContext.runAsUser (manifests/).
RUN groupadd --gid 10001 tljob \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin tljob

# The wheel is this build's own, and its dependencies are pinned in pyproject.toml, hence DL3013 ignored.
# pip compiles every module to bytecode here, so the read-only container never needs to write .pyc files.
COPY --from=wheel /dist/ /tmp/dist/
# hadolint ignore=DL3013
RUN for wheel in /tmp/dist/tljob-*.whl; do pip install "${wheel}[gpu]" || exit 1; done \
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
