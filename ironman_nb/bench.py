"""Speed benchmarks, measured side by side in one command (each training run in its own process).

    python -m ironman_nb.bench train    [--model embedded:SmolLM2-135M-Instruct|qwen2-7b|llama3-8b|PATH|HUB_ID] [--steps 2] [--batch 4]
                                        [--accum 4] [--rounds 2] [--configs ...]
                                        [--quantization 4bit] ...
    python -m ironman_nb.bench generate [--model ...] [--prompts N] [--new-tokens N] [--batch N]

`train` runs the project's training path and a baseline that is exactly TRL's `SFTConfig` defaults
(same model, data, LoRA, batch and steps; TRL's default bf16 on GPUs and on CPUs with native bf16, i.e.
AVX-512 BF16 or AMX; fp32 on other CPUs, where bf16 ran ~100x slower), alternating, each after warm-up steps.
It prints one JSON line per run and a final line with `ratio` = project tokens/s ÷ baseline tokens/s
(medians; `ratio_per_round` pairs the runs of each round). Tokens are real
tokens (padding not counted). The data is the shipped persona set with its system prompt, as users train it.
`--configs "baseline;baseline:gradient_checkpointing=false;project;project:liger_kernel=off"` adds ablations
(SFTConfig fields for the baseline, TrainConfig fields for the project path); `--configs project
--quantization 4bit` measures the 24 GB profile alone (peak memory).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .config import DEFAULT_SYSTEM_PROMPT, EMBEDDED_MODEL, TrainConfig, read_yaml
from .data import chat_messages, read_sheet
from .launch import signals_handled
from .train import RealTokenCount, SharedPrefixCollator, build_trainer, lora_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA = PROJECT_ROOT / "data" / "ironman_ko.csv"
PROMPTS = PROJECT_ROOT / "data" / "eval_prompts.jsonl"

# Random-weight shapes of the models the recipe fine-tuned (weights may be unavailable; speed needs none).
SHAPES = {
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                     rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=5e5, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def load_bench_model(name: str, device: str, precision: str, tokenizer_name: str = EMBEDDED_MODEL,
                     quantization: str = "none", scratch: Path | None = None):
    """(model, tokenizer): a Hub id / folder / the embedded model, or a random-weight shape from SHAPES.

    Random shapes use `tokenizer_name` (default: the embedded model's; its ids fit their vocabularies). A
    random shape in 4-bit is written once to `scratch` and loaded from there, through the same loading code
    as a real model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import load_model, load_tokenizer, torch_dtype

    if name not in SHAPES:
        return load_model(name, precision, device, quantization), load_tokenizer(name)
    tokenizer = load_tokenizer(tokenizer_name)
    if quantization != "none":
        if scratch is None:
            raise ValueError("a random-weight shape in 4-bit needs a scratch folder to be written to")
        folder = scratch / name
        if not (folder / "config.json").is_file():
            model, _ = load_bench_model(name, device, precision, tokenizer_name)
            model.save_pretrained(folder)
            del model
            gc.collect()
        return load_model(str(folder), precision, device, quantization), tokenizer
    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(precision), attn_implementation="sdpa")
    return model, tokenizer


def bench_records(samples: int) -> list[dict]:
    table = read_sheet(str(DATA))
    rows = [r for r in table.rows if r.get("instruction") and r.get("output")]
    rows = (rows * (samples // len(rows) + 1))[:samples]
    return [{"messages": chat_messages({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]},
                                       DEFAULT_SYSTEM_PROMPT)} for r in rows]


class _PeakRSS:
    """Peak resident memory of this process while running (CPU runs; CUDA uses the allocator's peak)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def _step_timer(warmup: int, steps: int, device: str, profile: bool = False):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and real tokens of the `steps` optimizer steps after the warm-up; with `profile`, one more
        step under torch.profiler (after the timed ones, so its overhead is in no timing)."""

        def __init__(self):
            self.trainer = None
            self.start_time = self.start_tokens = None
            self.end_time = self.end_tokens = None
            self.profiler = None
            self.profile: dict | None = None

        def _now(self):
            if device == "cuda":
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if profile and state.global_step == warmup + steps:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as torch_profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                self.profiler = torch_profile(activities=activities)
                self.profiler.__enter__()
                self._profile_start = self._now()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start_time, self.start_tokens = self._now(), self.trainer.real_tokens_seen
            elif warmup < state.global_step <= warmup + steps:
                self.end_time, self.end_tokens = self._now(), self.trainer.real_tokens_seen
            elif self.profiler is not None:
                wall = self._now() - self._profile_start
                self.profiler.__exit__(None, None, None)
                self.profile = summarise_profile(self.profiler, wall, device)
                self.profiler = None

    return StepTimer()


def summarise_profile(profiler, wall_s: float, device: str, top: int = 12) -> dict:
    """One profiled optimizer step in numbers: its wall time, the time the device spent in kernels (on a GPU:
    a step whose kernels fill far less than its wall time waits on the CPU — launch overhead, syncs), kernel
    launches, and the operators taking the most time. The full table goes to stderr."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    on_gpu = device == "cuda"
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(events.table(sort_by=sort_key, row_limit=40), file=sys.stderr)
    if on_gpu:  # a step that waits on the CPU: where the CPU's time goes (cuDNN attention's was found this way)
        print(events.table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    # Operators (CPU-side rows; on a GPU ranked by the time of the kernels each launched itself).
    ranked = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: getattr(e, sort_key),
                    reverse=True)
    summary = {"wall_s": round(wall_s, 3),
               "top_ms": [[e.key[:80], round(getattr(e, sort_key) / 1e3, 1), e.count] for e in ranked[:top]]}
    if on_gpu:
        # The kernels' rows (an operator's row repeats its kernels' time, so only these are summed).
        kernel_s = sum(e.self_device_time_total for e in events
                       if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                             "cuLaunchKernel", "cuLaunchKernelEx"))
        summary.update(kernel_s=round(kernel_s, 3), device_busy=round(kernel_s / wall_s, 3), kernel_launches=launches,
                       top_cpu_ms=[[e.key[:80], round(e.self_cpu_time_total / 1e3, 1), e.count]
                                   for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]])
    return summary


def _counting_baseline_class():
    from trl import SFTTrainer

    class BaselineSFTTrainer(RealTokenCount, SFTTrainer):
        """TRL's SFTTrainer unchanged, except that it counts the real tokens it trains on (without a GPU sync, so
        that counting does not slow it)."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                self.count_real_tokens(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return BaselineSFTTrainer


@dataclasses.dataclass
class BenchArgs:
    model: str = EMBEDDED_MODEL
    # Notebook 02's default shape, and the issue's: 4 x 4 = 16 samples per optimizer step.
    steps: int = 2
    warmup: int = 1
    batch: int = 4
    accum: int = 4
    rounds: int = 2
    max_length: int = 1024
    lora_r: int = 8
    tokenizer: str = EMBEDDED_MODEL
    # Runs in each round: "baseline" (TRL defaults), "project" (TrainConfig defaults, i.e. the fast path `auto`
    # picks), and for ablations "project:NAME=VALUE,…" (TrainConfig fields overridden) or
    # "baseline:NAME=VALUE,…" (SFTConfig fields overridden, e.g. baseline:gradient_checkpointing=false).
    configs: tuple[str, ...] = ("baseline", "project")
    quantization: str = "none"
    scratch: str = ""
    # Each run in a fresh Python process ("on"), so no run inherits another's state: on a GPU, runs in one
    # process disturbed each other (a later TRL-defaults run showed the previous run's peak memory and ran 20 %
    # faster); on a CPU, the project path leaves glibc keeping freed memory for the rest of its process
    # (models.keep_freed_memory), which a TRL-defaults run after it would otherwise inherit.
    isolate: str = "on"
    # One more optimizer step after the timed ones under torch.profiler: the run's line gets a "profile"
    # summary (device busy share, kernel launches, top operators); the full table goes to stderr.
    profile: bool = False

    def __post_init__(self):
        if self.isolate not in ("on", "off"):
            raise ValueError(f"BenchArgs.isolate: 'on' or 'off' (got {self.isolate!r})")
        for field in ("steps", "warmup", "batch", "accum", "rounds"):
            if getattr(self, field) < 1:
                raise ValueError(f"BenchArgs.{field}: at least 1 (got {getattr(self, field)})")
        parsed = [parse_config(name) for name in self.configs]  # fails early on a misspelt kind, field or value
        if self.warmup < COMPILE_WARMUP and any(o.get("torch_compile") for _, o in parsed):
            # The first two batch shapes compile (the second makes the sequence length dynamic): not to be timed.
            print(f"[bench] a torch_compile run: {COMPILE_WARMUP} warm-up steps for every run (was {self.warmup})",
                  file=sys.stderr)
            self.warmup = COMPILE_WARMUP


COMPILE_WARMUP = 3


def parse_config(name: str) -> tuple[str, dict]:
    """("baseline" | "project", overrides) of a run named kind or "kind:field=value,…".

    Project overrides are TrainConfig parameters, baseline overrides SFTConfig fields (both validated here, before
    any model loads); values of both are read as YAML like the runner's `-p` values."""
    kind, _, spec = name.partition(":")
    if kind not in ("baseline", "project"):
        raise ValueError(f"bench config {name!r}: use baseline, project, or either with :field=value,…")
    items = [item.split("=", 1) for item in spec.split(",") if item]
    if any(len(item) != 2 for item in items):
        raise ValueError(f"bench config {name!r}: overrides are field=value, separated by commas")
    overrides = {key: read_yaml(value) for key, value in items}
    if kind == "project":
        overrides = TrainConfig.normalised(overrides)
        TrainConfig.from_params(**overrides)  # validates names and values
    else:
        from trl import SFTConfig

        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SFTConfig)})
        if unknown:
            raise ValueError(f"bench config {name!r}: {', '.join(unknown)} not a field of TRL's SFTConfig")
    return kind, overrides


def _run_once(name: str, args: BenchArgs, device: str, precision: str, records: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from .models import resolve_precision

    kind, overrides = parse_config(name)
    # A run that names its precision loads the model in it (TRL's bf16=false: fp32).
    if kind == "project":
        precision = resolve_precision(str(overrides.get("precision", precision)), device)
    elif overrides.get("bf16") is False and not overrides.get("fp16"):
        precision = "fp32"
    scratch = Path(args.scratch) if args.scratch else None
    model, tokenizer = load_bench_model(args.model, device, precision, args.tokenizer, args.quantization, scratch)
    n_params = model.num_parameters()  # a 4-bit layer's packed weight counts as its full size here
    total_steps = args.warmup + args.steps + (1 if args.profile else 0)
    timer = _step_timer(args.warmup, args.steps, device, args.profile)
    cfg = TrainConfig(base_model=args.model if args.model not in SHAPES else EMBEDDED_MODEL, max_steps=total_steps,
                      per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
                      lora_r=args.lora_r, lora_alpha=2 * args.lora_r, max_length=args.max_length, logging_steps=1,
                      save_steps=10**6, eval_steps=0, warmup_ratio=0.0, quantization=args.quantization)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "project":
            cfg = TrainConfig.from_params(**{**cfg.to_dict(), **overrides, "output_dir": str(Path(tmp) / "adapter")})
            setup = build_trainer(cfg, model=model, tokenizer=tokenizer, records=(records, []), extra_callbacks=[timer])
            trainer, fast = setup.trainer, setup.fast
        else:
            # Exactly TRL's defaults (and any overrides named) but for fp32 on a CPU without native bf16: same
            # LoRA, batch, steps and data.
            dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in records])
            on_cpu = {} if device == "cuda" else {"use_cpu": True, **({} if precision == "bf16" else {"bf16": False})}
            sft_args = SFTConfig(**{"output_dir": tmp, "max_steps": total_steps, "per_device_train_batch_size": args.batch,
                                    "gradient_accumulation_steps": args.accum, "logging_steps": 1, "save_strategy": "no",
                                    "report_to": "none", "max_length": args.max_length, **on_cpu, **overrides})
            trainer = _counting_baseline_class()(model=model, args=sft_args, train_dataset=dataset,
                                                 processing_class=tokenizer, peft_config=lora_config(cfg),
                                                 callbacks=[timer])
            setup = fast = None
        timer.trainer = trainer
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # stdout carries only the JSON lines: the trainers' own log lines go to stderr.
        with _PeakRSS() as rss, contextlib.redirect_stdout(sys.stderr):
            trainer.train()
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak
    seconds = timer.end_time - timer.start_time
    tokens = timer.end_tokens - timer.start_tokens
    result = {"config": name, "model": args.model, "device": device, "precision": precision,
              "tokens_per_s": round(tokens / seconds, 1), "tokens": tokens, "seconds": round(seconds, 2),
              "steps_timed": args.steps, "peak_memory_gib": round(peak / 2**30, 2), "parameters": n_params}
    result["fast_path"] = {"gradient_checkpointing": trainer.args.activation_checkpointing,
                           "checkpointed_layers": fast.checkpointed_layers if fast else None,  # None: all
                           "micro_batch": trainer.args.per_device_train_batch_size,
                           "accumulation_steps": trainer.args.gradient_accumulation_steps,
                           "padding_free": trainer.args.padding_free,
                           "shared_prefix": isinstance(trainer.data_collator, SharedPrefixCollator),
                           "liger_kernel": fast.liger_kernel if fast else False,
                           "fused_lora": fast.fused_lora if fast else False,
                           "cudnn_attention": fast.cudnn_attention if fast else None,  # baseline: torch's choice
                           "torch_compile": fast.torch_compile if fast else False,
                           "compile_memory_budget": fast.compile_memory_budget if fast else None,
                           "attn_implementation": trainer.model.config._attn_implementation,
                           "quantization": args.quantization}
    if timer.profile is not None:
        result["profile"] = timer.profile
    del trainer, model, setup
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def matmul_tflops(device: str) -> float | None:
    """Measured dense bf16 matmul rate of this GPU, the denominator of the 4·N limit."""
    if device != "cuda":
        return None
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 20
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * runs / (time.perf_counter() - start) / 1e12


def _run_isolated(name: str, args: BenchArgs, device: str, precision: str) -> dict:
    """`_run_once` in a fresh Python process (same interpreter and environment); its log goes to our stderr."""
    payload = json.dumps({"name": name, "args": dataclasses.asdict(args), "device": device, "precision": precision})
    code = "import sys; from ironman_nb.bench import run_one_main; sys.exit(run_one_main(sys.argv[1]))"
    process = subprocess.run([sys.executable, "-c", code, payload], stdout=subprocess.PIPE, text=True)
    results = [line[len(RESULT_MARK):] for line in process.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not results:
        raise RuntimeError(f"the {name!r} run exited with {process.returncode} (its log is above, on stderr)")
    return json.loads(results[-1])


RESULT_MARK = "BENCH_RESULT "


def run_records(args: BenchArgs) -> list[dict]:
    """The samples of every run: one step's more than the warm-up and timed steps take, so that with `profile`
    (which trains that one more step) the data, and so the length-grouped order, are the same as without."""
    return bench_records(args.batch * args.accum * (args.warmup + args.steps + 1))


def run_one_main(payload: str) -> int:
    """Entry point of an isolated run: one `_run_once`, its result on one marked stdout line."""
    spec = json.loads(payload)
    args = BenchArgs(**{**spec["args"], "configs": tuple(spec["args"]["configs"])})
    records = run_records(args)
    result = _run_once(spec["name"], args, spec["device"], spec["precision"], records)
    print(RESULT_MARK + json.dumps(result, ensure_ascii=False), flush=True)
    return 0


class BenchStopped(Exception):
    """SIGTERM or SIGINT during a run: that run ends, and the summary covers the runs that finished."""


def bench_train(args: BenchArgs, emit=print) -> dict:
    """Each of `args.configs` once per round, alternating; one JSON line per run, then a summary line."""
    from .models import resolve_device, resolve_precision

    device = resolve_device()
    precision = resolve_precision("auto", device)
    isolate = args.isolate == "on"
    records = run_records(args)
    runs: dict[str, list] = {name: [] for name in args.configs}
    stopped = []

    def stop(signum, frame):  # `timeout` ran out, or Ctrl-C: the summary of the runs that finished, then stop
        stopped.append(signum)
        raise BenchStopped(f"stopped by {signal.Signals(signum).name}")

    with tempfile.TemporaryDirectory(dir=args.scratch or None) as scratch, signals_handled(stop):
        run_args = dataclasses.replace(args, scratch=scratch)
        for round_index in range(args.rounds):
            for name in args.configs:
                try:
                    if isolate:
                        result = _run_isolated(name, run_args, device, precision)
                    else:
                        result = _run_once(name, run_args, device, precision, records)
                except Exception as err:  # one configuration failing must not lose the others' numbers
                    result = {"config": name, "model": args.model, "error": f"{type(err).__name__}: {err}"[:600]}
                    gc.collect()
                result.update(round=round_index, isolated=isolate)
                runs[name].append(result)
                emit(json.dumps(result, ensure_ascii=False))
                if stopped:
                    break
            if stopped:
                break
    ok = {name: [r for r in rs if "tokens_per_s" in r] for name, rs in runs.items()}
    parameters = next((r["parameters"] for rs in ok.values() for r in rs), None)
    summary = {"summary": "train", "model": args.model, "device": device, "quantization": args.quantization,
               "parameters": parameters}
    speed = {}
    for name, rs in ok.items():
        if rs:
            speed[name] = round(statistics.median(r["tokens_per_s"] for r in rs), 1)
            summary[f"{name}_tokens_per_s"] = speed[name]
            summary[f"{name}_tokens_per_s_range"] = [min(r["tokens_per_s"] for r in rs), max(r["tokens_per_s"] for r in rs)]
            summary[f"{name}_peak_memory_gib"] = max(r["peak_memory_gib"] for r in rs)
    if "baseline" in speed:
        for name in speed:
            if name != "baseline":
                key = "ratio" if name == "project" else f"{name}_ratio"
                summary[key] = round(speed[name] / speed["baseline"], 2)
                # Each round's runs ran back to back: their ratios show how far the machine's drift moves it.
                paired = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs[name], runs["baseline"])
                          if "tokens_per_s" in r and "tokens_per_s" in b]
                summary[f"{key}_per_round"] = [round(x, 2) for x in paired]
    peak = matmul_tflops(device) if not stopped else None
    if stopped:
        summary["stopped"] = signal.Signals(stopped[0]).name
    if peak and parameters:
        limit = peak * 1e12 / (4 * parameters)
        summary.update(matmul_tflops=round(peak, 1), limit_tokens_per_s=round(limit))
        for name, value in speed.items():
            summary[f"{name}_fraction_of_4N"] = round(value / limit, 3)
    emit(json.dumps(summary))
    return summary


def bench_generate(model_name: str = EMBEDDED_MODEL, prompts: int = 8, new_tokens: int = 64, batch: int = 8,
                   emit=print, tokenizer_name: str = EMBEDDED_MODEL) -> dict:
    """Notebook 05's generation path vs plain one-prompt-at-a-time `generate`: same prompts, same outputs."""
    from .compare import generate_token_ids
    from .io import read_jsonl
    from .models import resolve_device, resolve_precision, sdpa_without_cudnn

    device = resolve_device()
    model, tokenizer = load_bench_model(model_name, device, resolve_precision("auto", device), tokenizer_name)
    model.eval()
    texts = [r["prompt"] for r in read_jsonl(PROMPTS)][:prompts]
    generate_token_ids(model, tokenizer, texts[:1], DEFAULT_SYSTEM_PROMPT, 4, 1)  # warm-up
    timings, outputs = {}, {}
    # one_at_a_time: plain `generate`, one prompt per call. batched: notebook 05's path (batches + shared prefix;
    # on a GPU, attention off cuDNN's kernels). On a GPU also batched_cudnn: the same with torch's own choice.
    kinds = [("one_at_a_time", 1, False, False), ("batched", batch, True, device == "cuda")]
    if device == "cuda":
        kinds.append(("batched_cudnn", batch, True, False))
    for kind, size, share, avoid_cudnn in kinds * 2:
        start = time.perf_counter()
        with sdpa_without_cudnn(avoid_cudnn):
            outputs[kind] = generate_token_ids(model, tokenizer, texts, DEFAULT_SYSTEM_PROMPT, new_tokens, size,
                                               share_prefix=share)
        timings.setdefault(kind, []).append(time.perf_counter() - start)
    # Token ids as generated (a random-weight shape's ids beyond the tokenizer's vocabulary decode to nothing).
    result = {"summary": "generate", "model": model_name, "device": device, "prompts": len(texts),
              "max_new_tokens": new_tokens, "batch": batch,
              "same_outputs": outputs["batched"] == outputs["one_at_a_time"]}
    for kind, values in timings.items():
        new = sum(len(ids) + int(ended) for ids, ended in outputs[kind])
        result[f"{kind}_new_tokens"] = new
        result[f"{kind}_new_tokens_per_s"] = round(new / min(values), 1)
    result["ratio"] = round(min(timings["one_at_a_time"]) / min(timings["batched"]), 2)
    emit(json.dumps(result, ensure_ascii=False))
    return result


def bench_prepare(rows: int = 100_000, emit=print) -> dict:
    """Notebook 01 on a large sheet: the shipped rows repeated (each question made unique) to `rows`."""
    import csv

    from .config import PrepareConfig
    from .data import prepare

    source = read_sheet(str(DATA)).rows
    with tempfile.TemporaryDirectory() as tmp:
        sheet = Path(tmp) / "big.csv"
        with sheet.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["instruction", "input", "output", "category"])
            for i in range(rows):
                row = source[i % len(source)]
                writer.writerow([f"{row['instruction']} ({i})", row.get("input", ""), row["output"], row.get("category", "")])
        start = time.perf_counter()
        with _PeakRSS() as rss:
            result = prepare(PrepareConfig(input_path=str(sheet), output_dir=str(Path(tmp) / "out")))
        seconds = time.perf_counter() - start
    summary = {"summary": "prepare", "rows": rows, "rows_kept": result.report["rows_kept"], "seconds": round(seconds, 1),
               "rows_per_s": round(rows / seconds), "peak_rss_gib": round(rss.peak / 2**30, 2)}
    emit(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ironman_nb.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train_p = sub.add_parser("train", help="project training path vs TRL SFTConfig defaults")
    train_p.add_argument("--model", default=EMBEDDED_MODEL, help=f"Hub id, folder, embedded, or a shape: {', '.join(SHAPES)}")
    defaults = BenchArgs()
    for name in ("steps", "warmup", "batch", "accum", "rounds", "max-length", "lora-r"):
        train_p.add_argument(f"--{name}", type=int, default=getattr(defaults, name.replace("-", "_")))
    train_p.add_argument("--tokenizer", default=EMBEDDED_MODEL, help="tokenizer for a random-weight shape")
    train_p.add_argument("--configs", default="baseline;project",
                         help="runs per round, ';'-separated: baseline, project, or either with :field=value,… (ablations)")
    train_p.add_argument("--quantization", default="none", choices=("none", "4bit"))
    train_p.add_argument("--scratch", default="", help="folder for a 4-bit random shape's weights (default: temp)")
    train_p.add_argument("--isolate", default="on", choices=("on", "off"),
                         help="each run in a fresh process (default), or all in this one")
    train_p.add_argument("--profile", action="store_true",
                         help="profile one extra step per run: device busy share, kernel launches, top operators")
    gen_p = sub.add_parser("generate", help="batched generation vs one prompt at a time")
    gen_p.add_argument("--model", default=EMBEDDED_MODEL)
    gen_p.add_argument("--prompts", type=int, default=8)
    gen_p.add_argument("--new-tokens", type=int, default=64)
    gen_p.add_argument("--batch", type=int, default=8)
    gen_p.add_argument("--tokenizer", default=EMBEDDED_MODEL, help="tokenizer for a random-weight shape")
    prep_p = sub.add_parser("prepare", help="notebook 01 on a large generated sheet")
    prep_p.add_argument("--rows", type=int, default=100_000)
    ns = parser.parse_args(argv)
    # stdout carries only the JSON lines; anything else printed meanwhile (DeepSpeed's import-time warning,
    # the trainers' logs) goes to stderr.
    stdout = sys.stdout

    def emit(line: str) -> None:
        print(line, file=stdout, flush=True)

    with contextlib.redirect_stdout(sys.stderr):
        if ns.command == "prepare":
            bench_prepare(ns.rows, emit=emit)
        elif ns.command == "train":
            bench_train(BenchArgs(model=ns.model, steps=ns.steps, warmup=ns.warmup, batch=ns.batch, accum=ns.accum,
                                  rounds=ns.rounds, max_length=ns.max_length, lora_r=ns.lora_r,
                                  tokenizer=ns.tokenizer, configs=tuple(c for c in ns.configs.split(";") if c),
                                  quantization=ns.quantization, scratch=ns.scratch, isolate=ns.isolate,
                                  profile=ns.profile), emit=emit)
        else:
            bench_generate(ns.model, ns.prompts, ns.new_tokens, ns.batch, emit=emit, tokenizer_name=ns.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
