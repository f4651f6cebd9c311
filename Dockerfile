# hpo worker / finalizer / dashboard image.
# BASE_IMAGE is a build argument so that air-gapped hosts can pass a local stand-in.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# The real Fashion-MNIST files, from Debian (/usr/share/datasets/fashion-mnist).
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Behind a TLS-inspecting proxy, pass its CA certificate (PEM text; public, not a secret) so pip
# can reach PyPI: --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.crt)". pip then uses the system store.
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/extra-build-ca.crt \
      && update-ca-certificates >/dev/null; \
    fi
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# PyPI's Linux x86_64 torch wheels are CUDA builds: they use NVIDIA GPUs when the container gets
# them (--gpus / compose device reservations) and fall back to the CPU otherwise.
# A layer of its own, so that code changes do not re-download several GB.
RUN python3 -m pip install "torch>=2.4,<3" "torchvision>=0.19,<1"

WORKDIR /opt/hpo
COPY pyproject.toml README.md LICENSE ./

COPY src ./src
# [onnx]: `hpo export --format onnx` and its check work inside the container too.
RUN python3 -m pip install ".[onnx]" && python3 -c "import hpo.cli, onnxruntime"

# A non-root user; /work holds runs/ (final-train outputs) and the GPU claim locks, both volumes.
RUN useradd --create-home --uid 10001 hpo \
 && mkdir -p /work/runs /work/locks \
 && chown -R hpo:hpo /work
COPY --chmod=755 docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER hpo
WORKDIR /work
ENV HPO_GPU_LOCK_DIR=/work/locks
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["--help"]
