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

# Which torch: TORCH_INDEX empty takes PyPI's, a CUDA build (its NVIDIA libraries make the image
# several GB; it falls back to the CPU without a GPU). TORCH_INDEX=https://download.pytorch.org/whl/cpu
# takes the CPU-only build, as docker-compose.cpu.yml does. TORCH_FIND_LINKS (a URL of a page or
# directory listing of wheels) serves hosts that reach neither. A layer of its own, so code changes do not re-download it.
ARG TORCH_INDEX=""
ARG TORCH_PACKAGES="torch>=2.4,<3 torchvision>=0.19,<1"
ARG TORCH_FIND_LINKS=""
RUN links_host=$(printf '%s' "$TORCH_FIND_LINKS" | sed -E 's#^[a-z]+://([^/:]+).*#\1#') \
 && python3 -m pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
      ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS" --trusted-host "$links_host"} $TORCH_PACKAGES

# The other dependencies, read from pyproject.toml, before the code: a code change reinstalls nothing.
# [onnx]: `hpo export --format onnx` and its check; [s3]: an s3:// artifact store (several hosts);
# [bench]: `hpo bench`'s notebook baseline (torchvision; leave it out where TORCH_INDEX has none).
ARG EXTRAS="onnx,s3,bench"
WORKDIR /opt/hpo
COPY pyproject.toml ./
RUN python3 -c 'import sys, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = [e for e in sys.argv[1].split(",") if e]; \
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))' \
      "$EXTRAS" > /tmp/requirements.txt \
 && python3 -m pip install -r /tmp/requirements.txt

COPY README.md LICENSE ./
COPY src ./src
RUN python3 -m pip install --no-deps . \
 && python3 -m pip check \
 && python3 -c "import hpo.cli, torch; print('hpo image: torch', torch.__version__)"

# A non-root user; /work holds runs/ (final-train outputs) and the GPU claim locks, both volumes.
# (COPY, then chmod: the legacy builder, still Debian's, has no COPY --chmod.)
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh \
 && useradd --create-home --uid 10001 hpo \
 && mkdir -p /work/runs /work/locks \
 && chown -R hpo:hpo /work
USER hpo
WORKDIR /work
ENV HPO_GPU_LOCK_DIR=/work/locks
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["--help"]
