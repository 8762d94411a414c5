"""The six stages, called in order, on a GPU machine that has no papermill and cannot hold the embedded model.

A SmolLM2-135M-shaped model with random weights stands in for the base (the embedded GGUF is larger than what
travels to the lent GPU machine); it checks the GPU path end to end: bf16, the fast path chosen for CUDA,
resume-safe checkpoints, the bf16 merge tolerance, batched generation and the dry-run upload.

    python scripts/gpu_pipeline.py --tokenizer DIR --run-dir DIR
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="folder with the embedded model's tokenizer files")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--samples", type=int, default=256, help="training samples (a CPU smoke test uses a few)")
    parser.add_argument("--zero3", action="store_true", help="also train a few steps under deepspeed ZeRO-3 and merge")
    ns = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ironman_nb.compare import compare
    from ironman_nb.config import (CompareConfig, MergeConfig, PlotConfig, PrepareConfig, PushConfig, TrainConfig)
    from ironman_nb.data import prepare
    from ironman_nb.hub import push_to_hub
    from ironman_nb.merge import merge
    from ironman_nb.plots import plot_training
    from ironman_nb.train import train

    run = Path(ns.run_dir)
    base = run / "base"
    tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    timings = {}

    def stage(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"[gpu_pipeline] {name} done in {timings[name]} s", flush=True)
        return result

    stage("01_prepare_data", lambda: prepare(PrepareConfig(input_path=str(ROOT / "data" / "ironman_ko.csv"),
                                                            output_dir=str(run / "data"), base_model=str(base))))
    trained = stage("02_train_lora", lambda: train(TrainConfig(
        base_model=str(base), data_dir=str(run / "data"), output_dir=str(run / "adapter"), num_train_epochs=1,
        max_train_samples=ns.samples, max_eval_samples=min(32, ns.samples), learning_rate=5e-4, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, logging_steps=2, save_steps=8, eval_steps=8)))
    stage("03_plot_training", lambda: plot_training(PlotConfig(trainer_state=str(run / "adapter" / "trainer_state.json"),
                                                               output_dir=str(run / "plots"))))
    merged = stage("04_merge_lora", lambda: merge(MergeConfig(base_model=str(base), adapter_dir=str(run / "adapter"),
                                                              output_dir=str(run / "merged"))))
    compared = stage("05_compare", lambda: compare(CompareConfig(
        base_model=str(base), tuned_model=str(run / "merged"), prompts_path=str(ROOT / "data" / "eval_prompts.jsonl"),
        eval_data=str(run / "data" / "eval.jsonl"), output_dir=str(run / "compare"), max_new_tokens=64,
        max_eval_samples=min(32, ns.samples), max_prompts=0 if ns.samples >= 64 else 2)))
    stage("06_push_to_hub", lambda: push_to_hub(PushConfig(model_dir=str(run / "merged"))))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    # Printed before the ZeRO-3 part, so that a failure there keeps the six stages' results.
    print(json.dumps({"summary": "gpu_pipeline", "device": device, "seconds": timings, "train": trained.run_config["result"],
                      "resolved": {k: trained.run_config["resolved"][k] for k in (
                          "device", "precision", "gradient_checkpointing", "padding_free", "shared_prefix", "liger_kernel",
                          "fused_lora", "attn_implementation")},
                      "merge_checks": merged.checks,
                      "eval_nll": [compared.metrics["before"]["eval_nll"], compared.metrics["after"]["eval_nll"]]}), flush=True)
    if ns.zero3:
        # The same training under the deepspeed launcher with ZeRO-3 on this one GPU: the adapter must come out whole.
        zero3 = stage("02_train_lora (deepspeed ZeRO-3)", lambda: train(TrainConfig(
            base_model=str(base), data_dir=str(run / "data"), output_dir=str(run / "adapter_zero3"), max_steps=4,
            max_train_samples=64, max_eval_samples=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            learning_rate=5e-4, logging_steps=1, save_steps=100, eval_steps=0, launcher="deepspeed", num_processes=1,
            deepspeed_config=str(ROOT / "configs" / "ds_zero3.json"))))
        merged_zero3 = stage("04_merge_lora (ZeRO-3 adapter)", lambda: merge(MergeConfig(
            base_model=str(base), adapter_dir=str(run / "adapter_zero3"), output_dir=str(run / "merged_zero3"))))
        print(json.dumps({"summary": "gpu_pipeline_zero3", "device": device, "train": zero3.run_config["result"],
                          "merge_checks": merged_zero3.checks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
