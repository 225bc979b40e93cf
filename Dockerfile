# Hogwild! inference server image. Multi-stage: the build stage makes a virtual environment in /opt/venv;
# the runtime stage copies it onto the plain base (python3 + CA certificates, no python3-venv) and adds the
# compiler the engine's kernels need (g++ for the CPU image, gcc and python3-dev for Triton in the GPU one).
#
# GPU (default): CUDA runtime base, torch from PyPI (CUDA build):
#   docker build -t hogwild-server .
# CPU: any Debian/Ubuntu base with (or able to apt-get) python3, torch's CPU build:
#   docker build -t hogwild-server:cpu --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg DEVICE=cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Older NVIDIA drivers: a matching BASE_IMAGE and TORCH_INDEX_URL (e.g. .../whl/cu126).
# See docs/DEPLOY.md.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1
# CUDA and slim bases lack python3; a base that has it (and CA certificates) skips apt entirely.
RUN set -eu; \
    if ! command -v python3 >/dev/null || [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 --version

FROM base AS build
# torch first, in its own layer (it dwarfs the rest); TORCH_INDEX_URL picks a build (cpu, cu126, ...).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
# Passed through from the build host where its pip needs them (a mirror, local wheels); build-only.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DEFAULT_TIMEOUT=120
RUN set -eu; \
    if ! python3 -m venv /opt/venv >/dev/null 2>&1; then \
        rm -rf /opt/venv; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3-venv; \
        rm -rf /var/lib/apt/lists/*; \
        python3 -m venv /opt/venv; \
    fi
# Unset empty pass-through variables (pip reads an empty PIP_FIND_LINKS as a location).
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do \
        eval "[ -n \"\${$v:-}\" ]" || unset "$v"; \
    done; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        /opt/venv/bin/pip install --extra-index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        /opt/venv/bin/pip install "$TORCH_SPEC"; \
    fi
# The project's dependencies in their own layer, so a change to the sources alone reinstalls only them.
COPY pyproject.toml /src/pyproject.toml
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do \
        eval "[ -n \"\${$v:-}\" ]" || unset "$v"; \
    done; \
    if /opt/venv/bin/python -c "import tomllib" 2>/dev/null; then \
        /opt/venv/bin/python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" >/tmp/requirements.txt; \
        /opt/venv/bin/pip install -r /tmp/requirements.txt; \
    fi
COPY . /src
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do \
        eval "[ -n \"\${$v:-}\" ]" || unset "$v"; \
    done; \
    /opt/venv/bin/pip install /src; \
    /opt/venv/bin/python -c "import engine, torch; print('torch', torch.__version__)"

FROM base AS runtime
# The device the server uses unless HOGWILD_DEVICE says otherwise: cuda in the GPU image, cpu in the CPU one.
ARG DEVICE=cuda
ARG HOGWILD_UID=10001
RUN useradd --system --uid "$HOGWILD_UID" --user-group --create-home --home-dir /home/hogwild \
        --shell /usr/sbin/nologin hogwild \
    && mkdir -p /cache \
    && chown hogwild:hogwild /cache
COPY --from=build /opt/venv /opt/venv
# Compilers for the engine's kernels, built on first start. The CPU image carries g++: on a CPU with
# AVX512-BF16 the engine compiles its C++ kernels (about 11 s, into the /cache volume;
# engine/layers/cpu_kernels.py). The GPU image carries gcc and Python's headers: Triton compiles a small C
# launcher for its kernels. Without them the engine warns and runs the slower torch paths.
RUN set -eu; \
    if [ "$DEVICE" = cpu ]; then packages="g++"; else packages="gcc libc6-dev python3-dev"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*
# Configuration is by environment (HOGWILD_MODEL, HOGWILD_DEVICE, HOGWILD_API_KEY, ...; docs/DEPLOY.md).
# The model cache (the default model's conversion, Hugging Face downloads) and the compiled kernels (C++,
# Triton) live in the /cache volume, so a restarted container compiles nothing again.
# The system CA store is used for downloads, so a derived image can add a CA the usual way.
ENV PATH=/opt/venv/bin:$PATH \
    HOGWILD_HOST=0.0.0.0 \
    HOGWILD_PORT=8000 \
    HOGWILD_DEVICE=$DEVICE \
    HOGWILD_CACHE=/cache/hogwild \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
VOLUME ["/cache"]
USER hogwild
WORKDIR /home/hogwild
EXPOSE 8000
# /health answers as soon as the process is up; the first start may first fetch and convert the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('HOGWILD_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "server"]
