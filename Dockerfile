# genserve for GPU nodes: the same image runs `genserve serve` (API replicas) and `genserve worker`.
# Models are mounted read-only at /models; /data is the shared artifact store (images).
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/genserve \
    PATH=/opt/genserve/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CUDA wheel index matching the base image; then genserve and its dependencies.
ARG TORCH_SPEC="torch==2.13.0 torchvision==0.28.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN python3 -m venv $VIRTUAL_ENV && pip install --upgrade pip && pip install --index-url $TORCH_INDEX $TORCH_SPEC
WORKDIR /app
COPY pyproject.toml README.md ./
COPY genserve ./genserve
RUN pip install .

# A non-root user; models are read-only, only /data is written.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin genserve \
    && mkdir -p /data /models && chown genserve:genserve /data
USER 10001:10001
ENV GENSERVE_MODELS_DIR=/models \
    GENSERVE_DATA_DIR=/data \
    GENSERVE_BOOTSTRAP_DEFAULT_MODEL=false \
    GENSERVE_DEVICE=cuda \
    HOME=/home/genserve
VOLUME ["/data"]
EXPOSE 7860 9400
# tini reaps zombies and passes SIGTERM to genserve, which runs the (spot or warm) shutdown.
ENTRYPOINT ["/usr/bin/tini", "--", "genserve"]
CMD ["serve", "--host", "0.0.0.0", "--workers", "0"]
