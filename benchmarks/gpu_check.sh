#!/usr/bin/env bash
# The GPU check of rnnserve (issue 14), following ../shared/GPU.md.
#
#   bash benchmarks/gpu_check.sh prepare   here: wheels into .gpu/ (git-ignored), prints the plan
#   bash benchmarks/gpu_check.sh finish    on the GPU host, in the plan's last call: append the
#                                          last part, install, then `check` under a time budget
#   bash benchmarks/gpu_check.sh check|tests|bench   the check, or one half of it, once installed
#   bash benchmarks/gpu_check.sh plots FILE.json...  here: the PNGs of returned bench JSONs
#
# The GPU host (air-gapped, Python 3.12, torch with the CUDA 13 / cuDNN 9 wheels, numpy,
# protobuf, grpcio, prometheus-client, pytest, a CPU-only onnxruntime) takes at most 64 MiB
# per call and keeps /tmp only while it stays warm (30 s after a call), so device time goes to
# moving onnxruntime-gpu. `prepare` repacks its wheel (tar + xz, without the TensorRT provider
# the server never asks for: 255 MB -> ~200 MB) into 60 MiB parts, so the whole check is four
# calls, one right after the other:
#   calls 0..n-2   carry [".gpu/k"]                 cat .gpu/k/part >> /tmp/gpu/ort.tar.xz
#   call  n-1      carry [".gpu/n-1", ".gpu/extra"] bash benchmarks/gpu_check.sh finish
# `finish` checks the archive's sha256, unpacks onnxruntime-gpu and the server's other wheels
# (.gpu/extra) into /tmp/site, points PYTHONPATH at /tmp/site and at the project's source
# folders (the rnnserve.* namespace is mapped by package-dir, so a folder of symlinks stands in
# for an install), puts the NVIDIA wheels' lib folders on LD_LIBRARY_PATH (the server loads
# CUDA through preload_dlls and never imports torch) and runs the check, each step under its
# own time limit, most important first. Results go to $OUT (the device call's output folder)
# as one archive, rebuilt after every step so a call cut short still returns what it measured;
# else to benchmarks/results. Unpack them into benchmarks/results/ and run `plots` on the
# bench JSONs if the host could not draw them. ONLY="step ..." runs a subset (see STEPS), for
# a second, shorter visit: e.g. ONLY="gpu_tests runpath_cuda bench_cuda" FRONTENDS=1.
# bench_cuda measures each side-by-side pair once (BENCH_ROUNDS=2 for alternating rounds, at
# about twice its time).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the server, its tests and the benchmark import beyond what the GPU host has. Pure-Python
# packages are pinned to the versions the project's own environment runs; grpcio, protobuf and
# the gRPC add-ons stay unpinned so they match the latest grpcio-health-checking/-reflection
# that gpu-wheels fetches (generated code checks that its runtime is at least as new). onnx
# is not carried: the host's own (1.23) reads and writes the graphs the server builds.
EXTRA_WHEELS=(
  ml_dtypes==0.6.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  typer==0.29.2 click==8.5.1 shellingham==1.5.4 annotated-doc==0.0.7
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  grpcio protobuf grpcio-status googleapis-common-protos
  redis==8.1.0 psutil==7.2.2
  pytest==9.2.0 pluggy iniconfig packaging pytest-asyncio==1.5.0 pytest-timeout==2.4.0
)
SITE=/tmp/site
SHIM=/tmp/rnnserve-src
PART_MIB=60
PY=${PYTHON:-python3}

prepare() {
  ../shared/tools/gpu-wheels "${EXTRA_WHEELS[@]}" >/dev/null
  local wheel work
  wheel=.gpu/$(cat .gpu/whl/ORT_WHEEL_NAME)
  cat .gpu/[0-9]*/part >"$wheel"
  rm -rf .gpu/[0-9]*
  work=$(mktemp -d)
  unzip -q "$wheel" -d "$work"
  rm -f "$work"/onnxruntime/capi/libonnxruntime_providers_tensorrt.so "$wheel"
  tar -C "$work" -cf - . | xz -9e -T0 >.gpu/ort.tar.xz
  rm -rf "$work"
  mkdir -p .gpu/extra
  mv .gpu/whl/*.whl .gpu/extra/
  sha256sum .gpu/ort.tar.xz | cut -d' ' -f1 >.gpu/extra/ORT_SHA256
  split -b "${PART_MIB}m" -d -a 1 .gpu/ort.tar.xz .gpu/p
  rm .gpu/ort.tar.xz .gpu/whl/gpu-install
  local n=0 p
  for p in .gpu/p*; do mkdir -p ".gpu/$n" && mv "$p" ".gpu/$n/part" && n=$((n + 1)); done
  local last=$((n - 1))
  {
    echo "GPU check plan: $n device calls, one right after the other (the host keeps /tmp 30 s)"
    for k in $(seq 0 $((last - 1))); do
      echo "call $k: carry [\".gpu/$k\"], timeout_s 60"
      echo "  mkdir -p /tmp/gpu && cat .gpu/$k/part >> /tmp/gpu/ort.tar.xz && ls -l /tmp/gpu"
    done
    echo "call $last: carry [\".gpu/$last\", \".gpu/extra\"], timeout_s as device time allows"
    echo "  BUDGET_S=<timeout_s - 20> bash benchmarks/gpu_check.sh finish"
    echo "sizes:"
    du -sh .gpu/[0-9]* .gpu/extra
  } | tee .gpu/PLAN
}

finish() {
  local last
  last=$(find .gpu -maxdepth 1 -name '[0-9]*' -type d | sort | tail -1)
  mkdir -p /tmp/gpu
  cat "$last/part" >>/tmp/gpu/ort.tar.xz
  echo "$(cat .gpu/extra/ORT_SHA256)  /tmp/gpu/ort.tar.xz" | sha256sum -c - ||
    { ls -l /tmp/gpu; echo "the onnxruntime-gpu parts did not add up: start the plan again" >&2; exit 3; }
  mkdir -p "$SITE"
  tar -C "$SITE" -xJf /tmp/gpu/ort.tar.xz
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .gpu/extra/*.whl
  touch "$SITE/.rnnserve-extra"
  check
}

environment() {
  if [ -d "$SITE/onnxruntime" ]; then
    mkdir -p "$SHIM/rnnserve"
    local part
    for part in server:server client:client models:models v1:proto/rnnserve/v1 \
      bench:benchmarks/bench testing:tests/testing; do
      ln -sfn "$PWD/${part#*:}" "$SHIM/rnnserve/${part%%:*}"
    done
    export PYTHONPATH="$SITE:$SHIM"
  fi
  # The NVIDIA wheels that came with torch, found without importing torch.
  local libs
  libs=$("$PY" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
roots = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
print(":".join(str(lib) for root in roots for lib in sorted(root.glob("*/lib")) if lib.is_dir()))
PY
  )
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PYTHONUNBUFFERED=1
  STAMP=$(date -u +%Y-%m-%d)
  if [ -n "${OUT:-}" ]; then
    RESULTS=/tmp/gpu/results
  else
    RESULTS=benchmarks/results
  fi
  mkdir -p "$RESULTS"
  LOG="$RESULTS/gpu-check-$STAMP.log"
}

# Returned files: on the device, one archive of $RESULTS plus the log, rebuilt after each step.
save() {
  if [ -n "${OUT:-}" ]; then
    tar -C "$RESULTS" -czf "$OUT/gpu-check.tgz" . && cp "$LOG" "$OUT/gpu-check.log"
  fi
}

# step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what the budget has left); log; save.
step() {
  local name=$1 limit=$2 left rc=0
  shift 2
  left=$((${BUDGET_S:-100000} - SECONDS - 10))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    return 0
  fi
  [ "$limit" -lt "$left" ] || limit=$left
  echo "== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$LOG"
  # A step is a function of this script: timeout runs it in a child bash that inherits them.
  export -f probe gpu_tests runpath bench_cuda bench_cpu
  export PY RESULTS STAMP
  timeout -k 10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee -a "$LOG" || rc=$?
  echo "== $name: exit ${rc} at ${SECONDS}s" | tee -a "$LOG"
  save
}

probe() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nproc
  "$PY" - <<'PY'
import sys, onnxruntime as ort
print(sys.version.split()[0], "onnxruntime", ort.__version__, ort.__file__)
print("available providers:", ort.get_available_providers())
from rnnserve.server.runtime import choose_device, cuda_problem
print("cuda problem:", cuda_problem())
print("device choice:", choose_device("auto"))
PY
  # How far CUDA's arithmetic moves a session's numbers: the bench LSTM, 64 sessions, row by
  # row alone vs in the batch, with onnxruntime's default TF32 matmuls and without, vs CPU.
  "$PY" - "$RESULTS/drift-$STAMP-cuda.json" <<'PY'
import json, sys
import numpy as np, onnxruntime as ort
from rnnserve.bench.model import build_lstm
from rnnserve.server.runtime import choose_device
choose_device("auto")  # loads the CUDA libraries the way the server does
model = build_lstm()
rng = np.random.default_rng(0)
feeds = {"x": rng.standard_normal((1, 64, 32)).astype(np.float32)}
for kind in ("h", "c"):
    for layer in range(2):
        feeds[f"{kind}0_{layer}"] = rng.standard_normal((1, 64, 256)).astype(np.float32)
def run(providers, feeds):
    return ort.InferenceSession(model, providers=providers).run(None, feeds)
cpu = run(["CPUExecutionProvider"], feeds)
report = {}
for tf32 in (1, 0):
    providers = [("CUDAExecutionProvider", {"use_tf32": str(tf32)}), "CPUExecutionProvider"]
    batch = run(providers, feeds)
    alone = [run(providers, {k: v[:, r : r + 1] for k, v in feeds.items()}) for r in range(8)]
    report[f"use_tf32={tf32}"] = {
        "max_abs_alone_vs_batch": max(
            float(np.abs(a[i] - batch[i][:, r : r + 1]).max())
            for r, a in enumerate(alone) for i in range(len(batch))
        ),
        "max_abs_vs_cpu": max(float(np.abs(b - c).max()) for b, c in zip(batch, cpu)),
    }
print("CUDA arithmetic drift (bench LSTM, batch 64):", json.dumps(report))
open(sys.argv[1], "w").write(json.dumps(report, indent=1) + "\n")
PY
}

gpu_tests() {
  RNNSERVE_GPU_REPORT="$RESULTS/placement-$STAMP-cuda.json" \
    "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/server/test_device.py
}

# runpath DEVICE [FLAGS]: the run path alone (gather, run, scatter) at each batch size; the
# file is named for the device and the flags (--peephole, --tf32).
runpath() {
  local name="runpath-$STAMP-$1" flag
  for flag in "${@:2}"; do name="$name-${flag#--}"; done
  [ "$1" = cpu ] && name="$name-gpuhost"
  "$PY" -m rnnserve.bench.runpath --device "$1" --batches 1 64 256 1024 4096 \
    --rounds 3 --seconds-per-round 0.25 --out "$RESULTS/$name.json" "${@:2}" >/dev/null
}

bench_cuda() {
  "$PY" -m rnnserve.server bench --device cuda --sessions 1,64,256,1024,4096 --max-batch 4096 \
    --duration "${BENCH_DURATION:-1.5}" --rounds "${BENCH_ROUNDS:-1}" --client-procs 4 \
    --frontends "${FRONTENDS:-1,2,4,8}" \
    --memory-sessions 10000 --no-profile --name "bench-$STAMP-cuda${RUN_TAG:-}" --out-dir "$RESULTS"
}

# The engine process alone over the pipe on CUDA (what every frontend shares; with the run on
# the GPU its CPU per step is what caps many frontends), 4 load processes for frontends.
engine_pipe() {
  "$PY" -m rnnserve.bench.engine_pipe --device cuda --sessions 256 1024 4096 --load-procs 4 \
    --seconds 1.5 --json "$RESULTS/engine-pipe-$STAMP-cuda.json"
}

bench_cpu() {
  "$PY" -m rnnserve.server bench --device cpu --sessions 1,64,256,1024 --max-batch 256 \
    --quick --client-procs 4 --frontends 1 --memory-sessions 1000 --no-profile \
    --name "bench-$STAMP-cpu-gpuhost" --out-dir "$RESULTS"
}

# Steps run in this order, each only if named in $ONLY (default: all of them).
STEPS="probe gpu_tests runpath_cuda runpath_tf32 bench_cuda engine_pipe runpath_peephole runpath_cpu bench_cpu"

wanted() { [[ " ${ONLY:-$STEPS} " == *" $1 "* ]]; }

tests() {
  environment
  ! wanted probe || step probe 60 probe
  ! wanted gpu_tests || step "gpu tests" 150 gpu_tests
}

bench() {
  environment
  ! wanted runpath_cuda || step "run path, cuda" 90 runpath cuda
  ! wanted runpath_tf32 || step "run path, cuda, TF32" 60 runpath cuda --tf32
  ! wanted bench_cuda || step "bench, cuda" 300 bench_cuda
  ! wanted engine_pipe || step "engine over the pipe, cuda" 60 engine_pipe
  ! wanted runpath_peephole || step "run path, peephole LSTM, cuda" 60 runpath cuda --peephole
  ! wanted runpath_cpu || step "run path, cpu" 60 runpath cpu
  ! wanted bench_cpu || step "bench, cpu contrast" 150 bench_cpu
}

check() {
  tests
  bench
  ls -l "$RESULTS" | tee -a "$LOG"
  save
}

plots() {
  local file
  for file in "$@"; do
    .venv/bin/python - "$file" <<'PY'
import json, pathlib, sys
from rnnserve.bench.report import write_plots
path = pathlib.Path(sys.argv[1])
print(*write_plots(json.loads(path.read_text()), path.parent, path.stem))
PY
  done
}

case "${1:-}" in
  prepare | finish | check | tests | bench) "$1" ;;
  plots) shift && plots "$@" ;;
  *) sed -n '2,8p' "$0" >&2 && exit 2 ;;
esac
