#!/usr/bin/env bash
# Install a peer library (for benchmarks and interop tests) into its own virtual environment, beside the CPU torch
# saelab uses:
#
#   bash scripts/install_peer.sh SPEC VENV_DIR [IMPORT]     # e.g. eai-sparsify .venv-sparsify sparsify
#
# Environment:
#   TORCH_SPEC    the torch pin (default: torch==2.13.0, the CPU build; a constraints file keeps the peer and
#                 its dependencies from upgrading it to a CUDA build)
#   PYTHON        the interpreter that creates the venv (default: python3)
set -euo pipefail

spec="$1"
venv="$2"
module="${3:-}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$torch_spec" > "$constraints"

# torch first: a CPU wheel when one is reachable (a local wheel directory or the CPU index), then the peer with
# torch held at that version.
echo "installing $torch_spec"
if ! "${pip[@]}" install --quiet "$torch_spec"; then
    "${pip[@]}" install --quiet "$torch_spec" --index-url https://download.pytorch.org/whl/cpu
fi
echo "installing $spec"
"${pip[@]}" install --quiet -c "$constraints" "$spec"
if [ -n "$module" ]; then
    "$venv/bin/python" -c "import $module, torch; print('$spec ok; torch', torch.__version__)"
fi
echo "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1): $venv"
