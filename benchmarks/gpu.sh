#!/usr/bin/env bash
# The GPU measurements in one run (issue: fast at every width), writing one JSON:
#
#   bash benchmarks/gpu.sh [OUT.json] [MODEL]      # on a CUDA machine: ~5-8 minutes
#   bash benchmarks/gpu.sh --small                 # any machine, seconds: checks that it still runs (CI does)
#
# SAE steps from activations in memory for topk, batchtopk and jumprelu at 8x and 32x (d_in 576), plain,
# torch.compile and bf16 autocast; training end to end from MODEL (default: the embedded SmolLM2-135M; a folder
# with config.json and tokenizer files but no weights gets random weights of that shape, which run as fast),
# plain and autocast; tokens/s and peak GPU memory of each. It needs nothing but this checkout and a Python with
# torch, transformers and saelab's dependencies (no network: saelab is imported from src/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--small" ]; then
  OUT=${2:-$(mktemp -d)/gpu.json}
  exec "$PYTHON" benchmarks/step_speed.py --small --modes plain,autocast --end-to-end "${3:-smollm2-135m}" \
    --end-to-end-modes plain --architectures topk,jumprelu --hook blocks.0.hook_resid_post --json "$OUT"
fi
OUT=${1:-benchmarks/results/gpu.json}
MODEL=${2:-smollm2-135m}
DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" != cuda ]; then
  echo "benchmarks/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine," \
       "or with --small to check the script on this one" >&2
  exit 2
fi
if [ -d "$MODEL" ] && ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  "$PYTHON" - "$MODEL" <<'PY'
import sys
from transformers import AutoConfig, AutoModelForCausalLM
folder = sys.argv[1]
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))  # random weights of that shape
model.save_pretrained(folder)
PY
fi
"$PYTHON" - <<'PY'
import torch; print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
PY
"$PYTHON" benchmarks/step_speed.py --device cuda --architectures topk,batchtopk,jumprelu --expansions 8,32 \
  --modes plain,compile,autocast --steps 30 --end-to-end "$MODEL" --end-to-end-modes plain,autocast \
  --end-to-end-tokens 409600 --lm-batch-size 64 --json "$OUT"
echo "benchmarks/gpu.sh: wrote $OUT"
