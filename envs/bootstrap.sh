#!/usr/bin/env bash
# Build the project's virtual environment from the pinned lock file.
#   envs/bootstrap.sh VENV_DIR
# The venv lives outside the clone (see the Makefile: a cache folder keyed by the lock file's hash), so CI and
# later clones on the same machine reuse it; a fresh machine builds it (about 3 minutes).
set -euo pipefail
venv=${1:?usage: envs/bootstrap.sh VENV_DIR}
here=$(cd "$(dirname "$0")" && pwd)

if [ -f "$venv/.complete" ]; then
  exit 0
fi
rm -rf "$venv"                       # an interrupted build is started again from scratch
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade "pip>=24"
# torch 2.14.1 + torchvision 0.29.1 is the matched pair (torchvision is built against one torch); everything is
# pinned, and the CUDA wheels (nvidia-*, cuda-*, triton) only on Linux, as torch itself declares them.
"$venv/bin/pip" install --quiet -r "$here/requirements.lock"
"$venv/bin/python" - <<'PY'
import torch, torchvision, diffusers, accelerate, cleanfid, open_clip, lmdb, lpips, snakemake, dvc  # noqa: F401
assert torchvision.ops.nms is not None
print(f"environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}")
PY
touch "$venv/.complete"
