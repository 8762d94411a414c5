"""The benchmarks run and count honestly (their speed numbers are reported, not asserted)."""
import json

from ironman_nb.bench import BenchArgs, bench_generate, bench_records, bench_train


def test_bench_records_are_the_shipped_persona_rows():
    records = bench_records(700)
    assert len(records) == 700
    assert records[0]["messages"][0]["role"] == "system" and records[0]["messages"][-1]["role"] == "assistant"


def test_train_benchmark_alternates_baseline_and_project(tiny_model_dir):
    lines = []
    summary = bench_train(BenchArgs(model=str(tiny_model_dir), steps=2, warmup=1, batch=2, rounds=1, max_length=512),
                          emit=lines.append)
    runs = [json.loads(line) for line in lines[:-1]]
    assert [r["config"] for r in runs] == ["baseline", "project"]
    assert runs[0]["fast_path"]["gradient_checkpointing"] is True  # TRL's default, kept in the baseline
    assert runs[1]["fast_path"]["shared_prefix"] is True
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in runs)
    # Both count real tokens of the same number of samples (2 timed steps x 2 samples), padding excluded.
    assert 0.8 < runs[0]["tokens"] / runs[1]["tokens"] < 1.25
    assert summary["ratio"] == round(summary["project_tokens_per_s"] / summary["baseline_tokens_per_s"], 2)


def test_generate_benchmark_checks_outputs_match(tiny_model_dir):
    lines = []
    result = bench_generate(str(tiny_model_dir), prompts=3, new_tokens=4, batch=3, emit=lines.append)
    assert result["same_outputs"] is True and result["ratio"] > 0
    assert json.loads(lines[-1])["summary"] == "generate"
