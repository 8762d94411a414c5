import os
import sys

import pytest

from ironman_nb.config import EMBEDDED_MODEL
from ironman_nb.models import (
    FALLBACK_CHAT_TEMPLATE,
    SYSTEM_INTO_FIRST_USER,
    ModelNotFoundError,
    embedded_model_dir,
    end_of_turn_token,
    hub_id,
    load_model,
    load_tokenizer,
    resolve_model_path,
    resolve_precision,
    select_local_gpu,
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


GEMMA2_TEMPLATE = (  # google/gemma-2-2b-it's, verbatim: no system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
DROPS_SYSTEM_TEMPLATE = (  # renders without error, and without the system prompt
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

MISTRAL_V03_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.3's, without its tool-call branches: the system message
    # goes before the *last* user turn only, so a training sample (which ends with the answer) has none
    '{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}'
    '{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}'
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate') }}{%- endif %}"
    '{%- if message["role"] == "user" %}{%- if loop.last and system_message is defined %}'
    '{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}'
    '{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}'
    '{%- elif message["role"] == "assistant" %}{{- " " + message["content"] + eos_token}}'
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}{%- endfor %}"
)


@pytest.mark.parametrize("template", [GEMMA2_TEMPLATE, DROPS_SYSTEM_TEMPLATE, MISTRAL_V03_TEMPLATE],
                         ids=["raises", "drops", "only-before-the-last-user-turn"])
def test_chat_template_without_system_turn_gets_the_persona_at_the_start_of_the_first_user_turn(
        tmp_path, tokenizer, caplog, template):
    import copy

    from ironman_nb.data import chat_messages, tokenize_conversation

    assert SYSTEM_INTO_FIRST_USER not in tokenizer.chat_template  # a template with a system turn: left as it is
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = template
    bare.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    loaded = load_tokenizer(str(tmp_path / "model"))
    assert "no system turn" in caplog.text
    messages = chat_messages({"instruction": "슈트 상태는?", "input": "", "output": "완벽하지."}, "너는 토니 스타크야.")
    text = loaded.apply_chat_template(messages, tokenize=False)
    assert "너는 토니 스타크야.\n\n슈트 상태는?" in text and text.count("너는 토니 스타크야.") == 1
    sample = tokenize_conversation(loaded, messages)
    answer = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    assert loaded.decode(answer).lstrip().startswith("완벽하지.")  # Mistral puts a space before the answer
    # Saved with the adapter or the merged model, the template keeps the fold, and is not folded twice.
    loaded.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text('{"model_type": "llama"}')
    assert load_tokenizer(str(tmp_path / "saved")).chat_template == loaded.chat_template


def test_a_gated_model_says_to_accept_its_terms_and_give_a_token(monkeypatch):
    from transformers import AutoTokenizer

    def gated(path, **kwargs):  # transformers' message for a gated repo without access (utils/hub.py)
        raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                      f"https://huggingface.co/{path}.\n401 Client Error.")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", gated)
    with pytest.raises(ModelNotFoundError) as caught:
        load_tokenizer("meta-llama/Meta-Llama-3-8B-Instruct")
    assert str(caught.value).endswith(
        "OSError: You are trying to access a gated repo.\nThe model is gated: accept its terms at "
        "https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct with your Hub account, and give that account's "
        "token through the HF_TOKEN environment variable or `hf auth login`.")


def test_unknown_model_offline_gets_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"base_model 'no-such-org/no-such-model' is not a local model folder(.|\n)*embedded"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="only embedded model"):
        resolve_model_path("embedded:other")


def test_model_folder_without_tokenizer_files_gets_one_clear_message(tmp_path, tiny_model_dir, tokenizer):
    """Not an empty tokenizer (transformers builds one for a Qwen2 folder, silently) nor "not a local model folder"."""
    import shutil

    from transformers import Qwen2Config

    llama = tmp_path / "llama"
    llama.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, llama / name)
    qwen2 = tmp_path / "qwen2"
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(qwen2)
    for folder in (llama, qwen2):
        with pytest.raises(ModelNotFoundError, match=rf"the folder {folder} has no tokenizer files(.|\n)*Copy the tokenizer"):
            load_tokenizer(str(folder))
    # Tokenizer files that do not load (here a broken sentencepiece file) are named, with transformers' reason.
    (llama / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelNotFoundError, match=rf"the tokenizer files in {llama} \(tokenizer.model\) could not be loaded: \w+"):
        load_tokenizer(str(llama))
    assert load_tokenizer(str(tiny_model_dir))("토니 스타크", add_special_tokens=False)["input_ids"]


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_precision_follows_the_device(monkeypatch):
    import ironman_nb.models as models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "mps") == "fp32"
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_gpus_without_native_bf16_train_in_fp16(monkeypatch, capability, expected):
    """torch says bf16 is supported on any CUDA card unless asked without emulation: a T4 (7.5) would emulate it."""
    import torch

    def is_bf16_supported(including_emulation=True):
        return including_emulation or capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", "cuda") == expected


@pytest.mark.parametrize("capability, precision, expected", [
    ((9, 0), "bf16", "flash_attention_2"), ((8, 0), "fp16", "flash_attention_2"),
    ((7, 5), "fp16", "sdpa"),  # a T4: flash-attn 2 runs on Ampere and newer only
    ((9, 0), "fp32", "sdpa"),  # flash-attn has no fp32 kernels
])
def test_flash_attention_only_where_its_kernels_run(monkeypatch, capability, precision, expected):
    import importlib.util

    import torch

    from ironman_nb.models import attention_implementation

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert attention_implementation("cuda", precision, "qwen2") == expected


def test_attention_implementation_follows_device_precision_and_model_type():
    from ironman_nb.models import attention_implementation

    assert attention_implementation("cpu", "bf16", "llama") == "grouped_matmul"
    assert attention_implementation("cpu", "bf16", "qwen2") == "grouped_matmul"
    assert attention_implementation("cpu", "fp32", "llama") == "sdpa"  # the flash kernel was as fast in fp32
    assert attention_implementation("cpu", "bf16", "gemma2") == "sdpa"  # soft-capping: not plain attention
    assert attention_implementation("cpu", "bf16", None) == "sdpa"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grouped_matmul_attention_matches_sdpa(tiny_model_dir, tokenizer, precision):
    """Padded rows, packed rows (position_ids: each sample attends only to itself), a KV-cache continuation and
    batched left-padded generation give sdpa's logits, gradients and tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from ironman_nb.models import register_grouped_matmul_attention

    register_grouped_matmul_attention()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    tol = {"fp32": dict(atol=1e-5, rtol=1e-4), "bf16": dict(atol=0.15, rtol=0.05)}[precision]
    models = {name: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=name)
              for name in ("sdpa", "grouped_matmul")}
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    lengths = [5, 7]  # two samples packed in one row
    packed = {"input_ids": ids[:1, :12], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    cases = {"padded": {"input_ids": ids, "attention_mask": mask}, "packed": packed}
    for name, inputs in cases.items():
        logits = {}
        for attn, model in models.items():
            model.zero_grad()
            out = model(**inputs, use_cache=False).logits
            out.float().square().mean().backward()
            logits[attn] = (out.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float())
        assert torch.allclose(*[v[0] for v in logits.values()], **tol), name
        assert torch.allclose(*[v[1] for v in logits.values()], atol=tol["atol"] * 0.1, rtol=tol["rtol"] * 10), name
    alone = models["grouped_matmul"](input_ids=ids[:1, 5:12], use_cache=False).logits.float()
    assert torch.allclose(logits["grouped_matmul"][0][0, 5:12], alone[0], **tol)  # the second sample saw only itself
    with torch.no_grad():
        for model in models.values():
            model.eval()
        prefix = {attn: m(input_ids=ids[:, :6], use_cache=True) for attn, m in models.items()}
        rest = {attn: m(input_ids=ids[:, 6:], past_key_values=prefix[attn].past_key_values).logits.float()
                for attn, m in models.items()}
        assert torch.allclose(rest["sdpa"], rest["grouped_matmul"], **tol)
        tokenizer.padding_side = "left"
        prompts = tokenizer(["안녕", "토니 스타크, 오늘 기분 어때?"], return_tensors="pt", padding=True)
        tokenizer.padding_side = "right"
        if precision == "fp32":  # greedy tokens: exact only where logits are
            outputs = [m.generate(**prompts, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                       for m in models.values()]
            assert torch.equal(*outputs)


def test_few_row_linear_computes_weight_times_input_for_decoding_rows_only():
    """Inside the context a linear layer gives F.linear's output for any row count, computing W·xᵀ for 2–64 rows
    (a decoding step) and x·Wᵀ otherwise; a module with its own forward is left alone; on leaving, every layer
    has its class's forward again."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from ironman_nb.models import few_row_linear

    class WeightAsFirstOperand(TorchDispatchMode):
        """Records, per matrix product, whether the weight (by storage) was its first operand."""

        def __init__(self, weight):
            super().__init__()
            self.weight, self.first = weight, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                first = args[1] if func is torch.ops.aten.addmm.default else args[0]
                self.first.append(first.untyped_storage().data_ptr() == self.weight.untyped_storage().data_ptr())
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False), torch.nn.Linear(8, 4))
    own_forward = model[2].forward = lambda x: x[..., :4]  # as accelerate's hooks replace a module's forward
    with few_row_linear(model):
        for shape in [(1, 1, 16), (8, 16), (2, 4, 16), (65, 16), (3, 40, 16)]:
            x = torch.randn(shape)
            with WeightAsFirstOperand(model[0].weight) as seen:
                hidden = model[0](x)
            assert seen.first == [2 <= x.numel() // 16 <= 64], shape
            assert torch.allclose(hidden, F.linear(x, model[0].weight, model[0].bias), atol=1e-6), shape
            assert torch.allclose(model[1](hidden), F.linear(hidden, model[1].weight), atol=1e-6), shape
        assert model[2].forward is own_forward
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    assert model[2].forward is own_forward
    with WeightAsFirstOperand(model[0].weight) as seen:
        model[0](torch.randn(8, 16))
    assert seen.first == [False]


KEEP_FREED_PROBE = """
import resource, sys, torch
from ironman_nb.models import keep_freed_memory

def faults_of_a_fresh_block():
    torch.ones(16 * 2**20).sum()  # 64 MB: above glibc's largest adaptive mmap threshold (32 MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# The fewest of a few tries: a freed block is sometimes not the one the next allocation reuses (small
# allocations of other threads land beside it), so one try inside the context faulted now and then under load.
outside = min(faults_of_a_fresh_block() for _ in range(4))
with keep_freed_memory():
    inside = min(faults_of_a_fresh_block() for _ in range(4))
print(outside, inside)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
@pytest.mark.parametrize("environment", [{}, {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_keep_freed_memory_reuses_freed_blocks_unless_the_environment_sets_malloc(environment):
    """A 64 MB block freed and allocated again page-faults on every 4 KiB page by default (glibc maps it afresh);
    inside the context the freed block is reused without faulting. Where the environment sets glibc's malloc
    parameters, the context leaves them be. Each case in its own process: the setting lasts for the process."""
    import subprocess

    env = {**os.environ, **environment}
    env.pop("GLIBC_TUNABLES", None)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if name not in environment:
            env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE], env=env, capture_output=True, text=True,
                            check=True)
    outside, inside = map(int, result.stdout.split())
    pages = 64 * 2**20 // 4096
    assert outside > pages // 2
    if environment:
        assert inside > pages // 2
    else:
        assert inside < pages // 20


@pytest.mark.parametrize("local_rank, cuda, selected", [("1", True, [1]), (None, True, []), ("1", False, [])])
def test_a_launched_process_trains_on_its_own_gpu(monkeypatch, local_rank, cuda, selected):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    select_local_gpu()
    assert chosen == selected


def test_a_4bit_model_loads_onto_the_current_gpu(monkeypatch, tiny_model_dir):
    """Not GPU 0 in every process: a 4-bit model is not moved afterwards (the trainer leaves quantized models
    where they are)."""
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    asked = {}

    def from_pretrained(path, **kwargs):
        asked.update(kwargs)
        return "model"

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert load_model(str(tiny_model_dir), "bf16", "cuda", "4bit") == "model"
    assert asked["device_map"] == {"": 3}


def test_generation_stops_where_the_template_and_the_models_own_config_say(tokenizer):
    from transformers import GenerationConfig

    from ironman_nb.models import stop_token_ids

    assert stop_token_ids(tokenizer) == [2]  # <|im_end|>: end of turn and EOS
    qwen2_like = GenerationConfig(eos_token_id=[2, 0])  # <|im_end|>, <|endoftext|>
    assert stop_token_ids(tokenizer, qwen2_like) == [2, 0]
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=0)) == [2, 0]
