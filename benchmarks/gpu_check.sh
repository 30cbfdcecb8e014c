#!/usr/bin/env bash
# The GPU check of rnnserve (issue 14), following ../shared/GPU.md.
#
#   bash benchmarks/gpu_check.sh prepare    here: wheels into .gpu/ (git-ignored), prints the plan
#   bash benchmarks/gpu_check.sh check      on the GPU host, after the plan's install calls:
#                                           GPU tests + run paths + benchmarks, in one command
#   bash benchmarks/gpu_check.sh tests|bench  the two halves of `check`, if one call is too short
#   bash benchmarks/gpu_check.sh plots FILE.json...   here: the PNGs of returned bench JSONs
#
# The GPU host (air-gapped, Python 3.12, torch with the CUDA 13 / cuDNN 9 wheels, numpy,
# protobuf, grpcio, prometheus-client, statsmodels, pytest, a CPU-only onnxruntime) gets:
#   calls 0..n-2   carry [".gpu/k"]               mkdir -p /tmp/gpu && cat .gpu/k/part >> /tmp/gpu/ort.part
#   call  n-1      carry [".gpu/n-1", ".gpu/whl"] same, then: bash .gpu/whl/gpu-install
#   last call      carry [".gpu/extra"]           bash benchmarks/gpu_check.sh check
# one right after the other (the host keeps /tmp only while it stays up). `check` installs the
# server's other wheels (.gpu/extra) into /tmp/site beside onnxruntime-gpu, points
# PYTHONPATH at /tmp/site and at the project's source folders (the rnnserve.* namespace is
# mapped by package-dir, so a folder of symlinks stands in for an install), and puts the NVIDIA
# wheels' lib folders on LD_LIBRARY_PATH (the server loads CUDA through preload_dlls and
# never imports torch). Results go to $OUT (the device call's output folder), else
# benchmarks/results: copy them into benchmarks/results/ and run `plots` on the bench JSONs.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the server, its tests and the benchmark import beyond what the GPU host has. Pure-Python
# packages are pinned to the versions the project's own environment runs; grpcio, protobuf and
# the gRPC add-ons stay unpinned so they match the latest grpcio-health-checking/-reflection
# that gpu-wheels fetches (generated code checks that its runtime is at least as new).
EXTRA_WHEELS=(
  onnx==1.23.2 ml_dtypes==0.6.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  typer==0.29.2 click==8.5.1 shellingham==1.5.4 annotated-doc==0.0.7
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  grpcio protobuf grpcio-status googleapis-common-protos
  redis==8.1.0 pyzmq==27.3.0 psutil==7.2.2
  pytest==9.2.0 pluggy iniconfig packaging pytest-asyncio==1.5.0 pytest-timeout==2.4.0
)
SITE=/tmp/site
SHIM=/tmp/rnnserve-src

prepare() {
  ../shared/tools/gpu-wheels "${EXTRA_WHEELS[@]}"
  # gpu-wheels leaves every small wheel in .gpu/whl, which travels with the last onnxruntime
  # part; the server's own wheels travel in the check's call instead (room under 64 MiB).
  mkdir -p .gpu/extra
  for whl in .gpu/whl/*.whl; do
    case "$(basename "$whl")" in
      grpcio_health_checking-* | grpcio_reflection-*) ;;
      *) mv "$whl" .gpu/extra/ ;;
    esac
  done
  local parts last
  parts=$(find .gpu -maxdepth 1 -name '[0-9]*' -type d | wc -l)
  last=$((parts - 1))
  {
    echo "GPU check plan: $((parts + 1)) device calls, one right after the other"
    for k in $(seq 0 "$last"); do
      local carry="[\".gpu/$k\"]" tail=""
      if [ "$k" = "$last" ]; then
        carry="[\".gpu/$k\", \".gpu/whl\"]" tail=" && bash .gpu/whl/gpu-install"
      fi
      echo "call $k: carry $carry"
      echo "  mkdir -p /tmp/gpu && cat .gpu/$k/part >> /tmp/gpu/ort.part$tail"
    done
    echo "call $parts: carry [\".gpu/extra\"], timeout_s 590"
    echo "  bash benchmarks/gpu_check.sh check"
    echo "sizes:"
    du -sh .gpu/[0-9]* .gpu/whl .gpu/extra
  } | tee .gpu/PLAN
}

environment() {
  if [ ! -f "$SITE/.rnnserve-extra" ]; then
    test -d "$SITE/onnxruntime" || { echo "onnxruntime-gpu is not in $SITE: run the install calls first" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .gpu/extra/*.whl
    touch "$SITE/.rnnserve-extra"
  fi
  mkdir -p "$SHIM/rnnserve"
  local part
  for part in server:server client:client models:models v1:proto/rnnserve/v1 \
    bench:benchmarks/bench testing:tests/testing; do
    ln -sfn "$PWD/${part#*:}" "$SHIM/rnnserve/${part%%:*}"
  done
  export PYTHONPATH="$SITE:$SHIM"
  # The NVIDIA wheels that came with torch, found without importing torch.
  local libs
  libs=$(python3 - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
roots = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
print(":".join(str(lib) for root in roots for lib in sorted(root.glob("*/lib")) if lib.is_dir()))
PY
  )
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  OUT_DIR=${OUT:-benchmarks/results}
  STAMP=$(date -u +%Y-%m-%d)
  mkdir -p "$OUT_DIR"
}

tests() {
  environment
  python3 - <<'PY' 2>&1 | tee "$OUT_DIR/gpu-check-$STAMP-device.txt"
import onnxruntime as ort
from rnnserve.server.runtime import choose_device, cuda_problem
print("onnxruntime", ort.__version__, ort.__file__)
print("available providers:", ort.get_available_providers())
print("cuda problem:", cuda_problem())
print("device choice:", choose_device("auto"))
PY
  local rc=0
  RNNSERVE_GPU_REPORT="$OUT_DIR/placement-$STAMP-cuda.json" \
    python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/server/test_device.py 2>&1 \
    | tee "$OUT_DIR/gpu-check-$STAMP-pytest.txt" || rc=$?
  python3 -m rnnserve.bench.runpath --device cuda --batches 1 64 256 1024 4096 \
    --rounds 5 --seconds-per-round 0.3 --out "$OUT_DIR/runpath-$STAMP-cuda.json" >/dev/null
  python3 -m rnnserve.bench.runpath --device cpu --batches 1 64 256 1024 4096 \
    --rounds 3 --seconds-per-round 0.3 --out "$OUT_DIR/runpath-$STAMP-cpu.json" >/dev/null
  echo "gpu tests exit status: $rc"
  return "$rc"
}

bench() {
  environment
  local common=(--memory-sessions 10000 --no-profile --frontends 1 --out-dir "$OUT_DIR")
  python3 -m rnnserve.server bench --device cuda --sessions 1,64,256,1024,4096 --max-batch 4096 \
    --duration 2 --name "bench-$STAMP-cuda" "${common[@]}"
  python3 -m rnnserve.server bench --device cpu --sessions 1,64,256,1024 --max-batch 256 \
    --quick --name "bench-$STAMP-cpu-contrast" "${common[@]}"
}

check() {
  local rc=0
  tests || rc=$?
  bench
  ls -l "$OUT_DIR"
  return "$rc"
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
  prepare | check | tests | bench) "$1" ;;
  plots) shift && plots "$@" ;;
  *) sed -n '2,9p' "$0" >&2 && exit 2 ;;
esac
