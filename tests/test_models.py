import pytest

from ironman_nb.config import EMBEDDED_MODEL
from ironman_nb.models import (
    FALLBACK_CHAT_TEMPLATE,
    ModelNotFoundError,
    embedded_model_dir,
    end_of_turn_token,
    hub_id,
    load_tokenizer,
    resolve_model_path,
    resolve_precision,
)


def test_embedded_model_is_a_standard_folder_that_loads_without_gguf():
    import torch
    from transformers import AutoModelForCausalLM

    folder = embedded_model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert torch.isfinite(model.model.embed_tokens.weight).all()
    assert model.generation_config.eos_token_id == 2  # <|im_end|>
    assert resolve_model_path(EMBEDDED_MODEL) == str(folder)
    assert hub_id(EMBEDDED_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_embedded_chat_template_and_end_of_turn(tokenizer):
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_llama3_style_template_ends_turns_with_eot(tokenizer):
    import copy

    llama = copy.deepcopy(tokenizer)
    llama.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    assert end_of_turn_token(llama) == "<|eot_id|>"


def test_tokenizer_without_template_gets_the_documented_fallback(tmp_path, tokenizer, caplog):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == FALLBACK_CHAT_TEMPLATE
    assert "no chat template" in caplog.text
    text = loaded.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert "### User:\nq" in text and f"a{loaded.eos_token}" in text
    assert end_of_turn_token(loaded) == loaded.eos_token


def test_unknown_model_offline_gets_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"base_model 'no-such-org/no-such-model' is not a local model folder(.|\n)*embedded"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="only embedded model"):
        resolve_model_path("embedded:other")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_precision_follows_the_device():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "mps") == "fp32"
