# nextstep-serve: API and GPU worker in one image (the role comes from NEXTSTEP_ROLE or --role).
#
#   docker build -t nextstep-serve .
#   docker run -p 8000:8000 nextstep-serve                      # the default model on the CPU, no volume needed
#   docker run --gpus all -p 8000:8000 -v /ckpt:/models:ro nextstep-serve --model /models/NextStep-1-Large \
#       --device cuda --dtype bfloat16
#
# The CUDA base and the PyTorch wheel index go together: torch's wheels carry their own CUDA libraries,
# the base image its matching user-space pieces, and the host's driver must support that CUDA version
# (CUDA 13.0: driver 580 or newer). For older drivers:
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# A CPU-only image: --build-arg CUDA_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# flash-attn publishes no Linux wheels on PyPI (only a source build of an hour or more): pass the URL of a
# prebuilt wheel that matches this torch, CUDA and Python to include it. xformers comes from PyPI when a
# wheel for this torch exists there. Either may be absent: the Triton and torch attention paths cover them.
ARG FLASH_ATTN_WHEEL=""
ARG WITH_XFORMERS=1
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the distribution's own Python and compiler, as the base image's release ships them
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned, so nothing later swaps it for another build
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && echo "torch==${TORCH_VERSION}" > /opt/venv/torch-constraint.txt
WORKDIR /opt/nextstep
COPY pyproject.toml README.md ./
COPY model ./model
COPY kernels ./kernels
COPY server ./server
COPY bench ./bench
# editable: the embedded demo model's files stay beside its code, where it looks for them
# (torch's CUDA wheels bring the Triton build they were made with)
RUN pip install -c /opt/venv/torch-constraint.txt -e ".[redis]"
RUN if [ "${WITH_XFORMERS}" = "1" ]; then \
        pip install -c /opt/venv/torch-constraint.txt --only-binary=:all: xformers \
        || echo "no xformers wheel for torch ${TORCH_VERSION}: skipped"; \
    fi \
    && if [ -n "${FLASH_ATTN_WHEEL}" ]; then \
        pip install -c /opt/venv/torch-constraint.txt --no-deps "${FLASH_ATTN_WHEEL}"; \
    fi \
    && python -c "import importlib.util as u, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
        {m: u.find_spec(m) is not None for m in ('triton', 'flash_attn', 'xformers')})"

FROM ${CUDA_IMAGE} AS runtime
# gcc and the Python headers: Triton compiles its small CUDA launcher on first use
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 nextstep \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin nextstep \
    && mkdir -p /models && chown nextstep /models
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/nextstep /opt/nextstep
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TRITON_CACHE_DIR=/home/nextstep/.triton \
    NEXTSTEP_HOST=0.0.0.0 \
    NEXTSTEP_PORT=8000
# numeric, so Kubernetes' runAsNonRoot can check it
USER 10001:10001
WORKDIR /home/nextstep
EXPOSE 8000
# liveness only: a worker loading a 14B checkpoint is alive but not yet ready (/ready says when it is)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('NEXTSTEP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "server"]
