#!/usr/bin/env bash
# Install SAELens 6.x into its own virtual environment, for the interop tests in
# tests/test_saelens_interop.py (they call this venv's python; they skip when it is absent) and the benchmarks.
#
#   bash scripts/install_saelens.sh [VENV_DIR]        # default: <repo>/.venv-saelens
#
# Environment: SAELENS_SPEC (default: sae-lens==6.54.*); TORCH_SPEC and PYTHON as for scripts/install_peer.sh.
# Then: SAELAB_SAELENS_PYTHON=<VENV_DIR>/bin/python pytest tests/test_saelens_interop.py
# (the default path needs no variable).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-saelens}"
bash "$repo_root/scripts/install_peer.sh" "${SAELENS_SPEC:-sae-lens==6.54.*}" "$venv" sae_lens
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
print(f"sae-lens {md.version('sae-lens')}, transformer-lens {md.version('transformer-lens')}, "
      f"torch {torch.__version__} (cuda build: {torch.version.cuda is not None})")
from sae_lens import SAE  # noqa: F401  (the import the interop helper needs)
PY
