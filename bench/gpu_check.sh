#!/usr/bin/env bash
# GPU check: build llama-cpp-python with CUDA for this machine's GPU only, then run the real-width slice
# with all experts in RAM, half of them on the GPU, and all on the GPU, and print one table. Then the placement
# checks tests/test_rpc.py runs on a loopback RPC device, on the GPU (bench/placement_check.py): experts on it,
# the whole model on it, two sequences planned for it, against CPU-only and the plan's figures.
# Meant for a machine with one large NVIDIA GPU; about 10 minutes (the CUDA build is most of it).
#
#   bash bench/gpu_check.sh            # prints the table; also writes bench/out/gpu_check.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
mkdir -p "$OUT"
VENV=${GPU_VENV:-/tmp/cascade-gpu-venv}

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# CUDA for the local GPU's architecture only: a fraction of the all-architectures build time.
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native -DGGML_RPC=ON" FORCE_CMAKE=1 \
  "$VENV/bin/pip" install -q --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
"$VENV/bin/pip" install -q -e .
PY="$VENV/bin/python"
"$PY" -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'CUDA build failed'"

SLICE="$OUT/slice-v2-MEM_x_E"
GGUF="$OUT/slice-q4-moe.gguf"
[ -f "$SLICE/config.json" ] || "$PY" -m cascade_local.testing.checkpoint_fixture slice "$SLICE"
[ -f "$GGUF" ] || "$PY" -m cascade_local convert "$SLICE" -o "$GGUF" >/dev/null

"$PY" - "$GGUF" <<'PYEOF' | tee "$OUT/gpu_check.md"
import sys, time
from cascade_local.engine import Request
from cascade_local.runtime import PlacementOptions, open_engine
from cascade_local.sampling import SamplingParams

gguf = sys.argv[1]
prompt = [20 + (i * 7) % 700 for i in range(512)]
rows = []
for label, options in [
    ("all experts in RAM (--cpu-moe)", PlacementOptions(cpu_moe=True)),
    ("half the expert layers in RAM (--n-cpu-moe 3)", PlacementOptions(n_cpu_moe=3)),
    ("everything on the GPU", PlacementOptions()),
]:
    started = time.perf_counter()
    engine, plan = open_engine(gguf, ctx=4096, parallel=1, placement=options)
    load = time.perf_counter() - started
    engine.generate(Request(prompt[:32], SamplingParams(temperature=0), max_tokens=8))  # warm up
    result = engine.generate(Request(prompt, SamplingParams(temperature=0), max_tokens=128))
    gpu_gb = plan.need("GPU") / 2**30
    rows.append(f"| {label} | {gpu_gb:.2f} | {load:.1f} | {result.prompt_tokens_per_second:.0f} "
                f"| {result.generation_tokens_per_second:.1f} |")
    engine.close()
print("| placement | planned VRAM GiB | load s | prompt tok/s (512) | generation tok/s (128) |")
print("|---|--:|--:|--:|--:|")
print("\n".join(rows))
PYEOF

echo
"$PY" bench/placement_check.py "$GGUF" | tee -a "$OUT/gpu_check.md"
