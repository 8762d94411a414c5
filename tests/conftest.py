"""Shared fixtures: the embedded tokenizer and tiny models built from a config (no downloads)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest

from ironman_nb.config import EMBEDDED_MODEL

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer():
    from ironman_nb.models import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama with the embedded model's tokenizer and chat template, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_chat_data(folder: Path, train_rows: int = 12, eval_rows: int = 4) -> Path:
    """A small prepared-data folder as notebook 01 writes it."""
    from ironman_nb.config import DEFAULT_SYSTEM_PROMPT
    from ironman_nb.data import chat_messages

    folder.mkdir(parents=True, exist_ok=True)
    answers = ["내가 토니 스타크야. 슈트는 오늘도 완벽해.", "자비스, 이 친구한테 설명 좀 해줘. 농담이야, 내가 하지.",
               "아크 원자로 얘기라면 밤새 할 수 있어.", "회의는 짧게, 결정은 빠르게. 그게 스타크 방식이야."]

    def records(n, offset):
        for i in range(n):
            row = {"instruction": f"질문 {i + offset}: 오늘 기분 어때?", "input": "", "output": answers[i % len(answers)]}
            yield {"messages": chat_messages(row, DEFAULT_SYSTEM_PROMPT), "category": "identity", "row": i + offset}

    for name, n, offset in (("train.jsonl", train_rows, 0), ("eval.jsonl", eval_rows, 100)):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(n, offset)), encoding="utf-8")
    return folder


@pytest.fixture
def model_release_watch(monkeypatch):
    """Watches a stage's models: `watch(module)` wraps the module's load_model; `alive` gets, each time the stage
    releases GPU memory, how many of the models it loaded are still reachable then (after a garbage collection)."""
    import gc
    import types
    import weakref

    import ironman_nb.models as models

    loaded, alive = [], []

    def release():
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))

    def watch(module):
        real = module.load_model

        def load_model(*args, **kwargs):
            model = real(*args, **kwargs)
            loaded.append(weakref.ref(model))
            return model

        monkeypatch.setattr(module, "load_model", load_model)
        if hasattr(module, "release_gpu_memory"):
            monkeypatch.setattr(module, "release_gpu_memory", release)

    monkeypatch.setattr(models, "release_gpu_memory", release)
    return types.SimpleNamespace(watch=watch, loaded=loaded, alive=alive)
