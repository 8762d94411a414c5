"""The benchmarks run and count honestly (their speed numbers are reported, not asserted)."""
import json

from ironman_nb.bench import BenchArgs, bench_generate, bench_records, bench_train


def test_bench_records_are_the_shipped_persona_rows():
    records = bench_records(700)
    assert len(records) == 700
    assert records[0]["messages"][0]["role"] == "system" and records[0]["messages"][-1]["role"] == "assistant"


def test_train_benchmark_alternates_baseline_and_project(tiny_model_dir, capsys):
    """The command line with its default configs; each run in its own process (as on a GPU)."""
    from ironman_nb.bench import main

    assert main(["train", "--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1", "--batch", "2",
                 "--accum", "1", "--rounds", "1", "--max-length", "512", "--isolate", "on"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith('{"') for line in lines)  # only the JSON lines
    summary = json.loads(lines[-1])
    runs = [json.loads(line) for line in lines[:-1]]
    assert [(r["config"], r["isolated"]) for r in runs] == [("baseline", True), ("project", True)]
    assert runs[0]["fast_path"]["gradient_checkpointing"] is True  # TRL's default, kept in the baseline
    assert runs[1]["fast_path"]["shared_prefix"] is True
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in runs)
    # Both count real tokens of the same number of samples (2 timed steps x 2 samples), padding excluded.
    assert 0.8 < runs[0]["tokens"] / runs[1]["tokens"] < 1.25
    assert summary["ratio"] == round(summary["project_tokens_per_s"] / summary["baseline_tokens_per_s"], 2)
    assert summary["ratio_per_round"] == [round(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], 2)]


def test_generate_benchmark_checks_outputs_match(tiny_model_dir):
    lines = []
    result = bench_generate(str(tiny_model_dir), prompts=3, new_tokens=4, batch=3, emit=lines.append)
    assert result["same_outputs"] is True and result["ratio"] > 0
    assert json.loads(lines[-1])["summary"] == "generate"


def test_train_benchmark_runs_ablations_and_a_4bit_random_shape(monkeypatch, tmp_path):
    """`--configs` ablations of both paths with `--quantization 4bit` on a random shape: written once, loaded in NF4."""
    import pytest

    from ironman_nb import bench
    from ironman_nb.config import ConfigError

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=2048, rope_theta=1e4,
        tie_word_embeddings=False, rms_norm_eps=1e-5))
    lines = []
    configs = ("project", "project:gradient_checkpointing=off", "baseline:gradient_checkpointing=false")
    summary = bench_train(BenchArgs(model="tiny", steps=1, warmup=1, batch=2, accum=1, rounds=1, max_length=512,
                                    configs=configs, quantization="4bit", scratch=str(tmp_path), isolate="off"),
                          emit=lines.append)
    runs = [json.loads(line) for line in lines[:-1]]
    assert [r["config"] for r in runs] == list(configs)
    # The 4-bit profile checkpoints (on a CPU with the shared prefix); the overrides turn that off, in either path.
    assert [(r["fast_path"]["gradient_checkpointing"], r["fast_path"]["shared_prefix"]) for r in runs] == [
        (True, True), (False, True), (False, False)]
    assert all(r["fast_path"]["quantization"] == "4bit" and r["tokens"] > 0 for r in runs)
    assert "ratio" not in summary and summary["project:gradient_checkpointing=off_tokens_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the random weights lived in a temporary folder inside scratch
    with pytest.raises(ConfigError, match="no_such_field"):
        BenchArgs(configs=("project:no_such_field=1",))
    with pytest.raises(ValueError, match="field=value"):
        BenchArgs(configs=("baseline:gradient_checkpointing",))


def test_train_benchmark_precision_follows_trl_defaults_and_overrides(monkeypatch, tiny_model_dir, capsys):
    """On a CPU with native bf16 the baseline is TRL's default bf16 (with sdpa); `bf16=false` and the project's
    `precision=fp32` load and train in fp32; the project's bf16 run uses the grouped-matmul attention. Runs in
    this process print nothing to stdout (the trainers' log lines go to stderr)."""
    from ironman_nb import models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    lines = []
    configs = ("baseline", "baseline:bf16=false", "project", "project:precision=fp32")
    bench_train(BenchArgs(model=str(tiny_model_dir), steps=1, warmup=1, batch=2, accum=1, rounds=1, max_length=512,
                          configs=configs, isolate="off"), emit=lines.append)
    assert capsys.readouterr().out == ""
    runs = [json.loads(line) for line in lines[:-1]]
    assert [(r["config"], r["precision"], r["fast_path"]["attn_implementation"]) for r in runs] == [
        ("baseline", "bf16", "sdpa"), ("baseline:bf16=false", "fp32", "sdpa"),
        ("project", "bf16", "grouped_matmul"), ("project:precision=fp32", "fp32", "sdpa")]


def test_profile_adds_an_untimed_step_and_its_summary(tiny_model_dir):
    """`profile`: one more optimizer step after the timed ones, under torch.profiler, summarised in the run's line;
    the timed steps and their tokens are those of a run without it."""
    runs = {}
    for profile in (False, True):
        lines = []
        bench_train(BenchArgs(model=str(tiny_model_dir), steps=1, warmup=1, batch=2, accum=1, rounds=1, max_length=512,
                              configs=("project",), isolate="off", profile=profile), emit=lines.append)
        runs[profile] = json.loads(lines[0])
    assert "profile" not in runs[False]
    summary = runs[True]["profile"]
    assert summary["wall_s"] > 0
    assert any(name in ("aten::mm", "aten::addmm") and ms > 0 for name, ms, _ in summary["top_ms"])
    assert runs[True]["tokens"] == runs[False]["tokens"]  # the same samples timed; the profiled step is extra


def test_gpu_profile_summary_also_ranks_the_cpu_time(capsys):
    """On a GPU the summary ranks operators by their kernels' time and, since such a step waits on the CPU, also
    by the CPU time each took itself (`top_cpu_ms`, and a second table on stderr)."""
    import torch
    from torch.profiler import profile

    from ironman_nb.bench import summarise_profile

    # The operands exist before profiling so that the only operator of any weight is the matmul (filling them
    # inside the profile once took longer than a small matmul on a busy machine).
    left, right = torch.ones(512, 512), torch.ones(512, 512)
    with profile() as profiler:
        left @ right
    summary = summarise_profile(profiler, 1.0, "cuda")
    assert summary["kernel_s"] == 0 and summary["top_cpu_ms"][0][0] == "aten::mm"
    assert capsys.readouterr().err.count("Self CPU time total") == 2


def test_command_line_prints_only_json_lines_on_stdout(monkeypatch, capsys):
    """What a run prints besides its results (DeepSpeed's import warning, trainer logs) goes to stderr, so
    `python -m ironman_nb.bench train > results.jsonl` stays parseable."""
    from ironman_nb import bench

    def noisy_bench_generate(*args, emit=print, **kwargs):
        print("[WARNING] Setting accelerator to CPU.")
        emit(json.dumps({"summary": "generate", "ratio": 5.0}))

    monkeypatch.setattr(bench, "bench_generate", noisy_bench_generate)
    assert bench.main(["generate"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [{"summary": "generate", "ratio": 5.0}]
    assert "Setting accelerator" in captured.err


def test_generate_benchmark_counts_token_ids_beyond_the_tokenizers_vocabulary(monkeypatch):
    """A random 7B shape's vocabulary is larger than the tokenizer it borrows: ids past the tokenizer decode to
    nothing, so counting the decoded text counted fewer tokens than were generated."""
    from ironman_nb import bench

    monkeypatch.setitem(bench.SHAPES, "tiny-wide", dict(
        model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=152064, max_position_embeddings=2048, rope_theta=1e4,
        tie_word_embeddings=False, rms_norm_eps=1e-6))
    result = bench_generate("tiny-wide", prompts=2, new_tokens=8, batch=2, emit=lambda line: None)
    assert result["same_outputs"] is True
    # Random weights rarely pick a stop token: nearly all of the 2 x 8 new tokens are counted.
    assert result["batched_new_tokens"] == result["one_at_a_time_new_tokens"] >= 14


def test_bench_options_are_checked_before_any_model_loads():
    import pytest

    with pytest.raises(ValueError, match="steps: at least 1"):
        BenchArgs(steps=0)
    with pytest.raises(ValueError, match="warmup: at least 1"):
        BenchArgs(warmup=0)
    with pytest.raises(ValueError, match="gradient_checkpoint not a field of TRL's SFTConfig"):
        BenchArgs(configs=("baseline:gradient_checkpoint=false",))
    assert BenchArgs(configs=("project", "project:torch_compile=true"), warmup=1).warmup == 3  # compiling untimed


def test_baseline_overrides_replace_the_benchmarks_own_settings(tiny_model_dir):
    lines = []
    bench_train(BenchArgs(model=str(tiny_model_dir), steps=1, warmup=1, batch=2, accum=1, rounds=1, max_length=512,
                          configs=("baseline:per_device_train_batch_size=1,gradient_accumulation_steps=2",),
                          isolate="off"), emit=lines.append)
    run = json.loads(lines[0])
    assert "error" not in run, run
    assert (run["fast_path"]["micro_batch"], run["fast_path"]["accumulation_steps"]) == (1, 2)


def test_a_stopped_train_benchmark_still_prints_the_summary_of_the_finished_runs(monkeypatch):
    """`timeout` in gpu_check.sh sends SIGTERM: the runs done so far keep their summary line."""
    import os
    import signal

    from ironman_nb import bench

    def fake_run(name, args, device, precision, records):
        if name == "project":
            os.kill(os.getpid(), signal.SIGTERM)
        return {"config": name, "tokens_per_s": 100.0, "peak_memory_gib": 1.0, "parameters": 10}

    monkeypatch.setattr(bench, "_run_once", fake_run)
    lines = []
    summary = bench_train(BenchArgs(configs=("baseline", "project", "project:lora_r=4"), rounds=2, isolate="off"),
                          emit=lines.append)
    runs = [json.loads(line) for line in lines[:-1]]
    assert [r["config"] for r in runs] == ["baseline", "project"]
    assert runs[1]["error"] == "BenchStopped: stopped by SIGTERM"
    assert summary["stopped"] == "SIGTERM" and summary["baseline_tokens_per_s"] == 100.0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back
