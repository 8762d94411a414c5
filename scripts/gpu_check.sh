#!/usr/bin/env bash
# The GPU check (one H100, within 8 minutes): on the Qwen2-7B shape (random weights) the generation benchmark (also
# the machine's warm-up), the training benchmark (TRL defaults before and after the project path, within the
# issue's memory bound and on the card's budget), the six stages and a ZeRO-3 launch on a small random-weight
# model, then — if time is left — profiled ablations (cuDNN attention, 4 x 4 with the shared prefix), the training
# benchmark compiled, partial checkpointing at 16 samples per micro-batch, the 24 GB profile's peak memory (4-bit)
# and the Llama-3-8B shape. Its output is what the README's performance tables quote.
#
# Prepared on a machine with the project installed (make install), then run on the GPU machine:
#   bash scripts/gpu_check.sh prepare      # wheels into .whl/, the tokenizer into .gpu/ (both git-ignored)
#   bash scripts/gpu_check.sh              # there: installs the wheels, runs everything, writes $OUT
# Everything lands in three files: $OUT/results.jsonl (one JSON line per run, each tagged with its step),
# $OUT/env.txt (card, driver, versions, step times) and $OUT/log.txt (stderr of every step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"

# The GPU machine's Python (KINDS.md: python3 is 3.12 there); the wheels are downloaded for it.
GPU_PYTHON=3.12
if [ "${1:-}" = "prepare" ]; then
  rm -rf .whl && mkdir -p .whl .gpu
  failed=""
  for spec in trl==1.16.0 datasets==5.2.0 transformers==5.24.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19 \
              hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
              liger-kernel==0.8.5 bitsandbytes==0.50.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version $GPU_PYTHON --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      -d .whl "$spec" 2>&1 | grep -v "^WARNING: Location"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed="$failed $spec"
  done
  # One shot on a lent GPU: a missing wheel is found here, not there.
  if [ -n "$failed" ]; then echo "prepare: could not download:$failed" >&2; exit 1; fi
  # bitsandbytes ships a library per CUDA version (43 MB); keep the one for the GPU machine's CUDA 13.0 torch.
  python3 - <<'EOF'
import glob, os, zipfile
path = glob.glob(".whl/bitsandbytes-*.whl")[0]
keep = lambda name: not (name.endswith(".so") and "cuda130" not in name and "_cpu" not in name)
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not keep(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if keep(l.split(b",")[0].decode()))
        dst.writestr(item, data)
os.replace(slim, path)
EOF
  # DeepSpeed ships as a source archive; without its compiled ops it builds a pure-Python wheel.
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  .venv/bin/python -c "from ironman_nb.models import load_tokenizer; load_tokenizer('embedded:SmolLM2-135M-Instruct').save_pretrained('.gpu/tokenizer')"
  du -sh .whl .gpu
  exit 0
fi

started=$(date +%s)
if [ -d .whl ]; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       2>> "$OUT/log.txt"; then
    # One wheel that does not fit (another Python, say) fails them all: install the others one by one and go on
    # with what installs (a benchmark that needs a missing one fails alone, named in log.txt).
    for wheel in .whl/*.whl; do
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
        2>> "$OUT/log.txt" || echo "not installed: $wheel" | tee -a "$OUT/env.txt"
    done
  fi
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
{
  python3 -c "import sys; v = '%d.%d' % sys.version_info[:2]; print('python', v, '' if v == '$GPU_PYTHON' else '(the wheels are for $GPU_PYTHON)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, trl, peft, datasets, liger_kernel, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'bitsandbytes', bitsandbytes.__version__)"
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# step NAME MIN_S MAX_S CMD...: run CMD if at least MIN_S of the budget is left, for at most MAX_S (and what is
# left); its JSON lines go to results.jsonl tagged with the step, its stderr to log.txt. A step cut short still
# writes its finished runs and, for the training benchmark, their summary (it handles SIGTERM).
step() {
  local name=$1 need=$2 cap=$3; shift 3
  local left=$(( BUDGET_S - ($(date +%s) - started) ))
  if [ "$left" -lt "$need" ]; then echo "skipped $name: ${left} s left" | tee -a "$OUT/env.txt"; return; fi
  [ "$left" -lt "$cap" ] || left=$cap
  local t0=$(date +%s)
  echo "=== $name" >> "$OUT/log.txt"
  timeout "$left" "$@" 2>> "$OUT/log.txt" | python3 -c "import json, sys
for line in sys.stdin:
    try:
        record = json.loads(line)
    except ValueError:
        continue  # progress lines
    if isinstance(record, dict):
        print(json.dumps({'step': '$name', **record}, ensure_ascii=False), flush=True)" | tee -a "$OUT/results.jsonl"
  echo "$name: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
}

# A CPU smoke test of this script sets these to small model folders (with tokenizer files) and a few samples —
# at least 64: with fewer, the pipeline trains one optimizer step, still at learning rate 0 in its warm-up, and
# the merge rightly refuses the unchanged adapter. (Move a prepared .whl/ aside first: its wheels are for the GPU
# machine's Python; and put .venv/bin first on PATH, as the script calls python3.) On a 2-core CPU: ~18 minutes.
TOK=${GPU_CHECK_TOKENIZER:-.gpu/tokenizer} M7=${GPU_CHECK_MODEL:-qwen2-7b} M8=${GPU_CHECK_MODEL2:-llama3-8b}
SAMPLES=${GPU_CHECK_SAMPLES:-256}
# Generation first: notebook 05's batched path (sdpa off cuDNN's kernels on a GPU) and the same with torch's own
# choice, against plain one-at-a-time `generate`. It is also the machine's warm-up: on a freshly started H100 the
# first process ran ~2x slower on its CPU side (TRL's defaults: 2,174 tokens/s as the machine's first process,
# 4,052 later in a fresh process), which would flatter every ratio against a baseline measured first.
step generate_qwen2-7b 60 120 python3 -m ironman_nb.bench generate --model $M7 --tokenizer $TOK --prompts 8 --new-tokens 64 --batch 8
# The headline, each run in a fresh process (~50 s): TRL's defaults before and after the project path — within
# the issue's memory bound (TRL defaults' 15.8 GiB + 50 % as `auto`'s budget: one micro-batch of 16, most layers
# checkpointed) and on an 80 GB card's budget (one micro-batch of 16 with the shared prefix, no checkpointing) —
# so that drift shows as two baseline readings; the summary's ratios use their median.
step train_qwen2-7b 200 260 python3 -m ironman_nb.bench train --model $M7 --tokenizer $TOK --batch 4 --accum 4 \
  --steps 3 --warmup 1 --rounds 1 --configs "baseline;project:max_memory_gib=23.7;project;baseline"
# The six stages on a GPU (bf16, merge, batched generation, the held-out NLL) and a ZeRO-3 launch.
step pipeline 90 180 python3 scripts/gpu_pipeline.py --zero3 --tokenizer $TOK --run-dir /tmp/gpu_run --samples $SAMPLES
# Profiled ablations (one more step under torch.profiler: the device's busy share, kernel launches, top ops):
# sdpa free to pick cuDNN's attention (torch's default; off in `auto` for its CPU cost per call), and 4 x 4 with
# the shared prefix (within the bound without checkpointing, but waiting on kernel launches).
step train_qwen2-7b_ablations 110 170 python3 -m ironman_nb.bench train --model $M7 --tokenizer $TOK --batch 4 \
  --accum 4 --steps 3 --warmup 1 --rounds 1 --profile --configs "project:cudnn_attention=true;\
project:merge_micro_batches=off,shared_prefix=on;project"
# torch_compile: fewer, generated kernels and one autograd node per compiled module, against the launch-bound
# steps above. First within 23.7 GiB (the issue's bound: the compiler's default budget and checkpointed layers),
# then with a 36 GiB budget, where `auto` picks the lowest activation memory budget (the backward recomputes the
# MLP's products), no layer checkpointed; then on the card's budget — most telling first, as the budget may cut
# the step. Three warm-up steps: the first two shapes compile (the second makes the sequence length dynamic).
step train_qwen2-7b_compile 120 200 python3 -m ironman_nb.bench train --model $M7 --tokenizer $TOK --batch 4 --accum 4 \
  --steps 3 --warmup 3 --rounds 1 --configs "project:torch_compile=true,max_memory_gib=23.7;\
project:torch_compile=true,max_memory_gib=36;project:torch_compile=true"
# Partial checkpointing without the shared prefix: 16 samples in one micro-batch of whole padded rows; `auto`
# checkpoints the fewest layers that fit (estimated: 5 of 28 at the longest batch), against every layer.
step train_qwen2-7b_batch16 110 150 python3 -m ironman_nb.bench train --model $M7 --tokenizer $TOK --batch 16 --accum 1 \
  --steps 2 --warmup 1 --rounds 1 \
  --configs "project:shared_prefix=off;project:shared_prefix=off,gradient_checkpointing=on"
step train_qwen2-7b_4bit 90 120 python3 -m ironman_nb.bench train --model $M7 --tokenizer $TOK --quantization 4bit \
  --batch 2 --accum 8 --steps 2 --warmup 1 --rounds 1 --configs project --scratch /tmp
step train_llama3-8b 110 120 python3 -m ironman_nb.bench train --model $M8 --tokenizer $TOK --batch 4 --accum 4 \
  --steps 3 --warmup 1 --rounds 1 --configs "baseline;project"
echo "gpu_check finished in $(( $(date +%s) - started )) s" | tee -a "$OUT/env.txt"
