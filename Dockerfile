# rnnserve server image: Debian bookworm's Python 3.11, the `[server]` extra only (no torch),
# and the default model repository at /models.
#
#   make models                                     # the default repository, trained on the host
#   docker build -t rnnserve .                                                     # CPU
#   docker build --build-arg ORT_EXTRAS=cuda,cudnn -t rnnserve:cuda .              # CUDA
#   docker run -p 50051:50051 -p 9090:9090 rnnserve
#   docker run --gpus all -p 50051:50051 -p 9090:9090 rnnserve:cuda
#   docker run -v $PWD/my_repository:/models:ro ... rnnserve                       # your models
#
# Build inputs:
#   BASE_IMAGE        a Debian bookworm image (default debian:bookworm-slim; where no registry
#                     is reachable, deploy/docker/debian-base.sh makes one with mmdebstrap)
#   ORT_EXTRAS        empty: CPU (onnxruntime-gpu falls back to its CPU provider, one log line);
#                     `cuda,cudnn`: also the CUDA 13 and cuDNN 9 libraries as pip wheels
#   MODEL_REPOSITORY  the folder of the build context copied to /models (default
#                     model_repository, made by `make models`)
#   deploy/docker/ca-certificates/*.crt   extra CA certificates, trusted by apt and pip during
#                     the build and by the server at run time: needed behind an HTTPS proxy
#                     that re-signs certificates (README, "Building behind a proxy")
#
# The default models are trained on the host, not in the build: training needs torch, whose
# CPU wheels come only from download.pytorch.org (PyPI's torch pulls gigabytes of CUDA), and
# `make models` is seeded, so the result is the same as a build stage would make.
# No `# syntax=` line: the build runs on the classic builder and BuildKit alike, offline.

ARG BASE_IMAGE=debian:bookworm-slim

# --- python: the interpreter and the trusted certificates, shared by build and runtime. ---
FROM ${BASE_IMAGE} AS python
COPY deploy/docker/ca-certificates/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates python3 \
 && update-ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# pip uses its own certificate bundle unless told otherwise.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PYTHONDONTWRITEBYTECODE=1

# --- build: the server's virtual environment. ---------------------------------------------
FROM python AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
# Dependencies first, in their own layer: a source change does not download them again.
COPY pyproject.toml constraints.txt README.md ./
RUN python3 -m venv /opt/venv && python3 -c 'import tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print(*project["dependencies"], *project["optional-dependencies"]["server"], sep="\n")' \
    > /tmp/requirements.txt
ARG ORT_EXTRAS=
RUN /opt/venv/bin/pip install -c constraints.txt -r /tmp/requirements.txt \
      "onnxruntime-gpu${ORT_EXTRAS:+[$ORT_EXTRAS]}"
COPY proto proto
COPY server server
COPY client client
COPY models models
# rnnserve.bench (the `rnnserve bench` command) and rnnserve.testing (the server harness it
# uses) are parts of the package too; nothing else of benchmarks/ or tests/ is copied.
COPY benchmarks/bench benchmarks/bench
COPY tests/testing tests/testing
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip check \
 && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then \
      echo "torch must not be in the server image" >&2; exit 1; \
    fi \
 && find /opt/venv -type d -path "*/site-packages/nvidia/*/lib" | sort > /opt/venv/nvidia-libs.conf

# --- runtime -------------------------------------------------------------------------------
FROM python AS runtime
COPY --from=build /opt/venv /opt/venv
# Let the dynamic loader find the CUDA/cuDNN libraries that came as pip wheels (none on CPU).
RUN cp /opt/venv/nvidia-libs.conf /etc/ld.so.conf.d/zz-rnnserve-nvidia.conf && ldconfig \
 && useradd --system --uid 10001 --home-dir /var/lib/rnnserve --create-home rnnserve
ARG MODEL_REPOSITORY=model_repository
COPY ${MODEL_REPOSITORY} /models
# Readable by the server's user whatever the files' modes were on the host (the repository
# writer makes them 0600), writable by none.
RUN chmod -R a+rX,go-w /models
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
