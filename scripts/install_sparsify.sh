#!/usr/bin/env bash
# Install EleutherAI's sparsify (eai-sparsify on PyPI) into its own virtual environment, for
# benchmarks/vs_sparsify.py.
#
#   bash scripts/install_sparsify.sh [VENV_DIR]       # default: <repo>/.venv-sparsify
#
# Environment: SPARSIFY_SPEC (default: eai-sparsify); TORCH_SPEC and PYTHON as for scripts/install_peer.sh.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/scripts/install_peer.sh" "${SPARSIFY_SPEC:-eai-sparsify}" "${1:-$repo_root/.venv-sparsify}" sparsify
