#!/usr/bin/env bash
# The GPU check (one H100, within 8 minutes): the training benchmark and the generation benchmark on the
# Qwen2-7B shape (random weights), then the six stages on a small random-weight model. Its output is what
# the README's performance table quotes.
#
# Prepared on a machine with the project installed (make install), then run on the GPU machine:
#   bash scripts/gpu_check.sh prepare      # wheels into .whl/, the tokenizer into .gpu/ (both git-ignored)
#   bash scripts/gpu_check.sh              # there: installs the wheels, runs everything, writes $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"

if [ "${1:-}" = "prepare" ]; then
  mkdir -p .whl .gpu
  for spec in trl==1.16.0 datasets==5.2.0 transformers==5.24.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19 \
              hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "$spec"
  done
  # DeepSpeed ships as a source archive; without its compiled ops it builds a pure-Python wheel.
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  .venv/bin/python -c "from ironman_nb.models import load_tokenizer; load_tokenizer('embedded:SmolLM2-135M-Instruct').save_pretrained('.gpu/tokenizer')"
  du -sh .whl .gpu
  exit 0
fi

started=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, trl, peft, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" | tee "$OUT/versions.txt"

python3 -m ironman_nb.bench train --model qwen2-7b --tokenizer .gpu/tokenizer --batch 4 --accum 4 --steps 4 --warmup 1 --rounds 2 \
  2> "$OUT/bench_train.err" | grep --line-buffered '^{"' | tee "$OUT/bench_train_qwen2-7b.jsonl"
python3 -m ironman_nb.bench generate --model qwen2-7b --tokenizer .gpu/tokenizer --prompts 8 --new-tokens 64 --batch 8 \
  2> "$OUT/bench_generate.err" | grep --line-buffered '^{"' | tee "$OUT/bench_generate_qwen2-7b.jsonl"
python3 scripts/gpu_pipeline.py --zero3 --tokenizer .gpu/tokenizer --run-dir /tmp/gpu_run 2> "$OUT/pipeline.err" | grep -E '^\[gpu_pipeline\]|^\{' | tee "$OUT/pipeline.log"
if [ $(( $(date +%s) - started )) -lt 300 ]; then
  python3 -m ironman_nb.bench train --model llama3-8b --tokenizer .gpu/tokenizer --batch 4 --accum 4 --steps 3 --warmup 1 --rounds 1 \
    2> "$OUT/bench_train_llama.err" | grep --line-buffered '^{"' | tee "$OUT/bench_train_llama3-8b.jsonl"
fi
echo "gpu_check finished in $(( $(date +%s) - started )) s"
