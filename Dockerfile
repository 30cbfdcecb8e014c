# syntax=docker/dockerfile:1
# rnnserve server image: the `[server]` extra only (no torch), onnxruntime-gpu with the CUDA
# and cuDNN libraries from their pip wheels, and the default model repository at /models.
#
#   docker build -t rnnserve .
#   docker run -p 50051:50051 -p 9090:9090 rnnserve                      # CPU
#   docker run --gpus all -p 50051:50051 -p 9090:9090 rnnserve           # CUDA
#   docker run -v $PWD/my_repository:/models:ro ... rnnserve             # your own models
#
# Build args: PYTHON_IMAGE (base), ORT_EXTRAS (`cuda,cudnn` pulls the CUDA 13 + cuDNN 9
# wheels; empty builds a smaller CPU-only image), TORCH_INDEX (where the model stage gets its
# CPU torch from).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- models: train and export the default model repository. Torch lives only here. --------
FROM ${PYTHON_IMAGE} AS models
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY proto proto
COPY server server
COPY client client
COPY models models
# `server` too, so the exported models can be loaded here exactly as the server will.
RUN pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt ".[train,server]"
RUN rnnserve build-defaults --repository /models

# --- build: the server's virtual environment. ---------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG ORT_EXTRAS=cuda,cudnn
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY proto proto
COPY server server
COPY client client
COPY models models
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt ".[server]" "onnxruntime-gpu[${ORT_EXTRAS}]" \
 && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then \
      echo "torch must not be in the server image" >&2; exit 1; \
    fi
# Let the dynamic loader find the CUDA/cuDNN libraries that came as pip wheels.
RUN find /opt/venv -type d -path "*/site-packages/nvidia/*/lib" | sort > /opt/venv/nvidia-libs.conf

# --- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
COPY --from=build /opt/venv /opt/venv
RUN cp /opt/venv/nvidia-libs.conf /etc/ld.so.conf.d/zz-rnnserve-nvidia.conf && ldconfig \
 && useradd --system --uid 10001 --home-dir /var/lib/rnnserve --create-home rnnserve
COPY --from=models /models /models
COPY deploy/grpc_health_probe.py /opt/rnnserve/grpc_health_probe.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER rnnserve
WORKDIR /var/lib/rnnserve
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/rnnserve/grpc_health_probe.py", "127.0.0.1:50051"]
ENTRYPOINT ["rnnserve"]
CMD ["serve", "--repository", "/models", "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-port", "9090"]
