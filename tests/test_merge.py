import json
from pathlib import Path

import pytest

from conftest import write_chat_data
from ironman_nb.config import DEFAULT_SYSTEM_PROMPT, MergeConfig, TrainConfig
from ironman_nb.data import chat_messages
from ironman_nb.merge import LOGIT_TOLERANCE, MergeError, merge, persona_chat_template, probe_tolerance
from ironman_nb.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("trained")
    data = write_chat_data(root / "data")
    train(TrainConfig(base_model=str(tiny_model_dir), data_dir=str(data), output_dir=str(root / "adapter"),
                      max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      learning_rate=5e-3, logging_steps=1, save_steps=10, eval_steps=0, max_length=512))
    return root


def test_merged_model_loads_without_peft_and_matches_the_adapter(trained, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(trained / "adapter"), output_dir=str(tmp_path / "merged")))
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "generation_config.json").is_file()
    assert not any(p.name.startswith("adapter") for p in merged_dir.iterdir())
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert model.generation_config.eos_token_id in (2, [2]) or 2 in model.generation_config.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    assert "max |Δ logit|" in result.summary().index[3]
    info = json.loads((merged_dir / "ironman_nb.json").read_text(encoding="utf-8"))
    assert info["system_prompt"] == DEFAULT_SYSTEM_PROMPT

    # Template round trip: training path vs the saved tokenizer without a system message.
    conversation = chat_messages({"instruction": "슈트 몇 벌이야?", "input": "", "output": "셀 수 없을 만큼."}, DEFAULT_SYSTEM_PROMPT)
    from ironman_nb.models import load_tokenizer

    training_text = load_tokenizer(str(trained / "adapter")).apply_chat_template(conversation, tokenize=False)
    assert tokenizer.apply_chat_template(conversation[1:], tokenize=False) == training_text
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == training_text
    prompt = tokenizer.apply_chat_template(conversation[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT)


def test_corrupted_adapter_is_refused_and_earlier_merge_kept(trained, tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("earlier good merge")
    broken = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", broken)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match=r"adapter tensor\(s\) hold NaN or inf"):
        merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(broken), output_dir=str(out)))
    assert (out / "model.safetensors").read_text() == "earlier good merge"


def _earlier_merge(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("earlier good merge")
    return out


def _left_behind(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_short_disk_stops_before_writing_and_keeps_the_earlier_merge(trained, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    out = _earlier_merge(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=2**10))
    with pytest.raises(MergeError, match=r"the merged model needs about \d+\.\d MB .* which has 1\.0 KB free\. "
                                         r"Free some space .* Nothing was written"):
        merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(trained / "adapter"), output_dir=str(out)))
    assert (out / "model.safetensors").read_text() == "earlier good merge"
    assert _left_behind(out) == []


def test_disk_filling_up_while_saving_is_named_and_the_earlier_merge_kept(trained, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    from transformers import PreTrainedModel

    out = _earlier_merge(tmp_path)

    def save_until_full(self, folder, **kwargs):
        (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"half a model")
        # What safetensors raises on ENOSPC: its own error type, with the OS message only.
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_until_full)
    with pytest.raises(MergeError, match="the disk filled up while the merged model was saved .*earlier merged "
                                         "folder is kept"):
        merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(trained / "adapter"), output_dir=str(out)))
    assert (out / "model.safetensors").read_text() == "earlier good merge"
    assert _left_behind(out) == []


def test_a_finished_merge_leaves_no_model_in_memory(trained, tiny_model_dir, tmp_path, model_release_watch):
    import ironman_nb.merge as merge_module

    model_release_watch.watch(merge_module)
    merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(trained / "adapter"), output_dir=str(tmp_path / "m")))
    assert len(model_release_watch.loaded) == 1 and model_release_watch.alive == [0]


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    with pytest.raises(MergeError, match=r"the adapter was trained on .*but base_model is 'Qwen/Qwen2-7B-Instruct'"):
        merge(MergeConfig(base_model="Qwen/Qwen2-7B-Instruct", adapter_dir=str(trained / "adapter"), output_dir=str(tmp_path / "m")))


def test_failed_run_is_refused(trained, tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained / "adapter", run / "adapter")
    (run / "status.json").write_text(json.dumps({"stages": {"02_train_lora": {"status": "failed", "error": "NaN"}}}))
    with pytest.raises(MergeError, match="refusing to merge: stage 02_train_lora failed"):
        merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(run / "adapter"), output_dir=str(run / "merged")))


def test_persona_template_adds_the_default_system_message(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = persona_chat_template(tok.chat_template, '따옴표 "와 줄바꿈\n도 안전')
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith('<|im_start|>system\n따옴표 "와 줄바꿈\n도 안전<|im_end|>')
    own = tok.apply_chat_template([{"role": "system", "content": "다른 시스템"}, {"role": "user", "content": "hi"}], tokenize=False)
    assert own.startswith("<|im_start|>system\n다른 시스템<|im_end|>") and "따옴표" not in own


@pytest.mark.parametrize("head_scale", [20, 60])
def test_a_correct_bf16_merge_passes_the_probe_and_a_wrong_one_fails(head_scale):
    """In bf16 (a GPU's merge) rounding grows with the logits: a correct merge of a Qwen2-shaped model whose logits
    reach 26 or 78 differs from base+adapter by more than a fixed 0.25, but within the tolerance that grows with
    them; the adapter merged twice does not pass."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                  tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        base.lm_head.weight.mul_(head_scale)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    model.eval()
    ids = torch.randint(0, 4096, (1, 40))
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits.float()
        deltas = {name: module.get_delta_weight("default") for name, module in model.named_modules()
                  if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")}
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits.float()
        difference = float((merged_logits - adapter_logits).abs().max())
        assert LOGIT_TOLERANCE["bf16"] < difference <= probe_tolerance(adapter_logits, "bf16")
        for name, delta in deltas.items():  # merged twice
            merged.get_submodule(name.replace("base_model.model.", "", 1)).weight += delta
        twice = float((merged(input_ids=ids).logits.float() - adapter_logits).abs().max())
    assert twice > probe_tolerance(adapter_logits, "bf16")


def test_a_weight_beyond_fp16s_range_stops_an_fp16_merge(trained, tiny_model_dir, tmp_path, monkeypatch):
    """The checks ran in the compute precision, before the cast to the saved dtype, where 1e5 becomes inf."""
    import torch

    import ironman_nb.merge as merge_module

    load = merge_module.load_model

    def large_weight(*args, **kwargs):
        model = load(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e5  # fine in fp32 and bf16
        return model

    monkeypatch.setattr(merge_module, "load_model", large_weight)
    with pytest.raises(MergeError, match=r"not finite in fp16 \(first: .*down_proj.*save with dtype='bf16' or 'fp32'"):
        merge(MergeConfig(base_model=str(tiny_model_dir), adapter_dir=str(trained / "adapter"),
                          output_dir=str(tmp_path / "merged"), dtype="fp16"))
    assert not (tmp_path / "merged").exists()


def test_an_adapter_of_another_tool_is_saved_in_the_bases_dtype_or_named_for_what_it_is(tmp_path, tiny_model_dir):
    """Without run_config.json (LLaMA-Factory, PEFT's own save) `auto` took the compute precision: fp32 on a CPU,
    a 7B at twice its bf16 size. A pickled adapter_model.bin was reported as no adapter at all."""
    import shutil

    from ironman_nb.merge import base_dtype, check_adapter_finite

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert base_dtype(str(base), "fp32") == "bf16"
    (base / "config.json").write_text(json.dumps(config))  # no dtype named: the default
    assert base_dtype(str(base), "fp32") == "fp32"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(MergeError, match="holds adapter_model.bin .*save it again as safetensors"):
        check_adapter_finite(adapter)
