#!/usr/bin/env bash
# Install SAELens 6.x into its own virtual environment, for the interop tests in
# tests/test_saelens_interop.py (they call this venv's python; they skip when it is absent).
#
#   bash scripts/install_saelens.sh [VENV_DIR]        # default: <repo>/.venv-saelens
#
# Environment:
#   SAELENS_SPEC  the sae-lens requirement (default: sae-lens==6.54.*)
#   TORCH_SPEC    the torch pin (default: torch==2.13.0, the CPU build; a constraints file keeps
#                 sae-lens and its dependencies from upgrading it to a CUDA build)
#   PYTHON        the interpreter that creates the venv (default: python3)
#
# Then: SAELAB_SAELENS_PYTHON=<VENV_DIR>/bin/python pytest tests/test_saelens_interop.py
# (the default path needs no variable).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-saelens}"
saelens_spec="${SAELENS_SPEC:-sae-lens==6.54.*}"
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

# torch first: a CPU wheel when one is reachable (a local wheel directory or the CPU index), then
# sae-lens with torch held at that version.
echo "installing $torch_spec"
if ! "${pip[@]}" install --quiet "$torch_spec"; then
    "${pip[@]}" install --quiet "$torch_spec" --index-url https://download.pytorch.org/whl/cpu
fi
echo "installing $saelens_spec"
"${pip[@]}" install --quiet -c "$constraints" "$saelens_spec"

"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
print(f"sae-lens {md.version('sae-lens')}, transformer-lens {md.version('transformer-lens')}, "
      f"torch {torch.__version__} (cuda build: {torch.version.cuda is not None})")
from sae_lens import SAE  # noqa: F401  (the import the interop helper needs)
EOF
echo "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$venv" | cut -f1): $venv"
